"""GPU checks of the hierarchical backend against the NumPy reference.

    FLASHCOMM_RANKS_PER_NODE=1 NCCL_P2P_DISABLE=1 NCCL_SHM_DISABLE=1 \\
        mpiexec -n 2 python tests/gpu/hierarchical_checks.py [--quick]

On one host the override pretends every GPU is a node; the NCCL variables
force NCCL's traffic onto sockets, the path it takes between hosts without
InfiniBand.  On real hosts (one rank per host) leave the override out.
Every rank runs the same checks in the same order; rank 0 compares bit for
bit with ``flash_all_reduce_reference(..., algo="hierarchical", nodes=...)``
(NaN positions must match, NaN payloads may differ) and every rank's result
must hash the same.  Exit status 0 only if every check passed.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_checks import BITS, DTYPE_NAMES, Checker, host_input, run_plan, to_device  # noqa: E402

import flashcomm_cupy as fc  # noqa: E402
from flashcomm_cupy.config import Mode  # noqa: E402
from flashcomm_cupy.dtypes import DTYPES  # noqa: E402


def nan_filled(x):
    import cupy
    return cupy.full_like(x, 0x7E00 if x.dtype != cupy.float32 else np.nan)


def check_exact(ck: Checker, sizes, group_sizes=(128,)):
    """Every dtype, codec, rotation and symmetry; out-of-place, in place and through auto."""
    backend, nodes = ck.comm.backend, ck.comm.backend.nodes
    seed = 21
    for n in sizes:
        for dtype in DTYPE_NAMES:
            x = to_device(host_input(seed, ck.rank, n, dtype))
            for bits in BITS:
                for g in (group_sizes if bits is not None else (128,)):
                    for rotate, sym in (((False, False),) if bits is None else
                                        ((False, False), (True, False), (False, True))):
                        for algo in ("hierarchical", "auto"):
                            mode = Mode.make(bits, g, sym, rotate, algo)
                            concrete = backend.resolve_algo(x.nbytes, mode)
                            out = nan_filled(x)
                            backend.all_reduce(x, out, mode, dtype=DTYPES[dtype])
                            label = f"n={n} {dtype} {mode.label} -> {concrete}"
                            if concrete == "nccl":  # auto's lossless choice: NCCL's own order
                                ck.count += 1
                                continue
                            ck.compare_with_reference(label, out, n, dtype, mode, seed, concrete, nodes=nodes)
                        inplace = x.copy()
                        mode = Mode.make(bits, g, sym, rotate, "hierarchical")
                        backend.all_reduce(inplace, inplace, mode, dtype=DTYPES[dtype])
                        ck.compare_with_reference(f"n={n} {dtype} {mode.label} in place", inplace, n, dtype, mode,
                                                  seed, "hierarchical", nodes=nodes)
    ck.log(f"exact: {ck.count} cases")


def check_nonfinite(ck: Checker):
    """A NaN or Inf poisons only its group, on every node."""
    n, dtype, seed = 4096, "float16", 5
    ins = [host_input(seed, r, n, dtype) for r in range(ck.world)]
    ins[0][7] = np.nan
    ins[-1][1000] = np.inf
    x = to_device(ins[ck.rank])
    for bits in (None, 4, (4, 8)):
        mode = Mode.make(bits, 128, False, bits == 4, "hierarchical")
        out = nan_filled(x)
        ck.comm.backend.all_reduce(x, out, mode, dtype=DTYPES[dtype])
        ck.compare_with_reference(f"non-finite {mode.label}", out, n, dtype, mode, seed, "hierarchical",
                                  inputs=ins, nodes=ck.comm.backend.nodes)


def check_subnormals(ck: Checker):
    """bf16 and float32 subnormals are summed as the reference sums them, not flushed to zero
    (bf16 ``0x0001 + 0x0001`` is ``0x0002``): lossless, INT8 and INT8 rotated."""
    from flashcomm_cupy.dtypes import bfloat16
    n = 4099
    for dtype in ("bfloat16", "float32"):
        if dtype == "bfloat16":  # the 127 positive subnormal codes and a few normals
            ins = [((np.arange(n) + r) % 130 + 1).astype(np.uint16).view(bfloat16) for r in range(ck.world)]
        else:
            ins = [(np.arange(n, dtype=np.float32) + r) * np.float32(1e-42) for r in range(ck.world)]
        x = to_device(ins[ck.rank])
        for bits, rotate in ((None, False), (8, False), (8, True)):
            mode = Mode.make(bits, 128, False, rotate, "hierarchical")
            out = nan_filled(x)
            ck.comm.backend.all_reduce(x, out, mode, dtype=DTYPES[dtype])
            ck.compare_with_reference(f"subnormal {dtype} {mode.label}", out, n, dtype, mode, 0, "hierarchical",
                                      inputs=ins, nodes=ck.comm.backend.nodes)


def check_misaligned(ck: Checker):
    """Input and output views 2 bytes past a 16-byte boundary run on aligned copies, exactly."""
    n, dtype, seed = 4099, "float16", 13
    ins = [host_input(seed, r, n, dtype) for r in range(ck.world)]
    base = to_device(np.concatenate([np.zeros(1, ins[ck.rank].dtype), ins[ck.rank]]))
    for bits in (None, 4):
        mode = Mode.make(bits, 128, False, bits is not None, "hierarchical")
        out_base = nan_filled(base)
        ck.comm.backend.all_reduce(base[1:], out_base[1:], mode, dtype=DTYPES[dtype])
        ck.compare_with_reference(f"misaligned {mode.label}", out_base[1:], n, dtype, mode, seed, "hierarchical",
                                  inputs=ins, nodes=ck.comm.backend.nodes)


def check_node_failure(ck: Checker):
    """A failure one node reports reaches every node: rank 0's record is written as fc_node_sum
    writes it when a chunk reported a failure (sticky), then each rank runs the inter-node step
    (a lossless and an INT4 call; rank 0 skips its host-side check, as a graph replay does).
    Every rank's output must be all NaN and every rank's check() must raise, rank 1's naming
    node 0.  On a fresh communicator: the failure is sticky."""
    import cupy
    from mpi4py import MPI
    from flashcomm_cupy.errors import FlashTimeoutError
    comm = fc.Communicator(MPI.COMM_WORLD, backend="gpu")
    backend = comm.backend
    n = 4099
    x = cupy.ones(n, dtype=cupy.float16)
    if ck.rank == 0:
        backend.node_failure._words[0] = 2  # NODE_PROPAGATED: "an earlier call of mine failed"
    for bits in (None, 4):
        mode = Mode.make(bits, 128, False, False, "hierarchical")
        out = cupy.zeros_like(x)
        stream = cupy.cuda.get_current_stream()
        backend._plan(n, "float16", mode).run(x, out, backend.cross_nccl, stream)
        stream.synchronize()
        ck.count += 1
        if not bool(cupy.isnan(out).all()):
            ck.fail(f"node failure {mode.label}: rank {ck.rank}'s output is not all NaN")
    raised = ""
    try:
        backend.check()
    except FlashTimeoutError as exc:
        raised = str(exc)
    ck.count += 1
    if not raised or (ck.rank != 0 and "node 0" not in raised):
        ck.fail(f"node failure: rank {ck.rank}'s check() raised {raised!r}")
    print(f"node failure: rank {ck.rank} raised: {raised}", flush=True)
    check_failed_node_reports_its_flash_record(ck, comm)
    comm.close()


def check_failed_node_reports_its_flash_record(ck: Checker, comm):
    """Several GPUs per node: a rank whose node's flash call failed sends its flash error record
    with its chunk.  Rank 0's chunks report a record saying "local rank 1 timed out waiting for
    local rank 0" (written by hand, as the flash kernels write it); rank 1 must record exactly
    that, with node 0 and sender 0, and output NaN."""
    import ctypes

    import cupy
    from flashcomm_cupy.backends import hierarchical as h
    flash_record = cupy.cuda.runtime.hostAlloc(64, 0x3)
    ctypes.memset(flash_record, 0, 64)
    if ck.rank == 0:
        (ctypes.c_uint32 * 4).from_address(flash_record)[:] = [1, 1, 0, 0]  # code TIMEOUT, rank 1, peer 0
        (ctypes.c_uint32 * 8).from_address(flash_record)[7] = 1  # claimed, as fc_record leaves a record it wrote
    failure = h.NodeFailure(ck.rank, flash_record=flash_record)
    try:
        n = 1000
        x = cupy.ones(n, dtype=cupy.float32)
        out = cupy.zeros_like(x)
        plan = h._OneGpuPerNodePlan(n, "float32", Mode.make(8, 128, False, False, "hierarchical"), ck.world, failure)
        stream = cupy.cuda.get_current_stream()
        plan.run(x, out, comm.backend.cross_nccl, stream)
        stream.synchronize()
        rec = failure.record()
        ck.count += 1
        want = dict(state=h.NODE_FAILED, node=0, sender=0, code=1, rank=1, peer=0)
        if rec is None or any(rec[k] != v for k, v in want.items()) or not bool(cupy.isnan(out).all()):
            ck.fail(f"flash record over the wire: rank {ck.rank} recorded {rec}, want {want} and NaN")
        elif ck.rank == 1:
            print(f"flash record over the wire: {h.node_failure_error(rec, 1)}", flush=True)
    finally:
        failure.close()
        cupy.cuda.runtime.freeHost(flash_record)


def check_graph(ck: Checker, replays: int):
    """Captured calls replay to the same bits as eager ones (the call allocates nothing)."""
    import cupy
    backend = ck.comm.backend
    n, dtype, seed = 1 << 20, "bfloat16", 9
    x = to_device(host_input(seed, ck.rank, n, dtype))
    for bits, rotate in ((4, False), (4, True), (None, False)):
        mode = Mode.make(bits, 128, False, rotate, "hierarchical")
        out = nan_filled(x)
        backend.all_reduce(x, out, mode, dtype=DTYPES[dtype])  # builds the plan before capture
        backend.synchronize()
        out.fill(0)
        replay = backend.capture_graph(lambda: backend.all_reduce(x, out, mode, stream=cupy.cuda.get_current_stream(),
                                                                  dtype=DTYPES[dtype]), 2)
        for _ in range(replays):
            replay()
        replay.stream.synchronize()
        ck.compare_with_reference(f"graph {mode.label}", out, n, dtype, mode, seed, "hierarchical",
                                  nodes=backend.nodes)


def check_flat_nccl(ck: Checker):
    """``algo="nccl"`` (and lossless ``auto``) sums over every rank, not over one cross-node group:
    integer-valued inputs, so NCCL's order gives the exact sum."""
    import cupy
    n = 10_007
    want = sum((r + 1) * (np.arange(n) % 7) for r in range(ck.world)).astype(np.float32)
    x = cupy.asarray(((ck.rank + 1) * (np.arange(n) % 7)).astype(np.float32))
    for algo in ("nccl", "auto"):
        out = cupy.full_like(x, np.nan)
        ck.comm.backend.all_reduce(x, out, Mode.make(None, 128, False, False, algo))
        ck.comm.backend.synchronize()
        ck.count += 1
        if not np.array_equal(out.get(), want):
            ck.fail(f"flat {algo}: rank {ck.rank} does not hold the sum over all {ck.world} ranks")


