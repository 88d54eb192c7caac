// flashcomm: cross-GPU signals, bounded waits and the poison protocol.
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
// slot that a slow peer still needs (see fc_flag.cuh for the argument).
// The two-shot (RS, AG) and the one-shot sets count their rounds with separate
// per-block epochs, so neither set can fall 2^31 rounds behind its counter
// however long the other algorithm runs alone.
//
// Waits are bounded, and a failure poisons the communicator (docs/reliability.md):
// * after `timeout_ns` a wait records which peer did not arrive in host-mapped
//   memory (FC_ERR_TIMEOUT), raises `abort` (every later wait of this rank
//   gives up at its next check) and, before anything else happens, stores a
//   poison word into every rank's workspace, its own first (before the abort,
//   so no block of this rank can give up unpoisoned) (fc_poison_all):
//   each peer's pending wait gives up at its next check (every 1024 polls) and
//   records FC_ERR_POISON, and every later call on any rank sees the poison;
// * a kernel whose block found poison, at its start or after its last wait,
//   writes NaN over every output element that block is responsible for.
//   Whatever a rank sends after it gave up is ordered after its poison stores
//   (both st.release.sys), so a peer that acquired such a signal finds the
//   poison by then: a failed call never leaves plausible numbers behind, in
//   eager calls and graph replays alike, and the flag kernels' hot loops carry
//   no failure branch (an early exit there cost the staged two-shot 7 %).
// The host turns the record into a Python exception; only closing the
// communicator clears the poison.
#pragma once
#include "fc_common.cuh"
#include "fc_args.cuh"  // FcError and its codes

// A poison word: FC_POISON | the rank the first failure waited for.  Never 0.
#define FC_POISON 0x100u
// The poison area of a workspace: the words [source rank], then every rank's
// workspace base (written by the host), so the out-of-line failure path can
// reach the peers without the kernel's arguments.
#define FC_POISON_PEERS_OFF 32
#define FC_POISON_AREA_BYTES (FC_POISON_PEERS_OFF + 8 * FC_MAX_RANKS)

// What every bounded wait needs: the error record, this rank's poison words
// (one per source rank, in its own workspace) and the bound.
struct FcWait {
  volatile FcError* err;
  const fc_u32* poison;
  fc_i64 timeout_ns;
  int rank, world;
};

