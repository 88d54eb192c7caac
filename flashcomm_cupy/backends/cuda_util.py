"""Small CUDA helpers shared by the GPU backends: device choice, timing, graphs, device facts."""
from __future__ import annotations

import socket

from .. import _mpi
from .base import Backend, Timer


def local_device_problem(nlocal: int, ndev: int):
    """Why the ``nlocal`` ranks of a host that each see ``ndev`` GPUs cannot get one GPU each
    (None when they can): either every rank sees at least one GPU per rank of the host (rank
    i takes GPU i), or each rank sees exactly one GPU, its own (``CUDA_VISIBLE_DEVICES`` set
    per rank, SLURM's ``--gpus-per-task=1``)."""
    if ndev == 0:
        return "no CUDA device visible to this process"
    if nlocal <= ndev or ndev == 1:
        return None
    return (f"{nlocal} ranks on this host but only {ndev} GPUs visible: run at most {ndev} ranks per host, "
            "or give each rank exactly one GPU of its own (CUDA_VISIBLE_DEVICES per rank)")


def select_device(mpi_comm, device=None) -> int:
    """Bind this process to its GPU (``device``, else local rank modulo the GPU count); collective.

    Raises RuntimeError on every rank when two ranks of a host would share a
    GPU: the flash kernels wait for all blocks of every rank to be resident
    at once, which two processes on one GPU cannot promise (NCCL refuses too).
    """
    import cupy
    ndev = cupy.cuda.runtime.getDeviceCount()
    problem = None
    if device is None:
        lr = _mpi.local_rank(mpi_comm)
        problem = local_device_problem(_mpi.local_size(mpi_comm), ndev)
        device = lr % max(ndev, 1)
    gpu = None
    if problem is None:
        try:  # a local failure must still reach the all-gather below, or the other ranks wait there
            cupy.cuda.Device(int(device)).use()
            gpu = cupy.cuda.runtime.deviceGetPCIBusId(int(device))
        except Exception as exc:
            problem = f"cannot use GPU {device} ({exc})"
    everyone = mpi_comm.allgather((socket.gethostname(), gpu, problem))
    problem = problem or next((f"rank {r}: {p}" for r, (_, _, p) in enumerate(everyone) if p), None)
    if problem is None:
        seen = {}
        for r, (host, bus, _) in enumerate(everyone):
            if bus is not None and (host, bus) in seen:
                problem = (f"ranks {seen[host, bus]} and {r} share the GPU at {bus} on {host}; "
                           "flashcomm needs one GPU per rank")
                break
            seen[host, bus] = r
    if problem is not None:
        raise RuntimeError(problem)
    return int(device)


def run_on_aligned_copies(x, out, stream, launch):
    """``launch(src, dst)`` on 16-byte aligned stand-ins of ``x`` and ``out`` (CuPy arrays; the
    kernels use 16-byte vector loads and stores), then ``out`` = ``dst``; returns ``out``.

    For callers whose ``x`` or ``out`` is misaligned (their aligned case launches directly).  The
    copies are made, used and freed on ``stream``, so CuPy's pool (per stream) hands them out
    again only to work queued after the kernel.  A CUDA graph would keep their pointers past
    that, so this raises inside capture."""
    import cupy
    if cupy.cuda.runtime.streamIsCapturing(stream.ptr):
        raise ValueError("flashcomm: x and out must be 16-byte aligned inside CUDA-graph capture "
                         f"(x at {x.data.ptr:#x}, out at {out.data.ptr:#x}): the aligned copies an "
                         "eager call makes would be freed while the graph still uses them")
    with stream:
        src = x if x.data.ptr % 16 == 0 else x.copy()
        dst = out if out.data.ptr % 16 == 0 else cupy.empty_like(out)
        launch(src, dst)
        if dst is not out:
            out[...] = dst
    return out


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
