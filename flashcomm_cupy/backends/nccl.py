"""NCCL through ``cupy.cuda.nccl``: the baseline every flashcomm number is compared with."""
from __future__ import annotations

import time

import numpy as np

from ..config import Mode
from ..dtypes import dtype_name
from ..errors import FlashTimeoutError, resolve_timeout
from .cuda_util import CudaBackend, select_device

# ncclDataType_t values (nccl.h): float16 6, float32 7, bfloat16 9.
_NCCL_DTYPE = {"float16": 6, "float32": 7, "bfloat16": 9}
_NCCL_SUM = 0
# All-gathers also move raw bytes (wire chunks): ncclUint8 is 1.
_NCCL_GATHER_DTYPE = dict(_NCCL_DTYPE, uint8=1)


def nccl_unique_id_roundtrip(uid):
    """Normalise a unique id for MPI broadcast (bytes in CuPy 14, a tuple of ints in 13)."""
    return bytes(uid) if isinstance(uid, (bytes, bytearray)) else tuple(uid)


def wait_nccl_streams(handles, stream_ptrs, timeout_s: float, before_abort=None) -> None:
    """Wait until everything queued on ``stream_ptrs`` (None: every stream with NCCL calls of any
    of ``handles`` since their last wait) has finished.

    NCCL's own calls wait for their peers without a bound.  Past ``timeout_s``, every handle that
    holds an NCCL call on a stream still running is aborted (which ends its kernels: a stream's
    event cannot say which communicator's call hangs) and this raises
    :class:`FlashTimeoutError`; those handles refuse every later call.  Streams without NCCL
    calls are waited for without a bound (the flash kernels bound their own waits).
    ``before_abort``: called (once) before the first abort, e.g. to mark what the aborted calls
    leave behind as untrustworthy for the work queued after them.
    """
    import cupy
    if stream_ptrs is None:
        ptrs = sorted(set().union(*(h._pending for h in handles)))
    else:
        ptrs = list(stream_ptrs)
    if not ptrs:
        return
    events = []
    for ptr in ptrs:
        ev = cupy.cuda.Event(disable_timing=True)
        ev.record(cupy.cuda.ExternalStream(ptr))
        events.append((ptr, ev))
    deadline = time.monotonic() + timeout_s
    polls = 0
    for ptr, ev in events:
        while not ev.done:
            holders = [h for h in handles if ptr in h._pending]
            if holders and time.monotonic() > deadline:
                if before_abort is not None:
                    before_abort()
                for h in holders:
                    h.abort(f"flashcomm: an NCCL call did not complete within {timeout_s:g} s (a peer did "
                            "not make the same call); the NCCL communicator was aborted. Close this "
                            "communicator and create a new one.")
                raise FlashTimeoutError(holders[0].aborted)
            polls += 1
            time.sleep(0 if polls < 2000 else 1e-4)
        for h in handles:
            h._pending.discard(ptr)


class NcclCommunicatorHandle:
    """A ``cupy.cuda.nccl.NcclCommunicator`` bootstrapped over an MPI communicator."""

    def __init__(self, mpi_comm):
        from cupy.cuda import nccl
        if not nccl.available:
            raise RuntimeError("CuPy was built without NCCL; pip install nvidia-nccl-cu13 (or -cu12)")
        self.rank = mpi_comm.Get_rank()
        self.world_size = mpi_comm.Get_size()
        uid = nccl.get_unique_id() if self.rank == 0 else None
        uid = mpi_comm.bcast(nccl_unique_id_roundtrip(uid) if uid is not None else None, root=0)
        self.comm = nccl.NcclCommunicator(self.world_size, uid, self.rank)
        self.version = nccl.get_version()
        #: streams with NCCL calls queued since they were last waited for
        self._pending = set()
        self.aborted = None

    def all_reduce(self, x_ptr: int, out_ptr: int, count: int, dtype: str, stream_ptr: int):
        if self.aborted:
            raise FlashTimeoutError(self.aborted)
        self.comm.allReduce(x_ptr, out_ptr, count, _NCCL_DTYPE[dtype], _NCCL_SUM, stream_ptr)
        self._pending.add(stream_ptr)

    def wait_streams(self, stream_ptrs, timeout_s: float) -> None:
        """Wait until everything queued on ``stream_ptrs`` (None: every stream with NCCL calls
        since the last wait) has finished; :func:`wait_nccl_streams` over this handle alone."""
        wait_nccl_streams([self], stream_ptrs, timeout_s)

    def abort(self, reason: str) -> None:
        """ncclCommAbort: end this communicator's pending kernels; every later call raises ``reason``."""
        self.aborted = reason
        if self.comm is not None:
            try:
                self.comm.abort()
            except Exception:  # pragma: no cover - already gone
                pass
            self.comm = None

    def all_gather(self, send_ptr: int, recv_ptr: int, count: int, dtype: str, stream_ptr: int):
        """``ncclAllGather``: ``count`` items (``dtype`` "uint8" or a float name) from every rank,
        placed in rank order in the receive buffer."""
        if self.aborted:
            raise FlashTimeoutError(self.aborted)
        self.comm.allGather(send_ptr, recv_ptr, count, _NCCL_GATHER_DTYPE[dtype], stream_ptr)
        self._pending.add(stream_ptr)

    def close(self):
        if self.comm is not None:
            self.comm.destroy()
            self.comm = None


