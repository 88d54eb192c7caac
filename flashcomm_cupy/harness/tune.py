"""Measure the auto-dispatch table (``flashcomm tune``).

For each message size, every candidate (algorithm x threads x blocks) runs
the same graph-timed loop as ``flashcomm bench`` (:func:`.timing.measure`);
the fastest per size and class (lossless, quantized) becomes a row of a
:class:`flashcomm_cupy.backends.flash.table.TuningTable` (its ``narrow`` and ``lossless``
candidate lists: the fastest, then the best flag choice where the fastest is LL).  Quantized rows
are tuned on ``tune_bits`` (INT4 by default); where INT4 runs LL, INT8 is timed on the LL
candidates and the best flag choice too (:func:`wide_entries`), for the ``wide`` list of the modes
with a wider step; where INT4 runs the staged two-shot, INT8 is timed on it and on the best plain
flag choice.  Every timed launch is passed to the backend as ``force=`` (nothing is left set).
"""
from __future__ import annotations

import datetime
import itertools
from typing import Callable, Iterable, Optional

import numpy as np

from .. import codecs
from ..backends.flash import table as tuning
from ..backends.flash.plan import Force
from ..backends.flash.table import merge  # noqa: F401 - ``flashcomm tune`` merges through here
from ..config import Mode
from .timing import measure

ONESHOT_MAX_BYTES = 8 << 20  # one-shot sends (world-1)x the bytes: never a contender past this
SMALL_BYTES = 1 << 20
# Small messages fit in one tile: vary the spread over SMs.  Large ones: vary the data per sync.
SMALL_SHAPES = [(t, b, 1) for t, b in itertools.product((128, 256), (8, 16, 32, 64))]
LARGE_SHAPES = ([(512, 132, u) for u in (1, 2, 4)] +
                [(256, b, u) for b in (132, 264) for u in (1, 2, 4, 8)])
# LL kernels (lossless): blocks 0 = one 16-byte vector per thread, else a fixed spread.
LL_SHAPES = [(t, b, 1) for t in (128, 256, 512) for b in (0, 32, 132)]
# Quantized LL kernels: one tile per block, so threads x units sets the spread.
LLQ_SHAPES = [(t, 0, u) for t in (64, 128, 256) for u in (1, 2)]
# The staged flag two-shot (quantized, large messages): its shared memory allows at most
# two 256-thread blocks per SM, and fewer with wide codecs or many ranks (the backend caps blocks).
STAGED_SHAPES = [(256, b, u) for b in (132, 264) for u in (1, 2, 4, 8)]


def candidates(nbytes: int, lossless: bool, max_blocks: int):
    """(algo, threads, blocks, units, protocol, staged) to try for one message size and class.

    LL candidates the backend cannot run at this size are skipped by :func:`tune`.
    """
    algos = ["twoshot"] + (["oneshot"] if nbytes <= ONESHOT_MAX_BYTES else [])
    shapes = SMALL_SHAPES if nbytes <= SMALL_BYTES else LARGE_SHAPES
    for algo in algos:
        for threads, blocks, units in shapes:
            yield algo, threads, min(blocks, max_blocks), units, "flag", False
        if lossless:
            for threads, blocks, units in LL_SHAPES:
                yield algo, threads, min(blocks, max_blocks), units, "ll", False
        else:
            for threads, blocks, units in LLQ_SHAPES:
                yield algo, threads, blocks, units, "ll", False
    if not lossless and nbytes > SMALL_BYTES:
        for threads, blocks, units in STAGED_SHAPES:
            yield "twoshot", threads, min(blocks, max_blocks), units, "flag", True
    if lossless:
        yield "nccl", 0, 0, 0, "flag", False


def wide_entries(entries: list, flag_entry: dict, time_wide: Callable[[dict], Optional[float]]) -> list:
    """The ``wide`` candidates of a row whose INT4 best is LL (``entries``: every LL candidate)
    or the staged two-shot (``entries``: that choice); empty where nothing could be timed.

    INT6/INT8 units take 1.5-2x the bytes of INT4 in LL form and fill an LL slot
    (or a staging buffer) with fewer elements, so INT8 gets its own search: ``time_wide``
    (seconds, or None where LL cannot serve it) times it with every entry
    and with the best (plain) flag choice; the fastest serves those modes, followed by the
    flag choice where the fastest is LL (for the calls the LL kernels cannot serve).
    """
    t_flag = time_wide(flag_entry)
    best = None
    for entry in entries:
        t = time_wide(entry)
        if t is not None and (best is None or t < best[0]):
            best = (t, entry)
    if best is not None and (t_flag is None or best[0] < t_flag):
        fastest = dict(best[1], us=round(best[0] * 1e6, 2))
        return [fastest, flag_entry] if fastest["protocol"] == "ll" else [fastest]
    return [dict(flag_entry, us=round(t_flag * 1e6, 2))] if t_flag is not None else []


