// flashcomm: element types, exact float conversions and vector memory helpers.
//
// Header-free on purpose (no cuda_fp16.h / cuda_bf16.h / <cstdint>): NVRTC
// through CuPy and nvcc both compile it without any include path but ours.
// Every float operation on the quantization path is an explicitly rounded
// intrinsic (__fadd_rn, __fmul_rn, ...) so the compiler cannot contract it
// into an FMA: the NumPy reference does two roundings, and so must we.
#pragma once

typedef unsigned char fc_u8;
typedef unsigned short fc_u16;
typedef unsigned int fc_u32;
typedef unsigned long long fc_u64;
typedef long long fc_i64;

#define FC_MAX_RANKS 8
#define FC_ELEMS 32  // elements per thread: one 16-byte INT4 store, one group lane
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

// Load FC_ELEMS consecutive elements starting at element `base` as float32;
// elements at or beyond `n` read as 0 (the zero padding of the reference).
template <int DT>
__device__ __forceinline__ void fc_load_elems(const void* src, fc_i64 base, fc_i64 n, bool cached,
                                              float (&v)[FC_ELEMS]) {
  typedef typename FcElem<DT>::T T;
  const T* p = reinterpret_cast<const T*>(src) + base;
  if (base + FC_ELEMS <= n) {
    const int words = FC_ELEMS * (int)sizeof(T) / 16;
    const int per = 16 / (int)sizeof(T);
#pragma unroll
    for (int k = 0; k < words; ++k) {
      fc_v4 w = cached ? *reinterpret_cast<const fc_v4*>(p + k * per) : fc_ld_cg(p + k * per);
      const T* e = reinterpret_cast<const T*>(&w);
#pragma unroll
      for (int i = 0; i < per; ++i) v[k * per + i] = FcElem<DT>::to_f32(e[i]);
    }
  } else {
#pragma unroll
    for (int i = 0; i < FC_ELEMS; ++i) v[i] = (base + i < n) ? FcElem<DT>::to_f32(p[i]) : 0.0f;
  }
}

// Store FC_ELEMS float32 values rounded to DT at element `base`, skipping >= n.
template <int DT>
__device__ __forceinline__ void fc_store_elems(void* dst, fc_i64 base, fc_i64 n, const float (&v)[FC_ELEMS]) {
  typedef typename FcElem<DT>::T T;
  T* p = reinterpret_cast<T*>(dst) + base;
  if (base + FC_ELEMS <= n) {
    const int words = FC_ELEMS * (int)sizeof(T) / 16;
    const int per = 16 / (int)sizeof(T);
#pragma unroll
    for (int k = 0; k < words; ++k) {
      fc_v4 w;
      T* e = reinterpret_cast<T*>(&w);
#pragma unroll
      for (int i = 0; i < per; ++i) e[i] = FcElem<DT>::from_f32(v[k * per + i]);
      fc_st_v4(p + k * per, w);
    }
  } else {
#pragma unroll
    for (int i = 0; i < FC_ELEMS; ++i)
      if (base + i < n) p[i] = FcElem<DT>::from_f32(v[i]);
  }
}
