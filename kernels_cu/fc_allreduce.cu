// flashcomm: fused Flash All-Reduce kernels (entry points only).
//
// Compile-time parameters (one module per combination, see flashcomm_cupy/_kernels.py):
//   FC_DT       element type: 0 float16, 1 bfloat16, 2 float32
//   FC_RS_BITS  reduce-scatter codec: 0 lossless, 4, 6, 8
//   FC_AG_BITS  all-gather codec:     0 lossless, 4, 6, 8 (0 iff FC_RS_BITS is 0)
// Runtime: group size, rotation, symmetric scaling, rank, world size.
// LL entry points (data-as-signal, see fc_ll.cuh): fc_ll_oneshot and
// fc_ll_twoshot in the lossless modules, fc_llq_oneshot and fc_llq_twoshot in
// the quantized ones.
// Profiling only (wrong results, benchmarks/kernel_variants.py): FC_PROFILE_NO_WAIT
// skips every wait for peers, FC_PROFILE_LOCAL_DATA keeps payload stores local.
//
// Work split: a tile is blockDim.x * FC_ELEMS * units elements; thread t owns units
// t, t + blockDim.x, ... (each unit-round is coalesced across the block).
// Global memory moves warp-transposed through a per-warp shared-memory stage
// (fc_warp_gather / fc_warp_scatter in fc_common.cuh): every warp instruction
// touches whole 32-byte sectors.  The caller's input and output are streamed
// (L2 evict-first), so the slots that peers write stay in L2.
// Two-shot: each rank's segment (reference.SegmentLayout) is cut into tiles
// and block b handles tiles b, b + B, ... of every segment, so block b of
// each rank only ever talks to block b of the other ranks.  Per tile:
//   1. quantize my part of every other owner's tile and store it into that
//      owner's reduce-scatter slot [me][b] (peer stores over NVLink); signal.
//   2. wait for all sources; dequantize them and add my exact values in rank
//      order (fp32); quantize the sum and store it into every peer's
//      all-gather slot [me][b]; dequantize it myself into my output; signal.
//   3. wait for all owners; dequantize their tiles into my output.
// Slot reuse is safe with one slot per (source, block): before a rank
// overwrites owner o's RS slot in round e it has, in round e-1, waited for
// o's all-gather signal, which o sends only after reading its RS slots; and o
// writes p's AG slot in round e only after p's round-e RS signal, which p sends
// only after reading round e-1's AG slots.  One-shot slots alternate by epoch
// parity: round e's writes never meet round e-1's reads, and round e+1 needs
// the peer's round-e signal, sent after it finished reading round e-1.
#include "fc_common.cuh"
#include "fc_quant.cuh"
#include "fc_signal.cuh"
#include "fc_ll.cuh"
#include "fc_async.cuh"

#ifndef FC_DT
#define FC_DT 0
#endif
#ifndef FC_RS_BITS
#define FC_RS_BITS 4
#endif
#ifndef FC_AG_BITS
#define FC_AG_BITS FC_RS_BITS
#endif

#define FC_FLAG_ROTATE 1
#define FC_FLAG_SYM 2

struct FcArgs {
  const void* in;
  void* out;
  fc_i64 n;             // message length in elements
  fc_i64 seg_elems;     // two-shot: elements per owner segment; one-shot: padded length
  FcError* err;         // host-mapped error record
  fc_i64 slot_bytes, flags_off, rs_off, ag_off, os_off, timeout_ns;
  int rank, world, group, flags, max_blocks;
  float rot_norm;
  int units;    // FC_ELEMS-element units per thread per tile: more data per synchronization
  int ll_tile;  // LL kernels: 16-byte vectors per block and segment (fits one LL slot)
  fc_i64 ll_off, ll_slot_bytes;
  // Workspace base of every rank (mine at [rank]), by value: kernel parameters
  // live in the constant bank, so no global load stands before the first store.
  fc_u64 peers[FC_MAX_RANKS];
  // Offsets in my workspace (flashcomm_cupy.backends.ipc.WorkspaceLayout):
  // per-block epochs of the two-shot and the one-shot flag sets, per-block LL
  // call counters, and the poison words [source rank] (fc_signal.cuh).
  fc_i64 ts_epoch_off, os_epoch_off, ll_epoch_off, poison_off;
};

__device__ __forceinline__ FcWait fc_wait_ctx(const FcArgs& a) {
  return FcWait{a.err, reinterpret_cast<const fc_u32*>(reinterpret_cast<unsigned char*>(a.peers[a.rank]) + a.poison_off),
                a.timeout_ns, a.rank, a.world};
}

__device__ __forceinline__ unsigned char* fc_slot(const FcArgs& a, int rank_of_ws, fc_i64 region, int parity,
                                                  int src) {
#ifdef FC_PROFILE_LOCAL_DATA  // timing variant only: data stays in HBM, no NVLink payload (wrong results)
  rank_of_ws = a.rank;
#endif
  unsigned char* ws = reinterpret_cast<unsigned char*>(a.peers[rank_of_ws]);
  const fc_i64 idx = ((fc_i64)parity * a.world + src) * a.max_blocks + blockIdx.x;
  return ws + region + idx * a.slot_bytes;
}

// A flag kernel's start: this block's epoch of the flag sets at `epoch_off`
// into e.  No poison check here: a block of a poisoned communicator runs its
// tiles like any other (its waits give up on the abort or the poison; what
// it sends then is ordered after its own poison stores, fc_give_up) and its
// end finds the poison and writes NaN.  A separate path for blocks that start
// poisoned made ptxas spill the two-shot kernels (7 % at 256 MB).
__device__ __forceinline__ fc_u32 fc_begin(const FcArgs& a, fc_i64 epoch_off, fc_u32* s_epoch) {
  const fc_u32* epochs = reinterpret_cast<const fc_u32*>(reinterpret_cast<unsigned char*>(a.peers[a.rank]) + epoch_off);
  if (threadIdx.x == 0) *s_epoch = epochs[blockIdx.x];
  __syncthreads();
  return *s_epoch;
}

