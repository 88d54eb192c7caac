"""Bootstrap over a ``torch.distributed`` process group instead of MPI.

Every cross-rank step flashcomm takes outside its kernels (rank and size,
exchanging IPC handles and the NCCL id, agreeing on settings, barriers, the
node-local rank, and the CPU backend's byte transfers) goes through one small
interface: the subset of ``mpi4py.MPI.Comm`` listed below.  It has two
implementations: an mpi4py communicator itself (under ``mpirun``) and
:class:`TorchGroupComm`, which carries the same calls over a
``torch.distributed`` group (under ``torchrun`` or ``torch.multiprocessing``,
no MPI library needed).

=====================  ==========================================================
``Get_rank/Get_size``  this rank and the group size
``allgather(obj)``     list of every rank's picklable object (lowercase: pickled)
``bcast(obj, root)``   ``root``'s object on every rank
``gather(obj, root)``  the list on ``root``, None elsewhere
``Barrier()``          blocking barrier; ``Ibarrier()`` a request with ``Test()``
``Dup()/Free()``       a communicator of the same ranks with its own message space
``Allgather(s, r)``    buffers (NumPy, C-contiguous): every rank's ``s`` into ``r``
``Alltoall(s, r)``     block ``i`` of ``s`` to rank ``i``; ``r`` gets one block per rank
``Allreduce(s, r)``    element-wise sum into ``r``
``Bcast(buf, root)``   ``root``'s buffer into ``buf`` on every rank
``Iallgather/Ialltoall/Iallreduce``  the same, non-blocking: a request with ``Test()``
``Abort(code)``        end this process now (the launcher ends the others)
=====================  ==========================================================

The CPU backend polls every request against its bound (:mod:`flashcomm_cupy.errors`).
Under MPI it also probes for a peer's abort message (``Iprobe``); gloo has no
probe, so over torch.distributed each rank gives up on its own bound instead of
at a peer's word (still bounded, later by at most one bound).

plus ``node_rank_and_size()`` (this rank's index among the group's ranks on its
host, and how many there are), which :mod:`flashcomm_cupy._mpi` asks before
splitting an MPI communicator by shared memory.

All transfers run over a gloo group of the same ranks (the user's own group
when it is gloo), on host memory: an NCCL group would need every object on
the current CUDA device, and flashcomm's bootstrap happens before it picks one.
This module imports torch only when a :class:`TorchGroupComm` is made.
"""
from __future__ import annotations

import os
import socket
import sys

import numpy as np

from .errors import PeerTransferError
from .launchers import launched_by_torchrun, torchrun_size  # noqa: F401  (launched_by_torchrun: public here)


def torchrun_world():
    """What ``Communicator()`` spans in a process ``torchrun`` started (no MPI launcher): the
    torch.distributed world group where ``init_process_group`` has run; None (MPI's world, this
    process alone) where torchrun's world is one process; else RuntimeError, since a
    communicator of one rank among several would return this rank's input as the "sum"."""
    dist = sys.modules.get("torch.distributed")  # not imported: nobody initialized it
    if dist is not None and dist.is_available() and dist.is_initialized():
        return TorchGroupComm(None)
    size = torchrun_size()
    if size > 1:
        raise RuntimeError(f"flashcomm: started by torchrun (WORLD_SIZE={size}) but torch.distributed is not "
                           "initialized: call torch.distributed.init_process_group() before "
                           "Communicator() (or use Communicator.from_torch()), or launch with mpirun")
    return None


def is_torch_group(obj) -> bool:
    """True for a ``torch.distributed`` ProcessGroup (without importing torch)."""
    return type(obj).__module__.split(".")[0] == "torch"


class _Request:
    """mpi4py's request interface over a torch ``Work``.  A failed ``Work`` also counts as
    completed (``is_completed``), so :meth:`Test` asks it, through ``wait()``, whether it
    succeeded, and raises :class:`PeerTransferError` if not: a failed receive must never pass for
    the peer's data."""

    def __init__(self, work):
        self._work = work

    def Test(self) -> bool:
        if not self._work.is_completed():
            return False
        self.Wait()
        return True

    def Wait(self) -> None:
        try:
            self._work.wait()
        except RuntimeError as exc:
            raise PeerTransferError(f"flashcomm: a transfer over torch.distributed failed: {exc}") from exc



def _bytes(a: np.ndarray) -> np.ndarray:
    if not a.flags.c_contiguous:
        raise ValueError("flashcomm: buffers sent over torch.distributed must be C-contiguous")
    return a.reshape(-1).view(np.uint8)


