// flashcomm: the hierarchical all-reduce's inter-node step (flashcomm_cupy/backends/hierarchical.py).
//
// Each node's vector (one GPU per node: the rank's input; several: its shard of the node's
// sum, float32) goes to the other nodes as one wire chunk of the reduce-scatter codec; every
// rank decodes the chunks of all nodes and sums them in node order in float32, from +0.0 -- the
// reference's sum_decoded over nodes -- then rotates back and rounds (reference.finish) where the
// sum is the result.  One thread per unit of FC_ELEMS elements; the chunk layout is fc_layout's,
// followed by the sender's status (FcNodeStatus), so a failure on one node reaches every node.
//
// Compiled as every module here (-ftz=false): subnormals are summed as the reference sums them.
#pragma once
#include "fc_common.cuh"
#include "fc_quant.cuh"
#include "fc_args.cuh"
#include "fc_reduce.cuh"
#include "fc_signal.cuh"

// A chunk's status: FC_NODE_TAIL_BYTES after its data, what the sending rank knew when it
// encoded.  The receiver marks every chunk's state "not arrived" before the all-gather (in the
// encoder, which runs first on the stream), so a chunk the all-gather never delivered (NCCL
// aborted) reads as failed too.
#define FC_NODE_OK 0u
#define FC_NODE_FAILED 1u      // the sender's node failed its intra-node call: its flash record follows
#define FC_NODE_PROPAGATED 2u  // the sender had already recorded a failed inter-node step
#define FC_NODE_MISSING 0xffffffffu
#define FC_NODE_TAIL_BYTES 32
struct FcNodeStatus {
  fc_u32 state, sender;          // FC_NODE_*, the sender's rank in the whole communicator
  fc_u32 code, rank, peer, late;  // FC_NODE_FAILED: the sender's FcError fields
  fc_u32 pad0, pad1;
};
// What a receiver records (host-mapped, read by HierarchicalGpuBackend.check): the first failed
// chunk it saw, or FC_NODE_MISSING with node FC_NODE_UNKNOWN when the host aborted the
// all-gather (its chunks may then be partly stale).  flashcomm_cupy/backends/hierarchical.py
// NODE_RECORD_FIELDS mirrors it.
#define FC_NODE_UNKNOWN 0xffffffffu
struct FcNodeRecord {
  fc_u32 state, node;  // the chunk's state (never FC_NODE_OK once written), its node
  fc_u32 sender, code, rank, peer, late, pad;
};
static_assert(sizeof(FcNodeStatus) == FC_NODE_TAIL_BYTES && sizeof(FcNodeRecord) == 32, "pinned");

// Elements [0, n) of `x` (type DT; [n, padded) read as 0, the reference's padding), rotated
// forward when `flags` has FC_FLAG_ROTATE, encoded into `send` as a chunk of `padded` elements
// (a multiple of `group`; BITS 0: the elements as they are), followed at stride -
// FC_NODE_TAIL_BYTES by this rank's status: failed when `flash_err` (the node's flash error
// record, or null) or `own` (this backend's record) holds a failure.  Block 0 also marks the
// `nodes` chunks of `recv` (stride bytes apart) not arrived.  16-byte aligned pointers.
template <int DT, int BITS>
__device__ __forceinline__ void fc_node_encode_impl(const void* x, unsigned char* send, unsigned char* recv,
                                                    fc_i64 stride, int nodes, fc_i64 n, fc_i64 padded, int group,
                                                    int flags, float rot_norm, const volatile FcError* flash_err,
                                                    const volatile FcNodeRecord* own, int sender) {
  __shared__ fc_v4 s_stage[FC_MAX_WARPS * FC_STAGE_VECS];
  fc_v4* stage = fc_warp_stage(s_stage);
  const int w = blockIdx.x * blockDim.x + threadIdx.x;
  const int gl = group / FC_ELEMS, lig = threadIdx.x % gl;
  const bool sym = flags & FC_FLAG_SYM;
  float v[FC_ELEMS];
  fc_load_elems<DT>(x, (fc_i64)w * FC_ELEMS, n, FC_STREAM, v, stage);
  if (BITS > 0 && (flags & FC_FLAG_ROTATE)) fc_rotate_fwd(v, gl, lig, fc_rotation_signs(lig), rot_norm);
  typename FcCodec<DT, BITS>::Packed p;
  FcCodec<DT, BITS>::pack(v, gl, sym, p);
  FcCodec<DT, BITS>::write(p, send, padded, w, gl, sym, stage);
  if (blockIdx.x == 0) {
    for (int k = threadIdx.x; k < nodes; k += blockDim.x)
      reinterpret_cast<FcNodeStatus*>(recv + (fc_i64)(k + 1) * stride - FC_NODE_TAIL_BYTES)->state = FC_NODE_MISSING;
    if (threadIdx.x == 0) {
      FcNodeStatus st = {FC_NODE_OK, (fc_u32)sender, 0u, 0u, 0u, 0u, 0u, 0u};
      if (flash_err != nullptr && flash_err->code != 0) {
        st.state = FC_NODE_FAILED;
        st.code = flash_err->code; st.rank = flash_err->rank; st.peer = flash_err->peer; st.late = flash_err->late;
      } else if (own->state != FC_NODE_OK) {
        st.state = FC_NODE_PROPAGATED;
      }
      *reinterpret_cast<FcNodeStatus*>(send + stride - FC_NODE_TAIL_BYTES) = st;
    }
  }
}

