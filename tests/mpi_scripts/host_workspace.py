"""Run under mpiexec: the host transport's workspace with CUDA faked, on CPUs.

``cuMemHostRegister`` is replaced by the identity (a device pointer equal to
the host address, as on every UVA system that reports
CAN_USE_HOST_POINTER_FOR_REGISTERED_MEM) and the canary kernel by host stores
through those pointers, so what is checked is the transport's own logic: the
segment, every rank's region at ``peers[k]``, the sentinel fill, the canary's
arrival in the owner's region, the agreement on failures, and close.
Usage: ``mpiexec -n K python -m mpi4py host_workspace.py CASE`` with CASE
``ok`` or ``register-fails`` (the last rank's registration fails).
"""
from __future__ import annotations

import ctypes
import sys

import numpy as np
from mpi4py import MPI

from flashcomm_cupy.backends import cuda_driver, host, ipc

comm = MPI.COMM_WORLD
rank, world = comm.Get_rank(), comm.Get_size()
case = sys.argv[1]
registered = []


def fake_register(address, nbytes):
    if case == "register-fails" and rank == world - 1:
        raise cuda_driver.CudaDriverError("cuMemHostRegister_v2 failed: planted (CUresult 2)")
    registered.append(address)
    return address


def host_canaries(mpi_comm, peer_ptrs, own_ptr):
    """check_canaries with host stores standing in for the kernel's."""
    for r, p in enumerate(peer_ptrs):
        if r != rank:
            ctypes.c_uint32.from_address(p + 4 * rank).value = 0xFC000000 | (rank << 8) | r
    mpi_comm.Barrier()
    mine = np.ctypeslib.as_array((ctypes.c_uint32 * ipc.MAX_RANKS).from_address(own_ptr))
    for r in range(world):
        want = 0 if r == rank else 0xFC000000 | (r << 8) | rank
        if int(mine[r]) != want:
            return f"rank {rank}: canary from rank {r} did not arrive (found {int(mine[r]):#x})"
    return None


cuda_driver.host_register = fake_register
cuda_driver.host_unregister = lambda address: registered.remove(address)
cuda_driver.device_attribute = lambda device, attribute: 1
host.check_canaries = host_canaries

layout = ipc.WorkspaceLayout(world, 8, 4096, 1024)
if case == "ok":
    ws = host.HostWorkspace(comm, layout, 0)
    assert ws.transport == "host" and len(ws.peer_ptrs) == world and ws.ptr == ws.peer_ptrs[rank]
    # every rank's region: zero flags, sentinel-filled LL slots, reachable through peers[k]
    for k, p in enumerate(ws.peer_ptrs):
        ll = np.ctypeslib.as_array((ctypes.c_uint8 * layout.ll_bytes).from_address(p + layout.ll_off))
        assert (ll == 0xFF).all(), f"rank {k}'s LL slots are not the sentinel"
        flags = np.ctypeslib.as_array((ctypes.c_uint8 * (layout.rs_off - layout.flags_off)).from_address(
            p + layout.flags_off))
        assert not flags.any(), f"rank {k}'s flags are not zero"
    # a store into a peer's slot lands in that peer's own view
    comm.Barrier()
    dst = (rank + 1) % world
    slot = ws.peer_ptrs[dst] + layout.rs_off + rank * layout.max_blocks * layout.slot_bytes
    ctypes.c_uint64.from_address(slot).value = 0xABCD0000 + rank
    comm.Barrier()
    src = (rank - 1) % world
    got = ctypes.c_uint64.from_address(ws.ptr + layout.rs_off + src * layout.max_blocks * layout.slot_bytes).value
    assert got == 0xABCD0000 + src, f"rank {rank} reads {got:#x} in rank {src}'s slot"
    comm.Barrier()
    ws.close()
    assert registered == [] and ws.peer_ptrs == [] and ws.ptr == 0
elif case == "register-fails":
    try:
        host.HostWorkspace(comm, layout, 0)
    except ipc.PeerAccessError as exc:
        text = str(exc)
        assert f"rank {world - 1} cannot register the shared segment with CUDA" in text and "planted" in text, text
    else:
        raise AssertionError("no PeerAccessError although a registration failed")
    assert registered == [], "a failed set-up left a registration behind"
print(f"OK rank {rank}", flush=True)
