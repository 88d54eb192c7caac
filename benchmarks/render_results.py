#!/usr/bin/env python3
"""Render benchmarks/RESULTS.md from the JSON files in benchmarks/results/.

    python benchmarks/render_results.py [--results DIR] [--out FILE] [--check]

* ``flashcomm bench --json`` files (schema ``flashcomm.bench/1``) become one
  section each: the machine and command, then a table with one line per
  message size -- the baseline's time and, per mode, its time and speedup --
  and the outcome of the correctness check.
* Any other JSON with a ``rows`` list of flat objects (e.g. ``flashcomm
  model --json``) becomes a plain table of its rows; ``columns`` (a list of
  keys) picks and orders the columns when present.  Other files are listed
  as skipped.

When the output file already has the markers ``<!-- BEGIN GENERATED -->``
and ``<!-- END GENERATED -->`` only the text between them is replaced, so
hand-written prose around the tables survives.  ``--check`` exits 1 when the
file is not up to date instead of writing it.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from collections import OrderedDict
from pathlib import Path
from typing import List, Optional

HERE = Path(__file__).resolve().parent
BEGIN, END = "<!-- BEGIN GENERATED -->", "<!-- END GENERATED -->"
BENCH_SCHEMA = "flashcomm.bench/1"


def _size(nbytes: int) -> str:
    for suffix, unit in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if nbytes >= unit and nbytes % unit == 0:
            return f"{nbytes // unit}{suffix}"
    return str(nbytes)


def _num(value, fmt: str = "{:.1f}") -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return fmt.format(value)


def _table(header: List[str], rows: List[List[str]], align: Optional[List[str]] = None) -> List[str]:
    align = align or ["---:"] * len(header)
    out = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out


def _printable(value):
    """``value`` with control characters removed from every string in it (Open MPI's version
    string ends in a NUL, which would make the Markdown a binary file)."""
    if isinstance(value, str):
        return "".join(ch for ch in value if ch >= " " or ch in "\t\n")
    if isinstance(value, dict):
        return {k: _printable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_printable(v) for v in value]
    return value


def render_bench(name: str, data: dict) -> List[str]:
    """A section for one ``flashcomm bench`` result."""
    meta, rows = data.get("meta", {}), data.get("rows", [])
    versions = meta.get("versions", {})
    ver = ", ".join(f"{k} {' '.join(str(v).split())}" for k, v in versions.items() if v)
    cfg = meta.get("config", {})
    timing = "CUDA graph" if cfg.get("graph") and any(r.get("graph_us") for r in rows) else "eager"
    lines = [f"### {meta.get('world_size')} x {meta.get('card')} -- {meta.get('dtype')} ({name})", "",
             f"- machine `{meta.get('machine')}`, {meta.get('date')}, backend {meta.get('backend')} "
             f"vs {meta.get('baseline')}",
             f"- command: `{meta.get('command')}`",
             f"- timing: {timing}, {cfg.get('iters')} calls x {cfg.get('repeats')} repeats, median per "
             "rank, max over ranks; us per call",
             f"- versions: {ver}", ""]
    modes = list(OrderedDict.fromkeys(r["mode"] for r in rows if not r.get("baseline")))
    base = next((r["mode"] for r in rows if r.get("baseline")), "baseline")
    by_size: "OrderedDict[int, dict]" = OrderedDict()
    for r in rows:
        by_size.setdefault(r["size_bytes"], {})[r["mode"]] = r
    header = ["size", f"{base} us"] + [f"{m} us (speedup)" for m in modes]
    body = []
    for size, cells in by_size.items():
        line = [_size(size), _num(cells.get(base, {}).get("time_us"))]
        for m in modes:
            r = cells.get(m)
            if r is None:
                line.append("-")
                continue
            sp = r.get("speedup")
            flag = "" if r.get("ok", True) else " FAIL"
            line.append(f"{_num(r.get('time_us'))} ({_num(sp, '{:.2f}')}x){flag}")
        body.append(line)
    lines += _table(header, body)
    checked = [r for r in rows if r.get("check", "off") != "off"]
    failed = [r for r in rows if not r.get("ok", True)]
    lines.append("")
    if not checked:
        lines.append("Correctness check: off.")
    elif failed:
        lines.append(f"Correctness check: **{len(failed)} of {len(rows)} rows FAILED** "
                     + "; ".join(f"{_size(r['size_bytes'])} {r['mode']}: {r.get('failure')}" for r in failed))
    else:
        worst = OrderedDict()
        for r in checked:
            if not r.get("baseline") and isinstance(r.get("rel_rms"), (int, float)):
                worst[r["mode"]] = max(worst.get(r["mode"], 0.0), r["rel_rms"])
        errs = ", ".join(f"{m} {e:.2e}" for m, e in worst.items())
        ref_max = cfg.get("reference_max_bytes")
        upto = f" up to {_size(int(ref_max))}" if ref_max else ""
        lines.append(f"Correctness check: all {len(checked)} rows OK (flash modes bit-exact vs the "
                     f"reference{upto}, ranks identical); worst rel-RMS error vs exact: {errs}.")
    return lines + [""]


def render_generic(name: str, data: dict) -> List[str]:
    """A plain table of a result file's ``rows``."""
    rows = data.get("rows", [])
    columns = data.get("columns") or list(OrderedDict.fromkeys(k for r in rows for k in r))
    title = data.get("title") or data.get("kind") or name
    lines = [f"### {title} ({name})", ""]
    meta = data.get("meta", {})
    if isinstance(meta, dict) and meta.get("command"):
        lines += [f"- command: `{meta['command']}`", ""]
    fmt = lambda v: _num(v, "{:.4g}") if isinstance(v, float) else ("-" if v is None else str(v))  # noqa: E731
    lines += _table(columns, [[fmt(r.get(c)) for c in columns] for r in rows], ["---"] * len(columns))
    return lines + [""]


