"""The CUDA IPC workspace every rank exports, and the real peer-access check.

Layout of one rank's workspace (bytes; all offsets 4 KiB aligned):

====================  =====================================================
canary                ``uint32[8]`` written by peers during the access check
flags                 three flag sets (reduce-scatter, all-gather, one-shot),
                      each ``uint32[8 ranks][max_blocks]``, then this rank's
                      per-block epochs of the two-shot and of the one-shot
                      sets and per-block LL call counters (each
                      ``uint32[max_blocks]``), then the poison words
                      ``uint32[8 ranks]`` (kernels_cu/fc_signal.cuh)
rs slots              ``[world][max_blocks]`` slots of ``slot_bytes``
ag slots              ``[world][max_blocks]`` slots
one-shot slots        ``[2 parities][world][max_blocks]`` slots
LL slots              ``[2 parities][2 areas][world][max_blocks]`` slots of
                      ``ll_slot_bytes``, filled with 0xFF bytes (the "empty"
                      sentinel of kernels_cu/fc_ll.cuh) instead of zeros
====================  =====================================================

Exported memory is freed only after every peer closed its handle to it
(close, barrier, free): a rank that frees early makes a slower peer's
``cudaIpcOpenMemHandle`` fail with ``cudaErrorInvalidValue``.
"""
from __future__ import annotations

import socket
from dataclasses import dataclass

import numpy as np

MAX_RANKS = 8
#: the poison area's layout (FC_POISON_PEERS_OFF / FC_POISON_AREA_BYTES in fc_signal.cuh)
POISON_PEERS_OFF = 32
POISON_AREA_BYTES = POISON_PEERS_OFF + 8 * MAX_RANKS
_PAGE = 4096
_ALLOC_ALIGN = 2 << 20  # IPC shares whole allocations; keep ours on their own 2 MiB


def _up(x: int, a: int) -> int:
    return (x + a - 1) // a * a


@dataclass(frozen=True)
class WorkspaceLayout:
    world: int
    max_blocks: int
    slot_bytes: int
    ll_slot_bytes: int = 8 << 10

    @property
    def canary_off(self) -> int:
        return 0

    @property
    def flags_off(self) -> int:
        return _PAGE

    @property
    def flag_set_bytes(self) -> int:
        return 4 * MAX_RANKS * self.max_blocks

    @property
    def ag_flags_off(self) -> int:
        """The two-shot's all-gather flag set (after the reduce-scatter set at :attr:`flags_off`)."""
        return self.flags_off + self.flag_set_bytes

    @property
    def os_flags_off(self) -> int:
        """The one-shot flag set."""
        return self.flags_off + 2 * self.flag_set_bytes

    @property
    def ts_epoch_off(self) -> int:
        """Per-block epochs of the two-shot's reduce-scatter and all-gather flag sets."""
        return self.flags_off + 3 * self.flag_set_bytes

    @property
    def os_epoch_off(self) -> int:
        """Per-block epochs of the one-shot flag set (counted apart: see fc_signal.cuh)."""
        return self.ts_epoch_off + 4 * self.max_blocks

    @property
    def ll_epoch_off(self) -> int:
        """Per-block LL call counters."""
        return self.os_epoch_off + 4 * self.max_blocks

    @property
    def poison_off(self) -> int:
        """The poison area (fc_signal.cuh): ``uint32[8]`` poison words, one per source rank and
        non-zero once that rank gave up, then at :attr:`poison_peers_off` every rank's
        workspace base as this rank maps it (``uint64[8]``, written by the host)."""
        return self.ll_epoch_off + 4 * self.max_blocks

    @property
    def poison_peers_off(self) -> int:
        return self.poison_off + POISON_PEERS_OFF

    @property
    def rs_off(self) -> int:
        return _up(self.poison_off + POISON_AREA_BYTES, _PAGE)

    @property
    def region_bytes(self) -> int:
        return self.world * self.max_blocks * self.slot_bytes

    @property
    def ag_off(self) -> int:
        return self.rs_off + self.region_bytes

    @property
    def os_off(self) -> int:
        return self.ag_off + self.region_bytes

    @property
    def ll_off(self) -> int:
        return self.os_off + 2 * self.region_bytes

    @property
    def ll_bytes(self) -> int:
        return 2 * 2 * self.world * self.max_blocks * self.ll_slot_bytes

    @property
    def total(self) -> int:
        return _up(self.ll_off + self.ll_bytes, _ALLOC_ALIGN)

    def fill_args(self, a) -> None:
        """Write every workspace offset and size of this layout into an FcArgs record ``a``
        (``flashcomm_cupy._kernels.ARGS_DTYPE``): the kernels derive none of them."""
        a["slot_bytes"], a["max_blocks"], a["flags_off"] = self.slot_bytes, self.max_blocks, self.flags_off
        a["rs_off"], a["ag_off"], a["os_off"] = self.rs_off, self.ag_off, self.os_off
        a["ll_off"], a["ll_slot_bytes"] = self.ll_off, self.ll_slot_bytes
        a["ts_epoch_off"], a["os_epoch_off"] = self.ts_epoch_off, self.os_epoch_off
        a["ll_epoch_off"], a["poison_off"] = self.ll_epoch_off, self.poison_off
        a["ag_flags_off"], a["os_flags_off"] = self.ag_flags_off, self.os_flags_off


_CANARY_SRC = r"""
extern "C" __global__ void fc_canary(unsigned int* dst, unsigned int value, unsigned int* back) {
  *(volatile unsigned int*)dst = value;
  __threadfence_system();
  back[0] = *(volatile unsigned int*)dst;
}
"""


def _bounded_barrier(comm, timeout_s: float) -> bool:
    """MPI barrier that gives up after ``timeout_s``; True when every rank arrived."""
    import time
    try:
        req = comm.Ibarrier()
    except Exception:
        return False
    deadline = time.monotonic() + timeout_s
    while not req.Test():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.001)
    return True


class PeerAccessError(RuntimeError):
    """A transport's workspace cannot be shared between these ranks (no CUDA IPC or peer
    access, no room in ``/dev/shm``, ...); the message says why."""


def agree(comm, failure):
    """Every rank learns the first failure of any rank (or None); collective."""
    return next((f for f in comm.allgather(failure) if f), None)


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
        kernel = cupy.RawKernel(_CANARY_SRC, "fc_canary")
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
            rt.memset(self.ptr, 0, layout.ll_off)
            rt.memset(self.ptr + layout.ll_off, 0xFF, layout.total - layout.ll_off)
            rt.deviceSynchronize()
            handle = bytes(rt.ipcGetMemHandle(self.ptr))
        except Exception as exc:
            handle, failure = None, f"rank {self.rank}: cannot export its workspace ({exc})"
        infos = mpi_comm.allgather((socket.gethostname(), handle, failure))
        failure = (next((f for _, _, f in infos if f), None)
                   or one_host_failure([h for h, _, _ in infos], "CUDA IPC"))
        if failure is None:
            failure = self._open_peers([h for _, h, _ in infos])
        failure = self._agree(failure)
        if failure is None:
            failure = self._agree(self._check_canaries())
        if failure is not None:
            self.close()
            raise PeerAccessError(failure)
        self.peer_table = cupy.asarray(np.array(self.peer_ptrs + [0] * (MAX_RANKS - self.world), dtype=np.uint64))

    def _agree(self, failure):
        return agree(self.comm, failure)

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
