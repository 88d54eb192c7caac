// flashcomm: the flag-protocol kernels (fc_signal.cuh): two-shot, staged two-shot, one-shot.
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
#pragma once
#include "fc_common.cuh"
#include "fc_quant.cuh"
#include "fc_signal.cuh"
#include "fc_async.cuh"
#include "fc_args.cuh"
#include "fc_transport.cuh"
#include "fc_poison.cuh"
#include "fc_reduce.cuh"

// The flag two-shot's phases for one tile of every segment (toff elements
// into each segment, nchunk elements long).  fc_twoshot_impl puts a round of
// signals between them: reduce_scatter writes my RS slot at every other owner;
// owner reads my RS slots once every source has signalled and writes my AG
// slot at every peer; all_gather reads my AG slots once every owner has
// signalled.
// The reduce-scatter-only and all-gather-only kernels (the node-local halves
// of the hierarchical all-reduce, below fc_twoshot_impl) are these phases
// with one change each: the shard between them travels in float32.

// 1. reduce-scatter: my contribution to every other owner's tile.
template <int DT, int RSB>
__device__ __forceinline__ void fc_twoshot_reduce_scatter(const FcArgs& a, const FcTile<RSB>& L, fc_i64 toff,
                                                          fc_i64 nchunk, float (&v)[FC_ELEMS], fc_v4* stage) {
  typedef FcCodec<DT, RSB> RS;
  for (int k = 1; k < a.world; ++k) {
    const int o = (a.rank + k) % a.world;
    const fc_i64 start = o * a.seg_elems + toff;
    if (start >= a.n) continue;  // all padding: nothing sent, nothing read
    unsigned char* dst = fc_slot(a, o, a.rs_off, 0, a.rank);
    const fc_i64 limit = min(a.n, start + nchunk);
    for (int u = 0; u < a.units; ++u) {
      const int w = L.unit(u);
      typename RS::Packed p;
      fc_pack_input<DT, RS>(a, start + (fc_i64)w * FC_ELEMS, limit, FC_STREAM, L.rot, L.sym, L.gl, L.lig, L.signs, v, p,
                            stage);
      RS::write(p, dst, nchunk, w, L.gl, L.sym, stage);
    }
  }
}

// 2. owner: sum in rank order (own values exact), re-quantize, all-gather;
// the owner keeps exactly what it sent.
template <int DT, int RSB, int AGB, typename Epi>
__device__ __forceinline__ void fc_twoshot_owner(const FcArgs& a, const FcTile<RSB>& L, fc_i64 toff, fc_i64 nchunk,
                                                 float (&v)[FC_ELEMS], fc_v4* stage, const Epi& epi) {
  typedef FcCodec<DT, RSB> RS;
  typedef FcCodec<DT, AGB> AG;
  const fc_i64 mine = a.rank * a.seg_elems + toff;
  if (mine < a.n) {
    const fc_i64 limit = min(a.n, mine + nchunk);
    for (int u = 0; u < a.units; ++u) {
      const int w = L.unit(u);
      const bool active = (fc_i64)w * FC_ELEMS < nchunk;
      float acc[FC_ELEMS];
      fc_owner_sum(
          a.world, a.rank, active, acc, v,
          [&](float (&x)[FC_ELEMS]) {
            fc_load_input<DT>(a, mine + (fc_i64)w * FC_ELEMS, limit, FC_STREAM, L.rot, L.gl, L.lig, L.signs, x,
                              stage);
          },
          [&](int s, float (&x)[FC_ELEMS]) {
            fc_decode<RS>(fc_slot(a, a.rank, a.rs_off, 0, s), nchunk, w, L.gl, L.sym, x, stage);
          });
      typename AG::Packed p;
      AG::pack(acc, L.gl, L.sym, p);
      for (int k = 1; k < a.world; ++k) {
        const int q = (a.rank + k) % a.world;
        AG::write(p, fc_slot(a, q, a.ag_off, 0, a.rank), nchunk, w, L.gl, L.sym, stage);
      }
      AG::unpack(p, L.sym, v);
      epi(mine + (fc_i64)w * FC_ELEMS, limit, v, stage);
    }
  }
}

