// flashcomm: asynchronous global -> shared copies (cp.async) for staged reads.
//
// The flag two-shot's owner step reads one unit from each of `world` sources
// before it can add them.  Loaded into registers, those reads form a chain of
// dependent round trips per unit (the decode of one source needs its data
// before the next load issues, and every source held in flight at once costs
// more registers than a 2-blocks-per-SM thread has: NOTES v10).  cp.async puts
// the bytes straight into shared memory, so a warp can have every source of a
// unit in flight at once for no registers, then decode them from shared memory.
// Contract of every helper here: all 32 lanes of the warp call together.
#pragma once
#include "fc_common.cuh"

__device__ __forceinline__ fc_u32 fc_smem_addr(const void* p) {
  fc_u32 a;
  asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p));
  return a;
}

// One 16-byte copy through L2 only (.cg: a stale line in this SM's L1 can never
// be returned, as for fc_ld_cg).  The first `bytes` (0..16) come from `src`,
// the rest of the 16 are zero-filled; with bytes == 0 nothing is read.
// Before sm_80 (no cp.async) the copy is a plain load and store: correct, not overlapped.
__device__ __forceinline__ void fc_cp_async16(fc_v4* dst, const void* src, int bytes) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(fc_smem_addr(dst)), "l"(src), "r"(bytes)
               : "memory");
#else
  fc_v4 v = {0u, 0u, 0u, 0u};
  if (bytes == 16) {
    v = fc_ld_cg(src);
  } else {  // partial copies are whole 16-bit elements or 32-bit metadata words
    fc_u16* h = reinterpret_cast<fc_u16*>(&v);
    for (int i = 0; i < bytes / 2; ++i) h[i] = fc_ld_cg_u16(reinterpret_cast<const fc_u16*>(src) + i);
  }
  *dst = v;
#endif
}
// The same for data read once (the caller's input): first in line for L2 eviction.
__device__ __forceinline__ void fc_cp_async16_stream(fc_v4* dst, const void* src, int bytes) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  asm volatile("cp.async.cg.shared.global.L2::cache_hint [%0], [%1], 16, %2, %3;" ::"r"(fc_smem_addr(dst)),
               "l"(src), "r"(bytes), "l"(fc_evict_first_policy())
               : "memory");
#else
  fc_cp_async16(dst, src, bytes);
#endif
}
__device__ __forceinline__ void fc_cp_async_commit() {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;" ::: "memory");
#endif
}
// Wait until at most N of this lane's latest commit groups are pending, then
// make every lane's completed copies visible to the warp.
template <int N>
__device__ __forceinline__ void fc_cp_async_wait() {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
#endif
  __syncwarp();
}

// Copy the CH 16-byte chunks at `src` (of which the first `valid` bytes exist;
// the rest read as zeros and are never touched) into `dst`, chunk c at
// fc_stage_index(c): the layout fc_warp_gather's stage uses, so a lane that
// reads its own consecutive chunks meets no bank conflicts.  `valid` is the
// same for the whole warp, so the common case (all valid) takes one branch
// with no per-chunk size arithmetic.
template <int CH, bool STREAM>
__device__ __forceinline__ void fc_fetch_chunks(fc_v4* dst, const unsigned char* src, fc_i64 valid) {
  const int lane = threadIdx.x & 31;
  if (valid >= 16 * CH) {
#pragma unroll
    for (int i = 0; i < (CH + 31) / 32; ++i) {
      const int c = i * 32 + lane;
      if (CH % 32 == 0 || c < CH) {
        if (STREAM) fc_cp_async16_stream(dst + fc_stage_index(c), src + 16 * c, 16);
        else fc_cp_async16(dst + fc_stage_index(c), src + 16 * c, 16);
      }
    }
    return;
  }
#pragma unroll
  for (int i = 0; i < (CH + 31) / 32; ++i) {
    const int c = i * 32 + lane;
    if (CH % 32 == 0 || c < CH) {
      const fc_i64 left = valid - 16 * (fc_i64)c;
      const int bytes = left >= 16 ? 16 : left > 0 ? (int)left : 0;
      const unsigned char* p = bytes ? src + 16 * c : src;
      if (STREAM) fc_cp_async16_stream(dst + fc_stage_index(c), p, bytes);
      else fc_cp_async16(dst + fc_stage_index(c), p, bytes);
    }
  }
}

// This lane's W words of a span that gives every lane W consecutive words
// (lane l's at byte 4 * W * l), staged by fc_fetch_chunks.
template <int W>
__device__ __forceinline__ void fc_staged_words(const fc_v4* area, fc_u32 (&x)[W]) {
  static_assert(W == 1 || W == 2 || W == 4 || W == 8 || W == 16 || W == 32, "words per lane");
  const int lane = threadIdx.x & 31;
  if constexpr (W >= 4) {
#pragma unroll
    for (int k = 0; k < W / 4; ++k) {
      const fc_v4 v = area[fc_stage_index(lane * (W / 4) + k)];
      x[4 * k] = v.x; x[4 * k + 1] = v.y; x[4 * k + 2] = v.z; x[4 * k + 3] = v.w;
    }
  } else {
    const fc_u32* words = reinterpret_cast<const fc_u32*>(area + fc_stage_index(lane * W / 4));
#pragma unroll
    for (int k = 0; k < W; ++k) x[k] = words[(lane * W) % 4 + k];
  }
}