class TorchGroupComm:
    """The mpi4py-like interface above over the ranks of a ``torch.distributed`` group.

    ``group`` None means the default (world) group.  Construction is
    collective over ``group``'s ranks when its backend is not gloo (a gloo
    group of the same ranks is created for the transfers).
    """

    def __init__(self, group=None, _cpu_group=None):
        import torch.distributed as dist
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("flashcomm: torch.distributed is not initialized; call "
                               "torch.distributed.init_process_group() first (torchrun sets its environment)")
        self._dist = dist
        self.group = group if group is not None else dist.group.WORLD
        self._rank = dist.get_rank(self.group)
        self._size = dist.get_world_size(self.group)
        self._ranks = [dist.get_global_rank(self.group, r) for r in range(self._size)]
        if _cpu_group is not None:
            self._cpu, self._owns_cpu_group = _cpu_group, True
        elif str(dist.get_backend(self.group)) == "gloo":
            self._cpu, self._owns_cpu_group = self.group, False
        else:
            self._cpu, self._owns_cpu_group = self._new_gloo_group(), True
        self._node = None

    def _new_gloo_group(self):
        # Only this group's ranks take part (the others may never construct a communicator).
        return self._dist.new_group(ranks=self._ranks, backend="gloo", use_local_synchronization=True)

    def _global(self, root: int) -> int:
        return self._ranks[root]

    def _tensor(self, a: np.ndarray):
        import torch
        return torch.from_numpy(_bytes(a))

    # ------------------------------------------------------------------ mpi4py subset
    def Get_rank(self) -> int:
        return self._rank

    def Get_size(self) -> int:
        return self._size

    def allgather(self, obj) -> list:
        out = [None] * self._size
        self._dist.all_gather_object(out, obj, group=self._cpu)
        return out

    def bcast(self, obj, root: int = 0):
        box = [obj if self._rank == root else None]
        self._dist.broadcast_object_list(box, src=self._global(root), group=self._cpu)
        return box[0]

    def gather(self, obj, root: int = 0):
        everyone = self.allgather(obj)
        return everyone if self._rank == root else None

    def Barrier(self) -> None:
        self._dist.barrier(group=self._cpu)

    def Ibarrier(self) -> _Request:
        return _Request(self._dist.barrier(group=self._cpu, async_op=True))

    def Dup(self) -> "TorchGroupComm":
        """A communicator of the same ranks over a new gloo group (collective over them)."""
        return TorchGroupComm(self.group, _cpu_group=self._new_gloo_group())

    def Free(self) -> None:
        if self._owns_cpu_group and self._dist.is_initialized():
            self._dist.destroy_process_group(self._cpu)
        self._owns_cpu_group = False

    def Allgather(self, send: np.ndarray, recv: np.ndarray) -> None:
        # all_gather_single replaces all_gather_into_tensor (deprecated from torch 2.12)
        gather = getattr(self._dist, "all_gather_single", None) or self._dist.all_gather_into_tensor
        gather(self._tensor(recv), self._tensor(send), group=self._cpu)

    def Alltoall(self, send: np.ndarray, recv: np.ndarray) -> None:
        self._dist.all_to_all_single(self._tensor(recv), self._tensor(send), group=self._cpu)

    def Allreduce(self, send: np.ndarray, recv: np.ndarray) -> None:
        import torch
        if not recv.flags.c_contiguous:
            raise ValueError("flashcomm: Allreduce needs a C-contiguous receive buffer")
        np.copyto(recv, send)
        self._dist.all_reduce(torch.from_numpy(recv.reshape(-1)), group=self._cpu)

    def Iallgather(self, send: np.ndarray, recv: np.ndarray) -> _Request:
        gather = getattr(self._dist, "all_gather_single", None) or self._dist.all_gather_into_tensor
        return _Request(gather(self._tensor(recv), self._tensor(send), group=self._cpu, async_op=True))

    def Ialltoall(self, send: np.ndarray, recv: np.ndarray) -> _Request:
        return _Request(self._dist.all_to_all_single(self._tensor(recv), self._tensor(send), group=self._cpu,
                                                     async_op=True))

    def Iallreduce(self, send: np.ndarray, recv: np.ndarray) -> _Request:
        import torch
        if not recv.flags.c_contiguous:
            raise ValueError("flashcomm: Iallreduce needs a C-contiguous receive buffer")
        np.copyto(recv, send)
        return _Request(self._dist.all_reduce(torch.from_numpy(recv.reshape(-1)), group=self._cpu, async_op=True))

    def Bcast(self, buf: np.ndarray, root: int = 0) -> None:
        self._dist.broadcast(self._tensor(buf), src=self._global(root), group=self._cpu)

    def Abort(self, errorcode: int = 1) -> None:
        os._exit(int(errorcode) or 1)

    # ------------------------------------------------------------------ node
    def node_rank_and_size(self):
        """(index of this rank among the group's ranks on this host, their number); collective once."""
        if self._node is None:
            hosts = self.allgather(socket.gethostname())
            mine = [r for r, h in enumerate(hosts) if h == hosts[self._rank]]
            self._node = (mine.index(self._rank), len(mine))
        return self._node

    def __repr__(self):
        return f"TorchGroupComm(rank={self._rank}, size={self._size}, backend={self._dist.get_backend(self.group)})"


def init_torch_from_mpi(mpi_comm, backend: str, timeout_s: float = 600.0) -> None:
    """``torch.distributed.init_process_group(backend)`` inside an ``mpirun`` job (collective).

    Rank 0 picks a free TCP port on its host and broadcasts the address over
    MPI; the group has the MPI communicator's ranks in the same order.  For
    scripts that use flashcomm over MPI and also need torch.distributed (e.g.
    NCCL as the baseline).
    """
    import datetime

    import torch.distributed as dist
    if mpi_comm.Get_rank() == 0:
        with socket.socket() as s:
            s.bind(("", 0))
            where = (socket.gethostname(), s.getsockname()[1])
    else:
        where = None
    addr, port = mpi_comm.bcast(where, root=0)
    dist.init_process_group(backend, init_method=f"tcp://{addr}:{port}", rank=mpi_comm.Get_rank(),
                            world_size=mpi_comm.Get_size(), timeout=datetime.timedelta(seconds=timeout_s))