// A flag kernel's end, after its last wait (block-uniform): the epoch moves
// on; or, when any poison word is set -- a wait of this call gave up on some
// rank, or the communicator was poisoned before -- record who gave up and
// write NaN over every tile this block handles in this call (nseg segments
// of a.seg_elems: the world for two-shot, 1 for one-shot), and the epoch
// stays behind.  Out of line, and only the epoch travels as an argument (the
// rest is read through a pointer to the __grid_constant__ kernel parameter):
// anything else the kernel would have to keep live across its tile loop.
template <int DT, bool ONESHOT>
__device__ __noinline__ void fc_flag_end(const FcArgs* ap, fc_u32 e) {
  const FcArgs& a = *ap;
  const FcWait w = fc_wait_ctx(a);
  fc_u32* epochs = reinterpret_cast<fc_u32*>(reinterpret_cast<unsigned char*>(a.peers[a.rank]) +
                                             (ONESHOT ? a.os_epoch_off : a.ts_epoch_off));
  if (!fc_block_poisoned(w)) {
    if (threadIdx.x == 0) epochs[blockIdx.x] = e;
    return;
  }
  if (threadIdx.x == 0) fc_record_poisoned(a.err, w.poison, a.rank, a.world);
  fc_fill_nan_tiles<DT>(a.out, a.n, a.seg_elems, ONESHOT ? 1 : a.world, blockDim.x * FC_ELEMS * a.units);
}

// Decode `chunk` unit w into v, or zeros for a lane past the chunk's end.
// Every lane of the warp calls it (reads move warp-transposed).
template <typename C>
__device__ __forceinline__ void fc_receive(const unsigned char* chunk, fc_i64 n, int w, bool active, int gl, bool sym,
                                           float (&v)[FC_ELEMS], fc_v4* stage) {
  typename C::Packed p;
  C::read(chunk, n, w, gl, sym, p, stage);
  C::unpack(p, sym, v);
  if (!active) {
#pragma unroll
    for (int i = 0; i < FC_ELEMS; ++i) v[i] = 0.0f;
  }
}

// The lane's unit of my input from element `base` (elements at or beyond
// `limit` read as 0), rotated when the mode asks: my exact contribution.
template <int DT>
__device__ __forceinline__ void fc_load_input(const FcArgs& a, fc_i64 base, fc_i64 limit, FcAccess access, bool rot,
                                              int gl, int lig, float (&v)[FC_ELEMS], fc_v4* stage) {
  fc_load_elems<DT>(a.in, base, limit, access, v, stage);
  if (rot) fc_rotate_fwd(v, gl, lig, a.rot_norm);
}

// That unit quantized: what I send.
template <int DT, typename C>
__device__ __forceinline__ void fc_pack_input(const FcArgs& a, fc_i64 base, fc_i64 limit, FcAccess access,
                                              bool rot, bool sym, int gl, int lig, float (&v)[FC_ELEMS],
                                              typename C::Packed& p, fc_v4* stage) {
  fc_load_input<DT>(a, base, limit, access, rot, gl, lig, v, stage);
  C::pack(v, gl, sym, p);
}

// Store the lane's unit of summed values (rotated back first when the mode
// rotates) into my output from element `base`; elements >= limit stay untouched.
template <int DT>
__device__ __forceinline__ void fc_store_output(const FcArgs& a, fc_i64 base, fc_i64 limit, bool rot, int gl, int lig,
                                                float (&v)[FC_ELEMS], fc_v4* stage, bool stream) {
  if (rot) fc_rotate_inv(v, gl, lig, a.rot_norm);
  fc_store_elems<DT>(a.out, base, limit, v, stage, stream);
}

template <int DT, int RSB, int AGB>
__device__ void fc_twoshot_impl(const FcArgs& a) {
  __shared__ fc_u32 s_epoch;
  __shared__ fc_v4 s_stage[FC_MAX_WARPS * FC_STAGE_VECS];
  fc_v4* const stage = fc_warp_stage(s_stage);
  typedef FcCodec<DT, RSB> RS;
  typedef FcCodec<DT, AGB> AG;
  const int t = threadIdx.x, nt = blockDim.x;
  const int group = RSB ? a.group : FC_ELEMS;
  const int gl = group / FC_ELEMS, lig = t % gl;
  const bool rot = RSB && (a.flags & FC_FLAG_ROTATE), sym = a.flags & FC_FLAG_SYM;
  const fc_i64 flag_set = 4 * FC_MAX_RANKS * (fc_i64)a.max_blocks;
  unsigned char* my_ws = reinterpret_cast<unsigned char*>(a.peers[a.rank]);
  const fc_i64 tile = (fc_i64)nt * FC_ELEMS * a.units;
  const fc_i64 ntiles = (a.seg_elems + tile - 1) / tile;
  fc_u32 e = fc_begin(a, a.ts_epoch_off, &s_epoch);
  float v[FC_ELEMS];

  for (fc_i64 ti = blockIdx.x; ti < ntiles; ti += gridDim.x) {
    ++e;
    const fc_i64 toff = ti * tile;
    const fc_i64 nchunk = min(tile, a.seg_elems - toff);
    // 1. reduce-scatter: my contribution to every other owner's tile.
    for (int k = 1; k < a.world; ++k) {
      const int o = (a.rank + k) % a.world;
      const fc_i64 start = o * a.seg_elems + toff;
      if (start >= a.n) continue;  // all padding: nothing sent, nothing read
      unsigned char* dst = fc_slot(a, o, a.rs_off, 0, a.rank);
      const fc_i64 limit = min(a.n, start + nchunk);
      for (int u = 0; u < a.units; ++u) {
        const int w = u * nt + t;
        typename RS::Packed p;
        fc_pack_input<DT, RS>(a, start + (fc_i64)w * FC_ELEMS, limit, FC_STREAM, rot, sym, gl, lig, v, p, stage);
        RS::write(p, dst, nchunk, w, gl, sym, stage);
      }
    }
    fc_signal_peers(a.peers, a.flags_off, a.rank, a.world, a.max_blocks, e);
    fc_wait_peers(my_ws, a.flags_off, a.max_blocks, e, fc_wait_ctx(a));

    // 2. owner: sum in rank order (own values exact), re-quantize, all-gather.
    const fc_i64 mine = a.rank * a.seg_elems + toff;
    if (mine < a.n) {
      const fc_i64 limit = min(a.n, mine + nchunk);
      for (int u = 0; u < a.units; ++u) {
        const int w = u * nt + t;
        const bool active = (fc_i64)w * FC_ELEMS < nchunk;
        float acc[FC_ELEMS];
#pragma unroll
        for (int i = 0; i < FC_ELEMS; ++i) acc[i] = 0.0f;
        for (int s = 0; s < a.world; ++s) {
          if (s == a.rank) {
            fc_load_input<DT>(a, mine + (fc_i64)w * FC_ELEMS, limit, FC_STREAM, rot, gl, lig, v, stage);
          } else {
            fc_receive<RS>(fc_slot(a, a.rank, a.rs_off, 0, s), nchunk, w, active, gl, sym, v, stage);
          }
#pragma unroll
          for (int i = 0; i < FC_ELEMS; ++i) acc[i] = __fadd_rn(acc[i], v[i]);
        }
        typename AG::Packed p;
        AG::pack(acc, gl, sym, p);
        for (int k = 1; k < a.world; ++k) {
          const int q = (a.rank + k) % a.world;
          AG::write(p, fc_slot(a, q, a.ag_off, 0, a.rank), nchunk, w, gl, sym, stage);
        }
        AG::unpack(p, sym, v);  // the owner keeps exactly what it sent
        fc_store_output<DT>(a, mine + (fc_i64)w * FC_ELEMS, limit, rot, gl, lig, v, stage, true);
      }
    }
    fc_signal_peers(a.peers, a.flags_off + flag_set, a.rank, a.world, a.max_blocks, e);
    fc_wait_peers(my_ws, a.flags_off + flag_set, a.max_blocks, e, fc_wait_ctx(a));

    // 3. all-gather: every other owner's reduced tile.
    for (int k = 1; k < a.world; ++k) {
      const int o = (a.rank + k) % a.world;
      const fc_i64 start = o * a.seg_elems + toff;
      if (start >= a.n) continue;
      const unsigned char* src = fc_slot(a, a.rank, a.ag_off, 0, o);
      const fc_i64 limit = min(a.n, start + nchunk);
      for (int u = 0; u < a.units; ++u) {
        const int w = u * nt + t;
        const bool active = (fc_i64)w * FC_ELEMS < nchunk;
        fc_receive<AG>(src, nchunk, w, active, gl, sym, v, stage);
        fc_store_output<DT>(a, start + (fc_i64)w * FC_ELEMS, limit, rot, gl, lig, v, stage, true);
      }
    }
  }
  fc_flag_end<DT, false>(&a, e);
}

