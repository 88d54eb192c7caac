"""The benchmark result: one :class:`Row` per message size x mode, plus run metadata.

JSON layout (``schema`` = :data:`SCHEMA`)::

    {"schema": "flashcomm.bench/1", "kind": "bench",
     "meta": {date, command, flashcomm_version, backend, baseline, world_size,
              dtype, machine, platform, card, gpu_count, versions: {...},
              ranks: [describe() of each rank], config: {...},
              interrupted: true (Ctrl-C: the rows before it) | unfinished: true (rows so far)},
     "rows": [{size_bytes, count, dtype, mode, bits, algo, algo_resolved, ...}, ...]}

Every command's ``--json`` goes through :func:`write_document` (one convention for all six):
a ``schema`` ``flashcomm.<command>/1`` and ``kind`` first, and floats that are not finite
written as the strings ``"nan"``, ``"inf"`` and ``"-inf"`` so the file is strict JSON;
:func:`read_json` turns them back for bench rows.  CSV holds the rows only, one column per
:class:`Row` field.  Every file is written whole (:func:`write_whole`): a reader, or a job killed
while rank 0 writes, finds the previous version or the new one, never half of one.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
import shutil
import stat
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

SCHEMA = "flashcomm.bench/1"  # == schema_name("bench")


@dataclass
class Row:
    """Measurements of one message size under one mode (times in microseconds)."""

    size_bytes: int
    count: int
    dtype: str
    mode: str                      # Mode.label, e.g. "int4 g128" or "nccl"
    bits: str                      # "none", "8", "4/8"; "none" for the baseline
    algo: str                      # as requested ("auto", "oneshot", ...)
    algo_resolved: str             # what ran
    group_size: int
    rotate: bool
    symmetric: bool
    baseline: bool
    time_us: Optional[float] = None      # primary figure: graph when available, else eager
    graph_us: Optional[float] = None
    eager_us: Optional[float] = None
    host_us: Optional[float] = None      # host wall time per eager call (the eager loop before its sync)
    algbw_gbps: Optional[float] = None
    busbw_gbps: Optional[float] = None
    speedup: Optional[float] = None      # baseline time / this time, same size
    floor_us: Optional[float] = None     # wire bytes per rank / peer bandwidth
    floor_ratio: Optional[float] = None  # time_us / floor_us
    check: str = "off"                   # "reference", "exact" (error vs exact only) or "off"
    rel_rms: Optional[float] = None
    max_abs: Optional[float] = None
    nonfinite: Optional[int] = None
    wrong: Optional[int] = None          # elements != reference, summed over ranks
    ranks_differ: Optional[int] = None   # ranks whose output differs from rank 0's
    bound: Optional[float] = None        # rel-RMS bound applied
    ok: bool = True
    failure: str = ""
    protocol: str = ""                   # flash kernels' signalling: "flag", "ll", "staged"; "" for baselines


_ROW_FIELDS = [f.name for f in dataclasses.fields(Row)]
_ROW_TYPES = {f.name: f.type for f in dataclasses.fields(Row)}


@dataclass
class BenchResult:
    meta: Dict[str, Any] = field(default_factory=dict)
    rows: List[Row] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when every row passed its checks."""
        return all(r.ok for r in self.rows)

    @property
    def failures(self) -> List[Row]:
        return [r for r in self.rows if not r.ok]

    def to_dict(self) -> dict:
        return {"schema": SCHEMA, "kind": "bench", "meta": self.meta,
                "rows": [dataclasses.asdict(r) for r in self.rows]}

    @classmethod
    def from_dict(cls, data: dict) -> "BenchResult":
        if data.get("schema") != SCHEMA:
            raise ValueError(f"not a flashcomm bench result (schema {data.get('schema')!r}, want {SCHEMA!r})")
        rows = [Row(**{k: v for k, v in r.items() if k in _ROW_TYPES}) for r in data.get("rows", [])]
        return cls(meta=dict(data.get("meta", {})), rows=rows)


