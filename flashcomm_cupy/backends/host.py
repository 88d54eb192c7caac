"""The host transport: every rank's workspace lives in one shared host-memory segment per node.

For GPUs without peer access (PCIe cards with P2P disabled, many cloud VMs)
and for ranks that each see only their own GPU.  The flash kernels address
rank k's workspace through ``FcArgs.peers[k]``, only ever store into peers'
workspaces and load from their own; so a transport is just where the
workspaces live and how a rank gets a device pointer to each of them.  Here:

* one :class:`.shm.NodeSegment` of ``world x layout.total`` bytes, rank k's
  workspace at offset ``k x layout.total`` (the layout of :mod:`.ipc`, LL
  slots filled with the 0xFF sentinel before any rank maps it);
* every rank registers the whole segment with CUDA (page-locked, portable,
  mapped: ``cuMemHostRegister``) and takes its device pointer, so
  ``peers[k]`` is this process's device address of rank k's workspace; a
  kernel's store to a peer goes over PCIe into host memory, and the peer's
  loads come back over PCIe;
* the existing real-store canary proves every pair before first use.

No GPU needs to see another, and no IPC handle is involved.  The segment has
no name once every rank has mapped it (see :mod:`.shm`), so nothing is left
in ``/dev/shm`` however the job ends.  docs/wire-format.md has the layout.
"""
from __future__ import annotations

import socket

import numpy as np

from . import cuda_driver
from .._mpi import first_failure
from .ipc import MAX_RANKS, PeerAccessError, Workspace, WorkspaceLayout, check_canaries, one_host_failure
from .shm import NodeSegment, SharedMemoryError


def fill_sentinels(view: memoryview, layout: WorkspaceLayout, world: int) -> None:
    """Write the LL "empty" sentinel (0xFF bytes) into every rank's LL slots; the rest of a
    fresh segment is already zero (new tmpfs pages read as zero)."""
    data = np.frombuffer(view, dtype=np.uint8)
    try:
        for k in range(world):
            base = k * layout.total + layout.ll_off
            data[base: base + layout.ll_bytes] = 0xFF
    finally:
        del data


class HostWorkspace(Workspace):
    """Every rank's workspace in one registered shared-memory segment of the node.

    A :class:`.ipc.Workspace`; set-up fails on every rank when ranks span
    several hosts, ``/dev/shm`` is too small, a registration fails or a
    canary does not arrive.
    """

    transport = "host"
    handles = "shared memory"

    def __init__(self, mpi_comm, layout: WorkspaceLayout, device_id: int):
        super().__init__(mpi_comm, layout, device_id)
        self._segment = None
        self._registered = 0
        failure = one_host_failure(mpi_comm.allgather(socket.gethostname()), "the host transport")
        if failure is not None:
            raise PeerAccessError(failure)
        if self.world > MAX_RANKS:
            raise PeerAccessError(f"at most {MAX_RANKS} ranks per host, got {self.world}")
        try:
            self._segment = NodeSegment(mpi_comm, self.world * layout.total,
                                        init=lambda view: fill_sentinels(view, layout, self.world))
        except SharedMemoryError as exc:
            raise PeerAccessError(str(exc)) from None
        failure = self._register()
        failure = first_failure(mpi_comm, failure)
        if failure is None:
            failure = first_failure(mpi_comm, check_canaries(mpi_comm, self.peer_ptrs, self.ptr))
        if failure is not None:
            self.close()
            raise PeerAccessError(failure)

    def _register(self):
        try:
            if not cuda_driver.device_attribute(self.device_id, cuda_driver.CU_DEVICE_ATTRIBUTE_CAN_MAP_HOST_MEMORY):
                return f"rank {self.rank}: GPU {self.device_id} cannot map host memory"
            base = cuda_driver.host_register(self._segment.address, self._segment.nbytes)
        except Exception as exc:
            return f"rank {self.rank} cannot register the shared segment with CUDA ({exc})"
        self._registered = self._segment.address
        self.peer_ptrs = [base + k * self.layout.total for k in range(self.world)]
        self.ptr = self.peer_ptrs[self.rank]
        return None

    def close(self, barrier_timeout_s: float = 10.0):
        """Local: unregister and unmap.  The memory goes with the last rank's mapping, so
        no rank waits for its peers (``barrier_timeout_s`` is accepted for the interface)."""
        try:
            import cupy
            cupy.cuda.runtime.deviceSynchronize()  # no kernel of ours still touches the segment
        except Exception:
            pass
        if self._registered:
            try:
                cuda_driver.host_unregister(self._registered)
            except Exception:
                pass
            self._registered = 0
        if self._segment is not None:
            self._segment.close()
            self._segment = None
        self.ptr = 0
        self.peer_ptrs = []
