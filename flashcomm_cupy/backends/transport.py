"""Which transport carries the flash kernels' traffic, and opening its workspace.

A transport is where the ranks' workspaces live and how each rank gets a
device pointer to every peer's (the kernels are the same for all):

======  ==========================================================  ================================
name    workspaces                                                  needs
======  ==========================================================  ================================
ipc     device memory of each GPU, shared through legacy CUDA IPC   peer access (NVLink or PCIe P2P)
        handles, or through virtual-memory handles (POSIX file
        descriptors) where legacy handles cannot be opened (each
        rank sees only its own GPU)
host    one shared host-memory segment per node, registered with    nothing but one host
        CUDA: stores and loads cross PCIe
======  ==========================================================  ================================

``"auto"`` takes IPC wherever every pair of ranks has a peer path, proven by
the real-store canary (legacy handles first, then virtual-memory handles),
and the host transport where they do not.  The choice is for the whole job:
a slot's address is ``peers[owner] + offset``, one base per owner, so a
rank cannot receive some peers over IPC and others through host memory.
"""
from __future__ import annotations

from .. import settings
from .ipc import IpcWorkspace, PeerAccessError

TRANSPORTS = settings.TRANSPORTS
ENV_VAR = settings.TRANSPORT


def resolve_transport(transport=None) -> str:
    """``transport``, else ``$FLASHCOMM_TRANSPORT``, else "auto"; ValueError for anything else."""
    return settings.resolve(settings.TRANSPORT, transport, "transport")


def _candidates(transport: str):
    from .host import HostWorkspace
    from .vmm import VmmWorkspace
    ipc = [IpcWorkspace, VmmWorkspace]
    return {"ipc": ipc, "host": [HostWorkspace], "auto": ipc + [HostWorkspace]}[transport]


def open_workspace(comm, layout, device_id: int, transport: str = "auto"):
    """The first workspace of ``transport``'s candidates that every rank can use (collective).

    Raises :class:`.ipc.PeerAccessError` on every rank, naming each
    candidate's reason, when none works.
    """
    reasons = []
    for cls in _candidates(resolve_transport(transport)):
        try:
            return cls(comm, layout, device_id)
        except PeerAccessError as exc:
            reasons.append(f"{cls.transport} ({cls.handles}): {exc}")
    raise PeerAccessError("; ".join(reasons))


def describe(ws) -> str:
    """One phrase for ``info`` and the bench header, e.g. "ipc (virtual-memory handles)"."""
    return f"{ws.transport} ({ws.handles}{' handles' if ws.transport == 'ipc' else ''})"