__device__ __forceinline__ void fc_st_release_sys(fc_u32* p, fc_u32 v) {
  asm volatile("st.release.sys.global.u32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}
__device__ __forceinline__ fc_u32 fc_ld_acquire_sys(const fc_u32* p) {
  fc_u32 v;
  asm volatile("ld.acquire.sys.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}
// Relaxed, system scope, never from L1: poison words are stored by peers.
__device__ __forceinline__ fc_u32 fc_ld_volatile_u32(const fc_u32* p) {
  fc_u32 v;
  asm volatile("ld.volatile.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}
__device__ __forceinline__ fc_u64 fc_globaltimer() {
  fc_u64 t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

// The first poison word set in this rank's workspace, or 0.  Its source is
// written to *src (this rank's own word is set once it aborted itself).
__device__ __forceinline__ fc_u32 fc_first_poison(const fc_u32* poison, int world, int* src) {
  for (int k = 0; k < world; ++k) {
    const fc_u32 p = fc_ld_volatile_u32(poison + k);
    if (p) {
      *src = k;
      return p;
    }
  }
  return 0;
}

// Record a failure (the first one only) and abort every later wait of this rank.
// Every block of a rank that gives up comes here at about the same time; the
// one whose atomic claims the record writes every field, then the code, and the
// others only raise abort.  (Testing `code == 0` instead let two blocks both
// pass and interleave their fields: a record could name one failure's peer under
// another's code.)  The record is host-mapped memory; an atomic there is atomic
// among this GPU's threads, the only writers, which is all the claim needs.
__device__ __noinline__ void fc_record(volatile FcError* err, int rank, fc_u32 code, int peer, fc_u32 late,
                                       fc_u32 epoch) {
  if (atomicCAS(const_cast<fc_u32*>(&err->claim), 0u, 1u) == 0u) {
    err->rank = rank;
    err->peer = peer;
    err->block = blockIdx.x;
    err->epoch = epoch;
    err->late = late;
    __threadfence_system();
    err->code = code;
  }
  err->abort = 1;
  __threadfence_system();
}

// Store this rank's poison word into every rank's workspace (its own too),
// through the peer bases the host keeps beside the poison words.  Any thread
// may call it, any number of times; `late` is named in the word.
__device__ __noinline__ void fc_poison_all(const fc_u32* poison, int rank, int world, fc_u32 late) {
  const fc_u64* bases = reinterpret_cast<const fc_u64*>(reinterpret_cast<const unsigned char*>(poison) +
                                                        FC_POISON_PEERS_OFF);
  const fc_i64 off = reinterpret_cast<const unsigned char*>(poison) -
                     reinterpret_cast<const unsigned char*>(bases[rank]);  // my poison_off
  for (int k = 0; k < world; ++k)
    fc_st_release_sys(reinterpret_cast<fc_u32*>(reinterpret_cast<unsigned char*>(bases[k]) + off) + rank,
                      FC_POISON | (late & 0xFFu));
}

// This rank gives up on the communicator, because `late` was late (or a
// peer said so): store my poison word into every rank's workspace (my own
// first), THEN record the failure and raise abort.  In that order a block of
// this rank that gives up on the abort -- and goes on computing, sending and
// ending its call without a further check -- can neither pass its end check
// unpoisoned (seen at 4 ranks before the order was fixed) nor send anything a
// peer could acquire ahead of my poison word.  A rank poisoned by a peer
// passes the poison on the same way, so the rule "whatever a rank sends after
// it gave up is ordered after its own poison stores" needs no exception.
__device__ __noinline__ void fc_give_up(volatile FcError* err, const fc_u32* poison, int rank, int world,
                                        fc_u32 code, int peer, fc_u32 late, fc_u32 epoch) {
  fc_st_release_sys(const_cast<fc_u32*>(poison) + rank, FC_POISON | (late & 0xFFu));
  fc_poison_all(poison, rank, world, late);
  fc_record(err, rank, code, peer, late, epoch);
}

// Called every 1024 polls of any wait: true when the wait must end, because
// this rank already gave up (abort), a peer poisoned it, or this wait has run
// past `timeout_ns`; the last two go through fc_give_up.  My own poison word
// alone means another block of this rank is giving up right now and records
// why itself.  (Out-of-line functions take scalars only: an aggregate
// argument would travel through local memory.)
__device__ __noinline__ bool fc_wait_give_up(fc_u64 t0, volatile FcError* err, const fc_u32* poison,
                                             fc_i64 timeout_ns, int rank, int world, int peer, fc_u32 epoch) {
  if (err->abort) return true;
  int src = 0;
  const fc_u32 p = fc_first_poison(poison, world, &src);
  if (p) {
    if (src != rank) fc_give_up(err, poison, rank, world, FC_ERR_POISON, src, p & 0xFFu, epoch);
    return true;
  }
  if ((fc_i64)(fc_globaltimer() - t0) <= timeout_ns) return false;
  fc_give_up(err, poison, rank, world, FC_ERR_TIMEOUT, peer, (fc_u32)peer, epoch);
  return true;
}

__device__ __forceinline__ bool fc_wait_give_up(fc_u64 t0, const FcWait& w, int peer, fc_u32 epoch) {
  return fc_wait_give_up(t0, w.err, w.poison, w.timeout_ns, w.rank, w.world, peer, epoch);
}

// Spin until *flag >= target (mod 2^32).  Returns false on timeout, poison or abort.
__device__ __noinline__ bool fc_wait_flag(const fc_u32* flag, fc_u32 target, volatile FcError* err,
                                          const fc_u32* poison, fc_i64 timeout_ns, int rank, int world, int peer) {
  if ((int)(fc_ld_acquire_sys(flag) - target) >= 0) return true;
  const fc_u64 t0 = fc_globaltimer();
  for (fc_u32 spins = 1;; ++spins) {
    if ((int)(fc_ld_acquire_sys(flag) - target) >= 0) return true;
    if ((spins & 1023u) == 0 && fc_wait_give_up(t0, err, poison, timeout_ns, rank, world, peer, target)) return false;
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

// Wait until every peer has signalled round `e` for this block.  A wait that
// gives up has poisoned every rank; the kernel goes on (and finds the poison
// after its last wait, see fc_block_poisoned).
__device__ __forceinline__ void fc_wait_peers(unsigned char* my_ws, fc_i64 set_off, int max_blocks, fc_u32 e,
                                              const FcWait& w) {
  if constexpr (FC_PROFILE_SKIPS_WAITS) {  // timing variant only (fc_profile.cuh): results are wrong
    __syncthreads();
    return;
  }
  const int k = threadIdx.x;
  if (k < w.world && k != w.rank)
    fc_wait_flag(fc_flag(my_ws, set_off, k, blockIdx.x, max_blocks), e, w.err, w.poison, w.timeout_ns, w.rank,
                 w.world, k);
  __syncthreads();
}

// True on every thread of the block when any poison word of this rank is set
// (threads < world read one each).  Collective over the block.
__device__ __forceinline__ bool fc_block_poisoned(const FcWait& w) {
  const fc_u32 p = threadIdx.x < w.world ? fc_ld_volatile_u32(w.poison + threadIdx.x) : 0u;
  return __syncthreads_or(p != 0u);
}

// Called by one thread of a block that found its workspace poisoned: record
// who gave up and pass the poison on (nothing new if this rank gave up already).
__device__ __noinline__ void fc_record_poisoned(volatile FcError* err, const fc_u32* poison, int rank, int world) {
  int src = 0;
  const fc_u32 p = fc_first_poison(poison, world, &src);
  if (p && src != rank && !err->abort) fc_give_up(err, poison, rank, world, FC_ERR_POISON, src, p & 0xFFu, 0);
}

// The quiet NaN of element type DT as it is stored (float16 and bfloat16 as their bits).
template <int DT>
__device__ __forceinline__ typename FcElem<DT>::T fc_nan() {
  if constexpr (DT == 2) {
    return __uint_as_float(0x7FC00000u);
  } else {
    return (typename FcElem<DT>::T)(DT == 0 ? 0x7E00u : 0x7FC0u);
  }
}

// NaN over out[o * seg + off, min(n, o * seg + off + len)) for o < nseg: the
// output elements of one block tile in every segment (nseg = 1: the message).
template <int DT>
__device__ __forceinline__ void fc_fill_nan(void* out, fc_i64 n, fc_i64 seg, int nseg, fc_i64 off, fc_i64 len) {
  typedef typename FcElem<DT>::T T;
  const T nan = fc_nan<DT>();
  T* o = reinterpret_cast<T*>(out);
  for (int s = 0; s < nseg; ++s) {
    const fc_i64 start = (fc_i64)s * seg + off;
    const fc_i64 end = min(n, start + len);
    for (fc_i64 i = start + threadIdx.x; i < end; i += blockDim.x) o[i] = nan;
  }
}

// NaN over every tile (of `tile` elements, in each of nseg segments of `seg`)
// that this block handles in a flag kernel's call: tiles b, b + grid, ...
// Inlined into the out-of-line fc_flag_end: as a call of its own (one more
// level of out-of-line calls) it made ptxas spill the two-shot kernels that
// only call fc_flag_end, 200-350 B, whatever their own code.
template <int DT>
__device__ __forceinline__ void fc_fill_nan_tiles(void* out, fc_i64 n, fc_i64 seg, int nseg, unsigned tile) {
  typedef typename FcElem<DT>::T T;
  const T nan = fc_nan<DT>();
  T* o = reinterpret_cast<T*>(out);
  for (fc_i64 off = (fc_i64)blockIdx.x * tile; off < seg; off += (fc_i64)gridDim.x * tile)
    for (int s = 0; s < nseg; ++s)
      for (unsigned j = threadIdx.x; j < tile; j += blockDim.x) {
        const fc_i64 k = off + j, i = (fc_i64)s * seg + k;
        if (k < seg && i < n) o[i] = nan;
      }
}
