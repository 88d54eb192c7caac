"""Run by tests/test_torch.py under ``torchrun --nproc-per-node 2`` (gloo, CPU backend, no MPI): what a
call does when its peer is gone.  ``argv[1]`` picks the case; each rank prints one line
``torch_failures rank R: <what its call did>``.

- ``late``: rank 0 gives up on a call (bound 2 s), closes its communicator and leaves; rank 1
  makes the same call 4 s later.  Rank 1's call must raise, not sum the buffers its failed
  receives left behind.
- ``exited``: rank 1 exits without calling; rank 0's call must raise a flashcomm error.
- ``plain``: ``fc.Communicator()`` with no arguments under torchrun is the torch.distributed world
  (MPI.COMM_WORLD would be each process alone: a "sum" of one rank); ``uninitialized``: before
  ``init_process_group`` it is an error that says so.
"""
from __future__ import annotations

import datetime
import os
import sys
import time

import torch
import torch.distributed as dist

import flashcomm_cupy as fc


def call(comm, rank):
    try:
        y = comm.all_reduce(torch.full((1 << 16,), float(rank + 1), dtype=torch.float16))
    except Exception as exc:  # noqa: BLE001 - the test reads which error it was
        return f"raised {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
    return f"returned {float(y[0])} .. {float(y[-1])}"


def main(case):
    if case == "uninitialized":  # a plain communicator before init_process_group: an error, not a world of one
        try:
            fc.Communicator(backend="cpu")
        except RuntimeError as exc:
            print(f"torch_failures rank {os.environ['RANK']}: raised {exc}", flush=True)
        return
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    rank = dist.get_rank()
    if case == "plain":
        comm = fc.Communicator(backend="cpu")
        print(f"torch_failures rank {rank}: world {comm.world_size}, {call(comm, rank)}", flush=True)
        comm.close()
        return
    comm = fc.Communicator.from_torch(backend="cpu", timeout_s=2.0)
    if case == "late":
        if rank == 1:
            time.sleep(4.0)
        print(f"torch_failures rank {rank}: {call(comm, rank)}", flush=True)
        if rank == 0:
            comm.close()
            os._exit(0)  # gone: its connections close
    elif case == "exited":
        if rank == 1:
            os._exit(0)
        time.sleep(1.0)
        print(f"torch_failures rank {rank}: {call(comm, rank)}", flush=True)
    os._exit(0)  # no teardown with a peer gone


if __name__ == "__main__":
    main(sys.argv[1])