// ------------------------------------------------------------------ staged two-shot
// The same three steps, slots, signals and sums as fc_twoshot_impl, with every
// global read moved through shared memory by cp.async (fc_async.cuh) and
// software-pipelined one job ahead: while a warp decodes and adds job i, the
// bytes of job i+1 (step 1: one owner's unit of my input; step 2: my input and
// every source's unit; step 3: every owner's unit) are already on their way,
// and holding them costs no registers (NOTES v21).  Each warp has its
// fc_warp_gather stage and two such buffers in dynamic shared memory,
// FcStagedTwoshot::warp_chunks(world) vectors: the host passes warps x that x
// 16 bytes (flashcomm_cupy.backends.gpu.staged_twoshot_smem) and launches no
// more blocks than fit the SMs at once with it.
template <int DT, int RSB, int AGB>
struct FcStagedTwoshot {
  static constexpr int IN = FcStagedElems<DT>::CHUNKS;
  static constexpr int SRC = FcStaged<RSB>::CHUNKS > FcStaged<AGB>::CHUNKS ? FcStaged<RSB>::CHUNKS
                                                                          : FcStaged<AGB>::CHUNKS;
  static constexpr __host__ __device__ int buffer_chunks(int world) { return IN + (world - 1) * SRC; }
  static constexpr __host__ __device__ int warp_chunks(int world) { return FC_STAGE_VECS + 2 * buffer_chunks(world); }
};