def render(results_dir: Path) -> str:
    """The generated Markdown for every JSON file in ``results_dir`` (sorted by name)."""
    files = sorted(results_dir.glob("*.json"))
    out = ["## Results", "",
           f"Generated by `python benchmarks/render_results.py` from {len(files)} file(s) in "
           f"`{results_dir.name}/`; do not edit between the markers.", ""]
    skipped = []
    for path in files:
        try:
            data = _printable(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, json.JSONDecodeError) as exc:
            skipped.append(f"{path.name} ({exc.__class__.__name__})")
            continue
        if isinstance(data, dict) and data.get("schema") == BENCH_SCHEMA:
            out += render_bench(path.name, data)
        elif isinstance(data, dict) and isinstance(data.get("rows"), list) and all(
                isinstance(r, dict) for r in data["rows"]):
            out += render_generic(path.name, data)
        else:
            skipped.append(f"{path.name} (no rows)")
    if skipped:
        out += ["Skipped: " + ", ".join(skipped), ""]
    return "\n".join(out).rstrip() + "\n"


def splice(existing: Optional[str], generated: str) -> str:
    """Put ``generated`` between the markers of ``existing`` (or make a new file)."""
    block = f"{BEGIN}\n{generated}{END}\n"
    if existing and BEGIN in existing and END in existing:
        head, rest = existing.split(BEGIN, 1)
        tail = rest.split(END, 1)[1]
        return head + block + tail.lstrip("\n")
    title = "# flashcomm benchmark results\n\n"
    return title + block


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=HERE / "results", help="directory of JSON files")
    parser.add_argument("--out", type=Path, default=HERE / "RESULTS.md", help="Markdown file to write")
    parser.add_argument("--check", action="store_true", help="exit 1 if --out is not up to date")
    args = parser.parse_args(argv)
    if not args.results.is_dir():
        print(f"render_results: no directory {args.results}", file=sys.stderr)
        return 2
    existing = args.out.read_text(encoding="utf-8") if args.out.exists() else None
    text = splice(existing, render(args.results))
    if args.check:
        if text != existing:
            print(f"render_results: {args.out} is out of date; run python benchmarks/render_results.py",
                  file=sys.stderr)
            return 1
        return 0
    args.out.write_text(text, encoding="utf-8")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
