// flashcomm: the low-latency ("LL") protocol, where the data is its own signal.
//
// The flag protocol (fc_signal.cuh) costs, per hop, a system-scope release
// fence, a separate flag store over NVLink and the peer's poll of that flag
// before the data can be read.  Here every 16-byte vector a peer stores into
// my LL slots is itself the signal (after TensorRT-LLM's "Lamport" one-shot):
//
// * Between calls every LL slot holds the sentinel 0xFFFFFFFF in every 32-bit
//   word (filled at workspace creation).
// * No payload word is ever the sentinel: 16-bit elements equal to 0xFFFF and
//   float32 words equal to 0xFFFFFFFF (negative NaNs with a full payload) are
//   sent as the positive NaN 0x7FFF / 0x7FFFFFFF.  The sum is NaN either way,
//   and sums come out of __fadd_rn / cvt.rn as canonical NaNs anyway.
// * A reader polls a vector until none of its four words is the sentinel
//   (each 32-bit word arrives whole), uses it, and stores the sentinel back,
//   so the slot is empty again for the call after next.
// * Slots alternate by call parity and belong to one block index b:
//   [parity][area][source][b].  A peer writes parity p again two calls later,
//   which needs my data of the call in between, which I send only after the
//   kernel that read (and cleared) parity p has finished.  Every launched
//   block exchanges at least one vector with every peer, so no block index
//   can run ahead of its partners (the host plan guarantees non-empty tiles).
// * Each block keeps its own call counter (parity), advanced by launched
//   blocks only; all ranks launch the same grid for the same call.
#pragma once
#include "fc_common.cuh"
#include "fc_signal.cuh"

#define FC_LL_EMPTY 0xFFFFFFFFu

// Volatile 16-byte load: always goes to L2, where peers' stores land.
__device__ __forceinline__ fc_v4 fc_ld_volatile(const void* p) {
  fc_v4 v;
  asm volatile("ld.volatile.global.v4.u32 {%0,%1,%2,%3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p) : "memory");
  return v;
}

__device__ __forceinline__ bool fc_ll_arrived(const fc_v4& v) {
  return v.x != FC_LL_EMPTY && v.y != FC_LL_EMPTY && v.z != FC_LL_EMPTY && v.w != FC_LL_EMPTY;
}

// A payload word that can never be mistaken for the sentinel (see above).
template <int DT>
__device__ __forceinline__ fc_u32 fc_ll_word(fc_u32 w) {
  if constexpr (DT == 2) {
    return w == FC_LL_EMPTY ? 0x7FFFFFFFu : w;
  } else {
    if ((w & 0xFFFFu) == 0xFFFFu) w = (w & 0xFFFF0000u) | 0x7FFFu;
    if ((w >> 16) == 0xFFFFu) w = (w & 0xFFFFu) | 0x7FFF0000u;
    return w;
  }
}

template <int DT>
__device__ __forceinline__ fc_v4 fc_ll_payload(fc_v4 v) {
  v.x = fc_ll_word<DT>(v.x);
  v.y = fc_ll_word<DT>(v.y);
  v.z = fc_ll_word<DT>(v.z);
  v.w = fc_ll_word<DT>(v.w);
  return v;
}

// acc += the vector's elements, as float32 (acc has 16 / sizeof(T) entries).
template <int DT>
__device__ __forceinline__ void fc_ll_accumulate(float* acc, const fc_v4& v) {
  typedef typename FcElem<DT>::T T;
  constexpr int PER = 16 / (int)sizeof(T);
  const T* e = reinterpret_cast<const T*>(&v);
#pragma unroll
  for (int i = 0; i < PER; ++i) acc[i] = __fadd_rn(acc[i], FcElem<DT>::to_f32(e[i]));
}

template <int DT>
__device__ __forceinline__ fc_v4 fc_ll_round(const float* acc) {
  typedef typename FcElem<DT>::T T;
  constexpr int PER = 16 / (int)sizeof(T);
  fc_v4 v;
  T* e = reinterpret_cast<T*>(&v);
#pragma unroll
  for (int i = 0; i < PER; ++i) e[i] = FcElem<DT>::from_f32(acc[i]);
  return v;
}

// `mine` where s is this rank, else v (word-wise selects keep v[] in registers).
__device__ __forceinline__ fc_v4 fc_ll_pick(bool is_mine, const fc_v4& mine, const fc_v4& v) {
  fc_v4 r;
  r.x = is_mine ? mine.x : v.x;
  r.y = is_mine ? mine.y : v.y;
  r.z = is_mine ? mine.z : v.z;
  r.w = is_mine ? mine.w : v.w;
  return r;
}

// Wait until the vector at each slots[s] (s < world, s != skip) has arrived,
// return them in v[s] and empty the slots.  Polls every source at once, so
// one L2 round trip covers all of them.  False on timeout or abort (recorded
// in `err` like fc_wait_flag); v is then meaningless.
__device__ __forceinline__ bool fc_ll_receive(unsigned char* const (&slots)[FC_MAX_RANKS], int world, int skip,
                                              fc_v4 (&v)[FC_MAX_RANKS], volatile FcError* err,
                                              fc_i64 timeout_ns, int rank, fc_u32 epoch) {
  fc_u32 pending = 0;
#pragma unroll
  for (int s = 0; s < FC_MAX_RANKS; ++s) {
    if (s < world && s != skip) {
      v[s] = fc_ld_volatile(slots[s]);
      if (!fc_ll_arrived(v[s])) pending |= 1u << s;
    }
  }
  if (pending) {
    const fc_u64 t0 = fc_globaltimer();
    for (fc_u32 spins = 1; pending; ++spins) {
#pragma unroll
      for (int s = 0; s < FC_MAX_RANKS; ++s) {
        if (pending & (1u << s)) {
          v[s] = fc_ld_volatile(slots[s]);
          if (fc_ll_arrived(v[s])) pending &= ~(1u << s);
        }
      }
      if (pending && (spins & 1023u) == 0) {
        if (err->abort) return false;
        if ((fc_i64)(fc_globaltimer() - t0) > timeout_ns) {
          if (err->code == 0) {
            err->rank = rank;
            err->peer = __ffs(pending) - 1;
            err->block = blockIdx.x;
            err->epoch = epoch;
            __threadfence_system();
            err->code = 1;
          }
          err->abort = 1;
          __threadfence_system();
          return false;
        }
      }
    }
  }
  const fc_v4 empty = {FC_LL_EMPTY, FC_LL_EMPTY, FC_LL_EMPTY, FC_LL_EMPTY};
#pragma unroll
  for (int s = 0; s < FC_MAX_RANKS; ++s)
    if (s < world && s != skip) fc_st_v4(slots[s], empty);
  return true;
}
