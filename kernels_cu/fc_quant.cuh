// flashcomm: group-wise quantization, wire packing and Hadamard rotation.
//
// The device twin of flashcomm_cupy/quant.py and hadamard.py; the NumPy code
// is the spec and tests compare codes and bytes exactly.  A thread owns
// FC_ELEMS (32, or 16 in the modules built for it) consecutive elements (a
// "unit"); a group of g elements spans gl = g/FC_ELEMS consecutive lanes of one
// warp (g <= 32 * FC_ELEMS), so group reductions and cross-lane butterflies are
// xor-shuffles that never leave the group.  The wire bytes do not depend on
// FC_ELEMS: a lane's codes are contiguous in the chunk.
// Every thread of a warp must call these (shuffles use the full mask).
#pragma once
#include "fc_common.cuh"
#include "fc_async.cuh"

#define FC_FULL_MASK 0xffffffffu

// Integer <-> float without the conversion pipe (F2I/I2F/FRND run at 1/8 of the
// FP32 rate on sm_90).  FC_MAGIC = 1.5 * 2^23: for |x| < 2^22, x + FC_MAGIC
// rounded to nearest-even is FC_MAGIC + rint(x) exactly (rint also rounds
// half to even), and its bit pattern is FC_MAGIC_BITS + rint(x).
#define FC_MAGIC 12582912.0f
#define FC_MAGIC_BITS 0x4B400000u

__device__ __forceinline__ bool fc_isfinite(float x) { return fabsf(x) <= 3.402823466e38f; }

// max (MAX) or min that returns NaN when either operand is NaN (fmaxf/fminf
// return the other operand), so a group's range is NaN or infinite iff the
// group holds a NaN or an infinity: the quantizer needs no separate probe of
// every element.
template <bool MAX>
__device__ __forceinline__ float fc_minmax_nan(float a, float b) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  float r;
  if (MAX) asm("max.NaN.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  else asm("min.NaN.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
#else
  return (a != a || b != b) ? __int_as_float(0x7fc00000) : MAX ? fmaxf(a, b) : fminf(a, b);
#endif
}
// The same over the gl lanes of a group.
template <bool MAX>
__device__ __forceinline__ float fc_group_minmax_nan(float v, int gl) {
  for (int m = 1; m < gl; m <<= 1) v = fc_minmax_nan<MAX>(v, __shfl_xor_sync(FC_FULL_MASK, v, m));
  return v;
}

// ----------------------------------------------------------------- rotation
// What one rotation costs a lane (a unit of E = FC_ELEMS elements, gl lanes a
// group), in instructions: the in-thread butterflies, E log2(E) FADDs; per
// cross-lane stage, E SHFLs and E FFMAs; the forward's signs, 2 integer ops an
// element; the normalisation, E FMULs (the inverse's signs ride on it, 2
// integer ops an element).  The butterflies and the normalisation are the
// reference's own roundings and stay; until issue 21 each element also hashed
// its index in both directions (7 instructions with the select and multiply)
// and each cross-lane butterfly took 4 (SHFL, two predicated FADDs, a MOV).
#define FC_ROT_MAX_GROUP 1024  // 32 lanes x 32 elements: the largest group a warp holds
#define FC_SIGN_BIT 0x80000000u

// Same 32-bit mix as hadamard.signs(): bit 31 of the mixed index; 1 means -1.
__host__ __device__ constexpr fc_u32 fc_rotation_sign_bit(fc_u32 j) {
  fc_u32 h = j * 0x9E3779B1u;
  h ^= h >> 16;
  h *= 0x85EBCA6Bu;
  h ^= h >> 13;
  return h >> 31;
}

// The sign bits of a group's elements, 32 to a word (bit b of word k is
// element 32k + b's), evaluated by the compiler from fc_rotation_sign_bit (host and
// device, so NVRTC, which compiles device code only, takes the initializer too).
struct FcSignWords { fc_u32 w[FC_ROT_MAX_GROUP / 32]; };
__host__ __device__ constexpr FcSignWords fc_sign_words() {
  FcSignWords s{};
  for (int k = 0; k < FC_ROT_MAX_GROUP / 32; ++k)
    for (int b = 0; b < 32; ++b) s.w[k] |= fc_rotation_sign_bit((fc_u32)(32 * k + b)) << b;
  return s;
}

// Word k of words [LO, LO + N) of fc_sign_words() (N a power of two, LO <= k < LO + N),
// chosen bit by bit of k: a tree of selects between immediates, no memory access.
// (Read from a __constant__ table, the lanes' indices differ: the load is
// serialised over the group's distinct words, and the kernels consumed it
// before issuing their first input load, so its whole latency, a constant-cache
// miss at a kernel's start included, came on top of every rotating call.)
template <int LO, int N>
__host__ __device__ __forceinline__ constexpr fc_u32 fc_sign_word(int k) {
  if constexpr (N == 1) {
    constexpr fc_u32 w = fc_sign_words().w[LO];
    return w;
  } else {
    const fc_u32 lo = fc_sign_word<LO, N / 2>(k), hi = fc_sign_word<LO + N / 2, N / 2>(k);
    return (k & (N / 2)) ? hi : lo;
  }
}

