// flashcomm: a kernel call's start and end under the poison protocol (fc_signal.cuh).
//
// The flag kernels (fc_flag.cuh) open with fc_begin and close with fc_end,
// and a block that finds poison takes fc_flag_fail; the LL kernels
// (fc_ll_kernels.cuh, fc_llq_kernels.cuh) do the same with fc_ll_begin /
// fc_ll_end.  Kept together so the failure path can be read (and its cost in
// registers studied) in one place.
#pragma once
#include "fc_common.cuh"
#include "fc_args.cuh"
#include "fc_signal.cuh"

// What this rank's bounded waits need, from the arguments.
__device__ __forceinline__ FcWait fc_wait_ctx(const FcArgs& a) {
  return FcWait{a.err, reinterpret_cast<const fc_u32*>(reinterpret_cast<unsigned char*>(a.peers[a.rank]) + a.poison_off),
                a.timeout_ns, a.rank, a.world};
}

// A flag kernel's start: this block's epoch of the flag sets at `epoch_off`
// into *e, and whether my workspace is poisoned (then the block takes
// fc_flag_fail and stops).  The poison words are read by threads < world
// alongside the epoch, under the barrier the epoch needs anyway.
__device__ __forceinline__ bool fc_begin(const FcArgs& a, const FcWait& w, fc_i64 epoch_off, fc_u32* s_epoch,
                                         fc_u32& e) {
  const fc_u32* epochs = reinterpret_cast<const fc_u32*>(reinterpret_cast<unsigned char*>(a.peers[a.rank]) + epoch_off);
  if (threadIdx.x == 0) *s_epoch = epochs[blockIdx.x];
  const bool any = fc_block_poisoned(w);
  e = *s_epoch;
  return any;
}

// A flag kernel's end, after its last wait: the epoch moves on, unless a wait
// of this call (of any rank) gave up -- then every rank is poisoned by now and
// the block takes fc_flag_fail instead (true).
__device__ __forceinline__ bool fc_end(const FcArgs& a, const FcWait& w, fc_i64 epoch_off, fc_u32 e) {
  if (fc_block_poisoned(w)) return true;
  fc_u32* epochs = reinterpret_cast<fc_u32*>(reinterpret_cast<unsigned char*>(a.peers[a.rank]) + epoch_off);
  if (threadIdx.x == 0) epochs[blockIdx.x] = e;
  return false;
}

// The failure path of a flag kernel's block (block-uniform): record who gave
// up (nothing new when this rank did) and write NaN over every tile this block
// handles in this call (nseg segments of a.seg_elems: the world for two-shot,
// 1 for one-shot).  The epoch stays behind: the communicator is poisoned.
template <int DT>
__device__ __forceinline__ void fc_flag_fail(const FcArgs& a, int nseg, fc_i64 tile) {
  if (threadIdx.x == 0) fc_record_poisoned(a.err, fc_wait_ctx(a).poison, a.rank, a.world);
  fc_fill_nan_tiles<DT>(a.out, a.n, a.seg_elems, nseg, tile);
}

// A block's LL call: its counter, this call's number e (slot parity e & 1),
// and the poison word this thread read when the call started (threads < world
// read one each; compared only in fc_ll_end, so the load's latency hides
// behind the whole call).
struct FcLLCall {
  fc_u32* counter;
  fc_u32 e;
  fc_u32 poison;
};

__device__ __forceinline__ FcLLCall fc_ll_begin(const FcArgs& a) {
  fc_u32* counter = reinterpret_cast<fc_u32*>(reinterpret_cast<unsigned char*>(a.peers[a.rank]) + a.ll_epoch_off) +
                    blockIdx.x;
  const fc_u32 poison = threadIdx.x < a.world ? fc_ld_volatile_u32(fc_wait_ctx(a).poison + threadIdx.x) : 0u;
  return FcLLCall{counter, *counter + 1, poison};
}

// The end of a block's LL call.  True when any thread of the block failed a
// receive (its wait already poisoned every rank, or found the poison) or the
// block started poisoned: the caller then writes NaN over the block's whole
// tile (the counter stays behind: the communicator is poisoned for good).
// A lane that failed receives and sends nothing more until then.
__device__ __forceinline__ bool fc_ll_end(const FcArgs& a, const FcLLCall& c, bool failed) {
  // every thread has read the counter before it moves on
  if (__syncthreads_or(failed || c.poison != 0u)) {
    if (threadIdx.x == 0) fc_record_poisoned(a.err, fc_wait_ctx(a).poison, a.rank, a.world);
    return true;
  }
  if (threadIdx.x == 0) *c.counter = c.e;
  return false;
}
