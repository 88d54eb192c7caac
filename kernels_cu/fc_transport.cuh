// flashcomm: the transport as the kernels see it -- where a rank's workspace is.
//
// Every byte one rank sends another is a store into the receiver's workspace
// (its slots, LL slots, flag words and poison words); a rank only ever loads
// from its own.  So the kernels need one thing from a transport: the address
// at which this rank reaches rank k's workspace, fc_ws(a, k).  Both transports
// of flashcomm_cupy/backends/transport.py provide exactly that through
// FcArgs.peers: "ipc" maps every peer's device memory into this process (CUDA
// IPC or virtual-memory handles; stores cross NVLink or PCIe P2P), "host"
// places every workspace in one page-locked host segment mapped into each
// process (stores and loads cross PCIe).  Another address-based transport
// (e.g. a symmetric heap) fills FcArgs.peers differently and changes nothing
// here.  One that cannot hand out addresses (a proxy thread forwarding
// stores) would replace these functions and fc_signal_peers' flag stores:
// nothing else in the kernels touches a peer.
#pragma once
#include "fc_common.cuh"
#include "fc_args.cuh"

// Rank k's workspace as this rank addresses it (k == a.rank: my own).
__device__ __forceinline__ unsigned char* fc_ws(const FcArgs& a, int k) {
  return reinterpret_cast<unsigned char*>(a.peers[k]);
}

// Flag-protocol slot [parity][src][block] of `region` in rank rank_of_ws's workspace.
__device__ __forceinline__ unsigned char* fc_slot(const FcArgs& a, int rank_of_ws, fc_i64 region, int parity,
                                                  int src) {
  if constexpr (FC_PROFILE_KEEPS_DATA_LOCAL) rank_of_ws = a.rank;  // timing variant only (fc_profile.cuh)
  unsigned char* ws = fc_ws(a, rank_of_ws);
  const fc_i64 idx = ((fc_i64)parity * a.world + src) * a.max_blocks + blockIdx.x;
  return ws + region + idx * a.slot_bytes;
}

// LL slot [parity][area][src][block] in rank rank_of_ws's workspace (fc_ll.cuh).
__device__ __forceinline__ unsigned char* fc_ll_slot(const FcArgs& a, int rank_of_ws, int parity, int area, int src) {
  unsigned char* ws = fc_ws(a, rank_of_ws);
  const fc_i64 idx = (((fc_i64)parity * 2 + area) * a.world + src) * a.max_blocks + blockIdx.x;
  return ws + a.ll_off + idx * a.ll_slot_bytes;
}