// The lane's sign bits: bit i for element lig * FC_ELEMS + i of its group.  A
// kernel works them out once (FcTile), as a lane keeps its place in the group
// for every unit; one register instead of a hash per element and use.  A group
// spans at most 32 lanes: FC_ELEMS words.
__host__ __device__ __forceinline__ constexpr fc_u32 fc_rotation_signs(int lig) {
  static_assert(FC_ELEMS <= FC_ROT_MAX_GROUP / 32, "a warp's group fits the sign table");
  const int j0 = lig * FC_ELEMS;
  return fc_sign_word<0, FC_ELEMS>(j0 >> 5) >> (j0 & 31);
}

// Element i's sign bit of `signs` moved to bit 31 (the float sign), the rest 0.
__device__ __forceinline__ fc_u32 fc_sign_at(fc_u32 signs, int i) { return (signs << (31 - i)) & FC_SIGN_BIT; }

// `signs` as a value the compiler cannot see through: the FC_ELEMS masks
// fc_sign_at derives from it are loop-invariant, and hoisted out of a kernel's
// unit loop they took FC_ELEMS registers and spilled the kernels at their
// register cap (benchmarks/sass_diff.py; without it the LL one-shot spills
// again: INT8 54/214 bytes stored/loaded, INT6 18/34); derived afresh where they
// are used, they cost one shift each.  The empty asm emits no instruction: it
// bars no scheduling in ptxas, only the hoisting before it.
__device__ __forceinline__ fc_u32 fc_opaque(fc_u32 x) {
  asm volatile("" : "+r"(x));
  return x;
}

// Unnormalised FWHT over a group: stages h = 1..FC_ELEMS/2 inside the thread,
// then h = FC_ELEMS..g/2 across lanes; (a, b) -> (a + b, a - b) with a the
// lower index.  Across lanes, the lower lane's a + b and the upper lane's a - b
// are both one FFMA of its own value by +-1 (exact) and the partner's: the
// same single rounding of the same exact sum as the FADD/FSUB, signed zeros
// and NaNs included, and no select.
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
    const float own = (lig & m) ? -1.0f : 1.0f;  // upper: p - v; lower: v + p
#pragma unroll
    for (int i = 0; i < FC_ELEMS; ++i) {
      const float p = __shfl_xor_sync(FC_FULL_MASK, v[i], m);
      v[i] = __fmaf_rn(v[i], own, p);
    }
  }
}

// Where a rotation's butterflies live in a kernel's code.
//   FC_ROT_INLINE  a copy at every use (the default);
//   FC_ROT_SHARED  one out-of-line copy that every use calls (fc_fwht_out_of_line).
// A small-message one-shot (one unit a lane, one warp a scheduler) runs its code
// once per call, and the butterflies' straight-line code then costs more to fetch
// than to run: on one H200 the first pass cost 2.2 us of a 64 KB call and a second
// pass of the same code 0.3 (benchmarks/NOTES.md v31, v32).  Shared, the inverse
// rotation after the sum runs the code the forward one fetched before the send.
// Kernels that loop over many units fetch it once anyway, and the call's register
// moves cost them more than it saves (the quantized LL two-shot 1 MB +1.4 us, the
// staged two-shot 16 MB +20 %): they keep it inline.
enum FcRotCode { FC_ROT_INLINE, FC_ROT_SHARED };

struct FcFwhtUnit { float x[FC_ELEMS]; };  // a unit by value: the call passes it in registers

__device__ __noinline__ FcFwhtUnit fc_fwht_out_of_line(FcFwhtUnit u, int gl, int lig) {
  fc_fwht(u.x, gl, lig);
  return u;
}

template <FcRotCode RC>
__device__ __forceinline__ void fc_fwht_at(float (&v)[FC_ELEMS], int gl, int lig) {
  if constexpr (RC == FC_ROT_SHARED) {
    FcFwhtUnit u;
#pragma unroll
    for (int i = 0; i < FC_ELEMS; ++i) u.x[i] = v[i];
    u = fc_fwht_out_of_line(u, gl, lig);
#pragma unroll
    for (int i = 0; i < FC_ELEMS; ++i) v[i] = u.x[i];
  } else {
    fc_fwht(v, gl, lig);
  }
}

