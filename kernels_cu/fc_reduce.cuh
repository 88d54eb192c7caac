// flashcomm: what every kernel does with one lane's unit of values -- load my
// input, receive a peer's, sum, and store the result.
#pragma once
#include "fc_common.cuh"
#include "fc_quant.cuh"
#include "fc_args.cuh"

// Decode `chunk` unit w into v.  Every lane of the warp calls it (reads move
// warp-transposed); a lane past the chunk's end decodes whatever is there.
template <typename C>
__device__ __forceinline__ void fc_decode(const unsigned char* chunk, fc_i64 n, int w, int gl, bool sym,
                                          float (&v)[FC_ELEMS], fc_v4* stage) {
  typename C::Packed p;
  C::read(chunk, n, w, gl, sym, p, stage);
  C::unpack(p, sym, v);
}

// Decode `chunk` unit w into v, or zeros for a lane past the chunk's end.
template <typename C>
__device__ __forceinline__ void fc_receive(const unsigned char* chunk, fc_i64 n, int w, bool active, int gl, bool sym,
                                           float (&v)[FC_ELEMS], fc_v4* stage) {
  fc_decode<C>(chunk, n, w, gl, sym, v, stage);
  if (!active) {
#pragma unroll
    for (int i = 0; i < FC_ELEMS; ++i) v[i] = 0.0f;
  }
}

// The lane's unit of my input from element `base` (elements at or beyond
// `limit` read as 0), rotated when the mode asks: my exact contribution.
// `signs`: the lane's fc_rotation_signs (FcTile::signs).
template <int DT, FcRotCode RC = FC_ROT_INLINE>
__device__ __forceinline__ void fc_load_input(const FcArgs& a, fc_i64 base, fc_i64 limit, FcAccess access, bool rot,
                                              int gl, int lig, fc_u32 signs, float (&v)[FC_ELEMS], fc_v4* stage) {
  fc_load_elems<DT>(a.in, base, limit, access, v, stage);
  if (rot) fc_rotate_fwd<RC>(v, gl, lig, signs, a.rot_norm);
}

// That unit quantized: what I send.
template <int DT, typename C, FcRotCode RC = FC_ROT_INLINE>
__device__ __forceinline__ void fc_pack_input(const FcArgs& a, fc_i64 base, fc_i64 limit, FcAccess access,
                                              bool rot, bool sym, int gl, int lig, fc_u32 signs, float (&v)[FC_ELEMS],
                                              typename C::Packed& p, fc_v4* stage) {
  fc_load_input<DT, RC>(a, base, limit, access, rot, gl, lig, signs, v, stage);
  C::pack(v, gl, sym, p);
}

// My own contribution exactly as the peers decode it (re-packed from my
// input): what the one-shots add for me, so every rank sums the same values.
template <int DT, typename C, FcRotCode RC = FC_ROT_INLINE>
__device__ __forceinline__ void fc_input_as_sent(const FcArgs& a, fc_i64 base, fc_i64 limit, FcAccess access, bool rot,
                                                 bool sym, int gl, int lig, fc_u32 signs, float (&v)[FC_ELEMS],
                                                 fc_v4* stage) {
  typename C::Packed p;
  fc_pack_input<DT, C, RC>(a, base, limit, access, rot, sym, gl, lig, signs, v, p, stage);
  C::unpack(p, sym, v);
}

// Store the lane's unit of summed values (rotated back first when the mode
// rotates) into my output from element `base`; elements >= limit stay untouched.
template <int DT, FcRotCode RC = FC_ROT_INLINE>
__device__ __forceinline__ void fc_store_output(const FcArgs& a, fc_i64 base, fc_i64 limit, bool rot, int gl, int lig,
                                                fc_u32 signs, float (&v)[FC_ELEMS], fc_v4* stage, bool stream) {
  if (rot) fc_rotate_inv<RC>(v, gl, lig, signs, a.rot_norm);
  fc_store_elems<DT>(a.out, base, limit, v, stage, stream);
}

