// flashcomm: the lossless LL kernels (data as its own signal, fc_ll.cuh): one-shot and two-shot.
//
// Same sums as the flag kernels (float32, rank order, from +0), but no flags:
// see fc_ll.cuh.  Block b owns vectors [b * ll_tile, (b + 1) * ll_tile) of
// the message (one-shot) or of every owner segment (two-shot); one tile per
// block and call, so each block index uses its LL slots once per call.
#pragma once
#include "fc_common.cuh"
#include "fc_ll.cuh"
#include "fc_args.cuh"
#include "fc_transport.cuh"
#include "fc_poison.cuh"

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
  fc_ll_end<DT>(a, c.call, failed, 1, c.first * PER, (fc_i64)c.nvec * PER);
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
  fc_ll_end<DT>(a, c.call, failed, a.world, c.first * PER, (fc_i64)c.nvec * PER);
}
