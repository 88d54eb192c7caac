"""Run under mpiexec: the virtual-memory-handle workspace with CUDA faked, on CPUs.

A memfd stands in for a ``cuMemCreate`` allocation: exporting it yields its
file descriptor, importing maps the received descriptor, and the "device
pointer" of a mapping is its host address.  So the descriptor hand-off
between the ranks, the mapping of every peer's allocation, the sentinel
fill, the canary's arrival in the owner's memory, the agreement on failures
and close run for real.  Usage: ``mpiexec -n K python -m mpi4py
vmm_workspace.py CASE`` with CASE ``ok`` or ``import-fails``.
"""
from __future__ import annotations

import ctypes
import mmap
import os
import sys
import types

import numpy as np
from mpi4py import MPI

comm = MPI.COMM_WORLD
rank, world = comm.Get_rank(), comm.Get_size()
case = sys.argv[1]

# CuPy's runtime as far as the workspace uses it
runtime = types.SimpleNamespace(memset=lambda ptr, value, n: ctypes.memset(ptr, value, n),
                                deviceSynchronize=lambda: None)
sys.modules["cupy"] = types.SimpleNamespace(cuda=types.SimpleNamespace(runtime=runtime))

from flashcomm_cupy.backends import cuda_driver, ipc, vmm  # noqa: E402

allocations = {}   # handle -> fd
mappings = {}      # address -> (mmap, ctypes anchor)


def create_exportable(device_id, nbytes):
    fd = os.memfd_create(f"fake-vmm-{rank}")
    os.ftruncate(fd, nbytes)
    allocations[fd] = fd
    return fd


def import_fd(fd):
    if case == "import-fails" and rank == 0:
        raise cuda_driver.CudaDriverError("cuMemImportFromShareableHandle failed: planted (CUresult 1)")
    handle = os.dup(fd)
    allocations[handle] = handle
    return handle


def map_for_device(handle, nbytes, device_id):
    m = mmap.mmap(allocations[handle], nbytes)
    anchor = (ctypes.c_char * nbytes).from_buffer(m)
    mappings[ctypes.addressof(anchor)] = (m, anchor)
    return ctypes.addressof(anchor)


def unmap(ptr, nbytes):
    m, anchor = mappings.pop(ptr)
    del anchor
    m.close()


def release(handle):
    os.close(allocations.pop(handle))


def host_canaries(mpi_comm, peer_ptrs, own_ptr):
    for r, p in enumerate(peer_ptrs):
        if r != rank:
            ctypes.c_uint32.from_address(p + 4 * rank).value = 0xFC000000 | (rank << 8) | r
    mpi_comm.Barrier()
    for r in range(world):
        got = ctypes.c_uint32.from_address(own_ptr + 4 * r).value
        if got != (0 if r == rank else 0xFC000000 | (r << 8) | rank):
            return f"rank {rank}: canary from rank {r} did not arrive (found {got:#x})"
    return None


cuda_driver.device_attribute = lambda device, attribute: 1
cuda_driver.granularity = lambda device: 2 << 20
cuda_driver.create_exportable = create_exportable
cuda_driver.export_fd = lambda handle: os.dup(handle)
cuda_driver.import_fd = import_fd
cuda_driver.map_for_device = map_for_device
cuda_driver.unmap = unmap
cuda_driver.release = release
vmm.check_canaries = host_canaries

layout = ipc.WorkspaceLayout(world, 8, 4096, 1024)
fds_before = len(os.listdir("/proc/self/fd"))
if case == "ok":
    ws = vmm.VmmWorkspace(comm, layout, 0)
    assert (ws.transport, ws.handles) == ("ipc", "virtual-memory") and ws.ptr == ws.peer_ptrs[rank]
    for k, p in enumerate(ws.peer_ptrs):
        ll = np.ctypeslib.as_array((ctypes.c_uint8 * layout.ll_bytes).from_address(p + layout.ll_off))
        assert (ll == 0xFF).all(), f"rank {k}'s LL slots are not the sentinel"
    comm.Barrier()
    ws.close()
    assert not mappings and not allocations and ws.peer_ptrs == []
else:
    try:
        vmm.VmmWorkspace(comm, layout, 0)
    except ipc.PeerAccessError as exc:
        assert "rank 0 cannot map rank 1's virtual-memory handle" in str(exc) and "planted" in str(exc), str(exc)
    else:
        raise AssertionError("no PeerAccessError although an import failed")
    assert not mappings and not allocations, "a failed set-up left mappings or handles behind"
assert len(os.listdir("/proc/self/fd")) == fds_before, "file descriptors leaked"
print(f"OK rank {rank}", flush=True)
