"""The bench table as plain text, printed one row at a time, that fits any width without cutting a cell.

nccl-tests prints each row as its size finishes, with ``printf`` and fixed
column widths.  We do the same, because the output must read well wherever it
goes: a terminal of any width, a pipe, a log file, Open MPI's forwarding (an
80-column pseudo-terminal per rank) and MPICH's (a pipe).  No control codes are
ever written here.

Column widths are fixed before the first row from what the sweep will print
(its sizes, counts, mode labels) and from the widest text each number format
produces.  A cell wider than its column (a number beyond that estimate) is
written whole and shifts the rest of its line: a table may lose alignment, it
never loses a digit.

:func:`choose_layout` picks one of three layouts for the available width:

* ``wide``: every column on one line, two spaces apart (``width`` None: no limit);
* ``compact``: the ``count`` and ``type`` columns move to a note above the
  table (the type is the same on every row; count = size / itemsize), one space
  apart;
* ``folded``: the compact columns, packed greedily into as many lines per row as
  the width needs, continuation lines indented; the header folds the same way so
  every cell stays under its name.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

from flashcomm_cupy.harness.results import Row
from flashcomm_cupy.harness.sizes import format_size

from . import report

#: widths that hold the widest text of each number format in :mod:`.report`
#: fmt_us: "9999.9", then "%.0f" of up to 8 digits; fmt_num: "0.000123", "1.23e-05", "12345";
#: fmt_err: "1.23e-05", "-inf"; fmt_speedup: "123.45x"
TIME_WIDTH = 8
NUM_WIDTH = 8
ERR_WIDTH = 8
SPEEDUP_WIDTH = 7
#: columns that move to a note in the compact and folded layouts
MOVABLE = ("count", "type")
FOLD_INDENT = "  "


@dataclass(frozen=True)
class Column:
    """One column: its heading, width, alignment, and how a row fills it (``first``: first row of its size)."""

    name: str
    width: int
    right: bool
    cell: Callable[[Row, bool], str]

    def fmt(self, text: str) -> str:
        return text.rjust(self.width) if self.right else text.ljust(self.width)


def algo_texts(supported_algos: Sequence[str], gpu: bool) -> List[str]:
    """Every text the algo column can show for a backend with these algorithms (its baseline included);
    the GPU kernels add their protocol ("/ll", "/staged", see :func:`report.algo_text`)."""
    texts = list(supported_algos)
    if gpu:
        texts += [f"{a}/ll" for a in supported_algos] + [f"{a}/staged" for a in supported_algos]
    return texts


def bench_columns(sizes: Sequence[int], counts: Sequence[int], dtype: str, mode_labels: Sequence[str],
                  algos: Sequence[str], *, eager: bool, floor: bool, check: bool,
                  wrong_max: int = 10 ** 6) -> List[Column]:
    """The bench table's columns, sized for these sizes, counts, modes and algorithm texts.

    ``eager``/``floor``/``check``: whether the sweep measures eager times (and their host
    time) next to graph times, a wire floor, and correctness -- columns nobody measured are left out.
    """
    def width(name: str, texts) -> int:
        return max([len(name)] + [len(t) for t in texts])

    def verdict(r: Row, first: bool) -> str:
        return report.DASH if r.check == "off" else ("ok" if r.ok else "FAIL")

    cols = [
        Column("size", width("size", map(format_size, sizes)), True,
               lambda r, first: format_size(r.size_bytes) if first else ""),
        Column("count", width("count", map(str, counts)), True, lambda r, first: str(r.count) if first else ""),
        Column("type", width("type", [dtype]), False, lambda r, first: r.dtype if first else ""),
        Column("mode", width("mode", mode_labels), False, lambda r, first: r.mode),
        Column("algo", width("algo", algos), False, lambda r, first: report.algo_text(r)),
        Column("time(us)", TIME_WIDTH, True, lambda r, first: report.fmt_us(r.time_us)),
    ]
    if eager:
        cols += [Column("eager(us)", max(9, TIME_WIDTH), True, lambda r, first: report.fmt_us(r.eager_us)),
                 # host wall time per eager call (what the launch costs the CPU), next to its eager time
                 Column("host(us)", max(8, TIME_WIDTH), True, lambda r, first: report.fmt_us(r.host_us))]
    cols += [
        Column("algbw", NUM_WIDTH, True, lambda r, first: report.fmt_num(r.algbw_gbps)),
        Column("busbw", NUM_WIDTH, True, lambda r, first: report.fmt_num(r.busbw_gbps)),
        Column("speedup", SPEEDUP_WIDTH, True, lambda r, first: report.fmt_speedup(r.speedup)),
    ]
    if floor:
        cols += [Column("floor(us)", max(9, TIME_WIDTH), True, lambda r, first: report.fmt_us(r.floor_us)),
                 Column("xfloor", NUM_WIDTH, True, lambda r, first: report.fmt_num(r.floor_ratio))]
    if check:
        cols += [Column("rel-RMS", ERR_WIDTH, True, lambda r, first: report.fmt_err(r.rel_rms)),
                 Column("max-abs", ERR_WIDTH, True, lambda r, first: report.fmt_err(r.max_abs)),
                 Column("#wrong", width("#wrong", [str(wrong_max)]), True,
                        lambda r, first: report.fmt_count(r.wrong)),
                 Column("check", len("check"), False, verdict)]
    return cols


@dataclass(frozen=True)
class Layout:
    """Which columns go on which line of a row, and the space between them."""

    name: str                       # "wide", "compact" or "folded"
    lines: List[List[Column]]
    sep: str
    moved: List[str]                # names of the columns moved to a note

    def line_width(self, i: int) -> int:
        cols = self.lines[i]
        indent = len(FOLD_INDENT) if i else 0
        return indent + sum(c.width for c in cols) + len(self.sep) * (len(cols) - 1)


def _one_line_width(cols: Sequence[Column], sep: str) -> int:
    return sum(c.width for c in cols) + len(sep) * (len(cols) - 1)


def choose_layout(columns: Sequence[Column], width: Optional[int]) -> Layout:
    """The widest layout that fits ``width`` columns of text (None: no limit); see the module docstring."""
    columns = list(columns)
    if width is None or _one_line_width(columns, "  ") <= width:
        return Layout("wide", [columns], "  ", [])
    kept = [c for c in columns if c.name not in MOVABLE]
    moved = [c.name for c in columns if c.name in MOVABLE]
    if _one_line_width(kept, " ") <= width:
        return Layout("compact", [kept], " ", moved)
    return Layout("folded", _fold(kept, width, "  "), "  ", moved)


def _fold(cols: List[Column], width: int, sep: str) -> List[List[Column]]:
    """Split ``cols`` into the fewest lines that fit ``width``, as even as possible (widest line smallest).

    Lines after the first are indented by :data:`FOLD_INDENT`.  When even one column per line
    does not fit, every column gets its own line (and overflows: it is never cut).
    """
    def line_width(i: int, part: Sequence[Column]) -> int:
        return (len(FOLD_INDENT) if i else 0) + _one_line_width(part, sep)

    for nlines in range(2, len(cols) + 1):
        best = None
        for cuts in itertools.combinations(range(1, len(cols)), nlines - 1):
            bounds = (0,) + cuts + (len(cols),)
            parts = [cols[bounds[i]:bounds[i + 1]] for i in range(nlines)]
            widest = max(line_width(i, p) for i, p in enumerate(parts))
            if widest <= width and (best is None or widest < best[0]):
                best = (widest, parts)
        if best is not None:
            return best[1]
    return [[c] for c in cols]


class StreamTable:
    """Renders the header once and each row as soon as it is known, as lists of plain lines."""

    def __init__(self, columns: Sequence[Column], width: Optional[int]):
        self.width = width
        self.layout = choose_layout(columns, width)
        self._last_size: Optional[int] = None

    def _join(self, i: int, texts: Sequence[str]) -> str:
        cols = self.layout.lines[i]
        body = self.layout.sep.join(c.fmt(t) for c, t in zip(cols, texts))
        return ((FOLD_INDENT if i else "") + body).rstrip()

    def note_lines(self, dtype: str, itemsize: int) -> List[str]:
        """What the compact layouts moved out of the table (empty for the wide one)."""
        if not self.layout.moved:
            return []
        return [f"# type {dtype} on every row; count = size / {itemsize} elements "
                f"(columns {', '.join(self.layout.moved)} left out to fit the width)"]

    def header_lines(self) -> List[str]:
        out = []
        for i, cols in enumerate(self.layout.lines):
            out.append(self._join(i, [c.name for c in cols]))
        for i, cols in enumerate(self.layout.lines):
            out.append(self._join(i, ["-" * c.width for c in cols]))
        return out

    def row_lines(self, row: Row) -> List[str]:
        """The lines of ``row``; a new size starts with a blank line (except the first)."""
        first = row.size_bytes != self._last_size
        out = [""] if first and self._last_size is not None else []
        self._last_size = row.size_bytes
        for i, cols in enumerate(self.layout.lines):
            out.append(self._join(i, [c.cell(row, first) for c in cols]))
        return out

    def text_lines(self, texts: Dict[str, str]) -> List[str]:
        """The lines of one row given as ``{column name: text}`` (for tables whose rows are not bench rows)."""
        return [self._join(i, [texts.get(c.name, "") for c in cols]) for i, cols in enumerate(self.layout.lines)]


def text_columns(names: Sequence[str], rows: Sequence[Sequence[str]], right: Sequence[bool]) -> List[Column]:
    """Columns sized to hold every text of ``rows`` (lists of cell texts in ``names`` order)."""
    return [Column(name, max([len(name)] + [len(r[i]) for r in rows]), right[i], lambda r, first: "")
            for i, name in enumerate(names)]


def plain_table(names: Sequence[str], rows: Sequence[Sequence[str]], right: Sequence[bool],
                width: Optional[int], groups: Optional[Sequence[object]] = None) -> List[str]:
    """A whole table of texts as lines that fit ``width`` (see :func:`choose_layout`); a blank line
    wherever ``groups[i]`` differs from the row before."""
    stream = StreamTable(text_columns(names, rows, right), width)
    out = stream.header_lines()
    for i, cells in enumerate(rows):
        if groups is not None and i and groups[i] != groups[i - 1]:
            out.append("")
        out += stream.text_lines(dict(zip(names, cells)))
    return out


def fold_text(text: str, width: Optional[int], indent: str) -> List[str]:
    """``text`` folded at word boundaries to ``width`` (None: as is), later lines after ``indent``;
    a word longer than the width stays whole."""
    import textwrap
    if width is None or len(text) <= width:
        return [text]
    return textwrap.wrap(text, width, subsequent_indent=indent, break_long_words=False,
                         break_on_hyphens=False) or [text]
