// flashcomm: the fused Flash All-Reduce kernels' entry points (one module per
// specialisation; the bodies live in the headers below).
//
// Compile-time parameters (one module per combination, see flashcomm_cupy/_kernels.py):
//   FC_DT       element type: 0 float16, 1 bfloat16, 2 float32
//   FC_RS_BITS  reduce-scatter codec: 0 lossless, 4, 6, 8
//   FC_AG_BITS  all-gather codec:     0 lossless, 4, 6, 8 (0 iff FC_RS_BITS is 0)
//   FC_ELEMS    elements per thread and unit (fc_common.cuh): 32, or 16 for the quantized LL kernels,
//               or 8 for the quantized LL one-shot alone (an 8-element build holds nothing else)
// Runtime (FcArgs, fc_args.cuh): group size, rotation, symmetric scaling, rank, world size, workspace layout.
// Profiling and occupancy experiments: fc_profile.cuh.
//
// Headers, bottom-up:
//   fc_common.cuh      element types, exact conversions, vector memory, warp-transposed stages
//   fc_quant.cuh       the codecs (FcCodec, FcUnit, fc_layout) and the Hadamard rotation
//   fc_async.cuh       cp.async staging of the staged two-shot
//   fc_args.cuh        FcArgs and FcError, pinned against the host mirrors
//   fc_signal.cuh      flags, bounded waits, the poison protocol
//   fc_ll.cuh          the LL protocol (data as its own signal)
//   fc_transport.cuh   where rank k's workspace is (peer stores), the slot addresses
//   fc_poison.cuh      a kernel call's start and end under the poison protocol
//   fc_reduce.cuh      a lane's unit: load my input, receive, sum, store
//   fc_flag.cuh        flag kernels: two-shot, its halves, staged two-shot, one-shot
//   fc_ll_kernels.cuh  lossless LL one-shot and two-shot
//   fc_llq_kernels.cuh quantized LL two-shot and one-shot
//   fc_node.cuh        the hierarchical all-reduce's inter-node encode and node-order sum
#include "fc_common.cuh"
#include "fc_quant.cuh"
#include "fc_signal.cuh"
#include "fc_ll.cuh"
#include "fc_async.cuh"
#include "fc_args.cuh"
#include "fc_transport.cuh"
#include "fc_poison.cuh"
#include "fc_reduce.cuh"
#include "fc_flag.cuh"
#include "fc_ll_kernels.cuh"
#include "fc_llq_kernels.cuh"
#include "fc_node.cuh"

#ifndef FC_DT
#define FC_DT 0
#endif
#ifndef FC_RS_BITS
#define FC_RS_BITS 4
#endif
#ifndef FC_AG_BITS
#define FC_AG_BITS FC_RS_BITS
#endif

#if FC_ELEMS >= 16  // 8-element builds: the quantized LL one-shot alone (below)
// FC_TWOSHOT_BOUNDS: 512 threads, or an occupancy experiment's (fc_profile.cuh).
extern "C" __global__ void FC_TWOSHOT_BOUNDS fc_twoshot(const __grid_constant__ FcArgs a) {
  fc_twoshot_impl<FC_DT, FC_RS_BITS, FC_AG_BITS>(a);
}

// The two-shot's halves for the hierarchical all-reduce (fc_flag.cuh): in/out as there.
extern "C" __global__ void __launch_bounds__(512) fc_reduce_scatter(const __grid_constant__ FcArgs a) {
  fc_twoshot_half_impl<FC_DT, FC_RS_BITS, FC_AG_BITS, true>(a);
}

extern "C" __global__ void __launch_bounds__(512) fc_all_gather(const __grid_constant__ FcArgs a) {
  fc_twoshot_half_impl<FC_DT, FC_RS_BITS, FC_AG_BITS, false>(a);
}

#if FC_RS_BITS != 0 && FC_DT != 2
// Quantized 16-bit modes only: a float32 unit would need twice the shared memory.
extern "C" __global__ void __launch_bounds__(512) fc_twoshot_staged(const __grid_constant__ FcArgs a) {
  fc_twoshot_staged_impl<FC_DT, FC_RS_BITS, FC_AG_BITS>(a);
}
#endif

extern "C" __global__ void __launch_bounds__(512) fc_oneshot(const __grid_constant__ FcArgs a) {
  fc_oneshot_impl<FC_DT, FC_RS_BITS>(a);
}

#if FC_RS_BITS == 0
extern "C" __global__ void __launch_bounds__(512) fc_ll_oneshot(FcArgs a) { fc_ll_oneshot_impl<FC_DT>(a); }

extern "C" __global__ void __launch_bounds__(512) fc_ll_twoshot(FcArgs a) { fc_ll_twoshot_impl<FC_DT>(a); }
#else
extern "C" __global__ void __launch_bounds__(FC_LLQ_TWOSHOT_THREADS, 2) fc_llq_twoshot(FcArgs a) {
  fc_llq_twoshot_impl<FC_DT, FC_RS_BITS, FC_AG_BITS>(a);
}
#endif
#endif  // FC_ELEMS >= 16