template <int DT, int RSB, int AGB>
__device__ void fc_twoshot_staged_impl(const FcArgs& a) {
  __shared__ fc_u32 s_epoch;
  extern __shared__ fc_v4 s_dyn[];
  typedef FcCodec<DT, RSB> RS;
  typedef FcCodec<DT, AGB> AG;
  typedef FcStagedTwoshot<DT, RSB, AGB> SH;
  const int t = threadIdx.x, nt = blockDim.x;
  const int group = a.group;
  const int gl = group / FC_ELEMS, lig = t % gl, gs = __ffs(gl) - 1;
  const bool rot = a.flags & FC_FLAG_ROTATE, sym = a.flags & FC_FLAG_SYM;
  const fc_i64 flag_set = 4 * FC_MAX_RANKS * (fc_i64)a.max_blocks;
  unsigned char* my_ws = reinterpret_cast<unsigned char*>(a.peers[a.rank]);
  const fc_i64 tile = (fc_i64)nt * FC_ELEMS * a.units;
  const fc_i64 ntiles = (a.seg_elems + tile - 1) / tile;
  const int nsrc = a.world - 1;
  const int buf_chunks = SH::buffer_chunks(a.world);
  // per warp: the fc_warp_gather/scatter stage, then two buffers
  fc_v4* const stage = s_dyn + (t >> 5) * SH::warp_chunks(a.world);
  fc_v4* const wbuf = stage + FC_STAGE_VECS;
  // buffer b: my input's unit, then one unit per other rank (j-th other rank)
  auto in_area = [&](int b) { return wbuf + b * buf_chunks; };
  auto src_area = [&](int b, int j) { return wbuf + b * buf_chunks + SH::IN + j * SH::SRC; };
  fc_u32 e = fc_begin(a, a.ts_epoch_off, &s_epoch);
  float v[FC_ELEMS];

  for (fc_i64 ti = blockIdx.x; ti < ntiles; ti += gridDim.x) {
    ++e;
    const fc_i64 toff = ti * tile;
    const fc_i64 nchunk = min(tile, a.seg_elems - toff);
    const FcLayout rs_layout = fc_layout(nchunk, RSB, group, sym), ag_layout = fc_layout(nchunk, AGB, group, sym);

    // 1. reduce-scatter; job i = (owner k = 1 + i / units, unit i % units).
    const int jobs1 = nsrc * a.units;
    auto fetch1 = [&](int i) {
      const int o = (a.rank + 1 + i / a.units) % a.world;
      const fc_i64 start = o * a.seg_elems + toff;
      if (start < a.n)
        fc_fetch_elems<DT, true>(a.in, start + (fc_i64)((i % a.units) * nt + t) * FC_ELEMS, min(a.n, start + nchunk),
                                 in_area(i & 1));
    };
    fetch1(0);
    fc_cp_async_commit();
    for (int i = 0; i < jobs1; ++i) {
      if (i + 1 < jobs1) fetch1(i + 1);
      fc_cp_async_commit();
      fc_cp_async_wait<1>();
      const int o = (a.rank + 1 + i / a.units) % a.world;
      const fc_i64 start = o * a.seg_elems + toff;
      if (start < a.n) {  // all padding: nothing sent, nothing read
        const int w = (i % a.units) * nt + t;
        fc_staged_elems<DT>(in_area(i & 1), v);
        if (rot) fc_rotate_fwd(v, gl, lig, a.rot_norm);
        typename RS::Packed p;
        RS::pack(v, gl, sym, p);
        RS::write(p, fc_slot(a, o, a.rs_off, 0, a.rank), nchunk, w, gl, sym, stage);
      }
      __syncwarp();  // buffer i & 1 is refilled next round
    }
    fc_signal_peers(a.peers, a.flags_off, a.rank, a.world, a.max_blocks, e);
    fc_wait_peers(my_ws, a.flags_off, a.max_blocks, e, fc_wait_ctx(a));

    // 2. owner: sum in rank order (own values exact), re-quantize, all-gather.
    const fc_i64 mine = a.rank * a.seg_elems + toff;
    if (mine < a.n) {
      const fc_i64 limit = min(a.n, mine + nchunk);
      auto fetch2 = [&](int u) {
        const int w = u * nt + t;
        fc_fetch_elems<DT, true>(a.in, mine + (fc_i64)w * FC_ELEMS, limit, in_area(u & 1));
        for (int j = 0; j < nsrc; ++j) {
          const int s = j < a.rank ? j : j + 1;
          fc_fetch_unit<RSB>(fc_slot(a, a.rank, a.rs_off, 0, s), rs_layout, (int)nchunk, w, gs, sym, src_area(u & 1, j));
        }
      };
      fetch2(0);
      fc_cp_async_commit();
      for (int u = 0; u < a.units; ++u) {
        if (u + 1 < a.units) fetch2(u + 1);
        fc_cp_async_commit();
        fc_cp_async_wait<1>();
        const int w = u * nt + t;
        const bool active = (fc_i64)w * FC_ELEMS < nchunk;
        float acc[FC_ELEMS];
#pragma unroll
        for (int i = 0; i < FC_ELEMS; ++i) acc[i] = 0.0f;
        for (int s = 0; s < a.world; ++s) {
          if (s == a.rank) {
            fc_staged_elems<DT>(in_area(u & 1), v);
            if (rot) fc_rotate_fwd(v, gl, lig, a.rot_norm);
          } else {
            typename RS::Packed p;
            fc_staged_unit<RSB>(src_area(u & 1, s < a.rank ? s : s - 1), w, gs, sym, p);
            RS::unpack(p, sym, v);
            if (!active) {
#pragma unroll
              for (int i = 0; i < FC_ELEMS; ++i) v[i] = 0.0f;
            }
          }
#pragma unroll
          for (int i = 0; i < FC_ELEMS; ++i) acc[i] = __fadd_rn(acc[i], v[i]);
        }
        typename AG::Packed p;
        AG::pack(acc, gl, sym, p);
        for (int k = 1; k < a.world; ++k) {
          const int q = (a.rank + k) % a.world;
          AG::write(p, fc_slot(a, q, a.ag_off, 0, a.rank), nchunk, w, gl, sym, stage);
        }
        AG::unpack(p, sym, v);  // the owner keeps exactly what it sent
        fc_store_output<DT>(a, mine + (fc_i64)w * FC_ELEMS, limit, rot, gl, lig, v, stage, true);
        __syncwarp();
      }
    }
    fc_signal_peers(a.peers, a.flags_off + flag_set, a.rank, a.world, a.max_blocks, e);
    fc_wait_peers(my_ws, a.flags_off + flag_set, a.max_blocks, e, fc_wait_ctx(a));

    // 3. all-gather: every other owner's reduced tile, one unit of each per job.
    auto fetch3 = [&](int u) {
      for (int k = 1; k < a.world; ++k) {
        const int o = (a.rank + k) % a.world;
        if (o * a.seg_elems + toff < a.n)
          fc_fetch_unit<AGB>(fc_slot(a, a.rank, a.ag_off, 0, o), ag_layout, (int)nchunk, u * nt + t, gs, sym,
                             src_area(u & 1, k - 1));
      }
    };
    fetch3(0);
    fc_cp_async_commit();
    for (int u = 0; u < a.units; ++u) {
      if (u + 1 < a.units) fetch3(u + 1);
      fc_cp_async_commit();
      fc_cp_async_wait<1>();
      const int w = u * nt + t;
      const bool active = (fc_i64)w * FC_ELEMS < nchunk;
      for (int k = 1; k < a.world; ++k) {
        const int o = (a.rank + k) % a.world;
        const fc_i64 start = o * a.seg_elems + toff;
        if (start >= a.n) continue;
        typename AG::Packed p;
        fc_staged_unit<AGB>(src_area(u & 1, k - 1), w, gs, sym, p);
        AG::unpack(p, sym, v);
        if (!active) {
#pragma unroll
          for (int i = 0; i < FC_ELEMS; ++i) v[i] = 0.0f;
        }
        fc_store_output<DT>(a, start + (fc_i64)w * FC_ELEMS, min(a.n, start + nchunk), rot, gl, lig, v, stage, true);
      }
      __syncwarp();
    }
  }
  fc_flag_end<DT, false>(&a, e);
}

template <int DT, int RSB>
__device__ void fc_oneshot_impl(const FcArgs& a) {
  __shared__ fc_u32 s_epoch;
  __shared__ fc_v4 s_stage[FC_MAX_WARPS * FC_STAGE_VECS];
  fc_v4* const stage = fc_warp_stage(s_stage);
  typedef FcCodec<DT, RSB> RS;
  const int t = threadIdx.x, nt = blockDim.x;
  const int group = RSB ? a.group : FC_ELEMS;
  const int gl = group / FC_ELEMS, lig = t % gl;
  const bool rot = RSB && (a.flags & FC_FLAG_ROTATE), sym = a.flags & FC_FLAG_SYM;
  const fc_i64 os_set = 2 * 4 * FC_MAX_RANKS * (fc_i64)a.max_blocks;
  unsigned char* my_ws = reinterpret_cast<unsigned char*>(a.peers[a.rank]);
  const fc_i64 tile = (fc_i64)nt * FC_ELEMS * a.units;
  const fc_i64 ntiles = (a.seg_elems + tile - 1) / tile;
  fc_u32 e = fc_begin(a, a.os_epoch_off, &s_epoch);
  float v[FC_ELEMS], acc[FC_ELEMS];

  for (fc_i64 ti = blockIdx.x; ti < ntiles; ti += gridDim.x) {
    ++e;
    const int par = e & 1;
    const fc_i64 toff = ti * tile;
    const fc_i64 nchunk = min(tile, a.seg_elems - toff);
    const fc_i64 limit = min(a.n, toff + nchunk);
    for (int u = 0; u < a.units; ++u) {
      const int w = u * nt + t;
      typename RS::Packed p;
      fc_pack_input<DT, RS>(a, toff + (fc_i64)w * FC_ELEMS, limit, FC_CACHED, rot, sym, gl, lig, v, p, stage);
      for (int k = 1; k < a.world; ++k) {
        const int q = (a.rank + k) % a.world;
        RS::write(p, fc_slot(a, q, a.os_off, par, a.rank), nchunk, w, gl, sym, stage);
      }
    }
    fc_signal_peers(a.peers, a.flags_off + os_set, a.rank, a.world, a.max_blocks, e);
    fc_wait_peers(my_ws, a.flags_off + os_set, a.max_blocks, e, fc_wait_ctx(a));
    for (int u = 0; u < a.units; ++u) {
      const int w = u * nt + t;
      const bool active = (fc_i64)w * FC_ELEMS < nchunk;
      const fc_i64 base = toff + (fc_i64)w * FC_ELEMS;
#pragma unroll
      for (int i = 0; i < FC_ELEMS; ++i) acc[i] = 0.0f;
      for (int s = 0; s < a.world; ++s) {
        if (s == a.rank) {
          // My own contribution exactly as the peers decode it (re-packed from my input).
          typename RS::Packed p;
          fc_pack_input<DT, RS>(a, base, limit, FC_CACHED, rot, sym, gl, lig, v, p, stage);
          RS::unpack(p, sym, v);
        } else {
          fc_receive<RS>(fc_slot(a, a.rank, a.os_off, par, s), nchunk, w, active, gl, sym, v, stage);
        }
#pragma unroll
        for (int i = 0; i < FC_ELEMS; ++i) acc[i] = __fadd_rn(acc[i], v[i]);
      }
      fc_store_output<DT>(a, base, limit, rot, gl, lig, acc, stage, true);
    }
  }
  fc_flag_end<DT, true>(&a, e);
}

