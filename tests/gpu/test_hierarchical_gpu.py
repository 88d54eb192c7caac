"""The hierarchical backend on GPUs: GPUs of one host as nodes.

    python -m pytest tests/gpu/test_hierarchical_gpu.py [--gpu-quick] [--gpu-worlds 2,4]

One ``mpiexec -n W`` launch per world runs ``hierarchical_checks.py``'s checks with NCCL forced
onto sockets (``NCCL_P2P_DISABLE=1 NCCL_SHM_DISABLE=1``), as between hosts without InfiniBand;
rank 0 compares bit for bit with ``flash_all_reduce_reference(..., algo="hierarchical", nodes=...)``.
At 2 ranks: every GPU a node (``FLASHCOMM_RANKS_PER_NODE=1``), and the flash two-shot's halves
(the node-local steps of several GPUs per node) composed on the two GPUs as one node.  At 4
ranks: 2 nodes x 2 GPUs (``ranks_per_node=2``, the option overriding the variable).
"""
import pytest

pytestmark = [pytest.mark.gpu]
two_gpus = pytest.mark.multi_gpu(2)
#: the launch's environment: every GPU a node, NCCL between them on sockets
MPI_ENV = {"FLASHCOMM_RANKS_PER_NODE": "1", "NCCL_P2P_DISABLE": "1", "NCCL_SHM_DISABLE": "1"}
#: device_run.sh's hier-checks stage gives the script 400 s
MPI_TIMEOUT_S = 600


class HierarchicalChecks:
    """hierarchical_checks.py's checks by name on one communicator (one GPU per node), and the
    communicators of the other layouts, made on first use."""

    def __init__(self, quick: bool):
        from hierarchical_checks import open_checker, plan
        self.quick = quick
        self.ck = open_checker()
        if self.ck.failures:  # another backend: nothing below would test the hierarchical one
            raise RuntimeError("; ".join(self.ck.failures))
        self.failures = self.ck.failures
        self.plan = dict(plan(self.ck, quick))
        self.others = []

    def run(self, name: str) -> None:
        self.plan[name]()

    def sizes(self) -> list:
        return [1, 127, 4099, 65_537] if self.quick else [1, 127, 4099, 65_537, 1_000_003]

    def flash_of_one_node(self):
        """A checker and the flash backend of all ranks as one node."""
        from mpi4py import MPI
        from gpu_checks import Checker
        import flashcomm_cupy as fc
        comm = fc.Communicator(MPI.COMM_WORLD, backend="gpu", ranks_per_node=MPI.COMM_WORLD.Get_size())
        self.others.append(comm)
        ck = Checker(comm)
        ck.failures = self.failures
        if not hasattr(comm.backend, "reduce_scatter"):
            raise RuntimeError(f"expected the flash backend on one node, got {comm.backend_name}")
        return ck, comm.backend

    def nodes_of(self, ranks_per_node: int):
        from hierarchical_checks import open_node_checker
        ck = open_node_checker(ranks_per_node, self.failures)
        self.others.append(ck.comm)
        if self.failures:
            raise RuntimeError("; ".join(self.failures))
        return ck

    def close(self) -> None:
        for comm in self.others:
            comm.close()
        self.ck.comm.close()


def rank_context(config):
    return HierarchicalChecks(config.getoption("gpu_quick"))


@two_gpus
def test_exact(ctx):
    """Every dtype, codec, rotation and symmetry, out of place, in place and through auto."""
    ctx.run("exact")


@two_gpus
def test_nonfinite(ctx):
    """A NaN or Inf poisons only its group, on every node."""
    ctx.run("nonfinite")


@two_gpus
def test_subnormals(ctx):
    """bf16 and float32 subnormals are summed as the reference sums them (no flush to zero)."""
    ctx.run("subnormals")


@two_gpus
def test_misaligned(ctx):
    """Misaligned input and output views: the same bits as aligned ones."""
    ctx.run("misaligned")


@two_gpus
def test_a_failure_on_one_node_raises_on_every_node(ctx):
    """A failure one node reports in its chunk: NaN and an error on every rank."""
    ctx.run("node_failure")


@two_gpus
def test_graph(ctx):
    """Captured calls replay to the same bits as eager ones."""
    ctx.run("graph")


@two_gpus
def test_twoshot_halves_compose_to_the_twoshot(ctx):
    """The reduce-scatter half then the all-gather half on one node of 2 GPUs: each rank's float32
    shard is the reference's owner sum and the result the flash two-shot's and the reference's, bit
    for bit, for every dtype, codec, rotation and symmetry and odd sizes."""
    from hierarchical_checks import check_twoshot_halves
    ck, flash = ctx.flash_of_one_node()
    check_twoshot_halves(ck, flash, ctx.sizes())


@pytest.mark.multi_gpu(4)
def test_two_nodes_of_two_gpus(ctx):
    """2 nodes x 2 GPUs: the halves inside each node, NCCL on sockets between them; exact for every
    dtype, codec, rotation and symmetry, non-finite inputs, and CUDA-graph replays; flat NCCL over
    all four ranks."""
    from hierarchical_checks import check_exact, check_flat_nccl, check_graph, check_nonfinite, check_subnormals
    ck = ctx.nodes_of(2)
    check_flat_nccl(ck)
    check_exact(ck, ctx.sizes(), (32, 128) if not ctx.quick else (128,))
    check_nonfinite(ck)
    check_subnormals(ck)
    check_graph(ck, 2)