// 3. all-gather: every other owner's reduced tile.
template <int DT, int RSB, int AGB, typename Epi>
__device__ __forceinline__ void fc_twoshot_all_gather(const FcArgs& a, const FcTile<RSB>& L, fc_i64 toff,
                                                      fc_i64 nchunk, float (&v)[FC_ELEMS], fc_v4* stage,
                                                      const Epi& epi) {
  for (int k = 1; k < a.world; ++k) {
    const int o = (a.rank + k) % a.world;
    const fc_i64 start = o * a.seg_elems + toff;
    if (start >= a.n) continue;
    const unsigned char* src = fc_slot(a, a.rank, a.ag_off, 0, o);
    const fc_i64 limit = min(a.n, start + nchunk);
    for (int u = 0; u < a.units; ++u) {
      const int w = L.unit(u);
      const bool active = (fc_i64)w * FC_ELEMS < nchunk;
      fc_receive<FcCodec<DT, AGB> >(src, nchunk, w, active, L.gl, L.sym, v, stage);
      epi(start + (fc_i64)w * FC_ELEMS, limit, v, stage);
    }
  }
}

template <int DT, int RSB, int AGB>
__device__ void fc_twoshot_impl(const FcArgs& a) {
  __shared__ fc_u32 s_epoch;
  __shared__ fc_v4 s_stage[FC_MAX_WARPS * FC_STAGE_VECS];
  fc_v4* const stage = fc_warp_stage(s_stage);
  const FcTile<RSB> L(a);
  const FcStoreEpilogue<DT, RSB> epi(a, L);
  // Read once here, where the kernels used to derive it: read at each use
  // (after the waits), ptxas allocated worse (benchmarks/sass_diff.py: the
  // float32 lossless one-shot spilled 336 instead of 124 bytes).
  const fc_i64 ag_flags = a.ag_flags_off;
  unsigned char* my_ws = fc_ws(a, a.rank);
  const fc_i64 ntiles = L.ntiles(a);
  fc_u32 e = fc_begin(a, a.ts_epoch_off, &s_epoch);
  float v[FC_ELEMS];

  for (fc_i64 ti = blockIdx.x; ti < ntiles; ti += gridDim.x) {
    ++e;
    const fc_i64 toff = ti * L.tile;
    const fc_i64 nchunk = min(L.tile, a.seg_elems - toff);
    fc_twoshot_reduce_scatter<DT, RSB>(a, L, toff, nchunk, v, stage);
    fc_signal_peers(a.peers, a.flags_off, a.rank, a.world, a.max_blocks, e);
    fc_wait_peers(my_ws, a.flags_off, a.max_blocks, e, fc_wait_ctx(a));
    fc_twoshot_owner<DT, RSB, AGB>(a, L, toff, nchunk, v, stage, epi);
    fc_signal_peers(a.peers, ag_flags, a.rank, a.world, a.max_blocks, e);
    fc_wait_peers(my_ws, ag_flags, a.max_blocks, e, fc_wait_ctx(a));
    fc_twoshot_all_gather<DT, RSB, AGB>(a, L, toff, nchunk, v, stage, epi);
  }
  fc_flag_end<DT, false>(&a, e);
}

// ------------------------------------------------------------------ two-shot halves
// The hierarchical all-reduce's node-local steps (flashcomm_cupy/reference.py
// hierarchical_sum): the two-shot cut after the owner's sum.  The shard
// between the halves is my segment in float32, rotated when the mode rotates
// (a.seg_elems elements, the padding included): the reduce-scatter half
// writes it to a.out, the all-gather half reads it from a.in.  Each keeps both
// rounds of signals per tile, so the slot-reuse argument at the top of this
// file holds across any sequence of two-shots and halves: RS slots are
// written before a round's first signal and read between its two, AG slots
// written between them and read after the second.

// The owner's float32 sum (rank order, own values exact), stored into the shard.
template <int DT, int RSB>
__device__ __forceinline__ void fc_twoshot_owner_shard(const FcArgs& a, const FcTile<RSB>& L, fc_i64 toff,
                                                       fc_i64 nchunk, float (&v)[FC_ELEMS], fc_v4* stage) {
  typedef FcCodec<DT, RSB> RS;
  const fc_i64 mine = a.rank * a.seg_elems + toff;
  const fc_i64 limit = min(a.n, mine + nchunk);
  for (int u = 0; u < a.units; ++u) {
    const int w = L.unit(u);
    const bool active = (fc_i64)w * FC_ELEMS < nchunk;
    float acc[FC_ELEMS];
    if (mine < a.n) {
      fc_owner_sum(
          a.world, a.rank, active, acc, v,
          [&](float (&x)[FC_ELEMS]) {
            fc_load_input<DT>(a, mine + (fc_i64)w * FC_ELEMS, limit, FC_STREAM, L.rot, L.gl, L.lig, L.signs, x, stage);
          },
          [&](int s, float (&x)[FC_ELEMS]) {
            fc_decode<RS>(fc_slot(a, a.rank, a.rs_off, 0, s), nchunk, w, L.gl, L.sym, x, stage);
          });
    } else {
      fc_zero(acc);  // all padding: nobody sent anything, and the sum of zeros is +0
    }
    fc_store_elems<2>(a.out, toff + (fc_i64)w * FC_ELEMS, toff + nchunk, acc, stage);
  }
}