// Where this block's sum stands, worked out by its thread 0: -1 every chunk OK; k >= 0 node k's
// chunk is not OK (the first); -2 this rank's record already holds a failure (an earlier call, or
// the host's mark when it aborted the all-gather: the chunks may be partly stale).  `own_state`:
// the record's state word as copied to device memory after the all-gather -- not the host-mapped
// record itself: a host-mapped read in every block cost 1.2-1.4 us per block, serialized
// (2xH200, INT4: 16 MB of fp16, 2,048 blocks, +2.6 ms; 256 MB, 32,768 blocks, +46 ms; NOTES v34).
__device__ __forceinline__ int fc_node_failed(const unsigned char* recv, fc_i64 stride, int nodes,
                                              const fc_u32* own_state) {
  __shared__ int s_failed;
  if (threadIdx.x == 0) {
    int failed = *own_state != FC_NODE_OK ? -2 : -1;
    for (int k = 0; k < nodes && failed == -1; ++k)
      if (reinterpret_cast<const FcNodeStatus*>(recv + (fc_i64)(k + 1) * stride - FC_NODE_TAIL_BYTES)->state !=
          FC_NODE_OK)
        failed = k;
    s_failed = failed;
  }
  __syncthreads();
  return s_failed;
}

// A failed sum (block 0's thread 0): record the failed chunk in `own` (unless it holds a failure
// already), and where the rank's node has a flash backend (node_poison not null: several GPUs per
// node) give up on the node as a failed flash wait does (fc_give_up): the node's all-gather half
// then finds the poison on every rank of the node, writes NaN and raises there too.
__device__ __noinline__ void fc_node_fail(const unsigned char* recv, fc_i64 stride, int failed,
                                          volatile FcNodeRecord* own, volatile FcError* flash_err,
                                          const fc_u32* node_poison, int node_rank, int node_world) {
  if (failed >= 0 && own->state == FC_NODE_OK) {
    const FcNodeStatus st = *reinterpret_cast<const FcNodeStatus*>(recv + (fc_i64)(failed + 1) * stride -
                                                                   FC_NODE_TAIL_BYTES);
    own->node = failed; own->sender = st.sender; own->code = st.code; own->rank = st.rank;
    own->peer = st.peer; own->late = st.late;
    __threadfence_system();
    own->state = st.state;  // last: the host reads the record once state is set
    __threadfence_system();
  }
  if (node_poison != nullptr)
    fc_give_up(flash_err, node_poison, node_rank, node_world, FC_ERR_NODE, node_rank, FC_LATE_OTHER_NODE, 0u);
}

// `nodes` chunks of `padded` elements, chunk k at recv + k * stride (16-byte aligned), decoded
// with the reduce-scatter codec (BITS 0: raw DT elements) and summed in node order in float32
// from +0.0; rotated back when `flags` has FC_FLAG_ROTATE; elements [0, n) stored, rounded to
// DT, into `out` (16-byte aligned).  If any chunk's status is not OK, or `own` holds a failure
// (`own_state`: a device copy of its state word made after the all-gather), every element is NaN
// instead and fc_node_fail records it and poisons the node (flash_err, node_poison, node_rank,
// node_world: the node's flash error record and this rank's poison words; null with one GPU per
// node).
template <int DT, int BITS>
__device__ __forceinline__ void fc_node_sum_impl(const unsigned char* recv, fc_i64 stride, int nodes, void* out,
                                                 fc_i64 n, fc_i64 padded, int group, int flags, float rot_norm,
                                                 volatile FcNodeRecord* own, const fc_u32* own_state,
                                                 volatile FcError* flash_err,
                                                 const fc_u32* node_poison, int node_rank, int node_world) {
  typedef FcCodec<DT, BITS> C;
  __shared__ fc_v4 s_stage[FC_MAX_WARPS * FC_STAGE_VECS];
  fc_v4* stage = fc_warp_stage(s_stage);
  const int w = blockIdx.x * blockDim.x + threadIdx.x;
  const int gl = group / FC_ELEMS, lig = threadIdx.x % gl;
  const bool sym = flags & FC_FLAG_SYM;
  const bool active = (fc_i64)w * FC_ELEMS < padded;
  const int failed = fc_node_failed(recv, stride, nodes, own_state);  // the same in every thread
  float acc[FC_ELEMS];
  if (failed != -1) {
#pragma unroll
    for (int i = 0; i < FC_ELEMS; ++i) acc[i] = __int_as_float(0x7fc00000);
    if (w == 0) fc_node_fail(recv, stride, failed, own, flash_err, node_poison, node_rank, node_world);
  } else {
#pragma unroll
    for (int i = 0; i < FC_ELEMS; ++i) acc[i] = 0.0f;  // 0 + (-0.0) is +0.0, as in the reference
    for (int k = 0; k < nodes; ++k) {
      float v[FC_ELEMS];
      fc_receive<C>(recv + (fc_i64)k * stride, padded, w, active, gl, sym, v, stage);
#pragma unroll
      for (int i = 0; i < FC_ELEMS; ++i) acc[i] = __fadd_rn(acc[i], v[i]);
    }
    if (BITS > 0 && (flags & FC_FLAG_ROTATE)) fc_rotate_inv(acc, gl, lig, fc_rotation_signs(lig), rot_norm);
  }
  fc_store_elems<DT>(out, (fc_i64)w * FC_ELEMS, n, acc, stage, true);
}
