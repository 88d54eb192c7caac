"""The backends by name: what ``Communicator(backend=...)`` and every ``--backend`` accept.

One row per backend.  A new backend is a module under ``backends/`` and one :class:`BackendSpec`
here; the API, the CLI's choices and the relaunch decision (which needs to know whether a
backend runs on GPUs) all read this table.  Constructors are imported only when a backend is
made, so naming one never imports CuPy.
"""
from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from typing import Dict, Tuple


@dataclass(frozen=True)
class BackendSpec:
    """A backend: ``factory`` ("module:callable" under this package) builds it from ``(comm, **options)``."""

    name: str
    factory: str
    gpu: bool            # runs on CUDA GPUs (a relaunch runs one rank per GPU)
    summary: str

    def make(self, comm, **options):
        module, attr = self.factory.split(":")
        return getattr(importlib.import_module(module, __package__), attr)(comm, **options)


BACKENDS: Dict[str, BackendSpec] = {spec.name: spec for spec in (
    BackendSpec("gpu", ".hierarchical:make_cuda_backend", gpu=True,
                summary="the flash kernels (one node; hierarchical across nodes), NCCL "
                        "where they cannot run"),
    BackendSpec("cpu", ".cpu:CpuBackend", gpu=False,
                summary="the same algorithms in NumPy over MPI (no GPU needed)"),
    BackendSpec("nccl", ".nccl:NcclBackend", gpu=True,
                summary="NCCL's all-reduce (lossless modes only)"),
)}
#: "auto" picks "gpu" when CuPy sees a GPU, else "cpu"
AUTO = "auto"
#: how to get CuPy, for every message about its absence (the API's and the CLI's)
CUPY_HINT = 'pip install "flashcomm-cupy[cuda12]" (or [cuda13] for CUDA 13)'

#: every name a caller may pass
NAMES: Tuple[str, ...] = (AUTO,) + tuple(BACKENDS)


def gpu_available() -> bool:
    """True when CuPy imports and sees at least one CUDA device (never raises)."""
    try:
        import cupy
    except Exception:
        return False
    try:
        return bool(cupy.is_available()) and cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


def spec(name: str) -> BackendSpec:
    """The row of backend ``name`` ("auto" resolved on this process); ValueError naming the choices."""
    if name == AUTO:
        name = "gpu" if gpu_available() else "cpu"
    try:
        return BACKENDS[name]
    except KeyError:
        raise ValueError(f"backend must be one of {', '.join(NAMES)}, got {name!r}") from None


def needs_gpu(name: str) -> bool:
    """True for a backend named explicitly that runs on GPUs ("auto" decides by the host: False)."""
    return name in BACKENDS and BACKENDS[name].gpu


def make(name: str, comm, **options):
    """Backend ``name`` over ``comm`` (collective).  "auto" is decided on each rank (can it use a
    GPU?) and must come out the same everywhere: ranks on different backends would wait in
    different collectives, so they all raise instead, naming who chose what."""
    row = spec(name)
    if row.gpu and importlib.util.find_spec("cupy") is None:
        raise ImportError(f"backend {row.name!r} needs CuPy, which is not installed: {CUPY_HINT}")
    if name == AUTO and comm is not None and hasattr(comm, "allgather"):
        from .. import _mpi
        _mpi.agree(comm, {"backend": row.name}, "the backends picked for backend='auto' (a rank picks gpu where "
                                               "CuPy sees a GPU; pass backend= to choose)")
    return row.make(comm, **options)
