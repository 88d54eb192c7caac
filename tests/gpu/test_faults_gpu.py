"""The GPU fault matrix of docs/reliability.md, each case of ``fault_checks.py`` as a test.

    python -m pytest tests/gpu/test_faults_gpu.py --gpu-worlds 2,4

Every case ends in the right answer or in FlashTimeoutError on every rank within the bound
(2 s), never in a finite wrong value.  One ``mpiexec -n W`` launch per world runs every selected
case (``tests/multi_gpu.py``); ``mpiexec -n W python tests/gpu/fault_checks.py`` runs the same as a script.
"""
import pytest

from fault_checks import DEAD_PEER_KERNELS, KERNELS

pytestmark = [pytest.mark.gpu, pytest.mark.multi_gpu]
#: device_run.sh's faults stage gives the script 420 s; each late/dead case waits out the bound and more
MPI_TIMEOUT_S = 600


def rank_context(config):
    from mpi4py import MPI

    from fault_checks import DEFAULT_BOUND_S, Cases, precompile
    precompile(MPI.COMM_WORLD)
    return Cases(MPI.COMM_WORLD, DEFAULT_BOUND_S)


def kernel_id(kernel) -> str:
    return kernel[0].replace(" ", "-")


def test_subnormals(ctx):
    """bf16 and float32 subnormals are summed as IEEE does (no flush to zero), bit for bit."""
    ctx.subnormals()


def test_epoch_gap_and_wrap(ctx):
    """One algorithm 2^31 rounds ahead of the other, then both counters past 2^32: always exact."""
    ctx.epoch_gap()


def test_misaligned_side_stream(ctx):
    """A misaligned input made and reduced on a side stream: exact."""
    ctx.misaligned_side_stream()


def test_two_communicators_opposite_order(ctx):
    """Two communicators dispatched in opposite orders on two streams: right, or FlashTimeoutError everywhere."""
    ctx.two_communicators_opposite_order()


def test_numpy_absent_peer(ctx):
    """NumPy in and out with a peer that never calls: the call itself raises, and so does the next."""
    ctx.numpy_absent_peer()


def test_graph_replays_around_a_stall(ctx):
    """Graph replays exact before a stall past the bound; after it sum-or-NaN, and check() raises."""
    ctx.graph_replays()


@pytest.mark.parametrize("kernel", KERNELS, ids=kernel_id)
def test_late_peer(ctx, kernel):
    """The last rank comes after the bound: FlashTimeoutError on every rank, sum-or-NaN, the next call raises."""
    ctx.late_peer(*kernel)


@pytest.mark.parametrize("kernel", DEAD_PEER_KERNELS, ids=kernel_id)
def test_dead_peer(ctx, kernel):
    """The last rank comes only after everyone gave up: it raises too, and nothing is wrong."""
    ctx.late_peer(*kernel, dead=True)
