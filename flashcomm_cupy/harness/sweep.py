"""The benchmark sweep: every message size x (baseline + requested modes).

:func:`run_sweep` is collective: every rank of the communicator calls it
with the same :class:`SweepConfig` and gets the same rows back.  Per size it
allocates one deterministic input and one output, times each mode
(:mod:`.timing`), then -- separately from timing -- checks each mode with
one call on fresh inputs (:mod:`.correctness`).
"""
from __future__ import annotations

import contextlib
import itertools
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable, List, Optional, Sequence

import numpy as np

from ..config import Mode
from ..dtypes import dtype_name
from . import checks, inputs, metrics, timing
from .correctness import SizeCheck
from .results import Row
from .sizes import format_size

#: progress(done, total, description) -- called on every rank after each (size, mode)
Progress = Callable[[int, int, str], None]
#: on_row(row) -- called on every rank with each finished row (its speedup and check filled in)
OnRow = Callable[[Row], None]


@dataclass
class SweepConfig:
    """What to measure.  ``modes`` are the flash modes; the baseline is always added first."""

    counts: Sequence[int]
    dtype: np.dtype
    modes: Sequence[Mode]
    warmup: int = 5
    iters: int = 20
    repeats: int = 5
    graph: bool = True
    eager: bool = False
    check: bool = True
    reference_max_bytes: int = 16 << 20
    seed: int = 1234
    peer_bw_gbps: Optional[float] = None
    extra: dict = field(default_factory=dict)

    def as_meta(self) -> dict:
        d = asdict(self)
        d["dtype"] = dtype_name(self.dtype)
        d["modes"] = [m.label for m in self.modes]
        d["counts"] = list(self.counts)
        return d


def build_modes(bits: Iterable, algos: Iterable[str], rotate: Iterable[bool],
                symmetric: Iterable[bool], group_size: int) -> List[Mode]:
    """The flash modes of a sweep: ``bits x algos x rotate x symmetric``, in that order.

    Rotation and symmetry only apply to quantized modes, so a lossless
    ``bits`` contributes one mode per algorithm.  Duplicates are dropped.
    """
    modes: List[Mode] = []
    for b, algo, rot, sym in itertools.product(list(bits), list(algos), list(rotate), list(symmetric)):
        probe = Mode.make(b, group_size, False, False, algo)
        if probe.lossless:
            mode = probe
        else:
            mode = Mode.make(b, group_size, sym, rot, algo)
        if mode not in modes:
            modes.append(mode)
    return modes


def baseline_mode(backend) -> Mode:
    return Mode.make(None, algo=backend.baseline_algo)


def device_stream(xp):
    """A non-blocking stream for CuPy (graphs cannot be captured on the legacy stream); None for NumPy."""
    if xp is np:
        return None
    return xp.cuda.Stream(non_blocking=True)


def _row(size_bytes, count, dtype, mode, resolved, t: timing.Timing, world_size,
         baseline_s, peer_bw) -> Row:
    primary = t.primary_s
    floor = metrics.floor_seconds(mode, count, np.dtype(dtype).itemsize, world_size, peer_bw)
    algbw = metrics.algbw_gbps(size_bytes, primary) if primary else None
    return Row(
        size_bytes=size_bytes, count=count, dtype=dtype_name(dtype), mode=mode.label,
        bits=mode.bits_label, algo=mode.algo, algo_resolved=resolved, group_size=mode.group_size,
        rotate=mode.rotate, symmetric=mode.symmetric, baseline=mode.is_baseline,
        time_us=primary * 1e6 if primary else None,
        graph_us=t.graph_s * 1e6 if t.graph_s is not None else None,
        eager_us=t.eager_s * 1e6 if t.eager_s is not None else None,
        host_us=t.host_s * 1e6 if t.host_s is not None else None,
        algbw_gbps=algbw,
        busbw_gbps=metrics.busbw_gbps(algbw, world_size) if algbw is not None else None,
        speedup=(baseline_s / primary) if (baseline_s and primary) else None,
        floor_us=floor * 1e6 if floor is not None else None,
        floor_ratio=(primary / floor) if (floor and primary) else None,
    )