// ------------------------------------------------------------------ LL protocol (lossless)
// Same sums as the flag kernels (float32, rank order, from +0), but no flags:
// see fc_ll.cuh.  Block b owns vectors [b * ll_tile, (b + 1) * ll_tile) of
// the message (one-shot) or of every owner segment (two-shot); one tile per
// block and call, so each block index uses its LL slots once per call.
__device__ __forceinline__ unsigned char* fc_ll_slot(const FcArgs& a, int rank_of_ws, int parity, int area, int src) {
  unsigned char* ws = reinterpret_cast<unsigned char*>(a.peers[rank_of_ws]);
  const fc_i64 idx = (((fc_i64)parity * 2 + area) * a.world + src) * a.max_blocks + blockIdx.x;
  return ws + a.ll_off + idx * a.ll_slot_bytes;
}

// A block's LL call: its counter, this call's number e (slot parity e & 1),
// and the poison word this thread read when the call started (threads < world
// read one each; compared only in fc_ll_end, so the load's latency hides
// behind the whole call).
struct FcLLCall {
  fc_u32* counter;
  fc_u32 e;
  fc_u32 poison;
};

__device__ __forceinline__ FcLLCall fc_ll_begin(const FcArgs& a) {
  fc_u32* counter = reinterpret_cast<fc_u32*>(reinterpret_cast<unsigned char*>(a.peers[a.rank]) + a.ll_epoch_off) +
                    blockIdx.x;
  const fc_u32 poison = threadIdx.x < a.world ? fc_ld_volatile_u32(fc_wait_ctx(a).poison + threadIdx.x) : 0u;
  return FcLLCall{counter, *counter + 1, poison};
}

// The end of a block's LL call.  True when any thread of the block failed a
// receive (its wait already poisoned every rank, or found the poison) or the
// block started poisoned: the caller then writes NaN over the block's whole
// tile (the counter stays behind: the communicator is poisoned for good).
// A lane that failed receives and sends nothing more until then.
__device__ __forceinline__ bool fc_ll_end(const FcArgs& a, const FcLLCall& c, bool failed) {
  // every thread has read the counter before it moves on
  if (__syncthreads_or(failed || c.poison != 0u)) {
    if (threadIdx.x == 0) fc_record_poisoned(a.err, fc_wait_ctx(a).poison, a.rank, a.world);
    return true;
  }
  if (threadIdx.x == 0) *c.counter = c.e;
  return false;
}

// Vectors of this block's tile of a segment (one-shot: the message) in the lossless LL kernels.
template <int PER>
__device__ __forceinline__ int fc_ll_tile_vectors(const FcArgs& a) {
  return (int)min((fc_i64)a.ll_tile, a.seg_elems / PER - (fc_i64)blockIdx.x * a.ll_tile);
}

// What both lossless LL kernels work out first: typed input and output, the
// block's call (parity c.par) and its tile of c.nvec vectors from vector c.first.
template <int DT>
struct FcLLTile {
  typedef typename FcElem<DT>::T T;
  const T* in;
  T* out;
  FcLLCall call;
  int par;
  fc_i64 first;
  int nvec;
  __device__ __forceinline__ explicit FcLLTile(const FcArgs& a)
      : in(reinterpret_cast<const T*>(a.in)), out(reinterpret_cast<T*>(a.out)), call(fc_ll_begin(a)),
        par(call.e & 1), first((fc_i64)blockIdx.x * a.ll_tile), nvec(fc_ll_tile_vectors<16 / (int)sizeof(T)>(a)) {}
};

// My LL slots of one area for vector i, one per source.
__device__ __forceinline__ void fc_ll_my_slots(const FcArgs& a, int parity, int area, int i,
                                               unsigned char* (&slots)[FC_MAX_RANKS]) {
#pragma unroll
  for (int s = 0; s < FC_MAX_RANKS; ++s) slots[s] = fc_ll_slot(a, a.rank, parity, area, s) + (fc_i64)i * 16;
}

// Vector i of every other source from my LL slots (area 0) plus `mine`,
// summed in float32 in rank order from +0 and rounded to DT.  ok = false when
// the receive failed (the result is then meaningless).
template <int DT>
__device__ __forceinline__ fc_v4 fc_ll_reduce_vector(const FcArgs& a, int par, int i,
                                                     const fc_v4& mine, fc_u32 e, bool& ok) {
  constexpr int PER = 16 / (int)sizeof(typename FcElem<DT>::T);
  unsigned char* slots[FC_MAX_RANKS];
  fc_ll_my_slots(a, par, 0, i, slots);
  fc_v4 v[FC_MAX_RANKS];
  ok = fc_ll_receive(slots, a.world, a.rank, v, fc_wait_ctx(a), e);
  float acc[PER];
#pragma unroll
  for (int j = 0; j < PER; ++j) acc[j] = 0.0f;
#pragma unroll
  for (int s = 0; s < FC_MAX_RANKS; ++s)
    if (s < a.world) fc_ll_accumulate<DT>(acc, fc_ll_pick(s == a.rank, mine, v[s]));
  return fc_ll_round<DT>(acc);
}

