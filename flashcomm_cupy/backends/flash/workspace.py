"""The flash backend's shared state on one rank: the transport's workspace, the host-mapped
error record the kernels fill when a wait fails, and the argument block every launch starts
from.  Opening is collective; :meth:`FlashWorkspace.close` frees whatever exists."""
from __future__ import annotations

import contextlib
import ctypes
import os

import numpy as np

from ..transport import open_workspace
from .layout import ARGS_DTYPE, ERROR_FIELDS, MAX_RANKS, WorkspaceLayout
from .plan import MIN_SLOT_BYTES

#: bytes of the host-mapped error record (FcError is eight uint32 words; the rest is spare)
ERROR_RECORD_BYTES = 64


def new_error_record() -> int:
    """A zeroed host-mapped error record (``ERROR_RECORD_BYTES``, portable and mapped, so every
    kernel of this rank writes it and the host reads it without a copy); free it with
    ``cupy.cuda.runtime.freeHost``."""
    import cupy
    ptr = cupy.cuda.runtime.hostAlloc(ERROR_RECORD_BYTES, 0x3)  # portable | mapped
    ctypes.memset(ptr, 0, ERROR_RECORD_BYTES)
    return ptr


def write_poison_peers(own_ptr: int, layout: WorkspaceLayout, peer_ptrs) -> None:
    """Store every rank's workspace base (as this rank maps it) in this rank's poison area at
    ``own_ptr``: the kernels' failure path poisons every rank through this table (fc_poison_all)."""
    import cupy
    bases = np.zeros(MAX_RANKS, dtype=np.uint64)
    bases[:len(peer_ptrs)] = peer_ptrs
    cupy.cuda.runtime.memcpy(own_ptr + layout.poison_peers_off, bases.ctypes.data, bases.nbytes,
                             cupy.cuda.runtime.memcpyDefault)


def base_args(layout: WorkspaceLayout, peer_ptrs, err_ptr: int, rank: int, timeout_s: float) -> np.ndarray:
    """One rank's FcArgs with every field but the per-call ones (pointers, size, mode, launch
    shape): the peers' workspace bases, the error record, every layout offset, rank, world and
    the wait bound."""
    args = np.zeros(1, dtype=ARGS_DTYPE)
    a = args[0]
    a["peers"][:len(peer_ptrs)] = peer_ptrs
    a["err"] = err_ptr
    layout.fill_args(a)
    a["rank"], a["world"] = rank, len(peer_ptrs)
    a["timeout_ns"] = int(timeout_s * 1e9)
    return args


class FlashWorkspace:
    """One rank's workspace over ``transport`` plus its error record and base argument block.

    ``args`` has every field but the per-call ones (pointers, size, mode, launch shape) filled:
    the peers' workspace bases, the error record, every layout offset, rank, world and timeout.
    """

    def __init__(self, comm, world: int, max_blocks: int, slot_bytes: int, device_id: int, transport: str,
                 timeout_s: float):
        self.ws = None
        self.err_ptr = 0
        self.error = (ctypes.c_uint32 * len(ERROR_FIELDS))()
        # Launches pick threads and units so one tile fits a slot (select_plan).
        # 48 KiB x 264 blocks x 4 regions is 200 MB per rank at 4 ranks.
        layout = WorkspaceLayout(world, int(max_blocks), max(int(slot_bytes), MIN_SLOT_BYTES))
        try:
            self.err_ptr = new_error_record()
            self.error = (ctypes.c_uint32 * len(ERROR_FIELDS)).from_address(self.err_ptr)
            self.ws = open_workspace(comm, layout, device_id, transport)
            rank = comm.Get_rank()
            write_poison_peers(self.ws.peer_ptrs[rank], layout, self.ws.peer_ptrs)
        except BaseException:
            self.close()
            raise
        self.args = base_args(layout, self.ws.peer_ptrs, self.err_ptr, rank, timeout_s)

    @property
    def layout(self) -> WorkspaceLayout:
        return self.ws.layout

    @property
    def transport(self) -> str:
        return self.ws.transport

    def failure(self):
        """The error record as a dict (``ERROR_FIELDS`` -> values), or None while it is empty."""
        return dict(zip(ERROR_FIELDS, self.error)) if self.error[0] else None

    def close(self) -> None:
        """Free the workspace (collective for the transports that share it) and the error record."""
        import cupy
        if self.ws is not None:
            self.ws.close()
            self.ws = None
        if self.err_ptr:
            cupy.cuda.runtime.freeHost(self.err_ptr)
            self.err_ptr = 0
            self.error = (ctypes.c_uint32 * len(ERROR_FIELDS))()  # no dangling view of freed memory


@contextlib.contextmanager
def environment(name: str, value: str):
    """``os.environ[name] = value`` for the block.  NCCL reads its settings when the first
    communicator of the process is created and keeps them, so this decides only for a
    process whose first NCCL communicator is created inside the block."""
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            del os.environ[name]
        else:
            os.environ[name] = old
