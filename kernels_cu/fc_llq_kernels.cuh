// flashcomm: the quantized LL kernels (units in their LL form, fc_ll.cuh FcLLq): two-shot and one-shot.
#pragma once
#include "fc_common.cuh"
#include "fc_quant.cuh"
#include "fc_ll.cuh"
#include "fc_args.cuh"
#include "fc_transport.cuh"
#include "fc_poison.cuh"
#include "fc_reduce.cuh"

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
// with an INT8 step, which the host runs at 128 (llq_threads); the 8-element
// builds (the one-shot alone) fit them too.
#define FC_LLQ_THREADS (FC_ELEMS <= 16 ? 256 : 128)
// Both kernels' launch bounds also name the two blocks per SM the LL protocol
// needs.  The two-shot's threads are those the host runs it with: the
// 16-element builds with an INT8 step need more than 128 registers and run
// 128 threads (plan.llq_threads).  Bounded by threads alone, ptxas traded
// registers for occupancies nothing uses: the INT8 two-shot took 128 registers
// and 70-114 bytes of spills once the rotation got cheaper (INT4/INT8 spilled 92
// before), the 32-element INT4/INT8 one 168 with spills (benchmarks/sass_diff.py).
#define FC_LLQ_TWOSHOT_THREADS_FOR(RSB, AGB) (FC_ELEMS == 16 && ((RSB) == 8 || (AGB) == 8) ? 128 : FC_LLQ_THREADS)
#define FC_LLQ_TWOSHOT_THREADS FC_LLQ_TWOSHOT_THREADS_FOR(FC_RS_BITS, FC_AG_BITS)

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
  // Stages for the warps of the block the host runs (FC_LLQ_TWOSHOT_THREADS, the
  // launch bound), and my own contributions to THREADS units of the tile's
  // owner sums (step 2; see load_own).
  constexpr int THREADS = FC_LLQ_TWOSHOT_THREADS_FOR(RSB, AGB);
  __shared__ fc_v4 s_stage[THREADS / 32 * FC_STAGE_VECS];
  __shared__ fc_v4 s_own[FC_ELEMS / 4][THREADS];
  fc_v4* const stage = fc_warp_stage(s_stage);
  typedef FcCodec<DT, RSB> RS;
  typedef FcCodec<DT, AGB> AG;
  constexpr int B = FC_LLQ_BATCH;
  const FcTile<RSB> L(a);
  const FcStoreEpilogue<DT, RSB> epi(a, L);
  const int t = L.t, nt = L.nt;
  const int gl = L.gl, lig = L.lig;
  const bool rot = L.rot, sym = L.sym;
  const fc_u32 signs = L.signs;
  const FcLLCall call = fc_ll_begin(a);
  const fc_u32 e = call.e;
  const int par = e & 1;
  const fc_i64 tile = (fc_i64)nt * FC_ELEMS * a.units;  // L.tile, read after fc_ll_begin's load as before
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
      fc_pack_input<DT, RS>(a, start + (fc_i64)w * FC_ELEMS, limit, FC_STREAM, rot, sym, gl, lig, signs, v, p, stage);
      if ((fc_i64)w * FC_ELEMS < nchunk) fc_llq_write<RSB>(dst + (fc_i64)w * FcLLq<RSB>::BYTES, p);
    }
  }

  // My own exact contribution to each unit's owner sum (my input, rotated when
  // the mode rotates) goes to s_own before the wait for the peers' units, so its
  // HBM read (step 1 never touches my own segment) and its rotation overlap their
  // flight instead of following it on every call's critical path.  In registers
  // across the wait it took the 256-thread builds past their 128 (INT6: 44 bytes
  // of spills).  Thread t's columns are slot * nt + t for slot < own_units: its
  // first own_units units (every unit of the shapes the table runs) are loaded in
  // step 1b, each later one in the slot of the unit own_units before it, which
  // step 2 has summed by then; no thread touches another's column (the block's
  // warps are not in step).
  const fc_i64 mine = a.rank * a.seg_elems + toff;
  const fc_i64 mine_limit = min(a.n, mine + nchunk);
  const int own_units = THREADS / nt;  // >= 1: nt <= THREADS (the launch bound)
  auto load_own = [&](int u, int slot) {
    fc_load_input<DT>(a, mine + (fc_i64)(u * nt + t) * FC_ELEMS, mine_limit, FC_STREAM, rot, gl, lig, signs, v,
                      stage);
#pragma unroll
    for (int k = 0; k < FC_ELEMS / 4; ++k)
      s_own[k][slot * nt + t] = fc_v4{__float_as_uint(v[4 * k]), __float_as_uint(v[4 * k + 1]),
                                      __float_as_uint(v[4 * k + 2]), __float_as_uint(v[4 * k + 3])};
  };
  // 1b. my first own_units units' contributions, while the reduce-scatter flies.
  for (int u = 0; u < own_units && u < a.units; ++u) load_own(u, u);

  // 2. owner: sum in rank order (own values exact), re-quantize, all-gather.
  for (int u = 0, slot = 0; u < a.units; ++u, slot = slot + 1 == own_units ? 0 : slot + 1) {
    const int w = u * nt + t;
    const bool active = (fc_i64)w * FC_ELEMS < nchunk;
    if (u >= own_units) load_own(u, slot);
    float acc[FC_ELEMS];
    FcUnit<RSB> got[B];
    fc_owner_sum<B>(
        a.world, a.rank, active, acc, v,
        [&](int s0) {
          if (!fc_llq_receive_batch<RSB, B>(a, par, 0, s0, w, active && !failed, got, e)) failed = true;
        },
        [&](float (&x)[FC_ELEMS]) {
#pragma unroll
          for (int k = 0; k < FC_ELEMS / 4; ++k) {
            const fc_v4 q = s_own[k][slot * nt + t];
            x[4 * k] = __uint_as_float(q.x); x[4 * k + 1] = __uint_as_float(q.y);
            x[4 * k + 2] = __uint_as_float(q.z); x[4 * k + 3] = __uint_as_float(q.w);
          }
        },
        [&](int j, int, float (&x)[FC_ELEMS]) { RS::unpack(got[j], sym, x); });
    typename AG::Packed p;
    AG::pack(acc, gl, sym, p);
    if (active && !failed) {
      for (int k = 1; k < a.world; ++k)
        fc_llq_write<AGB>(fc_ll_slot(a, (a.rank + k) % a.world, par, 1, a.rank) + (fc_i64)w * FcLLq<AGB>::BYTES, p);
    }
    AG::unpack(p, sym, v);  // the owner keeps exactly what it sent
    epi(mine + (fc_i64)w * FC_ELEMS, mine_limit, v, stage);
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
        epi(start + (fc_i64)w * FC_ELEMS, min(a.n, start + nchunk), v, stage);
      }
    }
  }
  fc_ll_end<DT>(a, call, failed, a.world, toff, nchunk);
}

