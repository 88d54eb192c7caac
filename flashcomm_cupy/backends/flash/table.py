"""The tuning table: measured candidate launches per card, world size, transport and size.

Format (``"format": "flashcomm.tuning/2"``)::

    {"format": "flashcomm.tuning/2",
     "sections": [{"card": "NVIDIA H100 80GB HBM3", "world": 4, "transport": "ipc",
                   "date": ..., "dtype": "float16", "tuned_bits": 4, "wide_bits": 8, "note": ...,
                   "rows": [{"max_bytes": 4096,
                             "lossless": [choice, ...], "narrow": [...], "wide": [...]}, ...]}]}

A section's rows are sorted by ``max_bytes``; the first row whose ``max_bytes`` is >= the
message size applies (the last row past it).  Each row maps a class of modes (lossless;
``narrow``: quantized with 4-bit steps; ``wide``: a step wider than 4 bits, whose LL units are
1.5-2x as large, see :func:`flashcomm_cupy.codecs.tuning_class`) to an ORDERED list of
candidate choices: the first one the kernels can serve runs.  Today that means: a choice
asking for the LL protocol (data as its own signal, ``kernels_cu/fc_ll.cuh``) that the LL
slots cannot hold falls to the first flag-protocol choice after it; every list ends with
one.  A choice is an algorithm ("oneshot", "twoshot" or "nccl"), a launch shape (threads per
block, blocks, 0 = as many as the message has tiles; units per thread per tile), the protocol,
and ``staged`` (the flag two-shot staging its reads through shared memory, for quantized
16-bit data); ``us`` is the time it measured, for the reader.

Which section serves a call: the running card's for that world size and transport, else the
first section of another card with that world size and transport (so a card nobody tuned runs
on the measurements of the first card listed), else the built-in :func:`heuristic`.

Today's single-card format (``{"card": ..., "worlds": {"2": [rows], "2/host": [rows]}}`` with
``lossless``/``lossless_flag``/``quantized``/``quantized_flag``/``quantized_wide``/
``quantized_wide_flag`` keys, as shipped until 2026-11 and as written by older ``flashcomm tune``)
loads through :func:`upgrade`.

Where a table comes from, first match wins (:func:`load`): an explicit path,
``$FLASHCOMM_TUNING``, ``~/.cache/flashcomm/tuning.json`` (written by ``flashcomm tune``), the
table shipped in ``flashcomm_cupy/tuning/default.json``, then the heuristics alone.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from ... import codecs, settings

FORMAT = "flashcomm.tuning/2"
SHIPPED = Path(__file__).resolve().parents[2] / "tuning" / "default.json"
USER = Path(os.path.expanduser("~/.cache/flashcomm/tuning.json"))

PROTOCOLS = ("flag", "ll")
TRANSPORTS = ("ipc", "host")
#: the section keys that describe a measurement (copied through, not used to dispatch)
SECTION_META = ("date", "dtype", "tuned_bits", "wide_bits", "note")


@dataclass(frozen=True)
class Choice:
    """Algorithm and launch shape; ``units`` = units (of the kernel's unit size) per thread per tile.

    ``protocol`` "ll" asks for the data-as-signal kernels; ``staged`` for the flag two-shot that
    stages its reads in shared memory (``fc_twoshot_staged``), which serves quantized modes on
    16-bit data (the plain flag two-shot runs elsewhere).
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

    @classmethod
    def from_dict(cls, c: dict) -> "Choice":
        return cls(c["algo"], int(c.get("threads", 256)), int(c.get("blocks", 0)), int(c.get("units", 1)),
                   str(c.get("protocol", "flag")), bool(c.get("staged", False)))

    def to_dict(self) -> dict:
        d = asdict(self)
        if not self.staged:
            del d["staged"]
        return d


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


def with_flag_fallback(choices) -> Tuple[Choice, ...]:
    """``choices`` ending with a flag-protocol choice: where none is listed, the first choice
    with flags (its algorithm and shape) is appended."""
    choices = tuple(choices)
    if choices and not any(c.protocol == "flag" for c in choices):
        choices += (replace(choices[0], protocol="flag"),)
    return choices


def heuristic_candidates(world: int, nbytes: int, lossless: bool) -> Tuple[Choice, ...]:
    return with_flag_fallback([heuristic(world, nbytes, lossless)])


def world_key(world: int, transport: str = "ipc") -> str:
    """The old format's ``worlds`` key: "2" for IPC, "2/host" for the host transport."""
    return str(int(world)) if transport == "ipc" else f"{int(world)}/{transport}"


# ------------------------------------------------------------------ the old format
def _entry_list(entry: dict, flag: Optional[dict]) -> List[dict]:
    if entry.get("protocol", "flag") != "ll":
        return [entry]
    if flag is None:  # no flag choice recorded: the LL choice's algorithm and shape, with flags
        flag = {k: v for k, v in entry.items() if k != "us"}
        flag["protocol"] = "flag"
    return [entry, flag]


def upgrade_row(row: dict) -> dict:
    """One row of the single-card format as a row of class -> ordered candidate list."""
    out = {"max_bytes": int(row["max_bytes"])}
    if "lossless" in row:
        out["lossless"] = _entry_list(row["lossless"], row.get("lossless_flag"))
    if "quantized" in row:
        out["narrow"] = _entry_list(row["quantized"], row.get("quantized_flag"))
        if "quantized_wide" in row:
            out["wide"] = _entry_list(row["quantized_wide"], row.get("quantized_wide_flag"))
        else:  # a row from before INT8 was timed: INT4's LL shape is no guide, its flag choice serves
            out["wide"] = [e for e in out["narrow"] if e.get("protocol", "flag") != "ll"]
    return out


def upgrade(data: dict) -> dict:
    """A table in :data:`FORMAT`; ``data`` may be in it already or in the single-card format."""
    if not data:
        return {"format": FORMAT, "sections": []}
    if data.get("format") == FORMAT:
        return data
    if "sections" in data:
        raise ValueError(f"tuning table format {data.get('format')!r} is not {FORMAT!r}")
    meta = {k: data[k] for k in SECTION_META if k in data}
    sections = []
    for key, rows in data.get("worlds", {}).items():
        world, _, transport = str(key).partition("/")
        sections.append(dict(card=data.get("card"), world=int(world), transport=transport or "ipc", **meta,
                             rows=[upgrade_row(r) for r in sorted(rows, key=lambda r: r["max_bytes"])]))
    return {"format": FORMAT, "sections": sections}


# ------------------------------------------------------------------ the table
Rows = List[Tuple[int, Dict[str, Tuple[Choice, ...]]]]


class TuningTable:
    """A loaded table (any format) plus where it came from."""

    def __init__(self, data: dict, source: str):
        self.data = upgrade(data)
        self.source = source
        #: (card, world, transport) -> [(max_bytes, {class: candidates})] sorted by size, in file order
        self.sections: Dict[tuple, Rows] = {}
        for sec in self.data["sections"]:
            key = (sec.get("card"), int(sec["world"]), sec.get("transport", "ipc"))
            rows = sorted(sec["rows"], key=lambda r: r["max_bytes"])
            self.sections[key] = [
                (int(r["max_bytes"]), {cls: with_flag_fallback(Choice.from_dict(c) for c in r[cls])
                                       for cls in codecs.CLASSES if cls in r}) for r in rows]

    def section(self, world: int, transport: str = "ipc", card: Optional[str] = None):
        """The key of the section serving ``card`` at ``world`` ranks over ``transport``, or None:
        the card's own, else the first listed for that world size and transport."""
        mine = [k for k in self.sections if k[1] == int(world) and k[2] == transport]
        exact = [k for k in mine if k[0] == card]
        return (exact or mine or [None])[0]

    def candidates(self, world: int, nbytes: int, cls: str, transport: str = "ipc",
                   card: Optional[str] = None) -> Optional[Tuple[Choice, ...]]:
        """The ordered candidates of the row serving ``nbytes`` for mode class ``cls``
        (:func:`flashcomm_cupy.codecs.tuning_class`); None where no section covers the call."""
        key = self.section(world, transport, card)
        if key is None:
            return None
        rows = self.sections[key]
        for max_bytes, classes in rows:
            if nbytes <= max_bytes:
                return classes[cls]
        return rows[-1][1][cls]

    def choose(self, world: int, nbytes: int, lossless: bool, flag_only: bool = False, wide: bool = False,
               transport: str = "ipc", card: Optional[str] = None) -> Choice:
        """The first candidate (``flag_only``: the first flag-protocol one) for a lossless, narrow
        or (``wide``) wide mode, the heuristic where no section applies."""
        cls = codecs.LOSSLESS if lossless else codecs.WIDE if wide else codecs.NARROW
        cands = self.candidates(world, nbytes, cls, transport, card) or heuristic_candidates(world, nbytes, lossless)
        return next(c for c in cands if c.protocol == "flag") if flag_only else cands[0]

    @property
    def rows(self) -> Dict[int, Rows]:
        """IPC rows by world size (each world's first section): what ``describe`` lists."""
        out = {}
        for (card, world, transport), rows in self.sections.items():
            if transport == "ipc":
                out.setdefault(world, rows)
        return out

    def digest(self) -> str:
        """Short hash of the sections: equal on ranks that dispatch alike."""
        return hashlib.sha256(json.dumps(self.data["sections"], sort_keys=True).encode()).hexdigest()[:12]

    def describe(self) -> dict:
        cards = sorted({str(k[0]) for k in self.sections})
        out = {"source": self.source, "card": cards[0] if len(cards) == 1 else cards,
               "measured": max((s.get("date") or "" for s in self.data["sections"]), default=None) or None,
               "worlds": sorted({k[1] for k in self.sections if k[2] == "ipc"})}
        for t in sorted({k[2] for k in self.sections} - {"ipc"}):
            out[f"worlds_{t}"] = sorted({k[1] for k in self.sections if k[2] == t})
        return out

    def save(self, path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        # atomically: ranks of a later job (or of this one) may read it while it is written
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(dumps(self.data))
        os.replace(tmp, path)


def dumps(data: dict) -> str:
    """A table as written to disk: one candidate per line, so diffs of re-tuned rows stay readable."""
    data = upgrade(data)
    lines = ["{", f' "format": {json.dumps(FORMAT)},', ' "sections": [']
    for i, sec in enumerate(data["sections"]):
        first = ("card", "world", "transport")
        head = {k: sec.get(k, "ipc" if k == "transport" else None) for k in first}
        head.update(sorted((k, v) for k, v in sec.items() if k not in first + ("rows",)))
        lines.append("  {" + json.dumps(head)[1:-1] + ', "rows": [')
        for j, row in enumerate(sec["rows"]):
            lines.append(f'   {{"max_bytes": {int(row["max_bytes"])},')
            classes = [c for c in codecs.CLASSES if c in row]
            for k, cls in enumerate(classes):
                lines.append(f'    "{cls}": [')
                lines.append(",\n".join("     " + json.dumps(c, sort_keys=True) for c in row[cls]))
                lines.append("    ]" + ("," if k + 1 < len(classes) else ""))
            lines.append("   }" + ("," if j + 1 < len(sec["rows"]) else ""))
        lines.append("  ]}" + ("," if i + 1 < len(data["sections"]) else ""))
    lines += [" ]", "}"]
    return "\n".join(lines) + "\n"


def merge(base: dict, new: dict) -> dict:
    """``base`` updated with ``new`` (either format): per (card, world, transport) section,
    ``new``'s rows replace the rows within their size range and the rows outside it stay, so
    re-tuning a range of sizes keeps the rest; a section ``base`` lacks is appended.  The
    section's measurement notes become ``new``'s."""
    base, new = upgrade(base or {}), upgrade(new)
    sections = [dict(s) for s in base["sections"]]
    index = {(s.get("card"), int(s["world"]), s.get("transport", "ipc")): s for s in sections}
    for sec in new["sections"]:
        rows = sec["rows"]
        if not rows:
            continue
        key = (sec.get("card"), int(sec["world"]), sec.get("transport", "ipc"))
        old = index.get(key)
        if old is None:
            index[key] = dict(sec, rows=sorted(rows, key=lambda r: r["max_bytes"]))
            sections.append(index[key])
            continue
        lo, hi = min(r["max_bytes"] for r in rows), max(r["max_bytes"] for r in rows)
        # old rows inside the re-tuned range go, even off the new size grid (another -f)
        kept = {r["max_bytes"]: r for r in old["rows"] if not lo <= r["max_bytes"] <= hi}
        kept.update({r["max_bytes"]: r for r in rows})
        old.update({k: v for k, v in sec.items() if k != "rows"})
        old["rows"] = [kept[k] for k in sorted(kept)]
    return {"format": FORMAT, "sections": sections}


def load(path: Optional[str] = None) -> TuningTable:
    """The table in force (see the module docstring for the search order)."""
    for cand in (path, settings.value(settings.TUNING), USER, SHIPPED):
        if cand and Path(cand).is_file():
            with open(cand) as fh:
                return TuningTable(json.load(fh), str(cand))
    return TuningTable({}, "built-in heuristics")
