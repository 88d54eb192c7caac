"""The flash GPU backend's entry point: :func:`make_gpu_backend`, the flash backend or NCCL.

The backend itself lives in :mod:`.flash` (``backend.py``: the class; ``plan.py``: kernel
selection; ``table.py``: the tuning table; ``layout.py``: workspace offsets; ``kernels.py``:
the device code; ``workspace.py``: the shared workspace).  The names below are re-exported for
the code that imported them from here.
"""
from __future__ import annotations

import warnings

from .flash.backend import FlashGpuBackend, Launch, error_from_record, resident_blocks  # noqa: F401
from .flash.plan import (ELEMS_PER_THREAD, LLQ_MAX_THREADS, LLQ_UNIT_ELEMS, SM_REGISTERS, STAGE_VECS,  # noqa: F401
                         Force, Limits, Plan, llq_threads, llq_unit_elems, select_plan, staged_twoshot_smem)
from .ipc import PeerAccessError
from .nccl import NcclBackend
from .. import codecs
from .transport import resolve_transport

#: bytes of one unit in the quantized LL form (FcLLq in fc_ll.cuh), by (unit elements, bits)
LLQ_UNIT_BYTES = {(e, b): c.ll_unit_bytes(e) for e in codecs.UNIT_ELEMS for b, c in codecs.CODECS.items()}


def staged_unit_chunks(bits: int, elems: int = ELEMS_PER_THREAD) -> int:
    """16-byte vectors of a warp's staged quantized unit (FcStaged<BITS>::CHUNKS in fc_quant.cuh)."""
    return codecs.spec(bits).staged_chunks(elems)


_warned = False


def make_gpu_backend(comm, **options):
    """The flash backend, or NCCL with one warning naming the reason when no transport works."""
    global _warned
    try:
        return FlashGpuBackend(comm, **options)
    except PeerAccessError as exc:
        if resolve_transport(options.get("transport")) != "auto":
            raise  # a transport asked for by name: say why it cannot run rather than run another
        if comm.Get_rank() == 0 and not _warned:
            warnings.warn(f"flashcomm: no transport for the flash kernels works here, falling back to NCCL: {exc}",
                          RuntimeWarning, stacklevel=3)
            _warned = True
        return NcclBackend.fallback(comm, options)