def check_twoshot_halves(ck: Checker, flash, sizes):
    """The flash backend's reduce-scatter half then all-gather half, composed on one node: every
    rank's shard is the reference's owner sum (``reduce_owner_segment``, rotated domain) and the
    result equals the flash two-shot's and the reference two-shot's bit for bit."""
    import cupy
    from flashcomm_cupy.dtypes import to_f32
    from flashcomm_cupy.reference import reduce_owner_segment
    from flashcomm_cupy import hadamard
    seed = 31
    for n in sizes:
        for dtype in DTYPE_NAMES:
            ins = [host_input(seed, r, n, dtype) for r in range(ck.world)]
            x = to_device(ins[ck.rank])
            for bits in BITS:
                for rotate, sym in (((False, False),) if bits is None else
                                    ((False, False), (True, False), (False, True))):
                    mode = Mode.make(bits, 128, sym, rotate, "twoshot")
                    label = f"halves n={n} {dtype} {mode.label}"
                    seg = flash.shard_elems(n, DTYPES[dtype], mode)
                    shard = cupy.full(seg, np.nan, dtype=cupy.float32)
                    out = nan_filled(x)
                    flash.reduce_scatter(x, shard, mode, dtype=DTYPES[dtype])
                    flash.all_gather(shard, out, mode, dtype=DTYPES[dtype])
                    flat = nan_filled(x)
                    flash.all_reduce(x, flat, mode, dtype=DTYPES[dtype])
                    flash.synchronize()
                    # the shard: my segment of every rank's padded (rotated) input, summed as the owner does
                    parts = []
                    for r in range(ck.world):
                        full = np.zeros(seg * ck.world, dtype=np.float32)
                        full[:n] = to_f32(ins[r])
                        if mode.rotate:
                            full = hadamard.rotate(full, mode.group_size)
                        parts.append(full[ck.rank * seg:(ck.rank + 1) * seg])
                    want = reduce_owner_segment(ck.rank, parts, mode)
                    got = shard.get()
                    if not np.array_equal(got.view(np.uint32), want.view(np.uint32)):
                        bad = np.flatnonzero(got.view(np.uint32) != want.view(np.uint32))
                        ck.fail(f"{label}: rank {ck.rank}'s shard: {bad.size} of {seg} differ, first at {bad[:5]}: "
                                f"got {got[bad[:5]]}, want {want[bad[:5]]}")
                    if not ck.agree(cupy.array_equal(out.view(cupy.uint8), flat.view(cupy.uint8)).item()):
                        ck.fail(f"{label}: the halves differ from the flash all-reduce on some rank")
                    ck.compare_with_reference(label, out, n, dtype, mode, seed, "twoshot", inputs=ins)
    ck.log(f"halves: {ck.count} cases")