// The owner's re-quantized shard: the all-gather codec's bytes to every peer;
// the owner keeps exactly what it sent (rotated back, rounded to DT).
template <int DT, int RSB, int AGB, typename Epi>
__device__ __forceinline__ void fc_twoshot_owner_from_shard(const FcArgs& a, const FcTile<RSB>& L, fc_i64 toff,
                                                            fc_i64 nchunk, float (&v)[FC_ELEMS], fc_v4* stage,
                                                            const Epi& epi) {
  typedef FcCodec<DT, AGB> AG;
  const fc_i64 mine = a.rank * a.seg_elems + toff;
  if (mine >= a.n) return;  // all padding: nothing sent, nothing read (as fc_twoshot_owner)
  const fc_i64 limit = min(a.n, mine + nchunk);
  for (int u = 0; u < a.units; ++u) {
    const int w = L.unit(u);
    fc_load_elems<2>(a.in, toff + (fc_i64)w * FC_ELEMS, toff + nchunk, FC_STREAM, v, stage);
    typename AG::Packed p;
    AG::pack(v, L.gl, L.sym, p);
    for (int k = 1; k < a.world; ++k) {
      const int q = (a.rank + k) % a.world;
      AG::write(p, fc_slot(a, q, a.ag_off, 0, a.rank), nchunk, w, L.gl, L.sym, stage);
    }
    AG::unpack(p, L.sym, v);
    epi(mine + (fc_i64)w * FC_ELEMS, limit, v, stage);
  }
}

// The reduce-scatter half's end: as fc_flag_end, with NaN over this block's
// tiles of the float32 shard (a.out) when the call failed.
__device__ __noinline__ void fc_shard_end(const FcArgs* ap, fc_u32 e) {
  const FcArgs& a = *ap;
  const FcWait w = fc_wait_ctx(a);
  fc_u32* epochs = reinterpret_cast<fc_u32*>(reinterpret_cast<unsigned char*>(a.peers[a.rank]) + a.ts_epoch_off);
  if (!fc_block_poisoned(w)) {
    if (threadIdx.x == 0) epochs[blockIdx.x] = e;
    return;
  }
  if (threadIdx.x == 0) fc_record_poisoned(a.err, w.poison, a.rank, a.world);
  fc_fill_nan_tiles<2>(a.out, a.seg_elems, a.seg_elems, 1, blockDim.x * FC_ELEMS * a.units);
}