template <int DT>
__device__ void fc_ll_oneshot_impl(const FcArgs& a) {
  typedef typename FcElem<DT>::T T;
  constexpr int PER = 16 / (int)sizeof(T);
  const FcLLTile<DT> c(a);
  bool failed = false;
  for (int i = threadIdx.x; i < c.nvec; i += blockDim.x) {
    const fc_i64 el = (c.first + i) * PER;
    const fc_v4 x = fc_ll_payload<DT>(fc_ld_vec_upto<DT>(c.in + el, el, a.n, FC_CACHED));
    for (int k = 1; k < a.world; ++k)
      fc_st_volatile(fc_ll_slot(a, (a.rank + k) % a.world, c.par, 0, a.rank) + (fc_i64)i * 16, x);
  }
  for (int i = threadIdx.x; i < c.nvec && !failed; i += blockDim.x) {
    const fc_i64 el = (c.first + i) * PER;
    const fc_v4 mine = fc_ll_payload<DT>(fc_ld_vec_upto<DT>(c.in + el, el, a.n, FC_CACHED));
    bool ok;
    const fc_v4 r = fc_ll_reduce_vector<DT>(a, c.par, i, mine, c.call.e, ok);
    if (ok) fc_st_vec_upto<DT>(c.out + el, el, a.n, r, false);
    else failed = true;
  }
  if (fc_ll_end(a, c.call, failed)) fc_fill_nan<DT>(a.out, a.n, a.seg_elems, 1, c.first * PER, (fc_i64)c.nvec * PER);
}

template <int DT>
__device__ void fc_ll_twoshot_impl(const FcArgs& a) {
  typedef typename FcElem<DT>::T T;
  constexpr int PER = 16 / (int)sizeof(T);
  const FcLLTile<DT> c(a);
  bool failed = false;
  // 1. reduce-scatter: my values of every other owner's tile, raw.  All loads
  // first: a store between two loads would keep the second from overlapping.
  for (int i = threadIdx.x; i < c.nvec; i += blockDim.x) {
    fc_v4 x[FC_MAX_RANKS];
#pragma unroll
    for (int o = 0; o < FC_MAX_RANKS; ++o) {
      if (o < a.world && o != a.rank) {
        const fc_i64 el = o * a.seg_elems + (c.first + i) * PER;
        x[o] = fc_ll_payload<DT>(fc_ld_vec_upto<DT>(c.in + el, el, a.n, FC_CACHED));
      }
    }
#pragma unroll
    for (int o = 0; o < FC_MAX_RANKS; ++o)
      if (o < a.world && o != a.rank) fc_st_volatile(fc_ll_slot(a, o, c.par, 0, a.rank) + (fc_i64)i * 16, x[o]);
  }
  // 2. owner: sum in rank order, send the rounded sum to every peer, keep it.
  for (int i = threadIdx.x; i < c.nvec; i += blockDim.x) {
    const fc_i64 el = a.rank * a.seg_elems + (c.first + i) * PER;
    const fc_v4 mine = fc_ld_vec_upto<DT>(c.in + el, el, a.n, FC_CACHED);
    bool ok;
    const fc_v4 r = fc_ll_payload<DT>(fc_ll_reduce_vector<DT>(a, c.par, i, mine, c.call.e, ok));
    if (!ok) {  // send no sum built from what never arrived
      failed = true;
      break;
    }
    for (int k = 1; k < a.world; ++k)
      fc_st_volatile(fc_ll_slot(a, (a.rank + k) % a.world, c.par, 1, a.rank) + (fc_i64)i * 16, r);
    fc_st_vec_upto<DT>(c.out + el, el, a.n, r, false);
  }
  // 3. all-gather: every other owner's sums.
  for (int i = threadIdx.x; i < c.nvec && !failed; i += blockDim.x) {
    unsigned char* slots[FC_MAX_RANKS];
    fc_ll_my_slots(a, c.par, 1, i, slots);
    fc_v4 v[FC_MAX_RANKS];
    if (!fc_ll_receive(slots, a.world, a.rank, v, fc_wait_ctx(a), c.call.e)) {
      failed = true;
      break;
    }
#pragma unroll
    for (int s = 0; s < FC_MAX_RANKS; ++s) {
      if (s < a.world && s != a.rank) {
        const fc_i64 el = s * a.seg_elems + (c.first + i) * PER;
        fc_st_vec_upto<DT>(c.out + el, el, a.n, v[s], false);
      }
    }
  }
  if (fc_ll_end(a, c.call, failed))
    fc_fill_nan<DT>(a.out, a.n, a.seg_elems, a.world, c.first * PER, (fc_i64)c.nvec * PER);
}

// Quantized LL two-shot: the flag two-shot's arithmetic, with units moved in
// their LL form (fc_ll.cuh, FcLLq) instead of flags.  Block b handles tile b
// (threads * FC_ELEMS * units elements) of every owner segment, exactly one
// per call; padding past n travels too, so every block exchanges with every
// peer.  Sources are polled FC_LLQ_BATCH at a time, so their L2 round trips
// overlap.  The host builds it with 16-element units where the group allows
// (benchmarks/NOTES.md v18): a lane's dependent chain is half as long and
// twice as many lanes share the work.
#define FC_LLQ_BATCH 4
// Most threads per block (flashcomm_cupy/backends/gpu.py: LLQ_MAX_THREADS).
// Two blocks per SM must fit, for every block to be resident: 32-element
// units need more than 128 registers (the batched receives), so 128 threads;
// 16-element builds fit 128 registers at 256 threads, except the two-shots
// with an INT8 step, which the host runs at 128 (llq_threads).
#define FC_LLQ_THREADS (FC_ELEMS == 16 ? 256 : 128)

// Unit w of sources s0 .. s0 + B - 1 (those < world, other than me; none when
// the lane is past its tile) from my LL slots of `area`: got[j] is source s0 + j's.
// False when the receive failed.
template <int BITS, int B>
__device__ __forceinline__ bool fc_llq_receive_batch(const FcArgs& a, int par, int area, int s0,
                                                     int w, bool active, FcUnit<BITS> (&got)[B], fc_u32 e) {
  unsigned char* slots[B];
  bool use[B];
#pragma unroll
  for (int j = 0; j < B; ++j) {
    use[j] = active && s0 + j < a.world && s0 + j != a.rank;
    slots[j] = fc_ll_slot(a, a.rank, par, area, min(s0 + j, a.world - 1)) + (fc_i64)w * FcLLq<BITS>::BYTES;
  }
  return fc_llq_receive<BITS, B>(slots, use, got, fc_wait_ctx(a), s0, e);
}

