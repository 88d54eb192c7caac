"""Run under mpiexec: the node's shared-memory segment and the descriptor hand-off.

Usage: ``mpiexec -n K python -m mpi4py node_sharing.py CASE PREFIX``.
Cases: ``segment`` (create, map, unlink, data visible across ranks), ``raise``
and ``kill`` (the last rank fails after mapping), ``too-big`` (a clear error
naming the size), ``fds`` (memfds and pipes handed to every rank), ``fds-timeout``
(one rank never sends: every rank raises within the bound).
Prints ``OK rank R`` on every rank that passed; failures raise.
"""
from __future__ import annotations

import os
import signal
import sys
import time

from mpi4py import MPI

from flashcomm_cupy.backends import fdpass, shm

comm = MPI.COMM_WORLD
rank, world = comm.Get_rank(), comm.Get_size()
case, prefix = sys.argv[1], sys.argv[2]
PAGE = 4096


def fill(view):
    view[: world * PAGE] = bytes(world * PAGE)
    view[-PAGE:] = b"\xab" * PAGE


def segment():
    seg = shm.NodeSegment(comm, 1 << 20, init=fill, prefix=prefix)
    assert not os.path.exists(os.path.join(shm.SHM_DIR, seg.name)), "the name outlived the set-up"
    view = seg.view
    assert bytes(view[-PAGE:]) == b"\xab" * PAGE, "rank 0's initialisation is not visible"
    view[rank * PAGE: rank * PAGE + 8] = (0xFC00 + rank).to_bytes(8, "little")
    comm.Barrier()
    for r in range(world):
        got = int.from_bytes(bytes(view[r * PAGE: r * PAGE + 8]), "little")
        assert got == 0xFC00 + r, f"rank {rank} reads {got:#x} from rank {r}'s page"
    del view
    return seg


def main():
    if case == "segment":
        segment().close()
    elif case in ("raise", "kill"):
        seg = segment()
        if rank == world - 1:
            if case == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            raise RuntimeError("planted failure after mapping")
        comm.Barrier()  # the others wait here until the job is torn down
        seg.close()
    elif case == "too-big":
        st = os.statvfs(shm.SHM_DIR)
        want = 2 * st.f_bavail * st.f_frsize + (1 << 30)
        try:
            shm.NodeSegment(comm, want, prefix=prefix)
        except shm.SharedMemoryError as exc:
            text = str(exc)
            assert f"({want} bytes)" in text and "/dev/shm" in text and "\n" not in text, text
        else:
            raise AssertionError("no error for a segment larger than /dev/shm")
    elif case == "fds":
        mine = []
        memfd = os.memfd_create(f"fc-test-{rank}")
        os.write(memfd, f"memfd of rank {rank}".encode())
        r_end, w_end = os.pipe()
        os.write(w_end, f"pipe of rank {rank}".encode() * world)  # every rank reads one copy
        os.close(w_end)
        mine = [memfd, r_end]
        got = fdpass.exchange_fds(comm, mine, timeout_s=20)
        assert got[rank] == mine
        for r in range(world):
            a, b = got[r]
            assert os.pread(a, 64, 0) == f"memfd of rank {r}".encode(), (r, os.pread(a, 64, 0))
            msg = f"pipe of rank {r}".encode()
            assert os.read(b, len(msg)) == msg
            if r != rank:
                assert os.get_inheritable(a) is False
                os.close(a)
                os.close(b)
        os.close(memfd)
        os.close(r_end)
        comm.Barrier()
    elif case == "fds-timeout":
        if rank == world - 1:
            fdpass._send = lambda *args: time.sleep(3) or "planted: never sent"
        t0 = time.monotonic()
        memfd = os.memfd_create("fc-test")
        try:
            fdpass.exchange_fds(comm, [memfd], timeout_s=2)
        except fdpass.FdExchangeError as exc:
            assert "\n" not in str(exc), str(exc)
            assert time.monotonic() - t0 < 15, "the hand-off was not bounded"
            print(f"rank {rank}: {exc}", flush=True)
        else:
            raise AssertionError("no error although one rank never sent")
        os.close(memfd)
    else:
        raise SystemExit(f"unknown case {case}")
    print(f"OK rank {rank}", flush=True)


main()
