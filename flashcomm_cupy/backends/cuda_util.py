"""Small CUDA helpers shared by the GPU backends: device choice, timing, graphs, device facts."""
from __future__ import annotations

import socket

from .. import _mpi
from .base import Backend, Timer


def select_device(mpi_comm, device=None) -> int:
    """Bind this process to its GPU (``device`` or local rank modulo the GPU count)."""
    import cupy
    ndev = cupy.cuda.runtime.getDeviceCount()
    if ndev == 0:
        raise RuntimeError("no CUDA device visible to this process")
    if device is None:
        lr = _mpi.local_rank(mpi_comm)
        nlocal = _mpi.local_size(mpi_comm)
        if nlocal > ndev:
            raise RuntimeError(f"{nlocal} ranks on this host but only {ndev} GPUs; run at most {ndev} ranks per host")
        device = lr % ndev
    cupy.cuda.Device(int(device)).use()
    return int(device)


class CudaEventTimer(Timer):
    """CUDA events on a stream; ``stop()`` synchronizes and returns seconds."""

    def __init__(self, stream=None):
        import cupy
        self.stream = stream or cupy.cuda.get_current_stream()
        self.t0 = cupy.cuda.Event()
        self.t1 = cupy.cuda.Event()

    def start(self):
        self.t0.record(self.stream)

    def stop(self) -> float:
        import cupy
        self.t1.record(self.stream)
        self.t1.synchronize()
        return cupy.cuda.get_elapsed_time(self.t0, self.t1) / 1e3


def capture_graph(fn, iters: int):
    """Capture ``iters`` calls of ``fn`` on a fresh non-blocking stream.

    ``fn`` must launch on CuPy's current stream.  Returns ``replay()``,
    which launches the graph on the capture stream and returns that stream.
    """
    import cupy
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        stream.begin_capture()
        try:
            for _ in range(iters):
                fn()
        finally:
            graph = stream.end_capture()
    graph.upload(stream)

    def replay():
        graph.launch(stream)
        return stream

    replay.stream = stream
    replay.graph = graph
    return replay


def describe_device(device_id: int) -> dict:
    import cupy
    rt = cupy.cuda.runtime
    props = rt.getDeviceProperties(device_id)
    name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
    try:
        pci = rt.deviceGetPCIBusId(device_id)
    except Exception:  # pragma: no cover - driver dependent
        pci = "?"
    free, total = cupy.cuda.Device(device_id).mem_info
    return {
        "host": socket.gethostname(),
        "device": device_id,
        "gpu": name,
        "pci_bus_id": pci,
        "memory_total_gib": round(total / 2**30, 1),
        "memory_free_gib": round(free / 2**30, 1),
        "sm_count": props["multiProcessorCount"],
        "compute_capability": f"{props['major']}.{props['minor']}",
        "cuda_driver": rt.driverGetVersion(),
        "cuda_runtime": rt.runtimeGetVersion(),
        "cupy": cupy.__version__,
    }


class CudaBackend(Backend):
    """What every backend on CUDA GPUs shares: CuPy arrays, an MPI barrier, CUDA-event
    timers, graph capture, and the device facts of ``describe()``.

    Subclasses set ``mpi_comm``, ``rank``, ``world_size``, ``device_id`` and
    ``nccl`` (a :class:`.nccl.NcclCommunicatorHandle`).
    """

    @property
    def xp(self):
        import cupy
        return cupy

    def barrier(self):
        self.mpi_comm.Barrier()

    def make_timer(self, stream=None):
        return CudaEventTimer(stream)

    def capture_graph(self, fn, iters, stream=None):
        return capture_graph(fn, iters)

    def describe(self):
        info = describe_device(self.device_id)
        info.update(backend=self.name, rank=self.rank, world_size=self.world_size, nccl_version=self.nccl.version,
                    mpi=_mpi.library_version(self.mpi_comm))
        return info