template <int DT, int RSB, int AGB>
__device__ void fc_llq_twoshot_impl(const FcArgs& a) {
  __shared__ fc_v4 s_stage[FC_MAX_WARPS * FC_STAGE_VECS];
  fc_v4* const stage = fc_warp_stage(s_stage);
  typedef FcCodec<DT, RSB> RS;
  typedef FcCodec<DT, AGB> AG;
  constexpr int B = FC_LLQ_BATCH;
  const int t = threadIdx.x, nt = blockDim.x;
  const int gl = a.group / FC_ELEMS, lig = t % gl;
  const bool rot = a.flags & FC_FLAG_ROTATE, sym = a.flags & FC_FLAG_SYM;
  const FcLLCall call = fc_ll_begin(a);
  const fc_u32 e = call.e;
  const int par = e & 1;
  const fc_i64 tile = (fc_i64)nt * FC_ELEMS * a.units;
  const fc_i64 toff = blockIdx.x * tile;
  const fc_i64 nchunk = min(tile, a.seg_elems - toff);
  float v[FC_ELEMS];
  // A lane whose receive failed keeps computing with its warp (the codec's
  // shuffles and the warp-transposed stores need every lane) but receives and
  // sends nothing more; its block writes NaN at the end.
  bool failed = false;

  // 1. reduce-scatter: my contribution to every other owner's tile.
  for (int k = 1; k < a.world; ++k) {
    const int o = (a.rank + k) % a.world;
    const fc_i64 start = o * a.seg_elems + toff;
    const fc_i64 limit = min(a.n, start + nchunk);
    unsigned char* dst = fc_ll_slot(a, o, par, 0, a.rank);
    for (int u = 0; u < a.units; ++u) {
      const int w = u * nt + t;
      typename RS::Packed p;
      fc_pack_input<DT, RS>(a, start + (fc_i64)w * FC_ELEMS, limit, FC_STREAM, rot, sym, gl, lig, v, p, stage);
      if ((fc_i64)w * FC_ELEMS < nchunk) fc_llq_write<RSB>(dst + (fc_i64)w * FcLLq<RSB>::BYTES, p);
    }
  }

  // 2. owner: sum in rank order (own values exact), re-quantize, all-gather.
  const fc_i64 mine = a.rank * a.seg_elems + toff;
  const fc_i64 mine_limit = min(a.n, mine + nchunk);
  for (int u = 0; u < a.units; ++u) {
    const int w = u * nt + t;
    const bool active = (fc_i64)w * FC_ELEMS < nchunk;
    float acc[FC_ELEMS];
#pragma unroll
    for (int i = 0; i < FC_ELEMS; ++i) acc[i] = 0.0f;
    for (int s0 = 0; s0 < a.world; s0 += B) {
      FcUnit<RSB> got[B];
      if (!fc_llq_receive_batch<RSB, B>(a, par, 0, s0, w, active && !failed, got, e)) failed = true;
#pragma unroll
      for (int j = 0; j < B; ++j) {
        if (s0 + j >= a.world) break;
        if (s0 + j == a.rank) {
          fc_load_input<DT>(a, mine + (fc_i64)w * FC_ELEMS, mine_limit, FC_STREAM, rot, gl, lig, v, stage);
        } else {
          RS::unpack(got[j], sym, v);
          if (!active) {
#pragma unroll
            for (int i = 0; i < FC_ELEMS; ++i) v[i] = 0.0f;
          }
        }
#pragma unroll
        for (int i = 0; i < FC_ELEMS; ++i) acc[i] = __fadd_rn(acc[i], v[i]);
      }
    }
    typename AG::Packed p;
    AG::pack(acc, gl, sym, p);
    if (active && !failed) {
      for (int k = 1; k < a.world; ++k)
        fc_llq_write<AGB>(fc_ll_slot(a, (a.rank + k) % a.world, par, 1, a.rank) + (fc_i64)w * FcLLq<AGB>::BYTES, p);
    }
    AG::unpack(p, sym, v);  // the owner keeps exactly what it sent
    fc_store_output<DT>(a, mine + (fc_i64)w * FC_ELEMS, mine_limit, rot, gl, lig, v, stage, true);
  }

  // 3. all-gather: every other owner's reduced tile.
  for (int u = 0; u < a.units; ++u) {
    const int w = u * nt + t;
    const bool active = (fc_i64)w * FC_ELEMS < nchunk;
    for (int s0 = 0; s0 < a.world; s0 += B) {
      FcUnit<AGB> got[B];
      if (!fc_llq_receive_batch<AGB, B>(a, par, 1, s0, w, active && !failed, got, e)) failed = true;
#pragma unroll
      for (int j = 0; j < B; ++j) {
        if (s0 + j >= a.world) break;
        if (s0 + j == a.rank) continue;
        const fc_i64 start = (s0 + j) * a.seg_elems + toff;
        AG::unpack(got[j], sym, v);
        fc_store_output<DT>(a, start + (fc_i64)w * FC_ELEMS, min(a.n, start + nchunk), rot, gl, lig, v, stage,
                            true);
      }
    }
  }
  if (fc_ll_end(a, call, failed)) fc_fill_nan<DT>(a.out, a.n, a.seg_elems, a.world, toff, nchunk);
}

