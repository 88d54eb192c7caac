// flashcomm: the hierarchical all-reduce's inter-node step (flashcomm_cupy/backends/hierarchical.py).
//
// Each node's vector (one GPU per node: the rank's input; several: its shard of the node's
// sum, float32) goes to the other nodes as one wire chunk of the reduce-scatter codec; every
// rank decodes the chunks of all nodes and sums them in node order in float32, from +0.0 -- the
// reference's sum_decoded over nodes -- then rotates back and rounds (reference.finish) where the
// sum is the result.  One thread per unit of FC_ELEMS elements; the chunk layout is fc_layout's.
//
// Compiled as every module here (-ftz=false): subnormals are summed as the reference sums them.
#pragma once
#include "fc_common.cuh"
#include "fc_quant.cuh"
#include "fc_args.cuh"
#include "fc_reduce.cuh"

// Elements [0, n) of `x` (type DT; [n, padded) read as 0, the reference's padding), rotated
// forward when `flags` has FC_FLAG_ROTATE, encoded into `chunk` as a chunk of `padded`
// elements (a multiple of `group`).  x and chunk 16-byte aligned.
template <int DT, int BITS>
__device__ __forceinline__ void fc_node_encode_impl(const void* x, unsigned char* chunk, fc_i64 n, fc_i64 padded,
                                                    int group, int flags, float rot_norm) {
  static_assert(BITS > 0, "a lossless node sends its elements as they are");
  __shared__ fc_v4 s_stage[FC_MAX_WARPS * FC_STAGE_VECS];
  fc_v4* stage = fc_warp_stage(s_stage);
  const int w = blockIdx.x * blockDim.x + threadIdx.x;
  const int gl = group / FC_ELEMS, lig = threadIdx.x % gl;
  const bool sym = flags & FC_FLAG_SYM;
  float v[FC_ELEMS];
  fc_load_elems<DT>(x, (fc_i64)w * FC_ELEMS, n, FC_STREAM, v, stage);
  if (flags & FC_FLAG_ROTATE) fc_rotate_fwd(v, gl, lig, fc_rotation_signs(lig), rot_norm);
  typename FcCodec<DT, BITS>::Packed p;
  FcCodec<DT, BITS>::pack(v, gl, sym, p);
  FcCodec<DT, BITS>::write(p, chunk, padded, w, gl, sym, stage);
}

// `nodes` chunks of `padded` elements, chunk k at chunks + k * chunk_bytes (16-byte aligned),
// decoded with the reduce-scatter codec (BITS 0: raw DT elements) and summed in node order in
// float32 from +0.0; rotated back when `flags` has FC_FLAG_ROTATE; elements [0, n) stored,
// rounded to DT, into `out` (16-byte aligned).
template <int DT, int BITS>
__device__ __forceinline__ void fc_node_sum_impl(const unsigned char* chunks, fc_i64 chunk_bytes, int nodes, void* out,
                                                 fc_i64 n, fc_i64 padded, int group, int flags, float rot_norm) {
  typedef FcCodec<DT, BITS> C;
  __shared__ fc_v4 s_stage[FC_MAX_WARPS * FC_STAGE_VECS];
  fc_v4* stage = fc_warp_stage(s_stage);
  const int w = blockIdx.x * blockDim.x + threadIdx.x;
  const int gl = group / FC_ELEMS, lig = threadIdx.x % gl;
  const bool sym = flags & FC_FLAG_SYM;
  const bool active = (fc_i64)w * FC_ELEMS < padded;
  float acc[FC_ELEMS];
#pragma unroll
  for (int i = 0; i < FC_ELEMS; ++i) acc[i] = 0.0f;  // 0 + (-0.0) is +0.0, as in the reference
  for (int k = 0; k < nodes; ++k) {
    float v[FC_ELEMS];
    fc_receive<C>(chunks + (fc_i64)k * chunk_bytes, padded, w, active, gl, sym, v, stage);
#pragma unroll
    for (int i = 0; i < FC_ELEMS; ++i) acc[i] = __fadd_rn(acc[i], v[i]);
  }
  if (flags & FC_FLAG_ROTATE) fc_rotate_inv(acc, gl, lig, fc_rotation_signs(lig), rot_norm);
  fc_store_elems<DT>(out, (fc_i64)w * FC_ELEMS, n, acc, stage, true);
}
