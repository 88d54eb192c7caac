"""The only module that bootstraps mpi4py: the world communicator, the local rank, the node layout."""
from __future__ import annotations

import socket
from typing import Any, Dict, List, Optional

from . import settings
from .launchers import launched_local_rank
from .topology import NodeLayout, check_ranks_per_node


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

    The launcher's variables (:mod:`flashcomm_cupy.launchers`) are read first;
    the portable fallback splits the communicator by shared memory.  A
    torch.distributed group (:mod:`flashcomm_cupy.torch_group`) answers itself.
    """
    if hasattr(comm, "node_rank_and_size"):
        return comm.node_rank_and_size()[0]
    launched = launched_local_rank()
    if launched is not None:
        return launched
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
    override, source = ranks_per_node, "ranks_per_node"
    if override is None:
        override, source = settings.raw(settings.RANKS_PER_NODE), f"${settings.RANKS_PER_NODE}"
    # Agree on the text first, check it after: a rank that raised alone, or skipped the split
    # below, would leave the others waiting in it.
    agree(comm, {"ranks_per_node override": None if override is None else str(override)},
          "node layout overrides (ranks_per_node= or $" + settings.RANKS_PER_NODE + ")")
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


# ----------------------------------------------------------------------------- agreement between ranks
# Two questions every collective set-up asks, answered here once:
#   agree          -- do all ranks hold the same values?  (settings that shape shared memory or
#                     pick kernels, a call's arguments): ValueError on every rank otherwise;
#   first_failure  -- did any rank fail a local step?  (opening a handle, a GPU check): every rank
#                     learns the first failure, so all raise together or none does.
def disagreement(everyone: List[Dict[str, Any]], what: str) -> Optional[str]:
    """The one-line message for ranks' ``{name: value}`` dicts that differ (None when all are equal).

    It names each differing value and every rank's value of it.
    """
    if all(v == everyone[0] for v in everyone):
        return None
    keys = list(dict.fromkeys(k for v in everyone for k in v))
    differ = [k for k in keys if any(v.get(k) != everyone[0].get(k) for v in everyone)]
    detail = "; ".join(f"{k}: " + ", ".join(f"rank {r}={v.get(k)!r}" for r, v in enumerate(everyone))
                       for k in differ)
    return f"flashcomm: {what} differ between ranks ({detail})"


def agree(comm, values: Dict[str, Any], what: str) -> None:
    """Raise ValueError on every rank unless all ranks hold equal ``values`` (collective).

    For settings that shape shared memory or pick kernels: ranks that
    disagree would read each other's workspace at different offsets, or wait
    for calls their peers never make.
    """
    message = disagreement(comm.allgather(values), what)
    if message:
        raise ValueError(message)


def call_description(elements: int, dtype: str, mode) -> Dict[str, Any]:
    """What every rank's call of one all-reduce must agree on, by name (for :func:`agree`)."""
    return {"elements": int(elements), "dtype": dtype, "bits": mode.bits_label, "group_size": mode.group_size,
            "rotate": mode.rotate, "symmetric": mode.symmetric, "algo": mode.algo}


#: the name :func:`agree` had before (tests/test_dispatch.py still uses it)
require_same_everywhere = agree


def first_failure(comm, failure: Optional[str], name_rank: bool = False) -> Optional[str]:
    """Every rank learns the first rank's failure, or None when no rank failed (collective).

    ``name_rank``: prefix "rank R: " unless every rank failed the same way.
    """
    return _first_of(comm.allgather(failure), name_rank)


def _first_of(everyone, name_rank: bool) -> Optional[str]:
    bad = [(r, f) for r, f in enumerate(everyone) if f]
    if not bad:
        return None
    rank, first = bad[0]
    if name_rank and any(f != first for f in everyone):
        return f"rank {rank}: {first}"
    return first


def raise_everywhere(comm, failure: Optional[BaseException], what: str, instead=None) -> None:
    """End a local step that may fail on some ranks only (collective): re-raise this rank's
    ``failure``, else raise RuntimeError naming the first rank whose ``what`` failed, else return.
    Every rank leaves together instead of some waiting in the next collective.

    ``instead``: an (exception type, factory) pair; when every rank that failed raised that type
    (by name), every rank raises ``factory(first failure)`` instead -- one decision everywhere,
    e.g. "fall back to NCCL" when the only failures are missing transports."""
    everyone = comm.allgather(None if failure is None else f"{type(failure).__name__}: {failure}")
    problem = _first_of(everyone, name_rank=True)
    if problem and instead is not None:
        kind, factory = instead
        if all(f is None or f.startswith(f"{kind.__name__}: ") for f in everyone):
            raise factory(problem)
    if failure is not None:
        raise failure
    if problem:
        raise RuntimeError(f"flashcomm: {what} could not start on another rank ({problem})")


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
