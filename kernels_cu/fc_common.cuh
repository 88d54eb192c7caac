// flashcomm: element types, exact float conversions and vector memory helpers.
//
// Header-free on purpose (no cuda_fp16.h / cuda_bf16.h / <cstdint>): NVRTC
// through CuPy and nvcc both compile it without any include path but ours.
// Every float operation on the quantization path is an explicitly rounded
// intrinsic (__fadd_rn, __fmul_rn, ...) so the compiler cannot contract it
// into an FMA: the NumPy reference does two roundings, and so must we.
#pragma once
#include "fc_profile.cuh"

typedef unsigned char fc_u8;
typedef unsigned short fc_u16;
typedef unsigned int fc_u32;
typedef unsigned long long fc_u64;
typedef long long fc_i64;

#define FC_MAX_RANKS 8
// Elements per thread and unit: 32 (one 16-byte INT4 store), or 16 or 8 where
// the host builds a module for it (flashcomm_cupy._kernels.UNIT_ELEMS).
#ifndef FC_ELEMS
#define FC_ELEMS 32
#endif
#define FC_ELEMS_LOG2 (FC_ELEMS == 32 ? 5 : FC_ELEMS == 16 ? 4 : 3)
#define FC_FLT_MIN 1.17549435e-38f

// ----------------------------------------------------------------- element types
// DT codes match flashcomm_cupy.dtypes.KERNEL_DTYPE_CODE.
template <int DT> struct FcElem;

template <> struct FcElem<0> {  // float16, stored as raw bits
  typedef fc_u16 T;
  static __device__ __forceinline__ float to_f32(T h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
  }
  static __device__ __forceinline__ T from_f32(float f) {
    T h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
  }
};

template <> struct FcElem<1> {  // bfloat16, stored as raw bits
  typedef fc_u16 T;
  static __device__ __forceinline__ float to_f32(T h) { return __uint_as_float(((fc_u32)h) << 16); }
  static __device__ __forceinline__ T from_f32(float f) {
    T h;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
  }
};

template <> struct FcElem<2> {  // float32
  typedef float T;
  static __device__ __forceinline__ float to_f32(T f) { return f; }
  static __device__ __forceinline__ T from_f32(float f) { return f; }
};

// ----------------------------------------------------------------- memory helpers
struct __align__(16) fc_v4 { fc_u32 x, y, z, w; };

