"""Run under mpiexec: the CPU backend's contract beyond the arithmetic.

Checks option handling, ``validate=True`` mismatch errors (raised on every
rank, naming the ranks), algorithm resolution, shapes, ``describe()``, and
closing.  Each failed check is collected; the script exits non-zero on
every rank when any rank has one.
Usage: ``mpiexec -n K python -m mpi4py cpu_backend_api.py``
"""
from __future__ import annotations

import os
import sys

import numpy as np

import flashcomm_cupy as fc
from flashcomm_cupy.backends.cpu import CpuBackend
from flashcomm_cupy.config import Mode
from flashcomm_cupy.dtypes import bfloat16

failures = []


def check(condition, message):
    if not condition:
        failures.append(message)


def expect_error(exc_type, fn, *must_contain):
    """Run ``fn``; the check passes when it raises ``exc_type`` whose text holds every string."""
    try:
        fn()
    except exc_type as exc:
        text = str(exc)
        missing = [s for s in must_contain if s not in text]
        check(not missing, f"{exc_type.__name__} message {text!r} lacks {missing}")
        return text
    except Exception as exc:  # noqa: BLE001 - report any wrong exception type
        failures.append(f"expected {exc_type.__name__}, got {type(exc).__name__}: {exc}")
        return None
    failures.append(f"expected {exc_type.__name__}, nothing was raised")
    return None


def main():
    from mpi4py import MPI
    world = MPI.COMM_WORLD
    rank, n = world.Get_rank(), world.Get_size()
    last = n - 1

    # Unknown options are a local TypeError (raised before any collective call).
    expect_error(TypeError, lambda: CpuBackend(world, timeout=3), "timeout")
    expect_error(TypeError, lambda: fc.Communicator(backend="cpu", workspace=1), "workspace")

    comm = fc.Communicator(backend="cpu", validate=True)
    backend = comm.backend
    check(backend.name == "cpu" and backend.baseline_algo == "mpi", f"name/baseline {backend.name}/{backend.baseline_algo}")
    check(backend.xp is np, "xp is not numpy")
    check(set(backend.supported_algos()) == {"oneshot", "twoshot", "hierarchical", "mpi"}, f"algos {backend.supported_algos()}")
    check((comm.rank, comm.world_size) == (rank, n), f"rank/size {(comm.rank, comm.world_size)} != {(rank, n)}")
    for nbytes in (0, 2, 1 << 10, 1 << 20, 1 << 30):
        for bits in (None, 4, (4, 8)):
            got = comm.resolve_algo(nbytes, bits=bits, algo="auto")
            check(got == "twoshot", f"auto resolved to {got} for {nbytes} bytes bits={bits}")
    for algo in ("oneshot", "twoshot", "mpi"):
        bits = None if algo == "mpi" else 4  # the vendor collective is lossless only
        check(comm.resolve_algo(1 << 20, bits=bits, algo=algo) == algo, f"{algo} did not resolve to itself")
    expect_error(ValueError, lambda: comm.all_reduce(np.ones(8, np.float32), bits=4, algo="mpi"), "algo='mpi'")
    expect_error(ValueError, lambda: backend.resolve_algo(1 << 20, Mode.make(4, algo="nccl")), "nccl")

    if n > 1:  # a mismatch needs two ranks
        # validate=True: a size mismatch raises ValueError on every rank, naming the odd rank.
        length = 1000 + (1 if rank == last else 0)
        text = expect_error(ValueError, lambda: comm.all_reduce(np.ones(length, np.float32), bits=4),
                            f"rank {last}", "1001", "1000")
        check(text is not None and f"ranks [{last}]" in text, f"size mismatch message {text!r} does not list [{last}]")
        # ... and a dtype mismatch likewise; MPI state is still usable afterwards.
        dt = np.float16 if rank == last else np.float32
        expect_error(ValueError, lambda: comm.all_reduce(np.ones(64, dt), bits=None), "float16", f"rank {last}")
        bits = 8 if rank == last else 4
        expect_error(ValueError, lambda: comm.all_reduce(np.ones(64, np.float32), bits=bits), f"rank {last}", "int8")

    # After the errors the communicator still works and agrees with the reference.
    rng = np.random.default_rng([7, rank])
    x = rng.standard_normal((4, 33)).astype(bfloat16)
    inputs = [np.random.default_rng([7, r]).standard_normal((4, 33)).astype(bfloat16) for r in range(n)]
    y = comm.all_reduce(x, bits=(4, 8), group_size=32)
    ref = fc.flash_all_reduce_reference(inputs, bits=(4, 8), group_size=32)[0]
    check(y.shape == (4, 33) and y.dtype == bfloat16, f"shape/dtype {y.shape}/{y.dtype}")
    check(np.array_equal(y.view(np.uint16), ref.view(np.uint16)), "2-D bf16 result differs from the reference")

    out = np.empty_like(x)
    got = comm.all_reduce(x, bits=None, out=out, algo="oneshot")
    check(got is out, "all_reduce(out=...) did not return out")
    exact16 = np.sum([np.asarray(i, np.float32) for i in inputs], axis=0, dtype=np.float32)
    check(np.array_equal(out.view(np.uint16), exact16.astype(bfloat16).view(np.uint16)),
          "lossless one-shot is not the rank-order float32 sum rounded once")

    # Lossless all-reduce of rank ids equals sum(range(n)) exactly for every algo.
    for algo in ("oneshot", "twoshot", "mpi"):
        for dt in (np.float16, bfloat16, np.float32):
            v = np.full(5, rank, dtype=dt)
            got = comm.all_reduce(v, bits=None, algo=algo)
            check(np.all(np.asarray(got, np.float64) == n * (n - 1) / 2),
                  f"{algo} {np.dtype(dt)} sum of rank ids: {np.asarray(got, np.float64)}")

    expect_error(TypeError, lambda: comm.all_reduce([1.0, 2.0]), "NumPy")

    info = comm.describe()
    for key, want in (("backend", "cpu"), ("rank", rank), ("world_size", n), ("pid", os.getpid())):
        check(info.get(key) == want, f"describe()[{key!r}] = {info.get(key)!r}, want {want!r}")
    check("MPI" in info.get("mpi_library", "") or "mpi" in info.get("mpi_library", "").lower(),
          f"describe() mpi_library {info.get('mpi_library')!r}")
    check(bool(info.get("hostname")), "describe() has no hostname")

    comm.barrier()
    comm.synchronize()
    comm.close()
    comm.close()  # idempotent
    expect_error(RuntimeError, lambda: comm.all_reduce(np.ones(4, np.float32)), "closed")

    # The user's communicator is untouched by the backend's traffic.
    check(world.allreduce(1) == n, "COMM_WORLD unusable after the backend closed")
    everyone = world.allgather(failures)
    bad = [(r, f) for r, fs in enumerate(everyone) for f in fs]
    if rank == 0:
        for r, f in bad:
            print(f"FAIL rank {r}: {f}", flush=True)
        print(f"world_size={n}: {len(bad)} failures", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
