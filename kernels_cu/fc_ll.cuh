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
#include "fc_quant.cuh"
#include "fc_signal.cuh"

#define FC_LL_EMPTY 0xFFFFFFFFu

// Every access to an LL slot is volatile (relaxed, system scope): the
// payload stores, the polls and the sentinel stores race by design, and only
// such "strong" accesses get PTX's guarantee that each 32-bit (or 64-bit)
// element is seen whole.  Volatile loads also always go to L2, where peers'
// stores land.
__device__ __forceinline__ void fc_st_volatile(void* p, fc_v4 v) {
  asm volatile("st.volatile.global.v4.u32 [%0], {%1,%2,%3,%4};" ::"l"(p), "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w)
               : "memory");
}

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

// Poll the items whose bits are set in `pending` until each has arrived:
// reload(j) loads item j again and says whether it has.  Every 1024 rounds
// fc_wait_give_up decides whether to stop; its record names peer_of(j) of the
// first item still missing.  False on timeout or abort.
template <int N, typename Reload, typename PeerOf>
__device__ __forceinline__ bool fc_ll_poll(fc_u32 pending, Reload reload, PeerOf peer_of, const FcWait& w,
                                           fc_u32 epoch) {
  if constexpr (FC_PROFILE_SKIPS_WAITS) pending = 0;  // timing variant only (fc_profile.cuh): wrong results
  if (!pending) return true;
  const fc_u64 t0 = fc_globaltimer();
  for (fc_u32 spins = 1; pending; ++spins) {
#pragma unroll
    for (int j = 0; j < N; ++j)
      if ((pending & (1u << j)) && reload(j)) pending &= ~(1u << j);
    if (pending && (spins & 1023u) == 0 &&
        fc_wait_give_up(t0, w, peer_of(__ffs(pending) - 1), epoch))
      return false;
  }
  return true;
}

// Wait until the vector at each slots[s] (s < world, s != skip) has arrived,
// return them in v[s] and empty the slots.  Polls every source at once, so
// one L2 round trip covers all of them.  False on timeout or abort (recorded
// like fc_wait_flag); v is then meaningless and the slots are left as they are.
__device__ __forceinline__ bool fc_ll_receive(unsigned char* const (&slots)[FC_MAX_RANKS], int world, int skip,
                                              fc_v4 (&v)[FC_MAX_RANKS], const FcWait& w, fc_u32 epoch) {
  fc_u32 pending = 0;
#pragma unroll
  for (int s = 0; s < FC_MAX_RANKS; ++s) {
    if (s < world && s != skip) {
      v[s] = fc_ld_volatile(slots[s]);
      if (!fc_ll_arrived(v[s])) pending |= 1u << s;
    }
  }
  if (!fc_ll_poll<FC_MAX_RANKS>(
          pending, [&](int s) { return fc_ll_arrived(v[s] = fc_ld_volatile(slots[s])); }, [](int s) { return s; }, w,
          epoch))
    return false;
  const fc_v4 empty = {FC_LL_EMPTY, FC_LL_EMPTY, FC_LL_EMPTY, FC_LL_EMPTY};
#pragma unroll
  for (int s = 0; s < FC_MAX_RANKS; ++s)
    if (s < world && s != skip) fc_st_volatile(slots[s], empty);
  return true;
}

// ------------------------------------------------------------------ quantized units
// The LL form of a quantized unit (FcUnit): every code word travels paired with
// a metadata word (scale, min, scale, min, ...) as one 64-bit element, stored
// and loaded with 64-bit element accesses (single-copy atomic), so the pair
// arrives whole.  Metadata words are never the sentinel: the scale is a
// non-negative finite float, the min finite, and a non-finite group carries
// the canonical NaN 0x7fc00000 in both.  A pair has arrived when its
// metadata word is not the sentinel; code words may take any value.
template <int BITS>
struct FcLLq {
  // code words per unit, rounded up to whole 16-byte vectors (pairs of pairs)
  static constexpr int WORDS = (FcUnit<BITS>::LO + (BITS == 6 ? FcUnit<BITS>::HI : 0) + 1) & ~1;
  static constexpr int VECS = WORDS / 2;                           // 16-byte vectors per unit
  static constexpr int BYTES = 16 * VECS;
};

