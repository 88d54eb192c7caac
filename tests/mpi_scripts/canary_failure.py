"""Run under mpiexec: the peer canary check fails on the last rank only (CUDA faked).

Every rank must return from ``check_canaries`` (no rank left in a barrier the
failing rank skipped) and, after agreeing, every rank must hold the failing
rank's message -- so construction falls back on every rank instead of hanging.
Prints OK on rank 0.
"""
import sys
import types

import numpy as np
from mpi4py import MPI

comm = MPI.COMM_WORLD
rank, last = comm.Get_rank(), comm.Get_size() - 1


written = np.zeros(1, np.uint32)


class _Kernel:
    """The canary kernel: it faults on the last rank; elsewhere the store reads back."""

    def __init__(self, src, name):
        if rank == last:
            raise RuntimeError("peer store faulted (simulated)")

    def __call__(self, grid, block, args):
        written[0] = args[1]


class _Array:
    def get(self):
        return written.copy()


def _memcpy(dst, src, nbytes, kind):
    """This rank's canary words as the peers left them: every peer but the last one stored."""
    import ctypes
    words = np.zeros(8, np.uint32)
    for r in range(comm.Get_size()):
        if r != rank and r != last:
            words[r] = 0xFC000000 | (r << 8) | rank
    ctypes.memmove(dst, words.ctypes.data, nbytes)


fake = types.ModuleType("cupy")
fake.RawKernel = _Kernel
fake.uint32 = np.uint32
fake.zeros = lambda n, dtype=None: _Array()
fake.cuda = types.SimpleNamespace(Device=lambda: types.SimpleNamespace(synchronize=lambda: None),
                                  runtime=types.SimpleNamespace(memcpy=_memcpy, memcpyDefault=4))
sys.modules["cupy"] = fake

from flashcomm_cupy.backends.ipc import check_canaries  # noqa: E402

mine = check_canaries(comm, [0] * comm.Get_size(), 0)
agreed = next((f for f in comm.allgather(mine) if f), None)
ok = agreed is not None and f"rank {last}" in agreed
if rank == last:
    ok = ok and mine is not None and "simulated" in mine
ok = all(comm.allgather(ok))
if rank == 0:
    print("OK" if ok else f"FAILED: {agreed!r}", flush=True)
sys.exit(0 if ok else 1)