// `signs`: fc_rotation_signs(lig).  The reference multiplies by +-1 first; here
// the sign bit is flipped (one LOP3 instead of an FMUL), the same exact result
// for every number, infinities, zeros and subnormals included.  Only a NaN
// could differ (its sign bit), and nothing can see it: the butterflies'
// FADDs return the canonical NaN (fc_ll.cuh relies on it too), and every
// forward-rotated value reaches the wire through the quantizer, which marks a
// group holding a NaN by its metadata alone.
template <FcRotCode RC = FC_ROT_INLINE>
__device__ __forceinline__ void fc_rotate_fwd(float (&v)[FC_ELEMS], int gl, int lig, fc_u32 signs, float norm) {
  signs = fc_opaque(signs);
#pragma unroll
  for (int i = 0; i < FC_ELEMS; ++i) v[i] = __uint_as_float(__float_as_uint(v[i]) ^ fc_sign_at(signs, i));
  // once but in timing builds (fc_profile.cuh)
#pragma unroll 1
  for (int r = 0; r < FC_PROFILE_ROT_TIMES; ++r) fc_fwht_at<RC>(v, gl, lig);
#pragma unroll
  for (int i = 0; i < FC_ELEMS; ++i) v[i] = __fmul_rn(v[i], norm);
}

// The reference's (v * norm) * s as one multiply v * (s * norm): s * norm is
// exact, and rounding to nearest is symmetric in the sign, so both round the
// same exact product (NaN in, canonical NaN out either way).
template <FcRotCode RC = FC_ROT_INLINE>
__device__ __forceinline__ void fc_rotate_inv(float (&v)[FC_ELEMS], int gl, int lig, fc_u32 signs, float norm) {
  // once but in timing builds (fc_profile.cuh)
#pragma unroll 1
  for (int r = 0; r < FC_PROFILE_ROT_TIMES; ++r) fc_fwht_at<RC>(v, gl, lig);
  signs = fc_opaque(signs);
  const fc_u32 nbits = __float_as_uint(norm);
#pragma unroll
  for (int i = 0; i < FC_ELEMS; ++i) v[i] = __fmul_rn(v[i], __uint_as_float(nbits ^ fc_sign_at(signs, i)));
}

// ----------------------------------------------------------------- codes
// A quantized unit: packed code words plus its group's metadata.
//   BITS 4: lo[FC_ELEMS/8]  (8 nibbles a word, element 8k+i at bits 4i)
//   BITS 8: lo[FC_ELEMS/4]  (4 bytes a word)
//   BITS 6: lo[FC_ELEMS/8] low nibbles as INT4, hi[] 2-bit high parts (16 a word; an
//           8-element unit fills half of its one word)
template <int BITS>
struct FcUnit {
  static constexpr int LO = BITS == 8 ? FC_ELEMS / 4 : FC_ELEMS / 8;  // code words
  static constexpr int HI = (FC_ELEMS + 15) / 16;                     // INT6 high-part words
  fc_u32 lo[LO];
  fc_u32 hi[HI];
  float scale, mn;
};

template <int BITS>
__device__ __forceinline__ fc_u32 fc_unpack_code(const FcUnit<BITS>& u, int i) {
  if (BITS == 8) return (u.lo[i >> 2] >> (8 * (i & 3))) & 255u;
  fc_u32 c = (u.lo[i >> 3] >> (4 * (i & 7))) & 15u;
  if (BITS == 6) c |= ((u.hi[i >> 4] >> (2 * (i & 15))) & 3u) << 4;
  return c;
}

// PRMT: byte k of the result is byte (s >> 4k) & 7 of the eight bytes b:a (a's
// are 0-3).  The host twin exists for the CPU tests of the INT6 packing.
__host__ __device__ __forceinline__ fc_u32 fc_byte_perm(fc_u32 a, fc_u32 b, fc_u32 s) {
#ifdef __CUDA_ARCH__
  return __byte_perm(a, b, s);
#else
  const unsigned long long x = ((unsigned long long)b << 32) | a;
  fc_u32 r = 0;
  for (int k = 0; k < 4; ++k) r |= (fc_u32)((x >> (8 * ((s >> (4 * k)) & 7))) & 255u) << (8 * k);
  return r;
#endif
}

// Bits of `a` where `m` is set, of `b` elsewhere: one LOP3.
__host__ __device__ __forceinline__ fc_u32 fc_bit_select(fc_u32 m, fc_u32 a, fc_u32 b) { return (a & m) | (b & ~m); }