# ----------------------------------------------------------------------------- JSON
def _encode(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return "nan" if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, dict):
        return {str(k): _encode(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_encode(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item):  # numpy scalars
        return _encode(obj.item())
    return obj


_NONFINITE = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf")}


def _decode_row(row: dict) -> dict:
    return {k: (_NONFINITE[v] if isinstance(v, str) and v in _NONFINITE
                and "float" in str(_ROW_TYPES.get(k, "")) else v) for k, v in row.items()}


def schema_name(kind: str) -> str:
    """The schema of command ``kind``'s JSON file, e.g. ``flashcomm.verify/1``."""
    return f"flashcomm.{kind}/1"


def document(kind: str, body: Dict[str, Any]) -> Dict[str, Any]:
    """``body`` with ``schema`` and ``kind`` first (``body`` may not set them)."""
    return {"schema": schema_name(kind), "kind": kind, **body}


def dumps_document(doc: Dict[str, Any]) -> str:
    """Strict JSON text of ``doc`` (non-finite floats as strings, NumPy scalars as Python values)."""
    return json.dumps(_encode(doc), indent=1, allow_nan=False, default=str)


def replaceable(path) -> bool:
    """True where :func:`write_whole` replaces ``path`` in one step: a regular file named directly
    (not through a symbolic link such as ``/dev/stdout``), or a path that does not exist yet."""
    try:
        return stat.S_ISREG(os.lstat(os.fspath(path)).st_mode)
    except FileNotFoundError:
        return True


def write_whole(path, text: str) -> None:
    """Write ``text`` to ``path``.  Where it is :func:`replaceable`, a finished temporary file
    beside it (hidden, the old file's permissions) replaces it (``os.replace``), so a reader, or a
    job killed meanwhile, finds the old text or the new, never half of one; a killed write can leave
    only that hidden temporary file.  Anything else (a pipe, a terminal, ``/dev/stdout``, a link) is
    opened and written in place, as is a file whose directory does not let a new file be made."""
    path = os.fspath(path)
    if replaceable(path):
        folder, name = os.path.split(os.path.abspath(path))
        tmp = os.path.join(folder, f".{name}.{os.getpid()}.tmp")
        try:
            with open(tmp, "w", encoding="utf-8", newline="") as fh:
                fh.write(text)
            if os.path.exists(path):
                shutil.copymode(path, tmp)
            os.replace(tmp, path)
            return
        except PermissionError:  # a read-only directory: the file itself may still be writable
            pass
        finally:
            if os.path.exists(tmp):  # gone once replaced
                os.remove(tmp)
    with open(path, "w", encoding="utf-8", newline="") as fh:
        fh.write(text)


def write_document(path, kind: str, body: Dict[str, Any]) -> None:
    """Write ``body`` as command ``kind``'s JSON file (see the module docstring)."""
    write_whole(path, dumps_document(document(kind, body)) + "\n")


def _decode_all(obj):
    if isinstance(obj, str):
        return _NONFINITE.get(obj, obj)
    if isinstance(obj, dict):
        return {k: _decode_all(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_decode_all(v) for v in obj]
    return obj


def read_document(path) -> Dict[str, Any]:
    """A JSON file :func:`write_document` wrote, with ``"nan"``/``"inf"``/``"-inf"`` as floats again
    wherever they stand (for documents without a typed reader such as :func:`read_json`; a text field
    that is exactly one of those words would read back as a float too, and no document has one)."""
    with open(path, encoding="utf-8") as fh:
        return _decode_all(json.load(fh))


def dumps(result: BenchResult) -> str:
    """Strict JSON text of ``result``."""
    return dumps_document(result.to_dict())


def loads(text: str) -> BenchResult:
    data = json.loads(text)
    data["rows"] = [_decode_row(r) for r in data.get("rows", [])]
    return BenchResult.from_dict(data)


def write_json(result: BenchResult, path) -> None:
    write_whole(path, dumps(result) + "\n")


def read_json(path) -> BenchResult:
    with open(path, encoding="utf-8") as fh:
        return loads(fh.read())


# ----------------------------------------------------------------------------- CSV
def write_csv(result: BenchResult, path) -> None:
    """One header line (the :class:`Row` field names) and one line per row; None is empty."""
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=_ROW_FIELDS)
    writer.writeheader()
    for r in result.rows:
        writer.writerow({k: ("" if v is None else v) for k, v in dataclasses.asdict(r).items()})
    write_whole(path, text.getvalue())


def _parse_cell(name: str, text: str):
    kind = str(_ROW_TYPES[name])
    if text == "":
        return "" if kind == "str" else None
    if kind == "bool":
        return text == "True"
    if "int" in kind:
        return int(text)
    if "float" in kind:
        return float(text)
    return text


def read_csv(path) -> List[Row]:
    with open(path, newline="", encoding="utf-8") as fh:
        return [Row(**{k: _parse_cell(k, v) for k, v in rec.items() if k in _ROW_TYPES})
                for rec in csv.DictReader(fh)]