// ------------------------------------------------------------------ the shared prologue
// Who this thread is in its block's tile, as every unit kernel (flag and
// quantized LL) works it out first.  A tile is nt * FC_ELEMS * a.units
// elements; thread t owns units t, t + nt, ... (unit(u)), so each unit-round
// is coalesced across the block.  Lossless modules (RSB 0) move whole
// FC_ELEMS-element units unrotated, whatever the group.
template <int RSB>
struct FcTile {
  int t, nt;
  int group;     // quantization group (elements)
  int gl, lig;   // lanes per group, and this lane's index in its group
  bool rot, sym;
  fc_u32 signs;  // the lane's rotation signs (fc_rotation_signs), when rot
  fc_i64 tile;   // elements per block tile
  __device__ __forceinline__ explicit FcTile(const FcArgs& a)
      : t(threadIdx.x), nt(blockDim.x), group(RSB ? a.group : FC_ELEMS), gl(group / FC_ELEMS), lig(t % gl),
        rot(RSB && (a.flags & FC_FLAG_ROTATE)), sym(a.flags & FC_FLAG_SYM), signs(rot ? fc_rotation_signs(lig) : 0u),
        tile((fc_i64)nt * FC_ELEMS * a.units) {}
  // the flag kernels' tiles per segment (block b takes tiles b, b + grid, ...)
  __device__ __forceinline__ fc_i64 ntiles(const FcArgs& a) const { return (a.seg_elems + tile - 1) / tile; }
  // the unit index of this thread's u-th unit of the tile
  __device__ __forceinline__ int unit(int u) const { return u * nt + t; }
};

__device__ __forceinline__ void fc_zero(float (&v)[FC_ELEMS]) {
#pragma unroll
  for (int i = 0; i < FC_ELEMS; ++i) v[i] = 0.0f;
}

// ------------------------------------------------------------------ the owner sum
// THE sum every unit kernel computes, and every bit-identity guarantee rests
// on (the NumPy reference, flashcomm_cupy/reference.py, does the same):
// acc = ((+0 + x_0) + x_1) + ... + x_{world-1} in float32, one rounding per
// add, in rank order, where x_rank is my own contribution as own(v) produces
// it (exact, or exactly as the peers decode it) and x_s of a peer is what
// peer(j, s, v) decodes -- zeros for a lane past the tile's end (`active`
// false), whatever the slot holds there.
// Sources arrive in batches of B (the quantized LL kernels poll B sources at a
// time so their round trips overlap): batch(s0) fetches sources s0 .. s0+B-1
// and peer(j, s, v) decodes source s, the j-th of the current batch.  The flag
// kernels read each source where they decode it: B = 1, batch() does nothing.
// Users: the flag two-shot and one-shot, the quantized LL two-shot.  Two
// kernels write the same sum out, because through this helper ptxas schedules
// them differently (benchmarks/sass_diff.py): the staged two-shot and the
// quantized LL one-shot; the lossless LL kernels add whole 16-byte vectors
// (fc_ll_reduce_vector: the same order, from +0, no lane past a tile).
template <int B, typename Batch, typename Own, typename Peer>
__device__ __forceinline__ void fc_owner_sum(int world, int rank, bool active, float (&acc)[FC_ELEMS],
                                             float (&v)[FC_ELEMS], Batch&& batch, Own&& own, Peer&& peer) {
  fc_zero(acc);
  for (int s0 = 0; s0 < world; s0 += B) {
    batch(s0);
#pragma unroll
    for (int j = 0; j < B; ++j) {
      const int s = s0 + j;
      if (s >= world) break;
      if (s == rank) {
        own(v);
      } else {
        peer(j, s, v);
        if (!active) fc_zero(v);
      }
#pragma unroll
      for (int i = 0; i < FC_ELEMS; ++i) acc[i] = __fadd_rn(acc[i], v[i]);
    }
  }
}

// The flag kernels' form: each source read where it is decoded.
template <typename Own, typename Peer>
__device__ __forceinline__ void fc_owner_sum(int world, int rank, bool active, float (&acc)[FC_ELEMS],
                                             float (&v)[FC_ELEMS], Own&& own, Peer&& peer) {
  fc_owner_sum<1>(world, rank, active, acc, v, [](int) {}, own, [&](int, int s, float (&x)[FC_ELEMS]) { peer(s, x); });
}

// ------------------------------------------------------------------ the epilogue
// What a kernel does with a lane's unit of final sums: every store of a result
// goes through an epilogue, so a fused epilogue (e.g. residual add + RMSNorm,
// which needs row-aligned segments) is one more functor with this interface.
// FcStoreEpilogue: rotate back when the mode rotates, store into my output
// from element `base` (elements >= limit untouched), streamed (L2 evict-first).
template <int DT, int RSB, FcRotCode RC = FC_ROT_INLINE>
struct FcStoreEpilogue {
  const FcArgs& a;
  const FcTile<RSB>& L;
  __device__ __forceinline__ FcStoreEpilogue(const FcArgs& a_, const FcTile<RSB>& L_) : a(a_), L(L_) {}
  __device__ __forceinline__ void operator()(fc_i64 base, fc_i64 limit, float (&v)[FC_ELEMS], fc_v4* stage) const {
    fc_store_output<DT, RC>(a, base, limit, L.rot, L.gl, L.lig, L.signs, v, stage, true);
  }
};
