"""Run under mpiexec: the CPU backend equals flash_all_reduce_reference bit for bit.

Every rank builds its input from (case seed, rank), so any rank can rebuild
every other rank's input and compute the reference alone.  Case ``i`` is
checked by rank ``i % N`` (spreading the reference work): it gathers every
rank's result, out-of-place and in place, and compares the bit patterns with
the reference.  The MPI_Allreduce baseline is checked against the exact
(float64) sum with the float32 summation error bound instead, since MPI
chooses its own summation order.

Exits non-zero on every rank when any case fails, printing each failure.
Usage: ``mpiexec -n K python -m mpi4py cpu_backend_matches_reference.py [--quick]``
"""
from __future__ import annotations

import itertools
import sys

import numpy as np

import flashcomm_cupy as fc
from flashcomm_cupy.dtypes import DTYPES, resolve_dtype

LENGTHS = (0, 1, 2, 7, 127, 128, 1000, 4099, 65537)
DTYPE_NAMES = ("float16", "bfloat16", "float32")
BITS = (None, 4, 6, 8, (4, 8))
FLASH_ALGOS = ("oneshot", "twoshot", "auto")
EXTRA_GROUP_SIZES = (32, 64, 256, 1024)


def make_input(seed: int, rank: int, length: int, dtype_name: str, special: bool = False) -> np.ndarray:
    """Deterministic per-(seed, rank) data with outliers, a zero and a constant group."""
    rng = np.random.default_rng([seed, rank])
    x = rng.standard_normal(length).astype(np.float64) * (1.0 + rank)
    x[::97] *= 30.0  # outliers, the case rotation exists for
    if length >= 512:
        x[256:384] = 0.0  # all-zero group: scale 0 path
        x[384:512] = 1.5  # constant group: scale 0, min carries the value
    if special and length >= 800:
        if rank == 1:
            x[3] = np.nan
        if rank == 0:
            x[700] = np.inf
            x[701] = -np.inf
    return x.astype(DTYPES[dtype_name])


def cases():
    """(kind, length, dtype, bits, group_size, symmetric, rotate, algo, special) in a fixed order."""
    out = []
    for length, dt in itertools.product(LENGTHS, DTYPE_NAMES):
        for bits, algo in itertools.product(BITS, FLASH_ALGOS):
            if bits is None:
                out.append(("flash", length, dt, None, 128, False, False, algo, False))
                continue
            for sym, rot in itertools.product((False, True), (False, True)):
                out.append(("flash", length, dt, bits, 128, sym, rot, algo, False))
        out.append(("mpi", length, dt, None, 128, False, False, "mpi", False))
    # Other group sizes, where segment padding and plane offsets change.
    for g, length, bits in itertools.product(EXTRA_GROUP_SIZES, (1000, 4099), (4, 6, 8, (4, 8))):
        for algo, dt in (("twoshot", "bfloat16"), ("oneshot", "float32"), ("twoshot", "float16")):
            out.append(("flash", length, dt, bits, g, bits == 8, length == 4099, algo, False))
    # NaN/Inf: only the groups holding them may turn NaN; bits must still agree.
    for bits, algo, dt in itertools.product((None, 4, (4, 8)), ("oneshot", "twoshot"), ("float16", "float32")):
        out.append(("flash", 1000, dt, bits, 128, False, bits == 4, algo, True))
    return out


def first_difference(a: np.ndarray, b: np.ndarray) -> str:
    ab = a.reshape(-1).view(np.uint8).reshape(a.size, -1)
    bb = b.reshape(-1).view(np.uint8).reshape(b.size, -1)
    idx = int(np.flatnonzero((ab != bb).any(axis=1))[0])
    return (f"{int((ab != bb).any(axis=1).sum())} elements differ, first at [{idx}]: "
            f"got {a.reshape(-1)[idx]!r}, reference {b.reshape(-1)[idx]!r}")


def mismatch(y: np.ndarray, ref: np.ndarray) -> str:
    """Why ``y`` is not ``ref``: the first differing element, or the differing dtype/shape."""
    if y.shape == ref.shape and y.dtype == ref.dtype:
        return first_difference(y, ref)
    return f"got {y.dtype}{y.shape}, reference {ref.dtype}{ref.shape}"