// One half of the two-shot: RS true, the reduce-scatter half (in = my input,
// DT, a.n elements; out = my float32 shard); RS false, the all-gather half
// (in = my float32 shard, the total; out = the result, DT, a.n elements).
// Per tile both rounds of signals, as fc_twoshot_impl: the reduce-scatter
// half's second signal says "my RS slots are read", the all-gather half's
// first "my AG slots are read" (the previous round's all-gather is done).
template <int DT, int RSB, int AGB, bool RS>
__device__ void fc_twoshot_half_impl(const FcArgs& a) {
  __shared__ fc_u32 s_epoch;
  __shared__ fc_v4 s_stage[FC_MAX_WARPS * FC_STAGE_VECS];
  fc_v4* const stage = fc_warp_stage(s_stage);
  const FcTile<RSB> L(a);
  const FcStoreEpilogue<DT, RSB> epi(a, L);
  unsigned char* my_ws = fc_ws(a, a.rank);
  const fc_i64 ntiles = L.ntiles(a);
  fc_u32 e = fc_begin(a, a.ts_epoch_off, &s_epoch);
  float v[FC_ELEMS];
  for (fc_i64 ti = blockIdx.x; ti < ntiles; ti += gridDim.x) {
    ++e;
    const fc_i64 toff = ti * L.tile;
    const fc_i64 nchunk = min(L.tile, a.seg_elems - toff);
    if constexpr (RS) fc_twoshot_reduce_scatter<DT, RSB>(a, L, toff, nchunk, v, stage);
    fc_signal_peers(a.peers, a.flags_off, a.rank, a.world, a.max_blocks, e);
    fc_wait_peers(my_ws, a.flags_off, a.max_blocks, e, fc_wait_ctx(a));
    if constexpr (RS)
      fc_twoshot_owner_shard<DT, RSB>(a, L, toff, nchunk, v, stage);
    else
      fc_twoshot_owner_from_shard<DT, RSB, AGB>(a, L, toff, nchunk, v, stage, epi);
    fc_signal_peers(a.peers, a.ag_flags_off, a.rank, a.world, a.max_blocks, e);
    fc_wait_peers(my_ws, a.ag_flags_off, a.max_blocks, e, fc_wait_ctx(a));
    if constexpr (!RS) fc_twoshot_all_gather<DT, RSB, AGB>(a, L, toff, nchunk, v, stage, epi);
  }
  if constexpr (RS)
    fc_shard_end(&a, e);
  else
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
  const FcTile<RSB> L(a);
  const FcStoreEpilogue<DT, RSB> epi(a, L);
  const int t = L.t, nt = L.nt;
  const int group = L.group;
  const int gl = L.gl, lig = L.lig, gs = __ffs(gl) - 1;
  const bool rot = L.rot, sym = L.sym;
  const fc_u32 signs = L.signs;
  const fc_i64 ag_flags = a.ag_flags_off;  // read once here: see fc_twoshot_impl
  unsigned char* my_ws = fc_ws(a, a.rank);
  const fc_i64 tile = L.tile;
  const fc_i64 ntiles = L.ntiles(a);
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
        if (rot) fc_rotate_fwd(v, gl, lig, signs, a.rot_norm);
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
        // fc_owner_sum's sum, written out: through the helper ptxas schedules this
        // kernel differently (benchmarks/sass_diff.py), and it is the one most tuned.
        float acc[FC_ELEMS];
        fc_zero(acc);
        for (int s = 0; s < a.world; ++s) {
          if (s == a.rank) {
            fc_staged_elems<DT>(in_area(u & 1), v);
            if (rot) fc_rotate_fwd(v, gl, lig, signs, a.rot_norm);
          } else {
            typename RS::Packed p;
            fc_staged_unit<RSB>(src_area(u & 1, s < a.rank ? s : s - 1), w, gs, sym, p);
            RS::unpack(p, sym, v);
            if (!active) fc_zero(v);
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
        epi(mine + (fc_i64)w * FC_ELEMS, limit, v, stage);
        __syncwarp();
      }
    }
    fc_signal_peers(a.peers, ag_flags, a.rank, a.world, a.max_blocks, e);
    fc_wait_peers(my_ws, ag_flags, a.max_blocks, e, fc_wait_ctx(a));

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
        epi(start + (fc_i64)w * FC_ELEMS, min(a.n, start + nchunk), v, stage);
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
  const FcTile<RSB> L(a);
  const FcStoreEpilogue<DT, RSB> epi(a, L);
  const int t = L.t, nt = L.nt;
  const int gl = L.gl, lig = L.lig;
  const bool rot = L.rot, sym = L.sym;
  const fc_u32 signs = L.signs;
  const fc_i64 os_flags = a.os_flags_off;  // read once here: see fc_twoshot_impl
  unsigned char* my_ws = fc_ws(a, a.rank);
  const fc_i64 tile = L.tile;
  const fc_i64 ntiles = L.ntiles(a);
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
      fc_pack_input<DT, RS>(a, toff + (fc_i64)w * FC_ELEMS, limit, FC_CACHED, rot, sym, gl, lig, signs, v, p, stage);
      for (int k = 1; k < a.world; ++k) {
        const int q = (a.rank + k) % a.world;
        RS::write(p, fc_slot(a, q, a.os_off, par, a.rank), nchunk, w, gl, sym, stage);
      }
    }
    fc_signal_peers(a.peers, os_flags, a.rank, a.world, a.max_blocks, e);
    fc_wait_peers(my_ws, os_flags, a.max_blocks, e, fc_wait_ctx(a));
    for (int u = 0; u < a.units; ++u) {
      const int w = u * nt + t;
      const bool active = (fc_i64)w * FC_ELEMS < nchunk;
      const fc_i64 base = toff + (fc_i64)w * FC_ELEMS;
      fc_owner_sum(
          a.world, a.rank, active, acc, v,
          [&](float (&x)[FC_ELEMS]) {
            fc_input_as_sent<DT, RS>(a, base, limit, FC_CACHED, rot, sym, gl, lig, signs, x, stage);
          },
          [&](int s, float (&x)[FC_ELEMS]) {
            fc_decode<RS>(fc_slot(a, a.rank, a.os_off, par, s), nchunk, w, gl, sym, x, stage);
          });
      epi(base, limit, acc, stage);
    }
  }
  fc_flag_end<DT, true>(&a, e);
}
