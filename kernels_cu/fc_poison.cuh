// flashcomm: a kernel call's start and end under the poison protocol (fc_signal.cuh).
//
// The flag kernels (fc_flag.cuh) open with fc_begin and close with the
// out-of-line fc_flag_end, which writes NaN where it finds poison; the LL kernels
// (fc_ll_kernels.cuh, fc_llq_kernels.cuh) do the same with fc_ll_begin /
// fc_ll_end.  Kept together so the failure path can be read (and its cost in
// registers studied) in one place.
#pragma once
#include "fc_common.cuh"
#include "fc_args.cuh"
#include "fc_signal.cuh"
#include "fc_profile.cuh"

// What this rank's bounded waits need, from the arguments.
__device__ __forceinline__ FcWait fc_wait_ctx(const FcArgs& a) {
  return FcWait{a.err, reinterpret_cast<const fc_u32*>(reinterpret_cast<unsigned char*>(a.peers[a.rank]) + a.poison_off),
                a.timeout_ns, a.rank, a.world};
}

// A flag kernel's start: this block's epoch of the flag sets at `epoch_off`.
// No poison check here: a block of a poisoned communicator runs its tiles like
// any other (its waits give up on the abort or the poison; what it sends then
// is ordered after its own poison stores, fc_give_up in fc_signal.cuh) and its
// end finds the poison and writes NaN.  A separate path for blocks that start
// poisoned made ptxas spill the two-shot kernels (7 % at 256 MB; NOTES v24).
__device__ __forceinline__ fc_u32 fc_begin(const FcArgs& a, fc_i64 epoch_off, fc_u32* s_epoch) {
  const fc_u32* epochs = reinterpret_cast<const fc_u32*>(reinterpret_cast<unsigned char*>(a.peers[a.rank]) + epoch_off);
  if (threadIdx.x == 0) *s_epoch = epochs[blockIdx.x];
  __syncthreads();
  return *s_epoch;
}

// A flag kernel's end, after its last wait (block-uniform): the epoch moves
// on; or, when any poison word is set -- a wait of this call gave up on some
// rank, or the communicator was poisoned before -- record who gave up and
// write NaN over every tile this block handles in this call (nseg segments of
// a.seg_elems: the world for two-shot, 1 for one-shot), and the epoch stays
// behind.  Out of line, and only the epoch travels as an argument (the rest is
// read through a pointer to the __grid_constant__ kernel parameter): anything
// else the kernel would have to keep live across its tile loop, and a fill
// reached through one more out-of-line call, made ptxas spill (NOTES v24).
template <int DT, bool ONESHOT>
__device__ __noinline__ void fc_flag_end(const FcArgs* ap, fc_u32 e) {
  const FcArgs& a = *ap;
  const FcWait w = fc_wait_ctx(a);
  fc_u32* epochs = reinterpret_cast<fc_u32*>(reinterpret_cast<unsigned char*>(a.peers[a.rank]) +
                                             (ONESHOT ? a.os_epoch_off : a.ts_epoch_off));
  if (!fc_block_poisoned(w)) {
    if (threadIdx.x == 0) epochs[blockIdx.x] = e;
    return;
  }
  if (threadIdx.x == 0) fc_record_poisoned(a.err, w.poison, a.rank, a.world);
  fc_fill_nan_tiles<DT>(a.out, a.n, a.seg_elems, ONESHOT ? 1 : a.world, blockDim.x * FC_ELEMS * a.units);
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
  fc_u32 poison = 0u;
  if constexpr (!FC_PROFILE_LL_SKIPS_POISON_READ)
    poison = threadIdx.x < a.world ? fc_ld_volatile_u32(fc_wait_ctx(a).poison + threadIdx.x) : 0u;
  return FcLLCall{counter, *counter + 1, poison};
}

// A failed LL call's end, out of line (only a failed call comes here): record
// who gave up and write NaN over the block's tile of each of nseg segments.
// Its inputs travel by value: taking the address of the __grid_constant__
// arguments made every access to them in the kernel go through a local copy.
template <int DT>
__device__ __noinline__ void fc_ll_fail(void* out, fc_i64 n, fc_i64 seg, int nseg, fc_i64 off, fc_i64 len,
                                        volatile FcError* err, const fc_u32* poison, int rank, int world) {
  if (threadIdx.x == 0) fc_record_poisoned(err, poison, rank, world);
  fc_fill_nan<DT>(out, n, seg, nseg, off, len);
}

// The end of a block's LL call.  When any thread of the block failed a
// receive (its wait already poisoned every rank, or found the poison) or the
// block started poisoned, the whole block goes to fc_ll_fail (NaN over the
// block's tile: elements [off, off + len) of each of nseg segments) and the
// counter stays behind (the communicator is poisoned for good); otherwise the
// counter moves on.  The normal path comes first and the failure path is one
// call: 0.05-0.1 us faster than the fill inlined after the vote on one H200's
// loopback, and never slower (benchmarks/NOTES.md v31).
// A lane that failed receives and sends nothing more until then.
template <int DT>
__device__ __forceinline__ void fc_ll_end(const FcArgs& a, const FcLLCall& c, bool failed, int nseg, fc_i64 off,
                                          fc_i64 len) {
  if constexpr (FC_PROFILE_LL_SKIPS_FAIL_PATH) {  // timing variant only (fc_profile.cuh): no failure path
    __syncthreads();
    if (threadIdx.x == 0) *c.counter = c.e;
    return;
  }
  // every thread has read the counter before it moves on
  if (!__syncthreads_or(failed || c.poison != 0u)) {
    if (threadIdx.x == 0) *c.counter = c.e;
    return;
  }
  fc_ll_fail<DT>(a.out, a.n, a.seg_elems, nseg, off, len, a.err, fc_wait_ctx(a).poison, a.rank, a.world);
}