class NcclBackend(CudaBackend):
    """Plain NCCL all-reduce; flashcomm modes are not available here."""

    name = "nccl"
    baseline_algo = "nccl"

    #: options it takes (the flash backend's sizing options are accepted and have no effect)
    OPTIONS = ("device", "timeout_s", "validate", "workspace_bytes", "max_blocks")

    @classmethod
    def fallback(cls, comm, options: dict) -> "NcclBackend":
        """The NCCL backend standing in for another backend built with ``options``: the options it
        takes are kept (the device, the bound ``timeout_s``), the others dropped."""
        return cls(comm, **{k: v for k, v in options.items() if k in cls.OPTIONS})

    def __init__(self, comm, **options):
        unknown = set(options) - set(self.OPTIONS)
        if unknown:
            raise TypeError(f"unknown option(s) for the nccl backend: {sorted(unknown)}")
        self.mpi_comm = comm
        self.rank = comm.Get_rank()
        self.world_size = comm.Get_size()
        self.device_id = select_device(comm, options.get("device"))
        self.timeout_s = resolve_timeout(options.get("timeout_s"))
        self.nccl = NcclCommunicatorHandle(comm)

    def supported_algos(self):
        return ("nccl",)

    def resolve_algo(self, nbytes, mode: Mode, itemsize: int = 2) -> str:
        return "nccl"

    def all_reduce(self, x, out, mode: Mode, stream=None, dtype=None):
        import cupy
        if not mode.lossless and not mode.is_baseline:
            raise ValueError("the nccl backend only reduces losslessly (bits=None or algo='nccl')")
        stream = stream or cupy.cuda.get_current_stream()
        self.nccl.all_reduce(x.data.ptr, out.data.ptr, x.size, dtype_name(dtype or x.dtype), stream.ptr)
        return out

    def check(self):
        """Raise if an earlier bounded wait had to abort the NCCL communicator."""
        if self.nccl.aborted:
            raise FlashTimeoutError(self.nccl.aborted)

    def wait(self, stream):
        """Wait (bounded, see NcclCommunicatorHandle.wait_streams) for ``stream``'s work."""
        self.nccl.wait_streams([stream.ptr], self.timeout_s)

    def eager_launcher(self, n: int, name: str, mode: Mode):
        """``launch(x_ptr, out_ptr, stream_ptr) -> True`` for the communicator's eager cache
        (see ``FlashGpuBackend.eager_launcher``); None where ``all_reduce`` would raise."""
        if (not mode.lossless and not mode.is_baseline) or n == 0:
            return None
        call = self.nccl.all_reduce  # refuses after an abort; tracked for the bounded wait

        def launch(x_ptr, out_ptr, stream_ptr):
            if self.nccl.comm is None and not self.nccl.aborted:
                raise RuntimeError("this NCCL backend is closed")
            call(x_ptr, out_ptr, n, name, stream_ptr)
            return True
        return launch

    def synchronize(self):
        import cupy
        self.nccl.wait_streams(None, self.timeout_s)
        cupy.cuda.Device().synchronize()

    def close(self):
        self.nccl.close()


def nccl_dtype_supported(dt) -> bool:
    return dtype_name(np.dtype(dt)) in _NCCL_DTYPE
