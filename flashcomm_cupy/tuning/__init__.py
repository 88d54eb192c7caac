"""Auto-dispatch tables: which algorithm and launch shape ``algo="auto"`` uses.

A table maps world size -> rows sorted by ``max_bytes``; the first row whose
``max_bytes`` is >= the message size applies.  Each row names, separately for
lossless and quantized modes, the algorithm ("oneshot", "twoshot" or "nccl"),
the launch shape (threads per block, blocks; 0 blocks = as many as the
message has tiles, up to the workspace's ``max_blocks``) and the signalling
protocol: "flag" (default) or "ll", where the data is its own signal
(``kernels_cu/fc_ll.cuh``; small and medium messages).  Where a row's choice
is LL, ``lossless_flag`` / ``quantized_flag`` hold the best flag-protocol
choice, for the calls LL cannot serve (a message too large for the LL slots).
Quantized rows are measured on INT4; where INT4 picks LL, ``quantized_wide``
holds what INT8 measured fastest with (an LL shape or the flag choice: INT6/INT8
units are 1.5-2x as large in LL form) and serves every mode with a step wider
than 4 bits, with ``quantized_wide_flag`` as its flag fallback; rows without it
send those modes to their flag choice.  An entry with ``"staged": true`` runs
the staged flag two-shot (reads through shared memory, pipelined one unit ahead:
``kernels_cu/fc_allreduce.cu``) for quantized modes on 16-bit data; where such a
row's INT4 choice is staged, ``quantized_wide`` holds INT8's faster of the
staged and the best plain flag choice.

Rows are keyed by world size ("2") for the IPC transport; the host transport
(:mod:`flashcomm_cupy.backends.host`, data over PCIe through host memory) has
rows of its own under "2/host" (:func:`world_key`), since NVLink measurements
say nothing about it.  A transport without rows for a world size gets the
built-in heuristics.

Where a table comes from, first match wins:

1. ``$FLASHCOMM_TUNING`` (a path),
2. ``~/.cache/flashcomm/tuning.json``, written by ``flashcomm tune``,
3. the table shipped in this package (``default.json``), measured on 4xH100,
4. built-in heuristics (below) for world sizes no table covers.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Dict, List, Optional

from .. import settings

SHIPPED = Path(__file__).with_name("default.json")
USER = Path(os.path.expanduser("~/.cache/flashcomm/tuning.json"))


PROTOCOLS = ("flag", "ll")


@dataclass(frozen=True)
class Choice:
    """Algorithm and launch shape; ``units`` = units (of the kernel's unit size) per thread per tile.

    ``protocol`` "ll" asks for the data-as-signal kernels; the backend falls
    back to the row's flag choice where they do not apply (messages larger
    than the LL slots).  ``staged`` asks for the flag two-shot that stages its
    reads in shared memory (``fc_twoshot_staged``); it serves quantized modes
    on 16-bit data, and the backend runs the plain flag two-shot elsewhere.
    """

    algo: str
    threads: int = 256
    blocks: int = 0
    units: int = 1
    protocol: str = "flag"
    staged: bool = False

    def __post_init__(self):
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {PROTOCOLS}, got {self.protocol!r}")


def heuristic(world: int, nbytes: int, lossless: bool) -> Choice:
    """Rules of thumb for tables that lack a world size.

    One-shot moves (world-1)x the bytes of two-shot but has one round trip
    instead of two, so it wins while latency dominates: vLLM's measured
    cut-over on H100 is 512 KB at 4 ranks and 256 KB at 8.
    """
    cut = 512 * 1024 if world <= 4 else 256 * 1024
    if nbytes <= cut:
        return Choice("oneshot", 128 if nbytes <= 64 * 1024 else 256, 0, 1, "ll" if lossless else "flag")
    # Large messages: several units per thread so each flag round trip moves more data.
    return Choice("twoshot", 512, 0, 4 if nbytes >= (16 << 20) else 1)


def world_key(world: int, transport: str = "ipc") -> str:
    """The ``worlds`` key of a world size's rows: "2" for IPC, "2/host" for the host transport."""
    return str(int(world)) if transport == "ipc" else f"{int(world)}/{transport}"


def _choice(c: dict) -> Choice:
    return Choice(c["algo"], int(c.get("threads", 256)), int(c.get("blocks", 0)), int(c.get("units", 1)),
                  str(c.get("protocol", "flag")), bool(c.get("staged", False)))


class TuningTable:
    """A loaded table plus where it came from."""

    def __init__(self, data: dict, source: str):
        self.data = data
        self.source = source
        #: IPC rows by world size; other transports' rows in ``transport_rows[transport][world]``
        self.rows: Dict[int, List[dict]] = {}
        self.transport_rows: Dict[str, Dict[int, List[dict]]] = {}
        for key, rows in data.get("worlds", {}).items():
            world, _, transport = str(key).partition("/")
            target = self.rows if transport in ("", "ipc") else self.transport_rows.setdefault(transport, {})
            target[int(world)] = sorted(rows, key=lambda r: r["max_bytes"])

    def choose(self, world: int, nbytes: int, lossless: bool, flag_only: bool = False,
               wide: bool = False, transport: str = "ipc") -> Choice:
        """The row's choice; ``flag_only``: its best flag-protocol choice (``<class>_flag``,
        recorded by ``flashcomm tune`` when the best was LL), for calls LL cannot serve.
        ``wide``: a quantized mode with an INT6/INT8 step: ``quantized_wide`` where the row has
        it, else the row's flag choice.  ``transport``: whose rows (see :func:`world_key`)."""
        rows = (self.rows if transport == "ipc" else self.transport_rows.get(transport, {})).get(int(world))
        if not rows:
            rule = heuristic(world, nbytes, lossless)
            return replace(rule, protocol="flag") if flag_only else rule
        row = next((r for r in rows if nbytes <= r["max_bytes"]), rows[-1])
        key = "lossless" if lossless else "quantized_wide" if wide and "quantized_wide" in row else "quantized"
        if wide and key == "quantized":
            flag_only = True  # a row from before INT8 was timed: INT4's LL shape is no guide for wider units
        entry = row[key]
        if flag_only and entry.get("protocol", "flag") == "ll":
            entry = row.get(key + "_flag") or dict(entry, protocol="flag")
        return _choice(entry)

    def digest(self) -> str:
        """Short hash of the table's rows: equal on ranks that dispatch alike."""
        import hashlib
        return hashlib.sha256(json.dumps(self.data.get("worlds", {}), sort_keys=True).encode()).hexdigest()[:12]

    def describe(self) -> dict:
        return {"source": self.source, "card": self.data.get("card"), "measured": self.data.get("date"),
                "worlds": sorted(self.rows),
                **{f"worlds_{t}": sorted(rows) for t, rows in sorted(self.transport_rows.items())}}

    def save(self, path: Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.data, indent=1, sort_keys=True) + "\n")


def load(path: Optional[str] = None) -> TuningTable:
    """The table in force (see the module docstring for the search order)."""
    candidates = [path, settings.value(settings.TUNING), USER, SHIPPED]
    for cand in candidates:
        if cand and Path(cand).is_file():
            with open(cand) as fh:
                return TuningTable(json.load(fh), str(cand))
    return TuningTable({}, "built-in heuristics")
