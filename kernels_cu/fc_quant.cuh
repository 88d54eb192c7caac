// flashcomm: group-wise quantization, wire packing and Hadamard rotation.
//
// The device twin of flashcomm_cupy/quant.py and hadamard.py; the NumPy code
// is the spec and tests compare codes and bytes exactly.  A thread owns
// FC_ELEMS = 32 consecutive elements (a "unit"); a group of g elements spans
// gl = g/32 consecutive lanes of one warp (g <= 1024), so group reductions and
// cross-lane butterflies are xor-shuffles that never leave the group.
// Every thread of a warp must call these (shuffles use the full mask).
#pragma once
#include "fc_common.cuh"

#define FC_FULL_MASK 0xffffffffu

__device__ __forceinline__ bool fc_isfinite(float x) { return fabsf(x) <= 3.402823466e38f; }

__device__ __forceinline__ float fc_group_max(float v, int gl) {
  for (int m = 1; m < gl; m <<= 1) v = fmaxf(v, __shfl_xor_sync(FC_FULL_MASK, v, m));
  return v;
}
__device__ __forceinline__ float fc_group_min(float v, int gl) {
  for (int m = 1; m < gl; m <<= 1) v = fminf(v, __shfl_xor_sync(FC_FULL_MASK, v, m));
  return v;
}
__device__ __forceinline__ int fc_group_any(int v, int gl) {
  for (int m = 1; m < gl; m <<= 1) v |= __shfl_xor_sync(FC_FULL_MASK, v, m);
  return v;
}

// ----------------------------------------------------------------- rotation
// Same 32-bit mix as hadamard.signs(): bit 31 of the mixed index picks -1.
__device__ __forceinline__ float fc_rotation_sign(fc_u32 j) {
  fc_u32 h = j * 0x9E3779B1u;
  h ^= h >> 16;
  h *= 0x85EBCA6Bu;
  h ^= h >> 13;
  return (h >> 31) ? -1.0f : 1.0f;
}

// Unnormalised FWHT over a group: stages h = 1..16 inside the thread, then
// h = 32..g/2 across lanes; (a, b) -> (a + b, a - b) with a the lower index.
__device__ __forceinline__ void fc_fwht(float (&v)[FC_ELEMS], int gl, int lig) {
#pragma unroll
  for (int h = 1; h < FC_ELEMS; h <<= 1) {
#pragma unroll
    for (int i = 0; i < FC_ELEMS; ++i) {
      if (!(i & h)) {
        float a = v[i], b = v[i + h];
        v[i] = __fadd_rn(a, b);
        v[i + h] = __fsub_rn(a, b);
      }
    }
  }
  for (int m = 1; m < gl; m <<= 1) {
    const bool upper = (lig & m) != 0;
#pragma unroll
    for (int i = 0; i < FC_ELEMS; ++i) {
      float p = __shfl_xor_sync(FC_FULL_MASK, v[i], m);
      v[i] = upper ? __fsub_rn(p, v[i]) : __fadd_rn(v[i], p);
    }
  }
}

__device__ __forceinline__ void fc_rotate_fwd(float (&v)[FC_ELEMS], int gl, int lig, float norm) {
#pragma unroll
  for (int i = 0; i < FC_ELEMS; ++i) v[i] = __fmul_rn(v[i], fc_rotation_sign(lig * FC_ELEMS + i));
  fc_fwht(v, gl, lig);
#pragma unroll
  for (int i = 0; i < FC_ELEMS; ++i) v[i] = __fmul_rn(v[i], norm);
}

__device__ __forceinline__ void fc_rotate_inv(float (&v)[FC_ELEMS], int gl, int lig, float norm) {
  fc_fwht(v, gl, lig);
#pragma unroll
  for (int i = 0; i < FC_ELEMS; ++i)
    v[i] = __fmul_rn(__fmul_rn(v[i], norm), fc_rotation_sign(lig * FC_ELEMS + i));
}

// ----------------------------------------------------------------- codes
// A quantized unit: packed code words plus its group's metadata.
//   BITS 4: lo[0..3]  (8 nibbles a word, element 8k+i at bits 4i)
//   BITS 8: lo[0..7]  (4 bytes a word)
//   BITS 6: lo[0..3] low nibbles as INT4, hi[0..1] 2-bit high parts (16 a word)
template <int BITS>
struct FcUnit {
  fc_u32 lo[BITS == 8 ? 8 : 4];
  fc_u32 hi[2];
  float scale, mn;
};

template <int BITS>
__device__ __forceinline__ void fc_pack_code(FcUnit<BITS>& u, int i, fc_u32 c) {
  if (BITS == 8) {
    u.lo[i >> 2] |= c << (8 * (i & 3));
  } else {
    u.lo[i >> 3] |= (c & 15u) << (4 * (i & 7));
    if (BITS == 6) u.hi[i >> 4] |= ((c >> 4) & 3u) << (2 * (i & 15));
  }
}