def open_node_checker(ranks_per_node: int, failures: list) -> Checker:
    """A checker on a communicator whose nodes are ``ranks_per_node`` ranks of this host each,
    recording into ``failures``."""
    from mpi4py import MPI
    comm = fc.Communicator(MPI.COMM_WORLD, backend="gpu", ranks_per_node=ranks_per_node)
    ck = Checker(comm)
    ck.failures = failures
    ck.log(f"flashcomm hierarchical GPU checks: {comm.world_size} ranks, backend {comm.backend_name}, "
           f"nodes {comm.describe().get('nodes')}, inside a node {comm.describe().get('intra_node')}")
    if comm.backend_name != "hierarchical" or comm.backend.flash is None:
        ck.fail(f"expected the hierarchical backend with {ranks_per_node} GPUs per node, got {comm.backend_name}")
    return ck


def open_checker() -> Checker:
    """The hierarchical backend's checker; its failures say so when the backend is another."""
    from mpi4py import MPI
    comm = fc.Communicator(MPI.COMM_WORLD, backend="gpu")
    ck = Checker(comm)
    ck.log(f"flashcomm hierarchical GPU checks: {comm.world_size} ranks, backend {comm.backend_name}, "
           f"nodes {comm.describe().get('nodes')}")
    if comm.backend_name != "hierarchical":
        ck.fail(f"expected the hierarchical backend (one GPU per node), got {comm.backend_name}: "
                "set FLASHCOMM_RANKS_PER_NODE=1 on one host")
    return ck


