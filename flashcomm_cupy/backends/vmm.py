"""The IPC workspace shared through CUDA virtual-memory handles instead of legacy IPC handles.

Legacy ``cudaIpcOpenMemHandle`` needs the exporting GPU to be visible in the
importing process, so ranks that each see only their own GPU (SLURM's
``--gpus-per-task=1``, ``CUDA_VISIBLE_DEVICES`` set per rank) cannot use it.
Virtual-memory handles can, as NCCL does:

1. each rank creates its workspace with ``cuMemCreate`` (device memory,
   exportable as a POSIX file descriptor), maps it for its own GPU, and
   exports it with ``cuMemExportToShareableHandle``;
2. the descriptors go to every other rank of the node over a Unix socket
   (:mod:`.fdpass`);
3. each rank imports every peer's allocation (``cuMemImportFromShareableHandle``),
   maps it into its own address space and grants its GPU access
   (``cuMemSetAccess``): the peer pointer works over NVLink or PCIe P2P
   whether or not the peer's GPU is visible here;
4. the real-store canary of :mod:`.ipc` proves every pair.

The allocation lives until the last process unmaps and releases it, so
closing needs no collective: a rank that leaves early never pulls memory
from under a slower peer.
"""
from __future__ import annotations

import os
import socket

from . import cuda_driver
from .fdpass import FdExchangeError, exchange_fds
from .._mpi import first_failure
from .ipc import (PeerAccessError, Workspace, WorkspaceLayout, check_canaries, fill_new_workspace,
                  one_host_failure)

HANDOFF_TIMEOUT_S = 30.0


def _up(x: int, a: int) -> int:
    return (x + a - 1) // a * a


class VmmWorkspace(Workspace):
    """One exportable device allocation per rank, mapped by every other rank.

    A :class:`.ipc.Workspace`; set-up fails on every rank when any rank
    cannot export, map or write any peer's workspace.
    """

    transport = "ipc"
    handles = "virtual-memory"

    def __init__(self, mpi_comm, layout: WorkspaceLayout, device_id: int):
        super().__init__(mpi_comm, layout, device_id)
        self._maps = []      # (address, bytes) to unmap
        self._handles = []   # allocation handles to release
        fd, failure, nbytes = -1, None, 0
        try:
            if not cuda_driver.device_attribute(
                    device_id, cuda_driver.CU_DEVICE_ATTRIBUTE_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR_SUPPORTED):
                raise RuntimeError("the driver cannot export device memory as file descriptors")
            nbytes = _up(layout.total, cuda_driver.granularity(device_id))
            handle = cuda_driver.create_exportable(device_id, nbytes)
            self._handles.append(handle)
            self.ptr = cuda_driver.map_for_device(handle, nbytes, device_id)
            self._maps.append((self.ptr, nbytes))
            fill_new_workspace(self.ptr, layout, nbytes)
            fd = cuda_driver.export_fd(handle)
        except Exception as exc:
            failure = f"rank {self.rank}: cannot export its workspace as a virtual-memory handle ({exc})"
        infos = mpi_comm.allgather((socket.gethostname(), nbytes, failure))
        failure = (next((f for _, _, f in infos if f), None)
                   or one_host_failure([h for h, _, _ in infos], "sharing virtual-memory handles"))
        if failure is None:
            failure = first_failure(mpi_comm, self._map_peers(fd, [n for _, n, _ in infos]))
        if fd >= 0:
            os.close(fd)
        if failure is None:
            failure = first_failure(mpi_comm, check_canaries(mpi_comm, self.peer_ptrs, self.ptr))
        if failure is not None:
            self.close()
            raise PeerAccessError(failure)

    def _map_peers(self, fd, sizes):
        """Hand my descriptor to every peer and map theirs; the failure or None (collective)."""
        try:
            fds = exchange_fds(self.comm, [fd], timeout_s=HANDOFF_TIMEOUT_S)
        except FdExchangeError as exc:
            return str(exc)
        failure = None
        for r, got in enumerate(fds):
            if r == self.rank:
                self.peer_ptrs.append(self.ptr)
                continue
            try:
                if failure is None:
                    handle = cuda_driver.import_fd(got[0])
                    self._handles.append(handle)
                    p = cuda_driver.map_for_device(handle, sizes[r], self.device_id)
                    self._maps.append((p, sizes[r]))
                    self.peer_ptrs.append(p)
            except Exception as exc:
                failure = f"rank {self.rank} cannot map rank {r}'s virtual-memory handle ({exc})"
            finally:
                os.close(got[0])
        return failure

    def close(self, barrier_timeout_s: float = 10.0):
        """Local: unmap and release everything this rank holds (no collective needed: an
        allocation lives until its last mapping and handle are gone)."""
        import cupy
        try:
            cupy.cuda.runtime.deviceSynchronize()
        except Exception:
            pass
        for p, n in reversed(self._maps):
            try:
                cuda_driver.unmap(p, n)
            except Exception:
                pass
        for h in self._handles:
            try:
                cuda_driver.release(h)
            except Exception:
                pass
        self._maps, self._handles = [], []
        self.ptr = 0
        self.peer_ptrs = []