#if FC_RS_BITS != 0
extern "C" __global__ void __launch_bounds__(FC_LLQ_THREADS, 2) fc_llq_oneshot(FcArgs a) {
  fc_llq_oneshot_impl<FC_DT, FC_RS_BITS, FC_ROT_INLINE>(a);
}

// The same with one shared copy of the butterflies (FcRotCode), for rotating
// modes from SHARED_ROTATION_MIN_WARPS warps (plan.py: shares_rotation_code).
extern "C" __global__ void __launch_bounds__(FC_LLQ_THREADS, 2) fc_llq_oneshot_rot(FcArgs a) {
  fc_llq_oneshot_impl<FC_DT, FC_RS_BITS, FC_ROT_SHARED>(a);
}
#endif

#if FC_ELEMS >= 16
// The hierarchical all-reduce's inter-node step (fc_node.cuh): x (FC_DT) -> one wire chunk,
// and every node's chunk -> their node-order sum as FC_DT.  The float32 build serves the shards
// of several GPUs per node.
extern "C" __global__ void __launch_bounds__(512) fc_node_encode(const void* x, unsigned char* send, unsigned char* recv,
                                                                 fc_i64 stride, int nodes, fc_i64 n, fc_i64 padded,
                                                                 int group, int flags, float rot_norm,
                                                                 const FcError* flash_err, const FcNodeRecord* own,
                                                                 int sender) {
  fc_node_encode_impl<FC_DT, FC_RS_BITS>(x, send, recv, stride, nodes, n, padded, group, flags, rot_norm, flash_err,
                                         own, sender);
}

extern "C" __global__ void __launch_bounds__(512) fc_node_sum(const unsigned char* recv, fc_i64 stride, int nodes,
                                                              void* out, fc_i64 n, fc_i64 padded, int group, int flags,
                                                              float rot_norm, FcNodeRecord* own,
                                                              const fc_u32* own_state, FcError* flash_err,
                                                              const fc_u32* node_poison, int node_rank,
                                                              int node_world) {
  fc_node_sum_impl<FC_DT, FC_RS_BITS>(recv, stride, nodes, out, n, padded, group, flags, rot_norm, own, own_state,
                                      flash_err, node_poison, node_rank, node_world);
}

// Test entry points: one wire chunk of n elements (a multiple of the group
// size) encoded from / decoded to float32, so tests can compare bytes with
// quant.encode / quant.decode (and rotation with hadamard.rotate).
extern "C" __global__ void fc_encode_chunk(const float* x, unsigned char* chunk, fc_i64 n, int group, int flags,
                                           float rot_norm) {
#if FC_RS_BITS > 0
  __shared__ fc_v4 s_stage[FC_MAX_WARPS * FC_STAGE_VECS];
  const int w = blockIdx.x * blockDim.x + threadIdx.x;
  const int gl = group / FC_ELEMS, lig = threadIdx.x % gl;
  float v[FC_ELEMS];
  // Coalesced through the warp's stage (elements >= n read as 0): one float at a time with a
  // 128-byte stride between lanes made the hierarchical path's local work 7 ms at 256 MB.
  fc_load_elems<2>(x, (fc_i64)w * FC_ELEMS, n, FC_CACHED, v, fc_warp_stage(s_stage));
  if (flags & FC_FLAG_ROTATE) fc_rotate_fwd(v, gl, lig, fc_rotation_signs(lig), rot_norm);
  typename FcCodec<FC_DT, FC_RS_BITS>::Packed p;
  FcCodec<FC_DT, FC_RS_BITS>::pack(v, gl, flags & FC_FLAG_SYM, p);
  FcCodec<FC_DT, FC_RS_BITS>::write(p, chunk, n, w, gl, flags & FC_FLAG_SYM, fc_warp_stage(s_stage));
#endif
}

extern "C" __global__ void fc_decode_chunk(const unsigned char* chunk, float* x, fc_i64 n, int group, int flags,
                                           float rot_norm) {
#if FC_RS_BITS > 0
  __shared__ fc_v4 s_stage[FC_MAX_WARPS * FC_STAGE_VECS];
  const int w = blockIdx.x * blockDim.x + threadIdx.x;
  const int gl = group / FC_ELEMS, lig = threadIdx.x % gl;
  const bool active = (fc_i64)w * FC_ELEMS < n;
  float v[FC_ELEMS];
  fc_receive<FcCodec<FC_DT, FC_RS_BITS> >(chunk, n, w, active, gl, flags & FC_FLAG_SYM, v, fc_warp_stage(s_stage));
  if (flags & FC_FLAG_ROTATE) fc_rotate_inv(v, gl, lig, fc_rotation_signs(lig), rot_norm);
  fc_store_elems<2>(x, (fc_i64)w * FC_ELEMS, n, v, fc_warp_stage(s_stage));  // coalesced, as the encoder's load
#endif
}
#endif  // FC_ELEMS >= 16