def plan(ck: Checker, quick: bool) -> list:
    """The checks, ``(name, fn)`` in order, for main() and tests/gpu/test_hierarchical_gpu.py."""
    sizes = [0, 1, 127, 4099, 65_537, 1_000_003] if not quick else [1, 4099, 65_537]
    groups = (32, 128, 1024) if not quick else (128,)
    return [("exact", lambda: check_exact(ck, sizes, groups)), ("nonfinite", lambda: check_nonfinite(ck)),
            ("subnormals", lambda: check_subnormals(ck)), ("misaligned", lambda: check_misaligned(ck)),
            ("node_failure", lambda: check_node_failure(ck)),
            ("graph", lambda: check_graph(ck, 3))]


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true", help="fewer sizes and group sizes")
    args = p.parse_args(argv)
    from mpi4py import MPI
    ck = open_checker()
    if not ck.failures:
        t_all = time.perf_counter()
        run_plan(ck, plan(ck, args.quick))
        ck.log(f"checks took {time.perf_counter() - t_all:.0f} s")
    ck.comm.close()
    failures = MPI.COMM_WORLD.allreduce(len(ck.failures))
    if ck.rank == 0:
        print(f"{'OK' if failures == 0 else 'FAILED'}: {ck.count} hierarchical cases, {failures} failures",
              flush=True)
    return 0 if failures == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