template <int BITS>
__device__ __forceinline__ fc_u32 fc_unpack_code(const FcUnit<BITS>& u, int i) {
  if (BITS == 8) return (u.lo[i >> 2] >> (8 * (i & 3))) & 255u;
  fc_u32 c = (u.lo[i >> 3] >> (4 * (i & 7))) & 15u;
  if (BITS == 6) c |= ((u.hi[i >> 4] >> (2 * (i & 15))) & 3u) << 4;
  return c;
}

// Quantize one unit (see quant.quantize for the exact rules).
template <int BITS>
__device__ __forceinline__ void fc_quantize(const float (&v)[FC_ELEMS], int gl, bool sym, FcUnit<BITS>& u) {
  // x * 0 is NaN exactly for NaN and +-Inf: one FMA per element flags a non-finite group.
  float probe = 0.0f;
#pragma unroll
  for (int i = 0; i < FC_ELEMS; ++i) probe = __fmaf_rn(v[i], 0.0f, probe);
  int bad = fc_group_any(probe != probe, gl);
  float scale, mn = 0.0f, inv;
  if (sym) {
    float amax = 0.0f;
#pragma unroll
    for (int i = 0; i < FC_ELEMS; ++i) amax = fmaxf(amax, fabsf(v[i]));
    amax = fc_group_max(amax, gl);
    scale = __fdiv_rn(amax, (float)((1 << (BITS - 1)) - 1));
  } else {
    float lo = v[0], hi = v[0];
#pragma unroll
    for (int i = 1; i < FC_ELEMS; ++i) { lo = fminf(lo, v[i]); hi = fmaxf(hi, v[i]); }
    mn = fc_group_min(lo, gl);
    const float rng = __fsub_rn(fc_group_max(hi, gl), mn);
    bad |= !fc_isfinite(rng);
    scale = __fdiv_rn(rng, (float)((1 << BITS) - 1));
  }
  if (scale < FC_FLT_MIN) { scale = 0.0f; inv = 0.0f; }
  else inv = __frcp_rn(scale);
#pragma unroll
  for (int k = 0; k < (BITS == 8 ? 8 : 4); ++k) u.lo[k] = 0;
  u.hi[0] = u.hi[1] = 0;
  if (bad) {
    u.scale = __int_as_float(0x7fc00000);
    u.mn = u.scale;
    return;
  }
#pragma unroll
  for (int i = 0; i < FC_ELEMS; ++i) {
    fc_u32 c;
    if (sym) {
      const float qs = (float)((1 << (BITS - 1)) - 1);
      float q = rintf(__fmul_rn(v[i], inv));
      c = (fc_u32)(int)(fminf(fmaxf(q, -qs), qs) + (float)(1 << (BITS - 1)));
    } else {
      float q = rintf(__fmul_rn(__fsub_rn(v[i], mn), inv));
      c = (fc_u32)fminf(fmaxf(q, 0.0f), (float)((1 << BITS) - 1));
    }
    fc_pack_code(u, i, c);
  }
  u.scale = scale;
  u.mn = mn;
}

template <int BITS>
__device__ __forceinline__ void fc_dequantize(const FcUnit<BITS>& u, bool sym, float (&v)[FC_ELEMS]) {
#pragma unroll
  for (int i = 0; i < FC_ELEMS; ++i) {
    const float c = (float)fc_unpack_code(u, i);
    v[i] = sym ? __fmul_rn(__fsub_rn(c, (float)(1 << (BITS - 1))), u.scale)
               : __fadd_rn(__fmul_rn(c, u.scale), u.mn);
  }
}

// ----------------------------------------------------------------- wire chunk
// Byte layout of a chunk of n elements (quant.plane_layout): 16-byte aligned
// regions lo | hi (INT6) | fp32 scales | fp32 mins (asymmetric).
struct FcLayout { fc_i64 lo, hi, scales, mins, total; };

__host__ __device__ __forceinline__ fc_i64 fc_align16(fc_i64 x) { return (x + 15) & ~(fc_i64)15; }

__host__ __device__ __forceinline__ FcLayout fc_layout(fc_i64 n, int bits, int group, bool sym) {
  FcLayout L;
  const fc_i64 groups = n / group;
  L.lo = 0;
  fc_i64 off = fc_align16(bits == 8 ? n : n / 2);
  L.hi = off;
  if (bits == 6) off = fc_align16(off + n / 4);
  L.scales = off;
  off = fc_align16(off + 4 * groups);
  L.mins = off;
  if (!sym) off = fc_align16(off + 4 * groups);
  L.total = off;
  return L;
}