// INT6 planes, 16 codes at a time, through four "code words": byte b of w[m]
// is code 4b + m, a whole byte each (bits 6-7 zero), so that both planes come
// out of whole-word shifts, selects and byte permutes, ~1.5 instructions a code
// each way instead of ~5 with a shift and mask per code and plane:
//   lo (two words): the nibble pairs x = (w0 | w1 << 4) and y = (w2 | w3 << 4),
//     bytes interleaved (lo0 = x0 y0 x1 y1, lo1 = x2 y2 x3 y3);
//   hi: per byte the 2-bit fields of w0..w3 at bits 0, 2, 4, 6.
// `q[i]`'s low byte is code i (< 64); its other bytes are ignored.
__host__ __device__ __forceinline__ void fc_int6_pack16(const fc_u32 (&q)[16], fc_u32& lo0, fc_u32& lo1,
                                                        fc_u32& hi) {
  fc_u32 w[4];
#pragma unroll
  for (int m = 0; m < 4; ++m)
    w[m] = fc_byte_perm(fc_byte_perm(q[m], q[m + 4], 0x0040u), fc_byte_perm(q[m + 8], q[m + 12], 0x4000u), 0x7610u);
  const fc_u32 x = fc_bit_select(0x0F0F0F0Fu, w[0], w[1] << 4), y = fc_bit_select(0x0F0F0F0Fu, w[2], w[3] << 4);
  lo0 = fc_byte_perm(x, y, 0x5140u);
  lo1 = fc_byte_perm(x, y, 0x7362u);
  hi = fc_bit_select(0x0F0F0F0Fu, fc_bit_select(0x03030303u, w[0] >> 4, w[1] >> 2),
                     fc_bit_select(0x30303030u, w[2], w[3] << 2));
}

// The inverse: the four code words of 16 codes from their planes.
__host__ __device__ __forceinline__ void fc_int6_unpack16(fc_u32 lo0, fc_u32 lo1, fc_u32 hi, fc_u32 (&w)[4]) {
  const fc_u32 x = fc_byte_perm(lo0, lo1, 0x6420u), y = fc_byte_perm(lo0, lo1, 0x7531u);
  const fc_u32 ha = hi & 0x33333333u, hb = hi & 0xCCCCCCCCu;  // fields of w0, w2 | w1, w3: clean neighbours
  w[0] = fc_bit_select(0x0F0F0F0Fu, x, ha << 4);
  w[1] = fc_bit_select(0x0F0F0F0Fu, x >> 4, hb << 2);
  w[2] = fc_bit_select(0x0F0F0F0Fu, y, ha);
  w[3] = fc_bit_select(0x0F0F0F0Fu, y >> 4, hb >> 2);
}

// INT6 decodes through the code words (fc_int6_unpack16: ~1.8 instructions a
// code against ~5 extracting each code from its planes) where that costs no
// spills; elsewhere it extracts each code.  The code words hold a unit's codes
// in four registers instead of three, and at their 128-register bounds ptxas
// spilled (benchmarks/sass_diff.py and ptxas -v, every FC_DT): the 16-element
// builds' LL two-shot (only the quantized LL kernels run those builds; 4-24
// bytes), and with an INT6 reduce-scatter and another all-gather codec the
// staged two-shot (float16: 0 -> 16 bytes with INT4, 16 -> 20 with INT8) and
// the float32 flag two-shot (8-12 bytes more).
#if defined(FC_RS_BITS) && defined(FC_AG_BITS)
#define FC_INT6_BYTE_DECODE (FC_ELEMS == 32 && !(FC_RS_BITS == 6 && FC_AG_BITS != 6))
#else
#define FC_INT6_BYTE_DECODE (FC_ELEMS == 32)
#endif
// Where that decode takes FC_MAGIC's upper bytes from: `off`'s bit pattern (a
// register the decode holds anyway), so the PRMTs' selectors stay immediates;
// with the constant FC_MAGIC_BITS ptxas made the constant the immediate and
// moved the selectors into registers (~30 moves a unit; an empty asm does not
// hide a constant from ptxas).  Float32 builds keep the constant: with `off`
// their flag one-shot spilled 12 bytes more (56 -> 68).
#if defined(FC_DT) && FC_DT == 2
#define FC_INT6_MAGIC_FROM_OFF 0
#else
#define FC_INT6_MAGIC_FROM_OFF 1
#endif

