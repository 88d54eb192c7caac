"""The hierarchical backend on GPUs: two GPUs of one host as two nodes of one GPU each.

    python -m pytest tests/gpu/test_hierarchical_gpu.py [--gpu-quick]

One ``mpiexec -n 2`` launch runs ``hierarchical_checks.py``'s checks with
``FLASHCOMM_RANKS_PER_NODE=1`` and NCCL forced onto sockets (``NCCL_P2P_DISABLE=1
NCCL_SHM_DISABLE=1``), as between hosts without InfiniBand; rank 0 compares bit for bit with
``flash_all_reduce_reference(..., algo="hierarchical", nodes=...)``.
"""
import pytest

pytestmark = [pytest.mark.gpu, pytest.mark.multi_gpu(2)]
#: the launch's environment: every GPU a node, NCCL between them on sockets
MPI_ENV = {"FLASHCOMM_RANKS_PER_NODE": "1", "NCCL_P2P_DISABLE": "1", "NCCL_SHM_DISABLE": "1"}
#: device_run.sh's hier-checks stage gives the script 400 s
MPI_TIMEOUT_S = 600


class HierarchicalChecks:
    """hierarchical_checks.py's checks by name on one communicator."""

    def __init__(self, quick: bool):
        from hierarchical_checks import open_checker, plan
        self.ck = open_checker()
        if self.ck.failures:  # another backend: nothing below would test the hierarchical one
            raise RuntimeError("; ".join(self.ck.failures))
        self.failures = self.ck.failures
        self.plan = dict(plan(self.ck, quick))

    def run(self, name: str) -> None:
        self.plan[name]()

    def close(self) -> None:
        self.ck.comm.close()


def rank_context(config):
    return HierarchicalChecks(config.getoption("gpu_quick"))


def test_exact(ctx):
    """Every dtype, codec, rotation and symmetry, out of place, in place and through auto."""
    ctx.run("exact")


def test_nonfinite(ctx):
    """A NaN or Inf poisons only its group, on every node."""
    ctx.run("nonfinite")


def test_graph(ctx):
    """Captured calls replay to the same bits as eager ones."""
    ctx.run("graph")