// Write unit `w` (elements [32w, 32w+32) of the chunk); lane 0 of each group
// writes the metadata.
template <int BITS>
__device__ __forceinline__ void fc_write_unit(unsigned char* chunk, const FcLayout& L, int w, int gl, bool sym,
                                              const FcUnit<BITS>& u) {
  if (BITS == 8) {
    fc_st_v4(chunk + L.lo + 32 * w, fc_v4{u.lo[0], u.lo[1], u.lo[2], u.lo[3]});
    fc_st_v4(chunk + L.lo + 32 * w + 16, fc_v4{u.lo[4], u.lo[5], u.lo[6], u.lo[7]});
  } else {
    fc_st_v4(chunk + L.lo + 16 * w, fc_v4{u.lo[0], u.lo[1], u.lo[2], u.lo[3]});
    if (BITS == 6) {
      fc_st_u32(chunk + L.hi + 8 * w, u.hi[0]);
      fc_st_u32(chunk + L.hi + 8 * w + 4, u.hi[1]);
    }
  }
  if (w % gl == 0) {
    fc_st_u32(chunk + L.scales + 4 * (w / gl), __float_as_uint(u.scale));
    if (!sym) fc_st_u32(chunk + L.mins + 4 * (w / gl), __float_as_uint(u.mn));
  }
}

template <int BITS>
__device__ __forceinline__ void fc_read_unit(const unsigned char* chunk, const FcLayout& L, int w, int gl, bool sym,
                                             FcUnit<BITS>& u) {
  if (BITS == 8) {
    fc_v4 a = fc_ld_cg(chunk + L.lo + 32 * w), b = fc_ld_cg(chunk + L.lo + 32 * w + 16);
    u.lo[0] = a.x; u.lo[1] = a.y; u.lo[2] = a.z; u.lo[3] = a.w;
    u.lo[4] = b.x; u.lo[5] = b.y; u.lo[6] = b.z; u.lo[7] = b.w;
  } else {
    fc_v4 a = fc_ld_cg(chunk + L.lo + 16 * w);
    u.lo[0] = a.x; u.lo[1] = a.y; u.lo[2] = a.z; u.lo[3] = a.w;
    if (BITS == 6) {
      u.hi[0] = fc_ld_cg_u32(chunk + L.hi + 8 * w);
      u.hi[1] = fc_ld_cg_u32(chunk + L.hi + 8 * w + 4);
    }
  }
  u.scale = fc_ld_cg_f32(chunk + L.scales + 4 * (w / gl));
  u.mn = sym ? 0.0f : fc_ld_cg_f32(chunk + L.mins + 4 * (w / gl));
}

// ----------------------------------------------------------------- codecs
// A codec moves a unit of float32 values through a wire chunk in three steps:
// pack (quantize, once), write (to as many destinations as needed), and
// unpack (what every receiver decodes, the sender included).  BITS == 0 is
// lossless: the packed form is the raw elements of type DT, already rounded.
template <int DT, int BITS>
struct FcCodec {
  typedef FcUnit<BITS> Packed;
  static __device__ __forceinline__ void pack(const float (&v)[FC_ELEMS], int gl, bool sym, Packed& p) {
    fc_quantize<BITS>(v, gl, sym, p);
  }
  static __device__ __forceinline__ void write(const Packed& p, unsigned char* chunk, fc_i64 n, int w, int gl,
                                               bool sym) {
    fc_write_unit<BITS>(chunk, fc_layout(n, BITS, gl * FC_ELEMS, sym), w, gl, sym, p);
  }
  static __device__ __forceinline__ void read(const unsigned char* chunk, fc_i64 n, int w, int gl, bool sym,
                                              Packed& p) {
    fc_read_unit<BITS>(chunk, fc_layout(n, BITS, gl * FC_ELEMS, sym), w, gl, sym, p);
  }
  static __device__ __forceinline__ void unpack(const Packed& p, bool sym, float (&v)[FC_ELEMS]) {
    fc_dequantize<BITS>(p, sym, v);
  }
};

template <int DT>
struct FcCodec<DT, 0> {
  typedef typename FcElem<DT>::T T;
  struct Packed { float v[FC_ELEMS]; };  // values already rounded to DT
  static __device__ __forceinline__ void pack(const float (&v)[FC_ELEMS], int, bool, Packed& p) {
#pragma unroll
    for (int i = 0; i < FC_ELEMS; ++i) p.v[i] = FcElem<DT>::to_f32(FcElem<DT>::from_f32(v[i]));
  }
  static __device__ __forceinline__ void write(const Packed& p, unsigned char* chunk, fc_i64 n, int w, int, bool) {
    fc_store_elems<DT>(chunk, (fc_i64)w * FC_ELEMS, n, p.v);
  }
  static __device__ __forceinline__ void read(const unsigned char* chunk, fc_i64 n, int w, int, bool, Packed& p) {
    fc_load_elems<DT>(chunk, (fc_i64)w * FC_ELEMS, n, false, p.v);
  }
  static __device__ __forceinline__ void unpack(const Packed& p, bool, float (&v)[FC_ELEMS]) {
#pragma unroll
    for (int i = 0; i < FC_ELEMS; ++i) v[i] = p.v[i];
  }
};