def _apply_check(row: Row, mode: Mode, dtype, result: dict) -> None:
    row.check = result["check"]
    row.rel_rms = result["rel_rms"]
    row.max_abs = result["max_abs"]
    row.nonfinite = result["nonfinite"]
    row.wrong = result["wrong"]
    row.ranks_differ = result["ranks_differ"]
    row.bound = checks.rel_rms_bound(mode, dtype)
    row.ok, row.failure = checks.verdict(mode, dtype, row.rel_rms, row.nonfinite,
                                         row.wrong, row.ranks_differ)


def run_sweep(comm, config: SweepConfig, progress: Optional[Progress] = None,
              on_row: Optional[OnRow] = None, interrupts=None) -> List[Row]:
    """Measure every size x mode of ``config`` on ``comm`` (a :class:`~flashcomm_cupy.Communicator`).

    Collective.  Rows come out grouped by size, baseline first, then the
    modes in ``config.modes`` order; ``on_row`` sees each one as soon as it
    is finished (so a caller can print it, and keep it when interrupted).
    ``interrupts`` (an entered :class:`.interrupts.AgreedInterrupts`) is checked
    before each row and after the last, so a Ctrl-C ends the sweep on every rank
    at the same row boundary.
    """
    backend = comm.backend
    modes = [baseline_mode(backend)] + [m for m in config.modes if not m.is_baseline]
    stream = device_stream(backend.xp)
    # Everything -- input generation, checks, the all-reduces -- runs on one
    # stream, so no cross-stream ordering is needed.
    with (stream if stream is not None else contextlib.nullcontext()):
        rows = _sweep_sizes(comm, config, modes, stream, progress, on_row, interrupts)
    return rows


def _sweep_sizes(comm, config, modes, stream, progress, on_row, interrupts=None) -> List[Row]:
    backend, mpi_comm = comm.backend, comm.mpi_comm
    xp, n = backend.xp, backend.world_size
    dtype = np.dtype(config.dtype)
    total = len(config.counts) * len(modes)
    done = 0
    rows: List[Row] = []
    for count in config.counts:
        nbytes = count * dtype.itemsize
        x = inputs.make_input(xp, config.seed, backend.rank, count, dtype)
        out = inputs.empty_output(xp, count, dtype)
        sizecheck = (SizeCheck(backend, mpi_comm, count, dtype, config.seed,
                               config.reference_max_bytes, x=x, out=out) if config.check else None)
        baseline_s = None
        for mode in modes:
            if interrupts is not None:
                interrupts.check()
            resolved = backend.resolve_algo(nbytes, mode, dtype.itemsize) if not mode.is_baseline else mode.algo

            # stream=None: the backend launches on CuPy's current stream, which is
            # ours here and the capture stream inside backend.capture_graph.
            def call(mode=mode):
                backend.all_reduce(x, out, mode, stream=None, dtype=dtype)

            t = timing.measure(backend, mpi_comm, call, warmup=config.warmup, iters=config.iters,
                               repeats=config.repeats, graph=config.graph, eager=config.eager,
                               stream=stream)
            if mode.is_baseline:
                baseline_s = t.primary_s
            row = _row(nbytes, count, dtype, mode, resolved, t, n, baseline_s, config.peer_bw_gbps)
            if not mode.is_baseline:
                row.protocol = backend.resolve_protocol(nbytes, mode, dtype.itemsize)
            if sizecheck is not None:
                _apply_check(row, mode, dtype, sizecheck.run_and_check(mode, resolved, stream))
            rows.append(row)
            if on_row is not None:
                on_row(row)
            done += 1
            if progress is not None:
                progress(done, total, f"{format_size(nbytes)} {mode.label}")
        if sizecheck is not None:
            sizecheck.close()
        del x, out
    if interrupts is not None:
        interrupts.check()  # a Ctrl-C during the last row ends the sweep as interrupted too
    return rows
