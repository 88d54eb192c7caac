"""The only module that bootstraps mpi4py: the world communicator, the local rank, the node layout."""
from __future__ import annotations

import os
import socket

from .topology import RANKS_PER_NODE_ENV, NodeLayout, check_ranks_per_node

_LOCAL_RANK_VARS = ("OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "PMI_LOCAL_RANK",
                    "SLURM_LOCALID", "PALS_LOCAL_RANKID", "LOCAL_RANK")


def mpi():
    """Import mpi4py.MPI with a readable error when MPI is missing."""
    try:
        from mpi4py import MPI
    except ImportError as exc:  # pragma: no cover - depends on the machine
        raise RuntimeError(
            "flashcomm needs mpi4py and an MPI library: pip install 'flashcomm-cupy[mpi]' "
            f"(brings MPICH) or install Open MPI ({exc})") from exc
    return MPI


def get_comm(comm=None):
    """``comm`` if given, else ``MPI.COMM_WORLD``."""
    return comm if comm is not None else mpi().COMM_WORLD


def local_rank(comm=None) -> int:
    """This process's rank among the processes of its node.

    Launcher variables (Open MPI, MPICH/Hydra, PALS, Slurm) are read first;
    the portable fallback splits the communicator by shared memory.  A
    torch.distributed group (:mod:`flashcomm_cupy.torch_group`) answers itself.
    """
    if hasattr(comm, "node_rank_and_size"):
        return comm.node_rank_and_size()[0]
    for var in _LOCAL_RANK_VARS:
        value = os.environ.get(var)
        if value is not None and value.strip().isdigit():
            return int(value)
    comm = get_comm(comm)
    node = comm.Split_type(mpi().COMM_TYPE_SHARED)
    try:
        return node.Get_rank()
    finally:
        node.Free()


def local_size(comm=None) -> int:
    if hasattr(comm, "node_rank_and_size"):
        return comm.node_rank_and_size()[1]
    comm = get_comm(comm)
    node = comm.Split_type(mpi().COMM_TYPE_SHARED)
    try:
        return node.Get_size()
    finally:
        node.Free()


def node_layout(comm=None, ranks_per_node=None) -> NodeLayout:
    """Which ranks of ``comm`` share a node (collective: every rank must call it).

    Discovery splits ``comm`` by shared memory (``MPI_COMM_TYPE_SHARED``), so
    a node is what MPI calls one: the ranks of one host.  The testing
    override ``ranks_per_node`` (else ``$FLASHCOMM_RANKS_PER_NODE``) replaces
    discovery with consecutive blocks of that many ranks (see
    :meth:`NodeLayout.blocks`): it pretends one host is several nodes, so the
    hierarchical all-reduce can be run and checked on one machine.  The
    override must be the same on every rank and divide the world size;
    otherwise every rank raises ValueError with a one-line reason.
    """
    comm = get_comm(comm)
    override = ranks_per_node
    source = "ranks_per_node"
    if override is None and os.environ.get(RANKS_PER_NODE_ENV, "").strip():
        override, source = os.environ[RANKS_PER_NODE_ENV].strip(), f"${RANKS_PER_NODE_ENV}"
    # Agree first: a rank that skipped the split below would leave the others waiting in it.
    require_same_everywhere(comm, {"ranks_per_node override": None if override is None else str(override)},
                            "node layout overrides (ranks_per_node= or $" + RANKS_PER_NODE_ENV + ")")
    if override is not None:
        return NodeLayout.blocks(comm.Get_size(), check_ranks_per_node(override, comm.Get_size(), source))
    if hasattr(comm, "node_rank_and_size"):  # a torch.distributed group: ranks of one host name a node
        hosts = comm.allgather(socket.gethostname())
        return NodeLayout.from_node_keys([hosts.index(h) for h in hosts])
    node = comm.Split_type(mpi().COMM_TYPE_SHARED, key=comm.Get_rank())
    try:
        lowest_rank_on_node = node.bcast(comm.Get_rank(), root=0)
    finally:
        node.Free()
    return NodeLayout.from_node_keys(comm.allgather(lowest_rank_on_node))


def require_same_everywhere(comm, settings: dict, what: str) -> None:
    """Raise ValueError on every rank unless all ranks hold equal ``settings`` (collective).

    For settings that shape shared memory or pick kernels: ranks that
    disagree would read each other's workspace at different offsets, or wait
    for calls their peers never make.
    """
    everyone = comm.allgather(settings)
    odd = [r for r, s in enumerate(everyone) if s != everyone[0]]
    if odd:
        keys = [k for k in settings if any(s.get(k) != everyone[0].get(k) for s in everyone)]
        detail = "; ".join(f"{k}: " + ", ".join(f"rank {r}={s.get(k)!r}" for r, s in enumerate(everyone))
                           for k in keys)
        raise ValueError(f"flashcomm: {what} differ between ranks ({detail})")


def clean_version(text: str) -> str:
    """First line of a library's version string, without the NUL terminator Open MPI includes."""
    lines = text.replace("\x00", "").strip().splitlines()
    return lines[0].strip() if lines else ""


def library_version(comm=None) -> str:
    """The MPI library's version line; for a torch.distributed communicator, says so (MPI is not loaded)."""
    if hasattr(comm, "node_rank_and_size"):
        return "not in use (torch.distributed bootstrap)"
    try:
        return clean_version(mpi().Get_library_version())
    except Exception as exc:  # pragma: no cover
        return f"unavailable ({exc})"


def free(comm) -> None:
    """Free a communicator made by ``Dup()`` (MPI or torch.distributed, see :mod:`.torch_group`).

    Freeing an MPI communicator after MPI_Finalize (interpreter exit) would abort the process.
    """
    if hasattr(comm, "node_rank_and_size") or not mpi().Is_finalized():
        comm.Free()