def report(mpi_comm, failures, summary: str) -> int:
    """Rank 0 prints every rank's failures (the first 50) and ``summary: N cases, M failures``;
    returns the exit status, the same on every rank (collective)."""
    all_failures = [f for part in mpi_comm.allgather(failures) for f in part]
    if mpi_comm.Get_rank() == 0:
        for f in all_failures[:50]:
            print("FAIL", f, flush=True)
        print(f"{summary}, {len(all_failures)} failures", flush=True)
    return 1 if all_failures else 0


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return (a.dtype == b.dtype and a.shape == b.shape
            and np.array_equal(a.reshape(-1).view(np.uint8), b.reshape(-1).view(np.uint8)))


def check_flash(case_id, case, inputs, results, failures):
    _, length, dt, bits, g, sym, rot, algo, _special = case
    ref = fc.flash_all_reduce_reference(inputs, bits=bits, group_size=g, symmetric=sym,
                                        rotate=rot, algo=algo)[0]
    for r, (y_out, y_in) in enumerate(results):
        for how, y in (("out-of-place", y_out), ("in-place", y_in)):
            if not same_bits(y, ref):
                failures.append(f"case {case_id} {case}: rank {r} {how}: " + mismatch(y, ref))


def check_baseline(case_id, case, inputs, results, failures):
    _, length, dt, *_ = case
    n = len(inputs)
    exact = fc.exact_sum(inputs)
    magnitude = np.sum([np.abs(np.asarray(x, dtype=np.float64)) for x in inputs], axis=0)
    eps32 = float(np.finfo(np.float32).eps)
    eps_dt = {"float16": 2.0 ** -10, "bfloat16": 2.0 ** -7, "float32": eps32}[dt]
    tiny_dt = {"float16": 2.0 ** -24, "bfloat16": 1e-38, "float32": 1e-45}[dt]
    # float32 summation of n terms, then one rounding to dt (half an ulp).
    bound = (n - 1) * eps32 * magnitude + 0.5 * eps_dt * (np.abs(exact) + (n - 1) * eps32 * magnitude) + tiny_dt
    for r, (y_out, y_in) in enumerate(results):
        for how, y in (("out-of-place", y_out), ("in-place", y_in)):
            err = np.abs(np.asarray(y, dtype=np.float64) - exact)
            if y.dtype != resolve_dtype(dt) or y.shape != exact.shape or np.any(err > bound):
                worst = int(np.argmax(err - bound)) if err.size else 0
                failures.append(f"case {case_id} {case}: rank {r} {how}: error {err.reshape(-1)[worst]:.3g} "
                                f"exceeds bound {bound.reshape(-1)[worst]:.3g} at [{worst}]")
        if not same_bits(y_out, results[0][0]):
            failures.append(f"case {case_id} {case}: rank {r} differs from rank 0 (MPI_Allreduce)")


def main(argv):
    quick = "--quick" in argv
    comm = fc.Communicator(backend="cpu")
    mpi_comm = comm.mpi_comm
    rank, n = comm.rank, comm.world_size
    failures = []
    all_cases = cases()
    if quick:
        all_cases = [c for c in all_cases if c[1] <= 4099]
    for case_id, case in enumerate(all_cases):
        kind, length, dt, bits, g, sym, rot, algo, special = case
        x = make_input(case_id, rank, length, dt, special)
        with np.errstate(invalid="ignore", over="ignore"):
            y_out = comm.all_reduce(x, bits=bits, group_size=g, symmetric=sym, rotate=rot, algo=algo)
            x_in = x.copy()
            y_in = comm.all_reduce(x_in, bits=bits, group_size=g, symmetric=sym, rotate=rot, algo=algo,
                                   out=x_in)
        if y_in is not x_in:
            failures.append(f"case {case_id} {case}: rank {rank}: in-place call did not return x")
        if not same_bits(x, make_input(case_id, rank, length, dt, special)):
            failures.append(f"case {case_id} {case}: rank {rank}: out-of-place call modified x")
        checker = case_id % n
        results = mpi_comm.gather((y_out, y_in), root=checker)
        if rank == checker:
            inputs = [make_input(case_id, r, length, dt, special) for r in range(n)]
            with np.errstate(invalid="ignore", over="ignore"):
                (check_flash if kind == "flash" else check_baseline)(case_id, case, inputs, results, failures)
    comm.close()
    return report(mpi_comm, failures, f"world_size={n}: {len(all_cases)} cases")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
