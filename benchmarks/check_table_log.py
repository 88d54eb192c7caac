#!/usr/bin/env python3
"""Check a log of ``flashcomm bench`` for a complete, readable table: no cut cell, no control code.

Usage::

    python benchmarks/check_table_log.py bench.log [more.log ...]

Prints ``OK: <n> rows, <k> line(s) per row`` per file, or one line per problem, and exits 1
when any file has a problem.  Standard library only, so it runs on any log from anywhere.

What it checks (the table format of ``flashcomm bench``: a header of column names, one line
of dashes per column, rows as plain text; a narrow width folds every row onto several lines
and the header folds the same way):

* no terminal control codes (escape sequences, carriage returns other than a terminal's CR LF
  line ends) and no ellipsis ``…``
  (the mark of a cell cut to fit);
* the table and its footer (``# OK``, ``# FAILED`` or ``# INTERRUPTED``) are present;
* every cell lies inside its column (the dashes give the spans) with a space on each side, so
  no text runs into a neighbour;
* every cell reads whole in its column's format: sizes like ``4K``, numbers, ``1.23x``
  speedups, ``ok``/``FAIL``, and so on -- a cut number would not parse.
"""
from __future__ import annotations

import re
import sys
from typing import Dict, List, Tuple

CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")  # everything but tab and newline
NUMBER = r"(-|nan|-?inf|-?\d+(\.\d+)?(e[-+]\d+)?)"
#: column -> full-match pattern of its cells ("" allowed where a row leaves it empty)
FORMATS: Dict[str, str] = {
    "size": r"(|\d+(\.\d+)?[KMGT]?)",
    "count": r"(|\d+)",
    "type": r"(|float16|bfloat16|float32)",
    "mode": r"\S.*",
    "algo": r"[a-z]+(/[a-z]+)?",
    "time(us)": NUMBER,
    "eager(us)": NUMBER,
    "algbw": NUMBER,
    "busbw": NUMBER,
    "speedup": r"(-|\d+\.\d\dx)",
    "floor(us)": NUMBER,
    "xfloor": NUMBER,
    "rel-RMS": NUMBER,
    "max-abs": NUMBER,
    "#wrong": r"(-|\d+)",
    "check": r"(-|ok|FAIL)",
}
REQUIRED = ("size", "mode", "algo", "time(us)", "algbw", "busbw", "speedup")
FOOTER = re.compile(r"^# (OK|FAILED|INTERRUPTED)\b")
#: lines a launcher or another rank may interleave with the table ("[mpiexec@host] ...",
#: "[rank 1] flashcomm: ...", "[host:pid] ..."): skipped, not table rows
CHATTER = re.compile(r"^(\[[^\]]*\]|flashcomm: |--------------------------------------)")
Span = Tuple[str, int, int]  # column name, start, end (exclusive)


def _spans(header: str, rule: str) -> List[Span]:
    """Columns of one header line, from the runs of dashes under it."""
    return [(header[m.start():m.end()].strip(), m.start(), m.end()) for m in re.finditer(r"-+", rule)]


def _cells(line: str, spans: List[Span], where: str, problems: List[str]) -> None:
    for name, start, end in spans:
        text = line[start:end]
        if (start > 0 and line[start - 1:start] not in ("", " ")) or line[end:end + 1] not in ("", " "):
            problems.append(f"{where}: the {name!r} cell runs past its column: {line.rstrip()!r}")
            continue
        pattern = FORMATS.get(name)
        cell = text.strip()
        if pattern is not None and not re.fullmatch(pattern, cell):
            problems.append(f"{where}: the {name!r} cell {cell!r} is not a whole value")


def check_log(text: str) -> Tuple[List[str], int, int]:
    """(problems, data rows, lines per row) of the bench table in ``text``."""
    problems: List[str] = []
    # a terminal's line discipline (Open MPI's per-rank pty, script(1)) ends lines with CR LF:
    # that is a line end, not a control code; a lone CR (a redrawn progress line) is
    lines = text.replace("\r\n", "\n").split("\n")
    for i, line in enumerate(lines):
        if CONTROL.search(line):
            problems.append(f"line {i + 1}: terminal control code {CONTROL.search(line).group()!r}")
        if "\u2026" in line:
            problems.append(f"line {i + 1}: ellipsis (a cut cell): {line.rstrip()!r}")
    start = next((i for i, line in enumerate(lines) if re.match(r"^\s*size\s", line)), None)
    if start is None:
        return problems + ["no bench table (no header line starting with 'size')"], 0, 0
    # header lines run until the first line of dashes; as many rule lines follow
    k = next((j for j in range(start, len(lines)) if re.fullmatch(r"[\s-]*-[\s-]*", lines[j])), None)
    if k is None:
        return problems + ["the table header has no line of dashes"], 0, 0
    nlines = k - start
    spans = [_spans(lines[start + j], lines[k + j]) for j in range(nlines)]
    names = [name for part in spans for name, _, _ in part]
    for name in REQUIRED:
        if name not in names:
            problems.append(f"column {name!r} missing from the header (found {names})")
    rows, body = 0, k + nlines
    record: List[int] = []
    end = None
    for i in range(body, len(lines)):
        line = lines[i]
        if FOOTER.match(line) or line.startswith("# geometric") or line.startswith("# FAILED "):
            end = i
            break
        if CHATTER.match(line):
            continue
        if not line.strip():
            if record:
                problems.append(f"line {i + 1}: a row ended after {len(record)} of {nlines} lines")
                record = []
            continue
        record.append(i)
        if len(record) == nlines:
            for j, idx in enumerate(record):
                _cells(lines[idx], spans[j], f"line {idx + 1}", problems)
            rows += 1
            record = []
    if end is None:
        problems.append("no footer (# OK / # FAILED / # INTERRUPTED): the table is incomplete")
    if rows == 0:
        problems.append("the table has no rows")
    return problems, rows, nlines


def main(argv: List[str]) -> int:
    if not argv:
        print(__doc__.split("\n\n")[1].strip(), file=sys.stderr)
        return 2
    status = 0
    for path in argv:
        with open(path, encoding="utf-8", errors="replace") as fh:
            problems, rows, nlines = check_log(fh.read())
        if problems:
            status = 1
            for p in problems:
                print(f"{path}: {p}")
        else:
            print(f"{path}: OK: {rows} rows, {nlines} line(s) per row")
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
