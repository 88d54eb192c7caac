"""Timing of one forward step across ranks, and the error between two final hidden states.

Method (the same for every mode, so ratios are fair):

* ``warmup`` untimed runs (they also compile kernels and fill CuPy's memory
  pool, which a CUDA graph capture needs: it must not allocate from the
  driver while capturing).
* Optionally the step is captured once into a CUDA graph through
  ``backend.capture_graph`` and replayed; decode steps are otherwise bound by
  Python's kernel-launch rate, not by the GPU.
* ``repeats`` timed runs, each started after a device synchronize and a host
  barrier so that ranks start together; each run is timed with the backend's
  timer (CUDA events on the step's stream on the GPU, the wall clock on the
  CPU).
* A rank's time is the median of its runs; the reported time is the maximum
  over ranks (the step is done when the slowest rank is).
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Callable, List, Optional

import numpy as np


@dataclass
class StepTiming:
    """Seconds: ``median`` (max over ranks of each rank's median), per-rank medians, whether a graph ran."""

    median: float
    rank_medians: List[float]
    graph: bool
    output: object
    graph_error: Optional[str] = None


def time_step(step: Callable[[], object], backend, mpi_comm, stream=None, warmup: int = 1,
              repeats: int = 5, use_graph: bool = False) -> StepTiming:
    """Time ``step`` (which returns the step's output array) on every rank; collective.

    ``output`` is the result of the last timed run.  When ``use_graph`` is
    set but the backend cannot capture (the CPU backend, or a capture error),
    on any rank, every rank runs the step eagerly and ``graph`` is False.
    """
    if repeats < 1:
        raise ValueError("repeats must be at least 1")
    holder = [None]

    def run():
        holder[0] = step()

    # A graph capture must find its buffers in CuPy's pool: the second warm-up
    # run frees the first one's output while the captured run allocates its own.
    for _ in range(max(2 if use_graph else 1, warmup)):
        run()
    replay, error = _capture(run, backend, stream) if use_graph else (None, None)
    if use_graph:
        states = mpi_comm.allgather((replay is not None, error))
        if not all(ok for ok, _ in states):
            replay = None  # all ranks run the same way, or the collectives' pacing differs
            error = next((e for _, e in states if e is not None), None)
    go = replay if replay is not None else run
    # A backend may replay its graph on a stream of its own (``replay.stream``): time that one.
    timed_stream = getattr(replay, "stream", stream) if replay is not None else stream
    if replay is not None:
        go()  # one untimed replay: the first launch of a graph uploads it
    times = []
    for _ in range(repeats):
        backend.synchronize()
        backend.barrier()
        timer = backend.make_timer(timed_stream)
        timer.start()
        go()
        times.append(timer.stop())
    backend.synchronize()
    mine = statistics.median(times)
    medians = [float(t) for t in mpi_comm.allgather(mine)]
    return StepTiming(max(medians), medians, replay is not None, holder[0], error)


def _capture(run, backend, stream):
    """``(replay, None)``, or ``(None, why)`` when the backend cannot capture this step."""
    try:
        replay = backend.capture_graph(run, 1, stream)
    except Exception as exc:  # e.g. a collective that cannot be captured: run eagerly
        try:
            backend.synchronize()
        except Exception:
            pass
        return None, f"{type(exc).__name__}: {exc}"[:300]
    return replay, None  # None: this backend has no graphs (the CPU backend)


def relative_rms(xp, result, reference) -> float:
    """``rms(result - reference) / rms(reference)`` in float64 (nan if either is non-finite)."""
    a = result.astype(xp.float64)
    b = reference.astype(xp.float64)
    num = float(((a - b) ** 2).sum())
    den = float((b * b).sum())
    if not (np.isfinite(num) and np.isfinite(den)):
        return float("nan")
    if den == 0.0:
        return 0.0 if num == 0.0 else float("inf")
    return float(np.sqrt(num / den))


def all_finite(xp, x) -> bool:
    return bool(xp.isfinite(x).all())