// Quantized LL one-shot: the flag one-shot's arithmetic (every rank reduces
// the whole message: each source's units decoded and summed in rank order,
// mine as the peers decode it), with units moved in their LL form.  Block b
// handles tile b (threads * FC_ELEMS * units elements) of the message,
// exactly one per call, padding included, so every block exchanges with every
// peer (the LL slot-reuse argument, fc_ll.cuh).
template <int DT, int RSB>
__device__ void fc_llq_oneshot_impl(const FcArgs& a) {
  __shared__ fc_v4 s_stage[FC_MAX_WARPS * FC_STAGE_VECS];
  fc_v4* const stage = fc_warp_stage(s_stage);
  typedef FcCodec<DT, RSB> RS;
  constexpr int B = FC_LLQ_BATCH;
  const int t = threadIdx.x, nt = blockDim.x;
  const int gl = a.group / FC_ELEMS, lig = t % gl;
  const bool rot = a.flags & FC_FLAG_ROTATE, sym = a.flags & FC_FLAG_SYM;
  const FcLLCall call = fc_ll_begin(a);
  const fc_u32 e = call.e;
  const int par = e & 1;
  const fc_i64 tile = (fc_i64)nt * FC_ELEMS * a.units;
  const fc_i64 toff = blockIdx.x * tile;
  const fc_i64 nchunk = min(tile, a.seg_elems - toff);
  const fc_i64 limit = min(a.n, toff + nchunk);
  float v[FC_ELEMS];
  bool failed = false;  // as in fc_llq_twoshot_impl

  // 1. my tile, quantized, to every peer.
  for (int u = 0; u < a.units; ++u) {
    const int w = u * nt + t;
    typename RS::Packed p;
    fc_pack_input<DT, RS>(a, toff + (fc_i64)w * FC_ELEMS, limit, FC_CACHED, rot, sym, gl, lig, v, p, stage);
    if ((fc_i64)w * FC_ELEMS < nchunk) {
      for (int k = 1; k < a.world; ++k)
        fc_llq_write<RSB>(fc_ll_slot(a, (a.rank + k) % a.world, par, 0, a.rank) + (fc_i64)w * FcLLq<RSB>::BYTES, p);
    }
  }

  // 2. every source's tile, summed in rank order.
  for (int u = 0; u < a.units; ++u) {
    const int w = u * nt + t;
    const bool active = (fc_i64)w * FC_ELEMS < nchunk;
    const fc_i64 base = toff + (fc_i64)w * FC_ELEMS;
    float acc[FC_ELEMS];
#pragma unroll
    for (int i = 0; i < FC_ELEMS; ++i) acc[i] = 0.0f;
    for (int s0 = 0; s0 < a.world; s0 += B) {
      FcUnit<RSB> got[B];
      if (!fc_llq_receive_batch<RSB, B>(a, par, 0, s0, w, active && !failed, got, e)) failed = true;
#pragma unroll
      for (int j = 0; j < B; ++j) {
        if (s0 + j >= a.world) break;
        if (s0 + j == a.rank) {  // mine exactly as the peers decode it (re-packed from my input)
          typename RS::Packed p;
          fc_pack_input<DT, RS>(a, base, limit, FC_CACHED, rot, sym, gl, lig, v, p, stage);
          RS::unpack(p, sym, v);
        } else {
          RS::unpack(got[j], sym, v);
          if (!active) {  // nothing was received past the tile's end
#pragma unroll
            for (int i = 0; i < FC_ELEMS; ++i) v[i] = 0.0f;
          }
        }
#pragma unroll
        for (int i = 0; i < FC_ELEMS; ++i) acc[i] = __fadd_rn(acc[i], v[i]);
      }
    }
    fc_store_output<DT>(a, base, limit, rot, gl, lig, acc, stage, true);
  }
  if (fc_ll_end(a, call, failed)) fc_fill_nan<DT>(a.out, a.n, a.seg_elems, 1, toff, nchunk);
}

// Occupancy experiments only (benchmarks/kernel_solo.py --define-sets): the
// two-shot's launch bounds, e.g. FC_TWOSHOT_THREADS=256 FC_TWOSHOT_MINB=3 for
// three 256-thread blocks per SM.
#ifdef FC_TWOSHOT_MINB
#define FC_TWOSHOT_BOUNDS __launch_bounds__(FC_TWOSHOT_THREADS, FC_TWOSHOT_MINB)
#else
#define FC_TWOSHOT_BOUNDS __launch_bounds__(512)
#endif
extern "C" __global__ void FC_TWOSHOT_BOUNDS fc_twoshot(const __grid_constant__ FcArgs a) {
  fc_twoshot_impl<FC_DT, FC_RS_BITS, FC_AG_BITS>(a);
}

#if FC_RS_BITS != 0 && FC_DT != 2
// Quantized 16-bit modes only: a float32 unit would need twice the shared memory.
extern "C" __global__ void __launch_bounds__(512) fc_twoshot_staged(const __grid_constant__ FcArgs a) {
  fc_twoshot_staged_impl<FC_DT, FC_RS_BITS, FC_AG_BITS>(a);
}
#endif

extern "C" __global__ void __launch_bounds__(512) fc_oneshot(const __grid_constant__ FcArgs a) {
  fc_oneshot_impl<FC_DT, FC_RS_BITS>(a);
}

#if FC_RS_BITS == 0
extern "C" __global__ void __launch_bounds__(512) fc_ll_oneshot(FcArgs a) { fc_ll_oneshot_impl<FC_DT>(a); }

extern "C" __global__ void __launch_bounds__(512) fc_ll_twoshot(FcArgs a) { fc_ll_twoshot_impl<FC_DT>(a); }
#else
extern "C" __global__ void __launch_bounds__(FC_LLQ_THREADS) fc_llq_twoshot(FcArgs a) {
  fc_llq_twoshot_impl<FC_DT, FC_RS_BITS, FC_AG_BITS>(a);
}

extern "C" __global__ void __launch_bounds__(FC_LLQ_THREADS) fc_llq_oneshot(FcArgs a) {
  fc_llq_oneshot_impl<FC_DT, FC_RS_BITS>(a);
}
#endif

// Test entry points: one wire chunk of n elements (a multiple of the group
// size) encoded from / decoded to float32, so tests can compare bytes with
// quant.encode / quant.decode (and rotation with hadamard.rotate).
extern "C" __global__ void fc_encode_chunk(const float* x, unsigned char* chunk, fc_i64 n, int group, int flags,
                                           float rot_norm) {
#if FC_RS_BITS > 0
  __shared__ fc_v4 s_stage[FC_MAX_WARPS * FC_STAGE_VECS];
  const int w = blockIdx.x * blockDim.x + threadIdx.x;
  const int gl = group / FC_ELEMS, lig = threadIdx.x % gl;
  const bool active = (fc_i64)w * FC_ELEMS < n;
  float v[FC_ELEMS];
#pragma unroll
  for (int i = 0; i < FC_ELEMS; ++i) v[i] = active ? x[(fc_i64)w * FC_ELEMS + i] : 0.0f;
  if (flags & FC_FLAG_ROTATE) fc_rotate_fwd(v, gl, lig, rot_norm);
  typename FcCodec<FC_DT, FC_RS_BITS>::Packed p;
  FcCodec<FC_DT, FC_RS_BITS>::pack(v, gl, flags & FC_FLAG_SYM, p);
  FcCodec<FC_DT, FC_RS_BITS>::write(p, chunk, n, w, gl, flags & FC_FLAG_SYM, fc_warp_stage(s_stage));
#endif
}

extern "C" __global__ void fc_decode_chunk(const unsigned char* chunk, float* x, fc_i64 n, int group, int flags,
                                           float rot_norm) {
#if FC_RS_BITS > 0
  __shared__ fc_v4 s_stage[FC_MAX_WARPS * FC_STAGE_VECS];
  const int w = blockIdx.x * blockDim.x + threadIdx.x;
  const int gl = group / FC_ELEMS, lig = threadIdx.x % gl;
  const bool active = (fc_i64)w * FC_ELEMS < n;
  float v[FC_ELEMS];
  fc_receive<FcCodec<FC_DT, FC_RS_BITS> >(chunk, n, w, active, gl, flags & FC_FLAG_SYM, v, fc_warp_stage(s_stage));
  if (flags & FC_FLAG_ROTATE) fc_rotate_inv(v, gl, lig, rot_norm);
  if (active)
    for (int i = 0; i < FC_ELEMS; ++i) x[(fc_i64)w * FC_ELEMS + i] = v[i];
#endif
}