// Quantize one unit (see quant.quantize for the exact rules).
template <int BITS>
__device__ __forceinline__ void fc_quantize(const float (&v)[FC_ELEMS], int gl, bool sym, FcUnit<BITS>& u) {
  // A group is bad (all-NaN metadata) iff it holds a NaN or an infinity, or its
  // range overflows: with NaN-propagating max/min all three show as a
  // non-finite range (asymmetric) or absolute maximum (symmetric).
  float scale, mn = 0.0f, inv;
  bool bad;
  if (sym) {
    float amax = 0.0f;
#pragma unroll
    for (int i = 0; i < FC_ELEMS; ++i) amax = fc_minmax_nan<true>(amax, fabsf(v[i]));
    amax = fc_group_minmax_nan<true>(amax, gl);
    bad = !fc_isfinite(amax);
    scale = __fdiv_rn(amax, (float)((1 << (BITS - 1)) - 1));
  } else {
    float lo = v[0], hi = v[0];
#pragma unroll
    for (int i = 1; i < FC_ELEMS; ++i) { lo = fc_minmax_nan<false>(lo, v[i]); hi = fc_minmax_nan<true>(hi, v[i]); }
    mn = fc_group_minmax_nan<false>(lo, gl);
    const float rng = __fsub_rn(fc_group_minmax_nan<true>(hi, gl), mn);
    bad = !fc_isfinite(rng);
    scale = __fdiv_rn(rng, (float)((1 << BITS) - 1));
  }
  if (scale < FC_FLT_MIN) { scale = 0.0f; inv = 0.0f; }
  else inv = __frcp_rn(scale);
#pragma unroll
  for (int k = 0; k < FcUnit<BITS>::LO; ++k) u.lo[k] = 0;
#pragma unroll
  for (int k = 0; k < FcUnit<BITS>::HI; ++k) u.hi[k] = 0;
  if (bad) {
    u.scale = __int_as_float(0x7fc00000);
    u.mn = u.scale;
    return;
  }
  // rint + clamp in the magic-biased domain (see FC_MAGIC): no conversion-pipe
  // instructions; q's bit pattern is `base` + the code.  Asymmetric codes need
  // no lower clamp: v >= mn, so x >= 0.  INT6's symmetric codes add their offset
  // 2^(BITS-1) to the magic constant instead (an integer of the same binade:
  // for |x| < 2^22 it rounds x alike, and here |x| < qmax + 1/2, see below), so
  // its `base` is FC_MAGIC_BITS either way and a code is q's low byte.
  const fc_u32 base = sym && BITS != 6 ? FC_MAGIC_BITS - (1u << (BITS - 1)) : FC_MAGIC_BITS;
  //
  // The clamps never bind (INT6 leaves them out; INT4/INT8 could too).  With r
  // the group's amax (symmetric) or range, |v| <= r, and asymmetric
  // 0 <= RN(v - mn) <= RN(max - mn) = r (RN is monotone).  A scale >= FLT_MIN
  // is normal and at most FLT_MAX / 7, so 1/scale is normal too and both are
  // within 2^-24 (relative) of r / qmax and its inverse: r * inv <= qmax (1 +
  // 2^-24) / (1 - 2^-24) < qmax + 1/2, so RN(v * inv) rounds to at most qmax in
  // magnitude (tests/test_int6_codec.py checks the reference's clip never
  // binds).  A smaller scale gives inv = 0: every code is the zero point.
  constexpr bool clamp = BITS != 6;
  float q[FC_ELEMS];
  if (sym) {
    const float qs = (float)((1 << (BITS - 1)) - 1);
    const float magic = BITS == 6 ? FC_MAGIC + (float)(1 << (BITS - 1)) : FC_MAGIC;
#pragma unroll
    for (int i = 0; i < FC_ELEMS; ++i) {
      const float x = __fadd_rn(__fmul_rn(v[i], inv), magic);
      q[i] = clamp ? fminf(fmaxf(x, magic - qs), magic + qs) : x;
    }
  } else {
#pragma unroll
    for (int i = 0; i < FC_ELEMS; ++i) {
      const float x = __fadd_rn(__fmul_rn(__fsub_rn(v[i], mn), inv), FC_MAGIC);
      q[i] = clamp ? fminf(x, FC_MAGIC + (float)((1 << BITS) - 1)) : x;
    }
  }
  if constexpr (BITS == 6 && FC_ELEMS == 8) {
    // Eight codes, each q's low 6 bits (`base`'s are 0): low nibbles as INT4
    // packs them, high parts at bits 2i of the one high word.
#pragma unroll
    for (int i = 0; i < FC_ELEMS; ++i) {
      const fc_u32 c = __float_as_uint(q[i]);
      u.lo[0] |= (c & 15u) << (4 * i);
      u.hi[0] |= ((c >> 4) & 3u) << (2 * i);
    }
  } else if constexpr (BITS == 6) {
#pragma unroll
    for (int k = 0; k < FcUnit<BITS>::HI; ++k) {
      fc_u32 b[16];
#pragma unroll
      for (int i = 0; i < 16; ++i) b[i] = __float_as_uint(q[16 * k + i]);
      fc_int6_pack16(b, u.lo[2 * k], u.lo[2 * k + 1], u.hi[k]);
    }
  } else {
    // INT4/INT8: a word's codes do not overlap, so adding the shifted bit
    // patterns (one IMAD/LEA each) and then subtracting the shifted bases once
    // per word, all modulo 2^32, leaves exactly the packed codes.
    constexpr int S = BITS, PER = 32 / BITS;
    constexpr fc_u32 SPREAD = BITS == 8 ? 0x01010101u : 0x11111111u;  // sum of 1 << (S * j), j < PER
#pragma unroll
    for (int i = 0; i < FC_ELEMS; ++i) u.lo[i / PER] += __float_as_uint(q[i]) << (S * (i % PER));
#pragma unroll
    for (int k = 0; k < FcUnit<BITS>::LO; ++k) u.lo[k] -= base * SPREAD;
  }
  u.scale = scale;
  u.mn = mn;
}

