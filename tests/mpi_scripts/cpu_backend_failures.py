"""Failure paths of the CPU backend, run under ``mpiexec -n K`` (K >= 2).

The spec (docs/reliability.md): every wait is bounded; ranks that disagree on a
call all raise ValueError naming what differs; a rank that never comes is named
by every other rank within the bound, and the communicator then refuses every
later call on every rank, the late rank included.  Never a hang, never a wrong
sum.  Prints ``OK`` on rank 0 when every check passed on every rank.
"""
from __future__ import annotations

import sys
import time

import numpy as np
from mpi4py import MPI

import flashcomm_cupy as fc

BOUND_S = 2.0
world = MPI.COMM_WORLD
rank, size = world.Get_rank(), world.Get_size()
last = size - 1
failures = []


def check(ok, what):
    if not ok:
        failures.append(what)
        print(f"FAIL rank {rank}: {what}", flush=True)


def raises(exc_type, fn):
    """(the exception fn raised, seconds it took); (None, seconds) when it did not raise."""
    t0 = time.monotonic()
    try:
        fn()
    except exc_type as exc:
        return exc, time.monotonic() - t0
    return None, time.monotonic() - t0


def exact(comm, n=1000):
    """A correct lossless call: the sum of 1 .. size on every rank."""
    y = comm.all_reduce(np.full(n, rank + 1, np.float32), bits=None)
    return bool(np.all(y == size * (size + 1) / 2))


# 1. Arguments that differ between ranks: every rank raises ValueError naming the
#    odd rank and the field, within the bound, and the communicator stays usable.
comm = fc.Communicator(backend="cpu", timeout_s=BOUND_S)
n = 1000 + (rank == last)
exc, dt = raises(ValueError, lambda: comm.all_reduce(np.ones(n, np.float32), bits=4))
check(exc is not None and f"ranks [{last}]" in str(exc) and "elements" in str(exc), f"size mismatch: {exc!r}")
bits = 8 if rank == last else 4
exc, dt = raises(ValueError, lambda: comm.all_reduce(np.ones(64, np.float32), bits=bits))
check(exc is not None and "int8" in str(exc) and "rs_bits" in str(exc), f"bits mismatch: {exc!r}")
check(exact(comm), "a call after the mismatches is exact")

# 2. A rank that skips a call: the others raise FlashTimeoutError naming it within
#    the bound; the late rank's next call raises too (a peer gave up), and so does
#    every later call on every rank.  Nobody hangs.
if rank != last:
    exc, dt = raises(fc.FlashTimeoutError, lambda: comm.all_reduce(np.ones(256, np.float32), bits=4))
    check(exc is not None and f"rank {last}" in str(exc), f"skipped call not named: {exc!r}")
    check(exc is not None and exc.late == last, f"late rank recorded: {getattr(exc, 'late', None)}")
    check(dt < BOUND_S + 3.0, f"skipped call raised after {dt:.1f} s (bound {BOUND_S} s)")
world.Barrier()  # the late rank comes now, after the others gave up
exc, dt = raises(fc.FlashTimeoutError, lambda: comm.all_reduce(np.ones(256, np.float32), bits=4))
check(exc is not None, f"a call after the abort did not raise ({exc!r})")
if rank == last:
    check(exc is not None and "gave up" in str(exc), f"late rank not told a peer gave up: {exc!r}")
check(dt < BOUND_S + 3.0, f"the call after the abort took {dt:.1f} s")
exc, _ = raises(fc.FlashTimeoutError, lambda: comm.barrier())
check(exc is not None, "barrier on an aborted communicator did not raise")
comm.close()

# 3. A rank that raises before the collective (its own bad input) leaves the others
#    bounded as well; a fresh communicator works afterwards.
comm = fc.Communicator(backend="cpu", timeout_s=BOUND_S)
if rank == last:
    exc, _ = raises(ValueError, lambda: comm.all_reduce(np.ones(8, np.float32), bits=5))
    check(exc is not None, "bits=5 did not raise before the collective")
else:
    exc, dt = raises(fc.FlashTimeoutError, lambda: comm.all_reduce(np.ones(8, np.float32), bits=4))
    check(exc is not None and dt < BOUND_S + 3.0, f"peer of a rank that raised early: {exc!r} after {dt:.1f} s")
world.Barrier()
comm.close()
fresh = fc.Communicator(backend="cpu", timeout_s=BOUND_S)
check(exact(fresh), "a new communicator after an abort is exact")
fresh.close()

# 4. A call refused on one rank only (its own arguments: here an algorithm the CPU backend does not
#    run), whose caller goes straight on to its next call: the others must not take that next call
#    for the refused one.  Every rank raises, nobody returns a sum, and the communicator refuses
#    what follows (the ranks' calls no longer line up).
comm = fc.Communicator(backend="cpu", timeout_s=BOUND_S)
first, second = np.full(4096, 1.0, np.float32), np.full(4096, 100.0, np.float32)
outcomes = []
for x, algo in ((first, "nccl" if rank == last else "auto"), (second, "auto")):
    try:
        outcomes.append(("returned", float(comm.all_reduce(x, bits=None, algo=algo)[0])))
    except (ValueError, fc.FlashTimeoutError) as exc:
        outcomes.append((type(exc).__name__, str(exc)))
check(all(kind != "returned" for kind, _ in outcomes), f"a sum came back after a call refused on rank {last}: "
      f"{outcomes}")
if rank != last:
    check("differ from rank 0 in call" in outcomes[0][1], f"the refused call not named: {outcomes[0]}")
world.Barrier()
comm.close()

# 5. The same argument refused on every rank: the calls still line up, and the next call is exact.
comm = fc.Communicator(backend="cpu", timeout_s=BOUND_S)
exc, _ = raises(ValueError, lambda: comm.all_reduce(np.ones(8, np.float32), algo="nccl"))
check(exc is not None, "algo='nccl' on the CPU backend was accepted")
check(exact(comm), "a call after a call refused on every rank is exact")
comm.close()

# 6. The bound itself is validated, from the option and from the environment.
for bad in (0, -1, float("inf"), float("nan"), "soon"):
    exc, _ = raises(ValueError, lambda: fc.Communicator(backend="cpu", timeout_s=bad))
    check(exc is not None and "timeout_s" in str(exc), f"timeout_s={bad!r} accepted: {exc!r}")

failed = world.allreduce(len(failures))
if rank == 0:
    print("OK" if failed == 0 else f"FAILED: {failed} checks", flush=True)
sys.exit(0 if failed == 0 else 1)
