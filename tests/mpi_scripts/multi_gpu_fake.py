"""A multi_gpu test module whose bodies run on CPU ranks, for tests/test_multi_gpu.py.

Each body is collective (every rank runs it); the context is MPI.COMM_WORLD with a failures list,
as the GPU modules' contexts (tests/gpu/test_*_gpu.py) have.
"""
import os
import time

import pytest

pytestmark = pytest.mark.multi_gpu
MPI_TIMEOUT_S = 120


class Ranks:
    def __init__(self):
        from mpi4py import MPI
        self.comm = MPI.COMM_WORLD
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        self.failures = []
        self.closed_file = os.environ.get("FAKE_CLOSED_FILE")

    def close(self):
        if self.closed_file:
            with open(f"{self.closed_file}.{self.rank}", "w") as f:
                f.write("closed\n")


def rank_context(config):
    return Ranks()


def test_ranks_sum(ctx, world):
    total = ctx.comm.allreduce(ctx.rank + 1)
    if total != world * (world + 1) // 2 or ctx.size != world:
        ctx.failures.append(f"sum {total} over {ctx.size} ranks")


def test_rank1_finds_wrong_elements(ctx):
    if ctx.rank == 1:
        ctx.failures.append("3 of 1048576 elements differ (fp16, INT4, g128)")
        ctx.failures.extend(f"extra failure {k}" for k in range(7))
    ctx.comm.Barrier()


def test_skipped_on_every_rank(ctx):
    pytest.skip("nothing to check here")


@pytest.mark.multi_gpu(3)
def test_at_three_ranks(ctx):
    ctx.comm.Barrier()


def test_last_rank_crashes(ctx):
    if ctx.rank == ctx.size - 1:
        raise ZeroDivisionError("the last rank divided by zero")
    ctx.comm.Barrier()  # never completes: the crash aborts the job


def test_after_the_crash(ctx):
    ctx.comm.Barrier()


def test_rank0_hangs(ctx):
    if ctx.rank == 0:
        time.sleep(600)
    ctx.comm.Barrier()