__device__ __forceinline__ void fc_st_volatile_v2_u64(void* p, fc_u64 a, fc_u64 b) {
  asm volatile("st.volatile.global.v2.u64 [%0], {%1,%2};" ::"l"(p), "l"(a), "l"(b) : "memory");
}
__device__ __forceinline__ void fc_ld_volatile_v2_u64(const void* p, fc_u64& a, fc_u64& b) {
  asm volatile("ld.volatile.global.v2.u64 {%0,%1}, [%2];" : "=l"(a), "=l"(b) : "l"(p) : "memory");
}

template <int BITS>
__device__ __forceinline__ fc_u32 fc_llq_code_word(const FcUnit<BITS>& u, int k) {
  constexpr int LO = FcUnit<BITS>::LO, HI = BITS == 6 ? FcUnit<BITS>::HI : 0;
  return k < LO ? u.lo[k] : k < LO + HI ? u.hi[k - LO] : 0u;
}

template <int BITS>
__device__ __forceinline__ void fc_llq_write(unsigned char* dst, const FcUnit<BITS>& u) {
  const fc_u64 s = (fc_u64)__float_as_uint(u.scale) << 32, m = (fc_u64)__float_as_uint(u.mn) << 32;
#pragma unroll
  for (int j = 0; j < FcLLq<BITS>::VECS; ++j)
    fc_st_volatile_v2_u64(dst + 16 * j, s | fc_llq_code_word<BITS>(u, 2 * j), m | fc_llq_code_word<BITS>(u, 2 * j + 1));
}

template <int BITS>
__device__ __forceinline__ bool fc_llq_arrived(const fc_u64 (&r)[FcLLq<BITS>::WORDS]) {
  bool ok = true;
#pragma unroll
  for (int k = 0; k < FcLLq<BITS>::WORDS; ++k) ok &= (fc_u32)(r[k] >> 32) != FC_LL_EMPTY;
  return ok;
}

template <int BITS>
__device__ __forceinline__ void fc_llq_load(const unsigned char* src, fc_u64 (&r)[FcLLq<BITS>::WORDS]) {
#pragma unroll
  for (int j = 0; j < FcLLq<BITS>::VECS; ++j) fc_ld_volatile_v2_u64(src + 16 * j, r[2 * j], r[2 * j + 1]);
}

template <int BITS>
__device__ __forceinline__ void fc_llq_unit(const fc_u64 (&r)[FcLLq<BITS>::WORDS], FcUnit<BITS>& u) {
  constexpr int LO = FcUnit<BITS>::LO, HI = FcUnit<BITS>::HI;
#pragma unroll
  for (int k = 0; k < HI; ++k) u.hi[k] = 0;
#pragma unroll
  for (int k = 0; k < FcLLq<BITS>::WORDS; ++k) {
    if (k < LO) u.lo[k] = (fc_u32)r[k];
    else if (BITS == 6 && k < LO + HI) u.hi[k - LO] = (fc_u32)r[k];
  }
  u.scale = __uint_as_float((fc_u32)(r[0] >> 32));
  u.mn = __uint_as_float((fc_u32)(r[1] >> 32));
}

// Receive the units at slots[j] of sources s0 + j (where use[j]) at once,
// then empty those slots.  False on timeout or abort.
template <int BITS, int B>
__device__ __forceinline__ bool fc_llq_receive(unsigned char* const (&slots)[B], const bool (&use)[B],
                                               FcUnit<BITS> (&u)[B], const FcWait& w, int s0, fc_u32 epoch) {
  constexpr int W = FcLLq<BITS>::WORDS;
  fc_u64 r[B][W];
  fc_u32 pending = 0;
#pragma unroll
  for (int j = 0; j < B; ++j) {
    if (use[j]) {
      fc_llq_load<BITS>(slots[j], r[j]);
      if (!fc_llq_arrived<BITS>(r[j])) pending |= 1u << j;
    }
  }
  if (!fc_ll_poll<B>(
          pending, [&](int j) { fc_llq_load<BITS>(slots[j], r[j]); return fc_llq_arrived<BITS>(r[j]); },
          [&](int j) { return s0 + j; }, w, epoch))
    return false;
  const fc_u64 empty = ~0ull;
#pragma unroll
  for (int j = 0; j < B; ++j) {
    if (use[j]) {
      fc_llq_unit<BITS>(r[j], u[j]);
#pragma unroll
      for (int v = 0; v < FcLLq<BITS>::VECS; ++v) fc_st_volatile_v2_u64(slots[j] + 16 * v, empty, empty);
    }
  }
  return true;
}
