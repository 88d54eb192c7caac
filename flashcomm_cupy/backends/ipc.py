"""The CUDA IPC workspace every rank exports, and the real peer-access check.

The workspace's layout is :class:`flashcomm_cupy.backends.flash.layout.WorkspaceLayout` (re-exported
here); the canary kernel is ``kernels_cu/fc_canary.cu``.

Exported memory is freed only after every peer closed its handle to it
(close, barrier, free): a rank that frees early makes a slower peer's
``cudaIpcOpenMemHandle`` fail with ``cudaErrorInvalidValue``.
"""
from __future__ import annotations

import socket

import numpy as np

from .._mpi import first_failure
from ..errors import PeerTransferError

from .flash import kernels
from .flash.layout import MAX_RANKS, POISON_AREA_BYTES, POISON_PEERS_OFF, WorkspaceLayout  # noqa: F401


def _bounded_barrier(comm, timeout_s: float) -> bool:
    """MPI barrier that gives up after ``timeout_s``; True when every rank arrived."""
    import time
    try:
        req = comm.Ibarrier()
    except Exception:
        return False
    deadline = time.monotonic() + timeout_s
    try:
        while not req.Test():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.001)
    except PeerTransferError:  # a peer left (torch.distributed): it never arrives
        return False
    return True


class PeerAccessError(RuntimeError):
    """A transport's workspace cannot be shared between these ranks (no CUDA IPC or peer
    access, no room in ``/dev/shm``, ...); the message says why."""


def check_canaries(comm, peer_ptrs, own_ptr):
    """Store a canary through every peer pointer from a kernel, load it back, then check
    arrivals in this rank's own workspace at ``own_ptr``; the failure message or None.

    Collective.  Real stores from a kernel prove what a handle or registration
    only promises: this GPU can write into each peer's workspace, and the
    peer sees the write in its own memory.
    """
    import cupy
    rank, world = comm.Get_rank(), comm.Get_size()
    failure = None
    try:  # whatever fails here, this rank still joins the barrier below
        kernel = cupy.RawKernel(kernels.read_source("fc_canary.cu"), "fc_canary")
        back = cupy.zeros(1, dtype=cupy.uint32)
        for r, p in enumerate(peer_ptrs):
            if r == rank:
                continue
            value = np.uint32(0xFC000000 | (rank << 8) | r)
            kernel((1,), (1,), (np.uint64(p + 4 * rank), value, back))
            got = int(back.get()[0])
            if got != int(value):
                failure = f"rank {rank}: canary read back from rank {r} as {got:#x}, wrote {int(value):#x}"
                break
        cupy.cuda.Device().synchronize()
    except Exception as exc:
        failure = f"rank {rank}: peer stores failed ({exc})"
    comm.Barrier()
    if failure is not None:
        return failure
    mine = np.empty(MAX_RANKS, dtype=np.uint32)
    # Default: the workspace may be device memory or mapped host memory (the host transport).
    cupy.cuda.runtime.memcpy(mine.ctypes.data, own_ptr, mine.nbytes, cupy.cuda.runtime.memcpyDefault)
    for r in range(world):
        want = 0 if r == rank else 0xFC000000 | (r << 8) | rank
        if int(mine[r]) != want:
            return f"rank {rank}: canary from rank {r} did not arrive (found {int(mine[r]):#x})"
    return None


def fill_new_workspace(ptr: int, layout: WorkspaceLayout, nbytes: int) -> None:
    """A new device workspace's contents, before any rank maps it: zeros (flags, epochs, the
    poison area) up to the LL slots, 0xFF bytes from there to ``nbytes`` (the allocation's size:
    every LL slot empty, fc_ll.cuh).  Returns once the device has written them."""
    import cupy
    rt = cupy.cuda.runtime
    rt.memset(ptr, 0, layout.ll_off)
    rt.memset(ptr + layout.ll_off, 0xFF, nbytes - layout.ll_off)
    rt.deviceSynchronize()


def one_host_failure(hosts, what: str):
    """The failure message when ``hosts`` (every rank's host name) name more than one host."""
    hosts = sorted(set(hosts))
    if len(hosts) > 1:
        return f"ranks span {len(hosts)} hosts ({', '.join(hosts)}); {what} needs one host"
    return None


