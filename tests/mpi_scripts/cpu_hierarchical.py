"""Run under mpiexec: the CPU backend's hierarchical all-reduce equals the reference bit for bit.

The node layout comes from ``--ranks-per-node P`` (the communicator option)
or, without it, from ``$FLASHCOMM_RANKS_PER_NODE`` or MPI's discovery.  For
every case each rank all-reduces its input (out-of-place and in place) with
``algo="hierarchical"`` and ``algo="auto"``; case ``i`` is checked by rank
``i % N``, which rebuilds every input and runs the reference with the
backend's node layout.  Also checked: ``auto`` resolves to hierarchical
exactly when the layout spans nodes, and ``describe()`` names the layout.

Exits non-zero on every rank when a check fails, printing each failure.
Usage: ``mpiexec -n K python -m mpi4py cpu_hierarchical.py [--ranks-per-node P] [--quick]``
"""
from __future__ import annotations

import itertools
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cpu_backend_matches_reference import make_input, mismatch, report, same_bits  # noqa: E402

import flashcomm_cupy as fc  # noqa: E402

LENGTHS = (0, 1, 7, 127, 1000, 4099)
QUICK_LENGTHS = (1, 4099)
DTYPE_NAMES = ("float16", "bfloat16", "float32")
BITS = (None, 4, 6, 8, (4, 8))


def cases(quick: bool = False):
    """(length, dtype, bits, group_size, symmetric, rotate, special) in a fixed order."""
    out = []
    for length, dt, bits in itertools.product(QUICK_LENGTHS if quick else LENGTHS, DTYPE_NAMES, BITS):
        if bits is None:
            out.append((length, dt, None, 128, False, False, False))
            continue
        for sym, rot in ((False, False), (True, False), (False, True)):
            out.append((length, dt, bits, 128, sym, rot, False))
    for g, bits in itertools.product((32, 256, 1024), (4, 6, (4, 8))):
        out.append((4099, "bfloat16", bits, g, bits == 6, g == 256, False))
    for bits, dt in itertools.product((None, 4), ("float16", "float32")):
        out.append((1000, dt, bits, 128, False, False, True))  # NaN and Inf on ranks 0 and 1
    return out


def option_from(argv):
    if "--ranks-per-node" in argv:
        return {"ranks_per_node": int(argv[argv.index("--ranks-per-node") + 1])}
    return {}


def main(argv):
    comm = fc.Communicator(backend="cpu", **option_from(argv))
    backend, mpi_comm = comm.backend, comm.mpi_comm
    rank, n = comm.rank, comm.world_size
    nodes = backend.nodes
    failures = []
    want_auto = "hierarchical" if nodes.spans_nodes else "twoshot"
    for nbytes in (0, 2, 1 << 20):
        got = comm.resolve_algo(nbytes, bits=4)
        if got != want_auto:
            failures.append(f"rank {rank}: auto resolved to {got} on {nodes.label()}, expected {want_auto}")
    info = comm.describe()
    if info.get("nodes") != nodes.label() or info.get("auto_algo") != want_auto:
        failures.append(f"rank {rank}: describe() says nodes={info.get('nodes')!r} auto={info.get('auto_algo')!r}")

    all_cases = cases(quick="--quick" in argv)
    for case_id, case in enumerate(all_cases):
        length, dt, bits, g, sym, rot, special = case
        x = make_input(case_id, rank, length, dt, special)
        kw = dict(bits=bits, group_size=g, symmetric=sym, rotate=rot)
        with np.errstate(invalid="ignore", over="ignore"):
            y_out = comm.all_reduce(x, algo="hierarchical", **kw)
            x_in = x.copy()
            y_in = comm.all_reduce(x_in, algo="hierarchical", out=x_in, **kw)
            y_auto = comm.all_reduce(x, algo="auto", **kw)
        if y_in is not x_in or not same_bits(x, make_input(case_id, rank, length, dt, special)):
            failures.append(f"case {case_id} {case}: rank {rank}: in-place returned another array or x changed")
        results = mpi_comm.gather((y_out, y_in, y_auto), root=case_id % n)
        if rank != case_id % n:
            continue
        inputs = [make_input(case_id, r, length, dt, special) for r in range(n)]
        with np.errstate(invalid="ignore", over="ignore"):
            ref = fc.flash_all_reduce_reference(inputs, algo="hierarchical", nodes=nodes, **kw)[0]
            ref_auto = fc.flash_all_reduce_reference(inputs, algo=want_auto, nodes=nodes, **kw)[0]
        for r, (a, b, c) in enumerate(results):
            for how, y, want in (("out-of-place", a, ref), ("in-place", b, ref), ("auto", c, ref_auto)):
                if not same_bits(y, want):
                    failures.append(f"case {case_id} {case}: rank {r} {how}: " + mismatch(y, want))
    comm.close()
    return report(mpi_comm, failures, f"nodes={nodes.label()}: {len(all_cases)} cases")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
