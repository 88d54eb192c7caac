// flashcomm: cross-GPU signals and bounded waits.
//
// Protocol (after vLLM's custom all-reduce, PR #2760): every block index b
// keeps a uint32 epoch in device memory that only ever increases (never a
// host-side counter frozen into a CUDA graph).  To tell peer k "round e of
// block b is in your buffer", thread k of block b stores e into k's flag word
// [me][b] with st.release.sys after a __syncthreads; the receiver's thread
// k spins with ld.acquire.sys until the word reaches e, then __syncthreads.
// Flags are single aligned 32-bit words written by exactly one peer, so no
// partially overlapping stores exist.  Reduce-scatter and all-gather rounds
// use two separate flag sets (RS, AG), one-shot rounds a third with data slots
// alternating by epoch parity, so a fast peer never overwrites a flag or a
// slot that a slow peer still needs (see fc_allreduce.cu for the argument).
//
// Waits are bounded: after `timeout_ns` a wait records which peer did not
// arrive in host-mapped memory, raises `abort` so every later wait returns at
// once, and gives up.  The host turns the record into a Python exception.
#pragma once
#include "fc_common.cuh"

struct FcError {
  fc_u32 code;   // 0 ok, 1 timeout
  fc_u32 rank;   // the rank that timed out
  fc_u32 peer;   // the rank it was waiting for
  fc_u32 block;  // block index
  fc_u32 epoch;  // round it waited for
  fc_u32 abort;  // set once: every later wait returns immediately
  fc_u32 pad[2];
};

__device__ __forceinline__ void fc_st_release_sys(fc_u32* p, fc_u32 v) {
  asm volatile("st.release.sys.global.u32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}
__device__ __forceinline__ fc_u32 fc_ld_acquire_sys(const fc_u32* p) {
  fc_u32 v;
  asm volatile("ld.acquire.sys.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}
__device__ __forceinline__ fc_u64 fc_globaltimer() {
  fc_u64 t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

// Called every 1024 polls of any wait: true when the wait must end, because
// another wait gave up (abort) or this one has run past `timeout_ns`, which it
// then records (first timeout only) and turns into an abort for every wait.
__device__ __noinline__ bool fc_wait_give_up(fc_u64 t0, volatile FcError* err, fc_i64 timeout_ns, int rank, int peer,
                                             fc_u32 epoch) {
  if (err->abort) return true;
  if ((fc_i64)(fc_globaltimer() - t0) <= timeout_ns) return false;
  if (err->code == 0) {
    err->rank = rank;
    err->peer = peer;
    err->block = blockIdx.x;
    err->epoch = epoch;
    __threadfence_system();
    err->code = 1;
  }
  err->abort = 1;
  __threadfence_system();
  return true;
}

// Spin until *flag >= target (mod 2^32).  Returns false on timeout or abort.
__device__ __noinline__ bool fc_wait_flag(const fc_u32* flag, fc_u32 target, volatile FcError* err,
                                          fc_i64 timeout_ns, int rank, int peer) {
  if ((int)(fc_ld_acquire_sys(flag) - target) >= 0) return true;
  const fc_u64 t0 = fc_globaltimer();
  for (fc_u32 spins = 1;; ++spins) {
    if ((int)(fc_ld_acquire_sys(flag) - target) >= 0) return true;
    if ((spins & 1023u) == 0 && fc_wait_give_up(t0, err, timeout_ns, rank, peer, target)) return false;
  }
}

// Flag words of one set: [source rank][block], in the owner's workspace.
__device__ __forceinline__ fc_u32* fc_flag(unsigned char* ws, fc_i64 set_off, int src, int block, int max_blocks) {
  return reinterpret_cast<fc_u32*>(ws + set_off) + (fc_i64)src * max_blocks + block;
}

// Tell every peer that this block's round `e` is in its buffer.
__device__ __forceinline__ void fc_signal_peers(const fc_u64* peers, fc_i64 set_off, int rank, int world,
                                                int max_blocks, fc_u32 e) {
  __syncthreads();
  const int k = threadIdx.x;
  if (k < world && k != rank)
    fc_st_release_sys(fc_flag(reinterpret_cast<unsigned char*>(peers[k]), set_off, rank, blockIdx.x, max_blocks), e);
}

// Wait until every peer has signalled round `e` for this block.
__device__ __forceinline__ void fc_wait_peers(unsigned char* my_ws, fc_i64 set_off, int rank, int world,
                                              int max_blocks, fc_u32 e, volatile FcError* err, fc_i64 timeout_ns) {
#ifdef FC_PROFILE_NO_WAIT  // timing variant only (benchmarks/kernel_variants.py): results are wrong
  __syncthreads();
  return;
#endif
  const int k = threadIdx.x;
  if (k < world && k != rank)
    fc_wait_flag(fc_flag(my_ws, set_off, k, blockIdx.x, max_blocks), e, err, timeout_ns, rank, k);
  __syncthreads();
}
