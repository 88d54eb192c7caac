"""NCCL through ``cupy.cuda.nccl``: the baseline every flashcomm number is compared with."""
from __future__ import annotations

import numpy as np

from ..config import Mode
from ..dtypes import dtype_name
from .cuda_util import CudaBackend, select_device

# ncclDataType_t values (nccl.h): float16 6, float32 7, bfloat16 9.
_NCCL_DTYPE = {"float16": 6, "float32": 7, "bfloat16": 9}
_NCCL_SUM = 0


def nccl_unique_id_roundtrip(uid):
    """Normalise a unique id for MPI broadcast (bytes in CuPy 14, a tuple of ints in 13)."""
    return bytes(uid) if isinstance(uid, (bytes, bytearray)) else tuple(uid)


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

    def all_reduce(self, x_ptr: int, out_ptr: int, count: int, dtype: str, stream_ptr: int):
        self.comm.allReduce(x_ptr, out_ptr, count, _NCCL_DTYPE[dtype], _NCCL_SUM, stream_ptr)

    def close(self):
        if self.comm is not None:
            self.comm.destroy()
            self.comm = None


class NcclBackend(CudaBackend):
    """Plain NCCL all-reduce; flashcomm modes are not available here."""

    name = "nccl"
    baseline_algo = "nccl"

    def __init__(self, comm, **options):
        unknown = set(options) - {"device", "timeout_s", "validate", "workspace_bytes", "max_blocks"}
        if unknown:
            raise TypeError(f"unknown option(s) for the nccl backend: {sorted(unknown)}")
        self.mpi_comm = comm
        self.rank = comm.Get_rank()
        self.world_size = comm.Get_size()
        self.device_id = select_device(comm, options.get("device"))
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

    def eager_launcher(self, n: int, name: str, mode: Mode):
        """``launch(x_ptr, out_ptr, stream_ptr) -> True`` for the communicator's eager cache
        (see ``FlashGpuBackend.eager_launcher``); None where ``all_reduce`` would raise."""
        if (not mode.lossless and not mode.is_baseline) or n == 0:
            return None
        call, nccl_dtype = self.nccl.comm.allReduce, _NCCL_DTYPE[name]

        def launch(x_ptr, out_ptr, stream_ptr):
            if self.nccl.comm is None:
                raise RuntimeError("this NCCL backend is closed")
            call(x_ptr, out_ptr, n, nccl_dtype, _NCCL_SUM, stream_ptr)
            return True
        return launch

    def synchronize(self):
        import cupy
        cupy.cuda.Device().synchronize()

    def close(self):
        self.nccl.close()


def nccl_dtype_supported(dt) -> bool:
    return dtype_name(np.dtype(dt)) in _NCCL_DTYPE