def tune(comm, sizes: Iterable[int], dtype=np.float16, tune_bits=4, iters: int = 20, repeats: int = 5,
         progress: Optional[Callable[[str], None]] = None, wide_bits: int = 8) -> dict:
    """Measure and return a tuning-table dict for this world size (collective)."""
    import cupy
    backend = comm.backend
    if backend.name != "gpu":
        raise RuntimeError("tuning needs the flash GPU backend")
    world = comm.world_size
    rows = []
    item = np.dtype(dtype).itemsize
    for nbytes in sizes:
        n = max(1, nbytes // item)
        x = cupy.asarray(np.random.default_rng([comm.rank, n]).standard_normal(n).astype(dtype))
        out = cupy.empty_like(x)

        def time_choice(launch: dict, bits):
            """Graph-timed seconds of one call with this launch (a table entry), or None where the
            LL or staged kernels it asks for cannot serve it."""
            algo, protocol = launch["algo"], launch["protocol"]
            mode = Mode.make(bits, 128, algo=algo)
            force = None if algo == "nccl" else Force.of(launch)
            ran = backend.resolve_protocol(nbytes, mode, item, force=force)
            if protocol == "ll" and ran != "ll":
                return None  # too large for the LL slots: the flag candidates cover it
            if launch.get("staged") and ran != "staged":
                return None  # float32, or too little shared memory: the plain kernel would run
            return measure(backend, comm.mpi_comm, lambda: backend.all_reduce(x, out, mode, dtype=dtype, force=force),
                           warmup=2, iters=iters, repeats=repeats, graph=True, eager=False).primary_s

        row = {"max_bytes": int(nbytes)}
        for cls, bits in ((codecs.LOSSLESS, None), (codecs.NARROW, tune_bits)):
            best = best_flag = best_plain = None
            ll_entries = []
            for algo, threads, blocks, units, protocol, staged in candidates(nbytes, bits is None,
                                                                             backend.ws.layout.max_blocks):
                shape = {"algo": algo, "threads": threads, "blocks": blocks, "units": units, "protocol": protocol}
                if staged:
                    shape["staged"] = True
                if protocol == "ll":
                    ll_entries.append(shape)
                t = time_choice(shape, bits)
                if t is None:
                    continue
                entry = (t, dict(shape, us=round(t * 1e6, 2)))
                if best is None or t < best[0]:
                    best = entry
                if protocol == "flag" and (best_flag is None or t < best_flag[0]):
                    best_flag = entry
                if protocol == "flag" and not staged and (best_plain is None or t < best_plain[0]):
                    best_plain = entry
            # the fastest, then (where it is LL) the best flag choice, for calls the LL kernels cannot serve
            row[cls] = [best[1]] + ([best_flag[1]] if best[1]["protocol"] == "ll" and best_flag else [])
            if cls == codecs.NARROW:
                wide = []
                if best[1]["protocol"] == "ll" and best_flag is not None and wide_bits:
                    wide = wide_entries(ll_entries, best_flag[1], lambda e: time_choice(e, wide_bits))
                elif best[1].get("staged") and wide_bits and best_plain is not None:
                    # INT8 takes more shared memory per unit (fewer blocks per SM): it may prefer the plain kernel
                    wide = wide_entries([best[1]], best_plain[1], lambda e: time_choice(e, wide_bits))
                # not timed on INT8: INT4's LL shape is no guide for wider units, its flag choices serve
                row[codecs.WIDE] = wide or [c for c in row[cls] if c["protocol"] != "ll"] or \
                    [dict({k: v for k, v in best[1].items() if k != "us"}, protocol="flag")]
            if progress:
                progress(f"{nbytes:>11} B {cls:9} -> {best[1]}")
                if cls == codecs.NARROW and wide:
                    progress(f"{nbytes:>11} B {'int' + str(wide_bits):9} -> {wide[0]}")
        rows.append(row)
        del x, out
    info = backend.describe()
    section = {"card": info.get("gpu"), "world": world, "transport": getattr(backend.ws, "transport", "ipc"),
               "date": datetime.date.today().isoformat(), "dtype": np.dtype(dtype).name,
               "tuned_bits": tune_bits, "wide_bits": wide_bits, "rows": rows}
    return {"format": tuning.FORMAT, "sections": [section]}