// Quantized LL one-shot: the flag one-shot's arithmetic (every rank reduces
// the whole message: each source's units decoded and summed in rank order,
// mine as the peers decode it), with units moved in their LL form.  Block b
// handles tile b (threads * FC_ELEMS * units elements) of the message,
// exactly one per call, padding included, so every block exchanges with every
// peer (the LL slot-reuse argument, fc_ll.cuh).  RC: where the rotation's
// butterflies live (FcRotCode); the host runs the FC_ROT_SHARED build
// (fc_llq_oneshot_rot) for rotating modes from SHARED_ROTATION_MIN_WARPS
// warps (plan.py: shares_rotation_code) and the inline one, which then has no
// call in it, for the rest.
template <int DT, int RSB, FcRotCode RC>
__device__ void fc_llq_oneshot_impl(const FcArgs& a) {
  __shared__ fc_v4 s_stage[FC_MAX_WARPS * FC_STAGE_VECS];
  fc_v4* const stage = fc_warp_stage(s_stage);
  typedef FcCodec<DT, RSB> RS;
  constexpr int B = FC_LLQ_BATCH;
  const FcTile<RSB> L(a);
  const FcStoreEpilogue<DT, RSB, RC> epi(a, L);
  const int t = L.t, nt = L.nt;
  const int gl = L.gl, lig = L.lig;
  const bool rot = L.rot, sym = L.sym;
  const fc_u32 signs = L.signs;
  const FcLLCall call = fc_ll_begin(a);
  const fc_u32 e = call.e;
  const int par = e & 1;
  const fc_i64 tile = (fc_i64)nt * FC_ELEMS * a.units;  // L.tile, read after fc_ll_begin's load as before
  const fc_i64 toff = blockIdx.x * tile;
  const fc_i64 nchunk = min(tile, a.seg_elems - toff);
  const fc_i64 limit = min(a.n, toff + nchunk);
  float v[FC_ELEMS];
  bool failed = false;  // as in fc_llq_twoshot_impl

  // 1. my tile, quantized, to every peer.  Each thread's first unit also stays
  // packed in shared memory (its own slot: no barrier) for step 2, which adds
  // it instead of loading, rotating and quantizing my input again after the
  // wait for the peers; with a.units 1 (small messages) nothing is packed
  // twice.  Held in registers instead, the unit took the INT8 build past the
  // 128 registers of two 256-thread blocks (166).
  __shared__ typename RS::Packed s_first[FC_LLQ_THREADS];
  for (int u = 0; u < a.units; ++u) {
    const int w = u * nt + t;
    typename RS::Packed p;
    fc_pack_input<DT, RS, RC>(a, toff + (fc_i64)w * FC_ELEMS, limit, FC_CACHED, rot, sym, gl, lig, signs, v, p, stage);
    if (u == 0) s_first[t] = p;
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
    // fc_owner_sum's sum, written out: through the helper ptxas schedules this
    // kernel differently (benchmarks/sass_diff.py).
    float acc[FC_ELEMS];
#pragma unroll
    for (int i = 0; i < FC_ELEMS; ++i) acc[i] = 0.0f;
    for (int s0 = 0; s0 < a.world; s0 += B) {
      FcUnit<RSB> got[B];
      if (!fc_llq_receive_batch<RSB, B>(a, par, 0, s0, w, active && !failed, got, e)) failed = true;
#pragma unroll
      for (int j = 0; j < B; ++j) {
        if (s0 + j >= a.world) break;
        if (s0 + j == a.rank) {  // mine exactly as the peers decode it: what step 1 packed
          if (u == 0) {
            RS::unpack(s_first[t], sym, v);
          } else {
            typename RS::Packed p;
            fc_pack_input<DT, RS, RC>(a, base, limit, FC_CACHED, rot, sym, gl, lig, signs, v, p, stage);
            RS::unpack(p, sym, v);
          }
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
    epi(base, limit, acc, stage);
  }
  fc_ll_end<DT>(a, call, failed, 1, toff, nchunk);
}
