// flashcomm: what every kernel does with one lane's unit of values -- load my
// input, receive a peer's, sum, and store the result.
#pragma once
#include "fc_common.cuh"
#include "fc_quant.cuh"
#include "fc_args.cuh"

// Decode `chunk` unit w into v, or zeros for a lane past the chunk's end.
// Every lane of the warp calls it (reads move warp-transposed).
template <typename C>
__device__ __forceinline__ void fc_receive(const unsigned char* chunk, fc_i64 n, int w, bool active, int gl, bool sym,
                                           float (&v)[FC_ELEMS], fc_v4* stage) {
  typename C::Packed p;
  C::read(chunk, n, w, gl, sym, p, stage);
  C::unpack(p, sym, v);
  if (!active) {
#pragma unroll
    for (int i = 0; i < FC_ELEMS; ++i) v[i] = 0.0f;
  }
}

// The lane's unit of my input from element `base` (elements at or beyond
// `limit` read as 0), rotated when the mode asks: my exact contribution.
template <int DT>
__device__ __forceinline__ void fc_load_input(const FcArgs& a, fc_i64 base, fc_i64 limit, FcAccess access, bool rot,
                                              int gl, int lig, float (&v)[FC_ELEMS], fc_v4* stage) {
  fc_load_elems<DT>(a.in, base, limit, access, v, stage);
  if (rot) fc_rotate_fwd(v, gl, lig, a.rot_norm);
}

// That unit quantized: what I send.
template <int DT, typename C>
__device__ __forceinline__ void fc_pack_input(const FcArgs& a, fc_i64 base, fc_i64 limit, FcAccess access,
                                              bool rot, bool sym, int gl, int lig, float (&v)[FC_ELEMS],
                                              typename C::Packed& p, fc_v4* stage) {
  fc_load_input<DT>(a, base, limit, access, rot, gl, lig, v, stage);
  C::pack(v, gl, sym, p);
}

// Store the lane's unit of summed values (rotated back first when the mode
// rotates) into my output from element `base`; elements >= limit stay untouched.
template <int DT>
__device__ __forceinline__ void fc_store_output(const FcArgs& a, fc_i64 base, fc_i64 limit, bool rot, int gl, int lig,
                                                float (&v)[FC_ELEMS], fc_v4* stage, bool stream) {
  if (rot) fc_rotate_inv(v, gl, lig, a.rot_norm);
  fc_store_elems<DT>(a.out, base, limit, v, stage, stream);
}
