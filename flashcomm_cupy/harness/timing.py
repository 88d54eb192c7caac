"""Timing of back-to-back all-reduce calls, eager and as CUDA-graph replays.

Protocol (per message size and mode):

1. ``warmup`` eager calls, then a device synchronize.
2. ``repeats`` times: synchronize, barrier across ranks, time ``iters``
   back-to-back calls with ``backend.make_timer(stream)`` (CUDA events on the
   GPU, the wall clock on the CPU) and divide by ``iters``.
3. When graphs are requested and ``backend.capture_graph`` returns a replay
   function on every rank, the same with one replay of ``iters`` captured
   calls per repeat.  ``call`` must launch on CuPy's current stream (the
   capture makes its stream current); a replay that launches on a stream of
   its own says so with a ``stream`` attribute, and is timed on it.
4. Each rank takes the median of its repeats; the figure reported is the
   maximum of those medians across ranks (the slowest rank bounds an
   all-reduce).

Cross-rank reductions use the lowercase mpi4py API (``allgather``) of the
communicator we are given, so this module never imports mpi4py itself.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence


def median(values: Sequence[float]) -> float:
    """Median of a non-empty sequence."""
    if not values:
        raise ValueError("median of no values")
    return float(statistics.median(values))


def max_across_ranks(mpi_comm, value: float) -> float:
    """The largest ``value`` over all ranks of ``mpi_comm`` (collective)."""
    return float(max(mpi_comm.allgather(float(value))))


def sum_across_ranks(mpi_comm, value: int) -> int:
    """The sum of ``value`` over all ranks of ``mpi_comm`` (collective)."""
    return int(sum(mpi_comm.allgather(int(value))))


def all_ranks_true(mpi_comm, flag: bool) -> bool:
    """True when ``flag`` holds on every rank (collective)."""
    return all(mpi_comm.allgather(bool(flag)))


@dataclass(frozen=True)
class Timing:
    """Seconds per call, max over ranks of the per-rank median; None = not measured."""

    eager_s: Optional[float]
    graph_s: Optional[float]
    #: wall time of the eager call loop per call, max over ranks: the host's cost per call
    host_s: Optional[float] = None

    @property
    def primary_s(self) -> Optional[float]:
        """The graph figure when there is one, else the eager figure."""
        return self.graph_s if self.graph_s is not None else self.eager_s


def _align(backend) -> None:
    backend.synchronize()
    backend.barrier()


def time_repeats(backend, run_once: Callable[[], None], calls_per_run: int, repeats: int,
                 stream=None) -> List[float]:
    """Seconds per call of ``repeats`` timed runs of ``run_once`` (which makes ``calls_per_run`` calls)."""
    per_call = []
    for _ in range(repeats):
        _align(backend)
        timer = backend.make_timer(stream)
        timer.start()
        run_once()
        per_call.append(timer.stop() / calls_per_run)
    return per_call


def measure(backend, mpi_comm, call: Callable[[], None], *, warmup: int, iters: int, repeats: int,
            graph: bool, eager: bool, stream=None) -> Timing:
    """Time ``call`` (one all-reduce) as described in the module docstring (collective).

    ``eager`` asks for the eager figure even when a graph figure exists; the
    eager figure is always measured when there is no graph.
    """
    if iters < 1 or repeats < 1 or warmup < 0:
        raise ValueError("iters and repeats must be >= 1 and warmup >= 0")
    for _ in range(warmup):
        call()
    _align(backend)

    replay = None
    if graph:
        replay = backend.capture_graph(call, iters, stream)
        # Every rank must take the same branch or the barriers below mismatch.
        if not all_ranks_true(mpi_comm, replay is not None):
            replay = None
    graph_s = None
    if replay is not None:
        # A replay may run on a stream of its own (exposed as ``replay.stream``);
        # the timer's events must be recorded on the stream the graph runs on.
        graph_stream = getattr(replay, "stream", None) or stream
        replay()  # the first replay uploads the graph; keep it out of the figures
        local = median(time_repeats(backend, replay, iters, repeats, graph_stream))
        graph_s = max_across_ranks(mpi_comm, local)

    eager_s = host_s = None
    if replay is None or eager:
        host = []

        def run_eager():
            host.append(host_seconds_per_call(call, iters))
        local = median(time_repeats(backend, run_eager, iters, repeats, stream))
        eager_s = max_across_ranks(mpi_comm, local)
        host_s = max_across_ranks(mpi_comm, median(host))
    _align(backend)
    return Timing(eager_s=eager_s, graph_s=graph_s, host_s=host_s)


def host_seconds_per_call(call: Callable[[], None], iters: int) -> float:
    """Make ``iters`` back-to-back calls; return the wall time of the loop per call.

    GPU launches are asynchronous, so this is what each eager call costs the
    host (Python, the driver), not the GPU's pace; where calls finish before
    they return (the CPU backend) it equals the eager figure.
    """
    t0 = time.perf_counter()
    for _ in range(iters):
        call()
    return (time.perf_counter() - t0) / iters


def event_seconds_per_call(launch: Callable[[], None], iters: int, repeats: int,
                           before_each: Optional[Callable[[], None]] = None) -> List[float]:
    """GPU seconds per call of ``repeats`` runs of ``iters`` back-to-back ``launch()`` calls on
    CuPy's current stream, timed by CUDA events, after one warm-up call and a device synchronize;
    ``before_each`` runs before every timed run (e.g. an MPI barrier).  Without a communicator or a
    backend: for the one-GPU benchmarks (``benchmarks/node_solo.py``, ``benchmarks/hier_parts.py``;
    ``loopback_time.py`` and ``kernel_solo.py`` launch a CUDA graph of calls, ``iters=1``)."""
    import cupy
    launch()
    cupy.cuda.Device().synchronize()
    per_call = []
    for _ in range(repeats):
        if before_each is not None:
            before_each()
        start, stop = cupy.cuda.Event(), cupy.cuda.Event()
        start.record()
        for _ in range(iters):
            launch()
        stop.record()
        stop.synchronize()
        per_call.append(cupy.cuda.get_elapsed_time(start, stop) / 1e3 / iters)
    return per_call