template <int BITS>
__device__ __forceinline__ void fc_dequantize(const FcUnit<BITS>& u, bool sym, float (&v)[FC_ELEMS]) {
  // code -> float exactly: FC_MAGIC's bit pattern with the code in its low mantissa bits,
  // minus FC_MAGIC (plus the symmetric offset; both subtractions are exact).
  const float off = sym ? FC_MAGIC + (float)(1 << (BITS - 1)) : FC_MAGIC;
  if constexpr (BITS == 6 && FC_INT6_BYTE_DECODE) {
    // code 16k + i's byte put under FC_MAGIC's upper bytes (bytes 1-3 of `off`
    // are FC_MAGIC's too): one PRMT a code
    const fc_u32 magic = FC_INT6_MAGIC_FROM_OFF ? __float_as_uint(off) : FC_MAGIC_BITS;
#pragma unroll
    for (int k = 0; k < FcUnit<BITS>::HI; ++k) {
      fc_u32 w[4];
      fc_int6_unpack16(u.lo[2 * k], u.lo[2 * k + 1], u.hi[k], w);
#pragma unroll
      for (int i = 0; i < 16; ++i) {
        const float c = __fsub_rn(__uint_as_float(fc_byte_perm(w[i & 3], magic, 0x7650u | (i >> 2))), off);
        v[16 * k + i] = sym ? __fmul_rn(c, u.scale) : __fadd_rn(__fmul_rn(c, u.scale), u.mn);
      }
    }
  } else {
#pragma unroll
    for (int i = 0; i < FC_ELEMS; ++i) {
      const float c = __fsub_rn(__uint_as_float(FC_MAGIC_BITS | fc_unpack_code(u, i)), off);
      v[i] = sym ? __fmul_rn(c, u.scale) : __fadd_rn(__fmul_rn(c, u.scale), u.mn);
    }
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

// A lane's W consecutive 32-bit words (W = 1, 2 or 4) as one access.
template <int W>
__device__ __forceinline__ void fc_st_words(void* p, const fc_u32 (&x)[W]) {
  static_assert(W == 1 || W == 2 || W == 4, "one access");
  if constexpr (W == 4) fc_st_v4(p, fc_v4{x[0], x[1], x[2], x[3]});
  else if constexpr (W == 2) fc_st_v2(p, x[0], x[1]);
  else fc_st_u32(p, x[0]);
}
// The same words loaded through L2 (fc_ld_cg), or zeros when !active.
template <int W>
__device__ __forceinline__ void fc_ld_cg_words(const void* p, bool active, fc_u32 (&x)[W]) {
  static_assert(W == 1 || W == 2 || W == 4, "one access");
  if constexpr (W == 4) {
    const fc_v4 v = active ? fc_ld_cg(p) : fc_v4{0u, 0u, 0u, 0u};
    x[0] = v.x; x[1] = v.y; x[2] = v.z; x[3] = v.w;
  } else if constexpr (W == 2) {
    x[0] = x[1] = 0u;
    if (active) fc_ld_cg_v2(p, x[0], x[1]);
  } else {
    x[0] = active ? fc_ld_cg_u32(p) : 0u;
  }
}

// Write unit `w` (elements [FC_ELEMS*w, FC_ELEMS*(w+1)) of a chunk of n
// elements); lane 0 of each group writes the metadata.  Called by every lane
// of the warp (32-byte INT8 units move warp-transposed, see fc_warp_scatter);
// units at or past n write nothing.  A lane's codes are contiguous, so the
// lanes of a warp store one contiguous span.
template <int BITS>
__device__ __forceinline__ void fc_write_unit(unsigned char* chunk, const FcLayout& L, fc_i64 n, int w, int gl,
                                              bool sym, const FcUnit<BITS>& u, fc_v4* stage) {
  constexpr int LO = FcUnit<BITS>::LO, HI = FcUnit<BITS>::HI;
  const bool active = (fc_i64)w * FC_ELEMS < n;
  if constexpr (LO == 8) {
    const fc_v4 lo[2] = {fc_v4{u.lo[0], u.lo[1], u.lo[2], u.lo[3]}, fc_v4{u.lo[4], u.lo[5], u.lo[6], u.lo[7]}};
    unsigned char* span = chunk + L.lo + 32 * (fc_i64)(w - (int)(threadIdx.x & 31));
    const fc_i64 left = n - 32 * (fc_i64)(w - (int)(threadIdx.x & 31));  // code bytes of this span in the chunk
    fc_warp_scatter<2>(stage, lo, [&](int q, const fc_v4& x) {
      if (16 * (fc_i64)q < left) fc_st_v4(span + 16 * q, x);
    });
  } else if (active) {
    fc_st_words<LO>(chunk + L.lo + 4 * LO * w, u.lo);
    if (BITS == 6) fc_st_words<HI>(chunk + L.hi + 4 * HI * w, u.hi);
  }
  if (active && w % gl == 0) {
    fc_st_u32(chunk + L.scales + 4 * (w / gl), __float_as_uint(u.scale));
    if (!sym) fc_st_u32(chunk + L.mins + 4 * (w / gl), __float_as_uint(u.mn));
  }
}

// Read unit `w`; called by every lane of the warp.  Units at or past n read as
// all-zero codes and metadata (the caller ignores them).
template <int BITS>
__device__ __forceinline__ void fc_read_unit(const unsigned char* chunk, const FcLayout& L, fc_i64 n, int w, int gl,
                                             bool sym, FcUnit<BITS>& u, fc_v4* stage) {
  constexpr int LO = FcUnit<BITS>::LO, HI = FcUnit<BITS>::HI;
  const bool active = (fc_i64)w * FC_ELEMS < n;
#pragma unroll
  for (int k = 0; k < HI; ++k) u.hi[k] = 0;
  if constexpr (LO == 8) {
    const unsigned char* span = chunk + L.lo + 32 * (fc_i64)(w - (int)(threadIdx.x & 31));
    const fc_i64 left = n - 32 * (fc_i64)(w - (int)(threadIdx.x & 31));
    fc_v4 lo[2];
    fc_warp_gather<2>(stage, [&](int q) -> fc_v4 {
      return 16 * (fc_i64)q < left ? fc_ld_cg(span + 16 * q) : fc_v4{0u, 0u, 0u, 0u};
    }, lo);
    u.lo[0] = lo[0].x; u.lo[1] = lo[0].y; u.lo[2] = lo[0].z; u.lo[3] = lo[0].w;
    u.lo[4] = lo[1].x; u.lo[5] = lo[1].y; u.lo[6] = lo[1].z; u.lo[7] = lo[1].w;
  } else {
    fc_ld_cg_words<LO>(chunk + L.lo + 4 * LO * w, active, u.lo);
    if (BITS == 6) fc_ld_cg_words<HI>(chunk + L.hi + 4 * HI * w, active, u.hi);
  }
  u.scale = active ? fc_ld_cg_f32(chunk + L.scales + 4 * (w / gl)) : 0.0f;
  u.mn = (active && !sym) ? fc_ld_cg_f32(chunk + L.mins + 4 * (w / gl)) : 0.0f;
}

// ----------------------------------------------------------------- staged reads
// fc_read_unit in two halves (see fc_async.cuh): fc_fetch_unit starts the copy
// of the warp's 32 units into a shared-memory area of FcStaged<BITS>::CHUNKS
// vectors; once fc_cp_async_wait has seen it complete, fc_staged_unit takes the lane's unit
// from it.  Units at or past n read as all-zero codes and metadata, as in
// fc_read_unit.
template <int BITS>
struct FcStaged {
  static constexpr int LO_W = FcUnit<BITS>::LO;                 // code words per lane
  static constexpr int HI_W = BITS == 6 ? FcUnit<BITS>::HI : 0;  // INT6 high-part words per lane
  static constexpr int LO_CH = 8 * LO_W, HI_CH = 8 * HI_W;      // 16-byte chunks of the warp's span
  static constexpr int HI_AT = LO_CH + LO_CH / 8;               // padded as fc_stage_index
  static constexpr int META_AT = HI_AT + HI_CH + HI_CH / 8;
  static constexpr int META_CH = 8;  // a warp's units cover at most 32 groups: 32 floats
  static constexpr int CHUNKS = META_AT + 2 * META_CH;
};

// `L` is fc_layout(n, BITS, group, sym), `gs` = log2(group / FC_ELEMS) (lanes per group).
template <int BITS>
__device__ __forceinline__ void fc_fetch_unit(const unsigned char* chunk, const FcLayout& L, int n, int w, int gs,
                                              bool sym, fc_v4* area) {
  typedef FcStaged<BITS> S;
  const int lane = threadIdx.x & 31;
  const int wb = w - lane;  // the warp's first unit
  fc_fetch_chunks<S::LO_CH, false>(area, chunk + L.lo + 4 * S::LO_W * wb, (BITS == 8 ? n : n / 2) - 4 * S::LO_W * wb);
  if constexpr (S::HI_CH > 0)
    fc_fetch_chunks<S::HI_CH, false>(area + S::HI_AT, chunk + L.hi + 4 * S::HI_W * wb, n / 4 - 4 * S::HI_W * wb);
  // Metadata: the 16-byte chunks holding the floats of groups wb/gl .. (wb+31)/gl;
  // lanes 0-7 fetch scales, lanes 8-15 minimums.
  const int c0 = (wb >> gs) >> 2, nc = ((wb + 31) >> gs >> 2) - c0 + 1;
  const int c = lane & 7;
  if (c < nc && (lane < 8 || (lane < 16 && !sym))) {
    const int left = 4 * (n >> (gs + FC_ELEMS_LOG2)) - 16 * (c0 + c);
    const int bytes = left >= 16 ? 16 : left > 0 ? left : 0;
    fc_cp_async16(area + S::META_AT + (lane < 8 ? 0 : S::META_CH) + c,
                  chunk + (lane < 8 ? L.scales : L.mins) + 16 * (c0 + c), bytes);
  }
}

template <int BITS>
__device__ __forceinline__ void fc_staged_unit(const fc_v4* area, int w, int gs, bool sym, FcUnit<BITS>& u) {
  typedef FcStaged<BITS> S;
  fc_staged_words<S::LO_W>(area, u.lo);
  if constexpr (S::HI_W > 0) {
    fc_staged_words<S::HI_W>(area + S::HI_AT, u.hi);
  } else {
#pragma unroll
    for (int k = 0; k < FcUnit<BITS>::HI; ++k) u.hi[k] = 0;
  }
  const int wb = w - (int)(threadIdx.x & 31);
  const int at = (w >> gs) - 4 * ((wb >> gs) >> 2);
  const float* meta = reinterpret_cast<const float*>(area + S::META_AT);
  u.scale = meta[at];
  u.mn = sym ? 0.0f : meta[4 * S::META_CH + at];
}

// The same for a lane's unit of DT elements (the caller's input, or lossless
// slots): FC_ELEMS elements from element `base`, elements >= n read as 0.
template <int DT>
struct FcStagedElems {
  static constexpr int PER = 16 / (int)sizeof(typename FcElem<DT>::T);
  static constexpr int V = FC_ELEMS / PER;  // vectors per lane
  static constexpr int CH = 32 * V;
  static constexpr int CHUNKS = CH + CH / 8;
};

template <int DT, bool STREAM>
__device__ __forceinline__ void fc_fetch_elems(const void* src, fc_i64 base, fc_i64 n, fc_v4* area) {
  typedef typename FcElem<DT>::T T;
  const fc_i64 span = base - (fc_i64)(threadIdx.x & 31) * FC_ELEMS;
  fc_fetch_chunks<FcStagedElems<DT>::CH, STREAM>(
      area, reinterpret_cast<const unsigned char*>(reinterpret_cast<const T*>(src) + span), (n - span) * (fc_i64)sizeof(T));
}

template <int DT>
__device__ __forceinline__ void fc_staged_elems(const fc_v4* area, float (&v)[FC_ELEMS]) {
  typedef FcStagedElems<DT> S;
  const int lane = threadIdx.x & 31;
  fc_v4 w[S::V];
#pragma unroll
  for (int k = 0; k < S::V; ++k) w[k] = area[fc_stage_index(lane * S::V + k)];
  fc_widen_elems<DT>(w, v);
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
  // write/read: every lane of the warp calls them (see fc_write_unit); units >= n are skipped.
  static __device__ __forceinline__ void write(const Packed& p, unsigned char* chunk, fc_i64 n, int w, int gl,
                                               bool sym, fc_v4* stage) {
    fc_write_unit<BITS>(chunk, fc_layout(n, BITS, gl * FC_ELEMS, sym), n, w, gl, sym, p, stage);
  }
  static __device__ __forceinline__ void read(const unsigned char* chunk, fc_i64 n, int w, int gl, bool sym,
                                              Packed& p, fc_v4* stage) {
    fc_read_unit<BITS>(chunk, fc_layout(n, BITS, gl * FC_ELEMS, sym), n, w, gl, sym, p, stage);
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
  static __device__ __forceinline__ void write(const Packed& p, unsigned char* chunk, fc_i64 n, int w, int, bool,
                                               fc_v4* stage) {
    fc_store_elems<DT>(chunk, (fc_i64)w * FC_ELEMS, n, p.v, stage);
  }
  static __device__ __forceinline__ void read(const unsigned char* chunk, fc_i64 n, int w, int, bool, Packed& p,
                                              fc_v4* stage) {
    fc_load_elems<DT>(chunk, (fc_i64)w * FC_ELEMS, n, FC_PEER, p.v, stage);
  }
  static __device__ __forceinline__ void unpack(const Packed& p, bool, float (&v)[FC_ELEMS]) {
#pragma unroll
    for (int i = 0; i < FC_ELEMS; ++i) v[i] = p.v[i];
  }
};
