"""The correctness sweep behind ``flashcomm verify``: every mode x dtype x length.

Each case is one out-of-place all-reduce on deterministic inputs, checked
like the benchmark's correctness pass (:class:`.correctness.SizeCheck`) with
the reference at every length, plus -- for flash modes -- one in-place call
whose result must be bit-identical to the out-of-place one.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

import numpy as np

from ..config import Mode
from ..dtypes import dtype_name
from . import checks, inputs
from .correctness import SizeCheck
from .sweep import baseline_mode, device_stream


@dataclass
class VerifyRow:
    """The outcome of one (dtype, length, mode) case."""

    dtype: str
    count: int
    mode: str
    bits: str
    algo: str
    algo_resolved: str
    group_size: int
    rotate: bool
    symmetric: bool
    baseline: bool
    rel_rms: Optional[float]
    max_abs: Optional[float]
    nonfinite: Optional[int]
    wrong: Optional[int]
    ranks_differ: Optional[int]
    inplace_wrong: Optional[int]
    bound: float
    ok: bool
    failure: str


def _inplace_mismatches(backend, mpi_comm, sizecheck: SizeCheck, mode: Mode, stream) -> int:
    """Elements (summed over ranks) where ``all_reduce(x, x)`` differs from the out-of-place result."""
    y = sizecheck.x.copy()
    backend.all_reduce(y, y, mode, stream=stream, dtype=sizecheck.dtype)
    backend.synchronize()
    local = checks.count_bit_mismatches(inputs.to_host(y, sizecheck.dtype),
                                        inputs.to_host(sizecheck.out, sizecheck.dtype))
    return int(sum(mpi_comm.allgather(local)))


def run_verify(comm, dtypes: Sequence, counts: Sequence[int], modes: Sequence[Mode],
               seed: int = 4321, inplace: bool = True,
               progress: Optional[Callable[[int, int, str], None]] = None) -> List[VerifyRow]:
    """Check the baseline and every mode in ``modes`` at every dtype and length (collective).

    Returns one :class:`VerifyRow` per case, identical on every rank.
    """
    backend, mpi_comm = comm.backend, comm.mpi_comm
    all_modes = [baseline_mode(backend)] + [m for m in modes if not m.is_baseline]
    stream = device_stream(backend.xp)
    total = len(dtypes) * len(counts) * len(all_modes)
    done = 0
    rows: List[VerifyRow] = []
    with (stream if stream is not None else contextlib.nullcontext()):
        for dt in dtypes:
            dt = np.dtype(dt)
            for count in counts:
                sc = SizeCheck(backend, mpi_comm, count, dt, seed, reference_max_bytes=1 << 62)
                for mode in all_modes:
                    nbytes = count * dt.itemsize
                    resolved = mode.algo if mode.is_baseline else backend.resolve_algo(nbytes, mode, dt.itemsize)
                    res = sc.run_and_check(mode, resolved, stream)
                    inplace_wrong = None
                    if inplace and not mode.is_baseline:
                        inplace_wrong = _inplace_mismatches(backend, mpi_comm, sc, mode, stream)
                    ok, failure = checks.verdict(mode, dt, res["rel_rms"], res["nonfinite"],
                                                 res["wrong"], res["ranks_differ"])
                    if inplace_wrong:
                        ok = False
                        failure = "; ".join(f for f in (failure, f"{inplace_wrong} in-place differ") if f)
                    rows.append(VerifyRow(
                        dtype=dtype_name(dt), count=count, mode=mode.label, bits=mode.bits_label,
                        algo=mode.algo, algo_resolved=resolved, group_size=mode.group_size,
                        rotate=mode.rotate, symmetric=mode.symmetric, baseline=mode.is_baseline,
                        rel_rms=res["rel_rms"], max_abs=res["max_abs"], nonfinite=res["nonfinite"],
                        wrong=res["wrong"], ranks_differ=res["ranks_differ"],
                        inplace_wrong=inplace_wrong, bound=checks.rel_rms_bound(mode, dt),
                        ok=ok, failure=failure))
                    done += 1
                    if progress is not None:
                        progress(done, total, f"{dtype_name(dt)} n={count} {mode.label}")
                sc.close()
    return rows
