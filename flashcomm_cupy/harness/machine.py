"""Run metadata: versions, machine and per-rank device facts for results and ``flashcomm info``.

Everything is gathered from ``backend.describe()`` of every rank (collective)
plus the versions this process can see.  Keys a backend's ``describe()`` may
provide and this module looks for (the first present of each list wins):

* host: ``hostname``, ``host``; ``pid``
* device name: ``gpu``, ``device_name``, ``gpu_name`` (``device`` is a GPU index)
* ``pci_bus_id``; memory: ``memory_total_gib``, ``memory_bytes``; ``gpu_count``
* versions: ``cuda_driver``/``driver_version``, ``cuda_runtime``/``cuda_runtime_version``,
  ``cupy``/``cupy_version``, ``nccl_version``, ``mpi_library``/``mpi``
* for ``flashcomm info``: ``peer_access``, ``topology``, ``workspace_bytes``, ``tuning_table``
* ``transport`` (e.g. "host (shared memory)"), ``nccl_p2p_disabled`` (the baseline runs NCCL-SHM)
"""
from __future__ import annotations

import datetime
import os
import platform
import socket
import sys
from typing import Any, Dict, List, Optional

import numpy as np

from .. import __version__
from .. import _mpi

_HOST_KEYS = ("hostname", "host")
_DEVICE_KEYS = ("gpu", "device_name", "gpu_name")
_DRIVER_KEYS = ("cuda_driver", "driver_version")
_RUNTIME_KEYS = ("cuda_runtime", "cuda_runtime_version", "runtime_version")
_CUPY_KEYS = ("cupy", "cupy_version")
_MPI_KEYS = ("mpi_library", "mpi")


def first_key(d: dict, keys, default=None):
    """The value of the first of ``keys`` present (and not None) in ``d``."""
    for k in keys:
        if d.get(k) is not None:
            return d[k]
    return default


def gather_descriptions(backend, mpi_comm) -> List[dict]:
    """``describe()`` of every rank, in rank order, with hostname and pid filled in (collective)."""
    mine = dict(backend.describe())
    mine.setdefault("hostname", first_key(mine, _HOST_KEYS, socket.gethostname()))
    mine.setdefault("pid", os.getpid())
    mine.setdefault("rank", mpi_comm.Get_rank())
    mine.setdefault("cpu_affinity", _cpu_affinity())
    return mpi_comm.allgather(_plain(mine))


def _cpu_affinity() -> List[int]:
    """The CPU cores this process may run on."""
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return list(range(os.cpu_count() or 1))


def host_cores(descriptions: List[dict]) -> Dict[str, Dict[str, int]]:
    """Per host: ranks on it and distinct CPU cores they may run on (the union of their affinities).

    The union is right both without binding (every rank sees every core) and with one core bound
    per rank (Open MPI's default), so ``ranks > cores`` means ranks share a core.
    """
    hosts: Dict[str, Dict[str, Any]] = {}
    for d in descriptions:
        entry = hosts.setdefault(str(d.get("hostname")), {"ranks": 0, "cores": set()})
        entry["ranks"] += 1
        entry["cores"].update(d.get("cpu_affinity") or [])
    return {h: {"ranks": e["ranks"], "cores": len(e["cores"])} for h, e in hosts.items() if e["cores"]}


def _plain(obj):
    """A picklable, JSON-friendly copy (NumPy scalars and arrays become Python values)."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def _module_version(name: str) -> Optional[str]:
    try:
        module = __import__(name)
    except Exception:
        return None
    return str(getattr(module, "__version__", "unknown"))


def software_versions(desc0: Optional[dict] = None) -> Dict[str, Any]:
    """flashcomm, Python, NumPy, mpi4py, MPI library, CuPy, CUDA driver/runtime, NCCL.

    GPU facts come from rank 0's ``describe()`` when present (the backend
    knows them best); CuPy's version is read only if CuPy is already imported
    or importable.
    """
    d = desc0 or {}
    versions = {
        "flashcomm": __version__,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "mpi4py": _module_version("mpi4py"),
        "mpi": " ".join(str(first_key(d, _MPI_KEYS) or _mpi.library_version()).split()),
        "cupy": first_key(d, _CUPY_KEYS) or (_module_version("cupy") if "cupy" in sys.modules else None),
        "cuda_driver": first_key(d, _DRIVER_KEYS),
        "cuda_runtime": first_key(d, _RUNTIME_KEYS),
        "nccl": d.get("nccl_version"),
    }
    return versions


def device_label(desc: dict, backend_name: str) -> str:
    """The device name of one rank ('cpu' on the CPU backend)."""
    return str(first_key(desc, _DEVICE_KEYS, "cpu" if backend_name == "cpu" else "unknown"))


def rank_summary(desc: dict, backend_name: str) -> dict:
    """host, pid, device, PCI bus id and memory (GiB) of one rank (missing facts are None)."""
    memory = desc.get("memory_total_gib")
    if memory is None and desc.get("memory_bytes") is not None:
        memory = round(desc["memory_bytes"] / 2**30, 1)
    return {"rank": desc.get("rank"), "host": first_key(desc, _HOST_KEYS), "pid": desc.get("pid"),
            "device": device_label(desc, backend_name), "pci_bus_id": desc.get("pci_bus_id"),
            "memory_gib": memory}


def _gpu_count(d0: dict, descriptions: List[dict], backend_name: str):
    if d0.get("gpu_count") is not None:
        return d0["gpu_count"]
    if backend_name == "cpu":
        return 0
    devices = {(d.get("hostname"), d.get("pci_bus_id")) for d in descriptions if d.get("pci_bus_id")}
    return len(devices) or None


def run_meta(backend, descriptions: List[dict], command: str, dtype_name: str,
             config_meta: Optional[dict] = None) -> Dict[str, Any]:
    """The ``meta`` block of a result file."""
    d0 = descriptions[0] if descriptions else {}
    hosts = sorted({d.get("hostname") for d in descriptions if d.get("hostname")})
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "flashcomm_version": __version__,
        "backend": backend.name,
        "baseline": backend.baseline_algo,
        "world_size": backend.world_size,
        "nodes": d0.get("nodes"),  # e.g. "2 nodes x 2 ranks" where the backend knows its node layout
        "dtype": dtype_name,
        "machine": hosts[0] if len(hosts) == 1 else ",".join(hosts),
        "platform": platform.platform(),
        "card": device_label(d0, backend.name),
        "gpu_count": _gpu_count(d0, descriptions, backend.name),
        "versions": software_versions(d0),
        "ranks": [rank_summary(d, backend.name) for d in descriptions],
        "transport": d0.get("transport"),
        "nccl_p2p_disabled": d0.get("nccl_p2p_disabled"),
        "host_cores": host_cores(descriptions),
        "config": config_meta or {},
    }