class Workspace:
    """What every transport's workspace gives the backend (see :mod:`.transport`).

    ``layout``; ``ptr``, this rank's workspace as a device pointer;
    ``peer_ptrs``, every rank's workspace as a device pointer of this process
    (``ptr`` at ``[rank]``); ``close()``; ``transport`` and ``handles`` name it.
    Construction is collective and raises :class:`PeerAccessError` on every
    rank, with the same message, when any rank cannot store into any peer's
    workspace.
    """

    transport = ""
    handles = ""

    def __init__(self, mpi_comm, layout: WorkspaceLayout, device_id: int):
        self.comm = mpi_comm
        self.rank = mpi_comm.Get_rank()
        self.world = mpi_comm.Get_size()
        self.layout = layout
        self.device_id = device_id
        self.ptr = 0
        self.peer_ptrs = []

    def close(self, barrier_timeout_s: float = 10.0):
        raise NotImplementedError


class IpcWorkspace(Workspace):
    """One cudaMalloc'd buffer per rank, opened by every other rank (legacy CUDA IPC handles).

    Construction is collective.  Raises :class:`PeerAccessError` on every rank
    (with the same message) when any rank cannot use any peer's buffer.
    """

    transport = "ipc"
    handles = "legacy"

    def __init__(self, mpi_comm, layout: WorkspaceLayout, device_id: int):
        import cupy
        rt = cupy.cuda.runtime
        super().__init__(mpi_comm, layout, device_id)
        self._opened = []
        failure = None
        try:
            self.ptr = rt.malloc(layout.total)
            fill_new_workspace(self.ptr, layout, layout.total)
            handle = bytes(rt.ipcGetMemHandle(self.ptr))
        except Exception as exc:
            handle, failure = None, f"rank {self.rank}: cannot export its workspace ({exc})"
        infos = mpi_comm.allgather((socket.gethostname(), handle, failure))
        failure = (next((f for _, _, f in infos if f), None)
                   or one_host_failure([h for h, _, _ in infos], "CUDA IPC"))
        if failure is None:
            failure = self._open_peers([h for _, h, _ in infos])
        failure = first_failure(self.comm, failure)
        if failure is None:
            failure = first_failure(self.comm, self._check_canaries())
        if failure is not None:
            self.close()
            raise PeerAccessError(failure)
        self.peer_table = cupy.asarray(np.array(self.peer_ptrs + [0] * (MAX_RANKS - self.world), dtype=np.uint64))

    def _open_peers(self, handles):
        import cupy
        rt = cupy.cuda.runtime
        for r, h in enumerate(handles):
            if r == self.rank:
                self.peer_ptrs.append(self.ptr)
                continue
            try:
                p = rt.ipcOpenMemHandle(h, rt.cudaIpcMemLazyEnablePeerAccess)
            except Exception as exc:
                return f"rank {self.rank} cannot open rank {r}'s IPC handle ({exc})"
            self._opened.append(p)
            self.peer_ptrs.append(p)
        return None

    def _check_canaries(self):
        return check_canaries(self.comm, self.peer_ptrs, self.ptr)

    def close(self, barrier_timeout_s: float = 10.0):
        """Collective: close peers' handles, wait for everybody, then free ours.

        The wait is bounded: a rank that is unwinding from an error while its
        peers sit in another collective must still get to MPI_Abort, so after
        ``barrier_timeout_s`` we stop waiting and leave our buffer to process
        exit rather than free memory a peer may still have open.
        """
        import cupy
        rt = cupy.cuda.runtime
        try:
            rt.deviceSynchronize()
        except Exception:
            pass
        for p in self._opened:
            try:
                rt.ipcCloseMemHandle(p)
            except Exception:
                pass
        self._opened = []
        if not _bounded_barrier(self.comm, barrier_timeout_s):
            self.ptr = 0  # a peer may still map it: leak rather than free under its feet
            return
        if self.ptr:
            rt.free(self.ptr)
            self.ptr = 0
