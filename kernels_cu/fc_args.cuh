// flashcomm: the kernels' argument block and error record, the two structs the host fills and reads.
//
// Both are mirrored in Python: FcArgs by flashcomm_cupy._kernels.ARGS_DTYPE
// (every field written by the host; the workspace offsets by
// WorkspaceLayout.fill_args, so the kernels derive none), FcError by
// flashcomm_cupy._kernels.ERROR_FIELDS / ERR_* (host-mapped memory the host
// reads after a failed call).  The static_asserts below pin the layout here;
// tests/test_kernels_compile.py checks the Python mirrors against the same
// structs, so an edit on either side fails a test.
#pragma once
#include "fc_common.cuh"

// Error record codes (mirrored by flashcomm_cupy._kernels.ERR_*).
#define FC_ERR_TIMEOUT 1u  // this rank waited past the bound for `peer`
#define FC_ERR_POISON 2u   // rank `peer` gave up and poisoned this rank
#define FC_ERR_NODE 3u     // the hierarchical inter-node step failed here (fc_node.cuh): another node failed,
                           // or its data never arrived; this rank poisoned its node
// FcError.late (and a poison word's low byte) when what failed was another node, not a rank of this one
#define FC_LATE_OTHER_NODE 0xFFu

struct FcError {
  fc_u32 code;   // 0 ok, FC_ERR_TIMEOUT, FC_ERR_POISON or FC_ERR_NODE
  fc_u32 rank;   // this rank
  fc_u32 peer;   // TIMEOUT: the rank it waited for; POISON: the rank that gave up
  fc_u32 block;  // block index
  fc_u32 epoch;  // round it waited for
  fc_u32 abort;  // set once: every later wait returns immediately
  fc_u32 late;   // the rank the first failure of the communicator waited for
  fc_u32 claim;  // 0 until a block of this rank claims the record to write it (fc_record)
};

// FcArgs.flags bits (flashcomm_cupy._kernels.FLAG_*)
#define FC_FLAG_ROTATE 1
#define FC_FLAG_SYM 2

struct FcArgs {
  const void* in;
  void* out;
  fc_i64 n;             // message length in elements
  fc_i64 seg_elems;     // two-shot: elements per owner segment; one-shot: padded length
  FcError* err;         // host-mapped error record
  fc_i64 slot_bytes;
  fc_i64 flags_off;  // the two-shot's reduce-scatter flag set (fc_signal.cuh); the other sets: *_flags_off
  fc_i64 rs_off, ag_off, os_off, timeout_ns;
  int rank, world, group, flags, max_blocks;
  float rot_norm;
  int units;    // FC_ELEMS-element units per thread per tile: more data per synchronization
  int ll_tile;  // LL kernels: 16-byte vectors per block and segment (fits one LL slot)
  fc_i64 ll_off, ll_slot_bytes;
  // Workspace base of every rank (mine at [rank]), by value: kernel parameters
  // live in the constant bank, so no global load stands before the first store.
  fc_u64 peers[FC_MAX_RANKS];
  // Offsets in my workspace (flashcomm_cupy.backends.ipc.WorkspaceLayout):
  // per-block epochs of the two-shot and the one-shot flag sets, per-block LL
  // call counters, and the poison words [source rank] (fc_signal.cuh).
  fc_i64 ts_epoch_off, os_epoch_off, ll_epoch_off, poison_off;
  // ... and the two-shot's all-gather flag set and the one-shot flag set.
  fc_i64 ag_flags_off, os_flags_off;
};

// The layout both sides agree on (natural alignment, no padding).  Checked
// by nvcc (tests/test_kernels_compile.py builds every header with it); NVRTC,
// which builds the kernels at run time, has no __builtin_offsetof.
#ifndef __CUDACC_RTC__
#define FC_ASSERT_FIELD(S, f, off) static_assert(__builtin_offsetof(S, f) == (off), #S "." #f)
FC_ASSERT_FIELD(FcError, code, 0);
FC_ASSERT_FIELD(FcError, rank, 4);
FC_ASSERT_FIELD(FcError, peer, 8);
FC_ASSERT_FIELD(FcError, block, 12);
FC_ASSERT_FIELD(FcError, epoch, 16);
FC_ASSERT_FIELD(FcError, abort, 20);
FC_ASSERT_FIELD(FcError, late, 24);
FC_ASSERT_FIELD(FcError, claim, 28);
FC_ASSERT_FIELD(FcArgs, in, 0);
FC_ASSERT_FIELD(FcArgs, out, 8);
FC_ASSERT_FIELD(FcArgs, n, 16);
FC_ASSERT_FIELD(FcArgs, seg_elems, 24);
FC_ASSERT_FIELD(FcArgs, err, 32);
FC_ASSERT_FIELD(FcArgs, slot_bytes, 40);
FC_ASSERT_FIELD(FcArgs, flags_off, 48);
FC_ASSERT_FIELD(FcArgs, rs_off, 56);
FC_ASSERT_FIELD(FcArgs, ag_off, 64);
FC_ASSERT_FIELD(FcArgs, os_off, 72);
FC_ASSERT_FIELD(FcArgs, timeout_ns, 80);
FC_ASSERT_FIELD(FcArgs, rank, 88);
FC_ASSERT_FIELD(FcArgs, world, 92);
FC_ASSERT_FIELD(FcArgs, group, 96);
FC_ASSERT_FIELD(FcArgs, flags, 100);
FC_ASSERT_FIELD(FcArgs, max_blocks, 104);
FC_ASSERT_FIELD(FcArgs, rot_norm, 108);
FC_ASSERT_FIELD(FcArgs, units, 112);
FC_ASSERT_FIELD(FcArgs, ll_tile, 116);
FC_ASSERT_FIELD(FcArgs, ll_off, 120);
FC_ASSERT_FIELD(FcArgs, ll_slot_bytes, 128);
FC_ASSERT_FIELD(FcArgs, peers, 136);
FC_ASSERT_FIELD(FcArgs, ts_epoch_off, 200);
FC_ASSERT_FIELD(FcArgs, os_epoch_off, 208);
FC_ASSERT_FIELD(FcArgs, ll_epoch_off, 216);
FC_ASSERT_FIELD(FcArgs, poison_off, 224);
FC_ASSERT_FIELD(FcArgs, ag_flags_off, 232);
FC_ASSERT_FIELD(FcArgs, os_flags_off, 240);
#undef FC_ASSERT_FIELD
#endif
static_assert(sizeof(FcError) == 32, "sizeof(FcError)");
static_assert(sizeof(FcArgs) == 248, "sizeof(FcArgs)");