// Receive slots are written by peers over NVLink; read them through L2 only
// (ld.global.cg) so a stale line in this SM's L1 from an earlier round can
// never be returned.
__device__ __forceinline__ fc_v4 fc_ld_cg(const void* p) {
  fc_v4 v;
  asm volatile("ld.global.cg.v4.u32 {%0,%1,%2,%3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
  return v;
}
__device__ __forceinline__ fc_u32 fc_ld_cg_u32(const void* p) {
  fc_u32 v;
  asm volatile("ld.global.cg.u32 %0, [%1];" : "=r"(v) : "l"(p));
  return v;
}
__device__ __forceinline__ float fc_ld_cg_f32(const void* p) { return __uint_as_float(fc_ld_cg_u32(p)); }
__device__ __forceinline__ void fc_st_v4(void* p, fc_v4 v) { *reinterpret_cast<fc_v4*>(p) = v; }
__device__ __forceinline__ void fc_st_u32(void* p, fc_u32 v) { *reinterpret_cast<fc_u32*>(p) = v; }

// Streaming access for data touched once (the caller's input and output):
// first in line for L2 eviction, so the workspace slots that peers write and
// this GPU reads back soon after stay in L2, and no L1 allocation.
// (Cache policies need sm_80; older GPUs get plain accesses.)
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
__device__ __forceinline__ fc_u64 fc_evict_first_policy() {
  fc_u64 pol;
  asm("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(pol));
  return pol;
}
__device__ __forceinline__ fc_v4 fc_ld_stream(const void* p) {
  fc_v4 v;
  asm volatile("ld.global.L1::no_allocate.L2::cache_hint.v4.u32 {%0,%1,%2,%3}, [%4], %5;"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p), "l"(fc_evict_first_policy()));
  return v;
}
__device__ __forceinline__ void fc_st_stream(void* p, fc_v4 v) {
  asm volatile("st.global.L1::no_allocate.L2::cache_hint.v4.u32 [%0], {%1,%2,%3,%4}, %5;"
               ::"l"(p), "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w), "l"(fc_evict_first_policy()) : "memory");
}
#else
__device__ __forceinline__ fc_v4 fc_ld_stream(const void* p) { return *reinterpret_cast<const fc_v4*>(p); }
__device__ __forceinline__ void fc_st_stream(void* p, fc_v4 v) { fc_st_v4(p, v); }
#endif

// How a unit's elements are read: kept in the caches (read more than once),
// streamed (read once), or through L2 only (slots written by peers: a stale
// line in this SM's L1 from an earlier round must never be returned).
enum FcAccess { FC_CACHED, FC_STREAM, FC_PEER };

__device__ __forceinline__ fc_u16 fc_ld_cg_u16(const void* p) {
  fc_u16 v;
  asm volatile("ld.global.cg.u16 %0, [%1];" : "=h"(v) : "l"(p));
  return v;
}
__device__ __forceinline__ void fc_st_v2(void* p, fc_u32 a, fc_u32 b) {
  asm volatile("st.global.v2.u32 [%0], {%1,%2};" ::"l"(p), "r"(a), "r"(b) : "memory");
}
__device__ __forceinline__ void fc_ld_cg_v2(const void* p, fc_u32& a, fc_u32& b) {
  asm volatile("ld.global.cg.v2.u32 {%0,%1}, [%2];" : "=r"(a), "=r"(b) : "l"(p));
}

// ----------------------------------------------------------------- warp-transposed access
// A lane owns one unit of FC_ELEMS consecutive elements, and the 32 lanes of a
// warp own 32 consecutive units.  Reading a unit as the lane's own 16-byte
// vectors would make each warp instruction touch 32 pieces 64 bytes apart:
// half-used sectors, and on H100 three times the L2 traffic of the data
// (Nsight Compute, benchmarks/NOTES.md v5).  Instead the warp moves its whole
// span with coalesced vectors (vector 32j + l goes to lane l) and swaps them
// through a per-warp shared-memory stage.  The stage pads one vector every
// eight, so both the row-wise and the column-wise side are free of bank
// conflicts.  Contract: all 32 lanes call together, lane l with the unit
// right after lane l-1's, and `stage` is this warp's FC_STAGE_VECS vectors.
#define FC_STAGE_VECS 144  // 128 vectors (2 KiB) moved per round + one pad per 8
#define FC_MAX_WARPS 16    // blocks of up to 512 threads

__device__ __forceinline__ int fc_stage_index(int q) { return q + (q >> 3); }

__device__ __forceinline__ fc_v4* fc_warp_stage(fc_v4* block_stage) {
  return block_stage + (threadIdx.x >> 5) * FC_STAGE_VECS;
}

// How a warp's span of 32*V vectors moves: in rounds of at most 128 vectors
// (the stage's size); in round r, lanes [r*LPR, (r+1)*LPR) are served, and
// lane l's i-th coalesced vector is span vector span_vector(i, l).
template <int V>
struct FcWarpShape {
  static_assert(V == 1 || V == 2 || V == 4 || V == 8, "vectors per lane");
  static constexpr int R = V == 8 ? 2 : 1;  // rounds
  static constexpr int LPR = 32 / R;        // lanes served per round
  static constexpr int J = V * LPR / 32;    // vectors each lane moves per round
  static __device__ __forceinline__ int span_vector(int i, int lane) { return (i / J) * (J * 32) + (i % J) * 32 + lane; }
  // where lane `lane`'s own k-th vector sits in the stage during its round
  static __device__ __forceinline__ int own_slot(int lane, int k) { return fc_stage_index((lane % LPR) * V + k); }
};

// Lane l receives vectors [V*l, V*l + V) of its warp's span; load(q) fetches span vector q.
template <int V, typename Load>
__device__ __forceinline__ void fc_warp_gather(fc_v4* stage, Load load, fc_v4 (&out)[V]) {
  typedef FcWarpShape<V> S;
  const int lane = threadIdx.x & 31;
  if constexpr (V == 1) {  // lane l's unit is span vector l: coalesced as it is, no stage
    out[0] = load(lane);
    return;
  }
  fc_v4 tmp[V];
#pragma unroll
  for (int i = 0; i < V; ++i) tmp[i] = load(S::span_vector(i, lane));  // all in flight
#pragma unroll
  for (int r = 0; r < S::R; ++r) {
#pragma unroll
    for (int j = 0; j < S::J; ++j) stage[fc_stage_index(j * 32 + lane)] = tmp[r * S::J + j];
    __syncwarp();
    if (lane / S::LPR == r) {
#pragma unroll
      for (int k = 0; k < V; ++k) out[k] = stage[S::own_slot(lane, k)];
    }
    __syncwarp();
  }
}

// The inverse: lane l's vectors in[0..V) become span vectors [V*l, V*l + V); store(q, x) writes one.
template <int V, typename Store>
__device__ __forceinline__ void fc_warp_scatter(fc_v4* stage, const fc_v4 (&in)[V], Store store) {
  typedef FcWarpShape<V> S;
  const int lane = threadIdx.x & 31;
  if constexpr (V == 1) {
    store(lane, in[0]);
    return;
  }
  fc_v4 tmp[V];
#pragma unroll
  for (int r = 0; r < S::R; ++r) {
    if (lane / S::LPR == r) {
#pragma unroll
      for (int k = 0; k < V; ++k) stage[S::own_slot(lane, k)] = in[k];
    }
    __syncwarp();
#pragma unroll
    for (int j = 0; j < S::J; ++j) tmp[r * S::J + j] = stage[fc_stage_index(j * 32 + lane)];
    __syncwarp();
  }
#pragma unroll
  for (int i = 0; i < V; ++i) store(S::span_vector(i, lane), tmp[i]);
}

template <typename T>
__device__ __forceinline__ T fc_ld_elem(const T* p, FcAccess access) {
  if constexpr (sizeof(T) == 2) {
    return access != FC_PEER ? *p : fc_ld_cg_u16(p);  // 16-bit types are stored as raw fc_u16 bits
  } else {
    return access != FC_PEER ? *p : __uint_as_float(fc_ld_cg_u32(p));
  }
}

__device__ __forceinline__ fc_v4 fc_ld_vec(const void* p, FcAccess access) {
  return access == FC_STREAM ? fc_ld_stream(p) : access == FC_PEER ? fc_ld_cg(p) : *reinterpret_cast<const fc_v4*>(p);
}

// The 16-byte vector of DT elements at `at` (element index `e`); elements at
// or beyond `n` read as 0 and are never touched.
template <int DT>
__device__ __forceinline__ fc_v4 fc_ld_vec_upto(const typename FcElem<DT>::T* at, fc_i64 e, fc_i64 n,
                                                FcAccess access) {
  typedef typename FcElem<DT>::T T;
  constexpr int PER = 16 / (int)sizeof(T);
  if (e + PER <= n) return fc_ld_vec(at, access);
  fc_v4 r = {0u, 0u, 0u, 0u};
  T* t = reinterpret_cast<T*>(&r);
#pragma unroll
  for (int i = 0; i < PER; ++i)
    if (e + i < n) t[i] = fc_ld_elem(at + i, access);
  return r;
}

// Store the vector `x` of DT elements at `at` (element index `e`); elements at
// or beyond `n` are not written.  `stream`: see fc_st_stream.
template <int DT>
__device__ __forceinline__ void fc_st_vec_upto(typename FcElem<DT>::T* at, fc_i64 e, fc_i64 n, const fc_v4& x,
                                               bool stream) {
  typedef typename FcElem<DT>::T T;
  constexpr int PER = 16 / (int)sizeof(T);
  if (e + PER <= n) {
    if (stream) fc_st_stream(at, x);
    else fc_st_v4(at, x);
  } else {
    const T* t = reinterpret_cast<const T*>(&x);
#pragma unroll
    for (int i = 0; i < PER; ++i)
      if (e + i < n) at[i] = t[i];
  }
}

// A lane's unit of DT elements, held as 16-byte vectors, widened to float32 (exact).
template <int DT, int V>
__device__ __forceinline__ void fc_widen_elems(const fc_v4 (&w)[V], float (&v)[FC_ELEMS]) {
  typedef typename FcElem<DT>::T T;
  constexpr int PER = 16 / (int)sizeof(T);
  static_assert(V * PER == FC_ELEMS, "one unit");
#pragma unroll
  for (int k = 0; k < V; ++k) {
    const T* e = reinterpret_cast<const T*>(&w[k]);
#pragma unroll
    for (int i = 0; i < PER; ++i) v[k * PER + i] = FcElem<DT>::to_f32(e[i]);
  }
}

// Load the lane's unit (FC_ELEMS elements from element `base`) as float32;
// elements at or beyond `n` read as 0 (the zero padding of the reference)
// and are never touched.
template <int DT>
__device__ __forceinline__ void fc_load_elems(const void* src, fc_i64 base, fc_i64 n, FcAccess access,
                                              float (&v)[FC_ELEMS], fc_v4* stage) {
  typedef typename FcElem<DT>::T T;
  constexpr int PER = 16 / (int)sizeof(T);  // elements per vector
  constexpr int V = FC_ELEMS / PER;         // vectors per lane
  const fc_i64 span = base - (fc_i64)(threadIdx.x & 31) * FC_ELEMS;
  const T* p = reinterpret_cast<const T*>(src) + span;
  fc_v4 w[V];
  fc_warp_gather<V>(stage, [&](int q) -> fc_v4 {
    return fc_ld_vec_upto<DT>(p + (fc_i64)q * PER, span + (fc_i64)q * PER, n, access);
  }, w);
  fc_widen_elems<DT>(w, v);
}

// Store the lane's unit rounded to DT at element `base`; elements >= n are not
// written.  `stream`: the caller's output, written once (see fc_st_stream).
template <int DT>
__device__ __forceinline__ void fc_store_elems(void* dst, fc_i64 base, fc_i64 n, const float (&v)[FC_ELEMS],
                                               fc_v4* stage, bool stream = false) {
  typedef typename FcElem<DT>::T T;
  constexpr int PER = 16 / (int)sizeof(T);
  constexpr int V = FC_ELEMS / PER;
  const fc_i64 span = base - (fc_i64)(threadIdx.x & 31) * FC_ELEMS;
  T* p = reinterpret_cast<T*>(dst) + span;
  fc_v4 w[V];
#pragma unroll
  for (int k = 0; k < V; ++k) {
    T* e = reinterpret_cast<T*>(&w[k]);
#pragma unroll
    for (int i = 0; i < PER; ++i) e[i] = FcElem<DT>::from_f32(v[k * PER + i]);
  }
  fc_warp_scatter<V>(stage, w, [&](int q, const fc_v4& x) {
    fc_st_vec_upto<DT>(p + (fc_i64)q * PER, span + (fc_i64)q * PER, n, x, stream);
  });
}
