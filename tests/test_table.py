"""The bench table at any width: no cut cell, no control code, rows printed as they finish.

The rows cover the widest texts a GPU run prints (256M sizes, nine-digit counts, long mode
labels, ``twoshot/staged``, eager and floor columns) and the odd values (nan, inf, missing).
Each rendering is read back by ``benchmarks/check_table_log.py``, the checker the GPU stage
runs on the device's log.
"""
from __future__ import annotations

import importlib.util
import io
from pathlib import Path

import pytest

from flashcomm_cupy.cli import report, table
from flashcomm_cupy.harness.results import BenchResult, Row

REPO = Path(__file__).resolve().parent.parent
WIDTHS = (40, 60, 80, 120, 200, None)
MODES = ["lossless", "int8 g128", "int4/8 g128 sym rot [oneshot]", "int4 g128"]
GPU_ALGOS = table.algo_texts(("oneshot", "twoshot", "nccl"), gpu=True)


def _checker():
    spec = importlib.util.spec_from_file_location("check_table_log", REPO / "benchmarks" / "check_table_log.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _row(size, mode, algo, protocol="", baseline=False, **values):
    base = dict(size_bytes=size, count=size // 2, dtype="bfloat16", mode=mode, bits="4", algo="auto",
                algo_resolved=algo, group_size=128, rotate=False, symmetric=False, baseline=baseline,
                time_us=3.1, graph_us=3.1, eager_us=12.25, algbw_gbps=1.32, busbw_gbps=1.32, speedup=1.0,
                floor_us=0.5, floor_ratio=6.2, check="reference", rel_rms=0.0712, max_abs=0.25, wrong=0,
                ok=True, protocol=protocol)
    base.update(values)
    return Row(**base)


def _result():
    rows = []
    for size in (4 << 10, 1 << 20, 256 << 20):
        rows.append(_row(size, "nccl", "nccl", baseline=True, wrong=None, rel_rms=2.2e-4))
        rows.append(_row(size, "lossless", "oneshot", "ll", time_us=6.7, speedup=12.5))
        rows.append(_row(size, "int8 g128", "twoshot", "staged", time_us=30612.4, algbw_gbps=0.000123,
                         busbw_gbps=1.23e-05, speedup=0.05))
        rows.append(_row(size, "int4/8 g128 sym rot [oneshot]", "oneshot", rel_rms=float("nan"),
                         max_abs=float("inf"), wrong=134217728 * 8, ok=False, failure="wrong"))
        rows.append(_row(size, "int4 g128", "twoshot", time_us=None, algbw_gbps=None, busbw_gbps=None,
                         speedup=None, floor_us=None, floor_ratio=None, check="off", rel_rms=None,
                         max_abs=None, wrong=None))
    meta = {"backend": "gpu", "baseline": "nccl", "world_size": 8, "dtype": "bfloat16",
            "config": {"counts": [r.count for r in rows if r.baseline], "modes": MODES, "graph": True,
                       "eager": True, "check": True, "peer_bw_gbps": 350.0, "extra": {"step_factor": 4}},
            "versions": {"cupy": "13.6.0"}, "ranks": [{"rank": 0, "host": "h", "pid": 1, "device": "GPU0"}]}
    return BenchResult(meta=meta, rows=rows)


def _cells(result):
    """Every cell text of every row, as the table columns make them."""
    cols = report.bench_columns_for(result.meta, result.rows)
    out, last = [], None
    for r in result.rows:
        first = r.size_bytes != last
        last = r.size_bytes
        out.append([c.cell(r, first) for c in cols if c.name not in ("count", "type")])
    return out


@pytest.mark.parametrize("width", WIDTHS)
def test_the_table_fits_every_width_and_no_cell_is_cut(width):
    result = _result()
    lines = report.bench_table_lines(result.meta, result.rows, width)
    text = "\n".join(lines)
    assert "\u2026" not in text and "\x1b" not in text and "\r" not in text
    if width is not None:
        assert max(map(len, lines)) <= width, text
    # every cell appears whole on the lines of its own row, which are the table's lines
    stream = table.StreamTable(report.bench_columns_for(result.meta, result.rows), width)
    for r, cells in zip(result.rows, _cells(result)):
        record = "\n".join(stream.row_lines(r))
        assert record.strip("\n") in text
        for c in cells:
            assert c in record, (c, record)
    footer = ["", "# OK"]
    problems, rows, nlines = _checker().check_log(text + "\n" + "\n".join(footer))
    assert problems == [] and rows == len(result.rows), problems


@pytest.mark.parametrize("width,layout", [(200, "wide"), (170, "compact"), (120, "folded"), (80, "folded"),
                                          (None, "wide")])
def test_the_layout_narrows_step_by_step(width, layout):
    result = _result()
    stream = table.StreamTable(report.bench_columns_for(result.meta, result.rows), width)
    assert stream.layout.name == layout
    notes = stream.note_lines("bfloat16", 2)
    assert bool(notes) == (layout != "wide")  # the moved columns are said, not lost


def test_a_value_wider_than_its_column_shifts_its_line_but_stays_whole():
    result = _result()
    huge = _row(4 << 10, "int8 g128", "twoshot", time_us=123456789012.0, speedup=123456.78)
    lines = report.bench_table_lines(result.meta, result.rows[:2] + [huge], 80)
    text = "\n".join(lines)
    assert "123456789012" in text and "123456.78x" in text


def test_the_printer_writes_each_row_when_it_finishes_without_control_codes():
    result = _result()
    out = io.StringIO()
    printer = report.BenchPrinter(result.meta, algos=GPU_ALGOS, enabled=True, stream=out, width=80)
    with printer:
        printer.header()
        seen = []
        for r in result.rows:
            before = out.getvalue()
            printer.row(r)
            seen.append(out.getvalue()[len(before):])
        printer.footer(result)
    assert all(chunk.strip() for chunk in seen)  # a row is out as soon as it is known
    text = out.getvalue()
    assert "\x1b" not in text and "\r" not in text
    assert max(map(len, text.splitlines())) <= 80
    problems, rows, nlines = _checker().check_log(text)
    assert problems == [] and rows == len(result.rows) and nlines >= 2


def test_an_interrupted_run_keeps_its_rows_and_says_so():
    result = _result()
    out = io.StringIO()
    printer = report.BenchPrinter(result.meta, algos=GPU_ALGOS, enabled=True, stream=out, width=None)
    printer.header()
    done = BenchResult(meta=result.meta, rows=result.rows[:3])
    for r in done.rows:
        printer.row(r)
    printer.footer(done, interrupted=True)
    assert "# INTERRUPTED after 3 of 15 rows" in out.getvalue()
    problems, rows, _ = _checker().check_log(out.getvalue())
    assert problems == [] and rows == 3


def test_ranks_other_than_zero_print_nothing():
    out = io.StringIO()
    printer = report.BenchPrinter(_result().meta, algos=(), enabled=False, stream=out, width=80)
    printer.header()
    printer.row(_result().rows[0])
    assert out.getvalue() == ""


@pytest.mark.parametrize("bad,why", [
    ("  1K  nccl   nccl   327\u2026   1.0   1.0  1.00x\n", "ellipsis"),
    ("  1K  nccl   nccl   3.1   1.0   1.0  1.0\n", "'speedup'"),
    ("  1K  nccl   nccl   3.1   1.0   1.0  \x1b[32m1.00x\n", "control code"),
])
def test_the_checker_finds_cut_cells_and_control_codes(bad, why):
    head = ("size  mode   algo   time(us)  algbw  busbw  speedup\n"
            "----  -----  -----  --------  -----  -----  -------\n")
    problems, _, _ = _checker().check_log(head + bad + "# OK\n")
    assert any(why in p for p in problems), problems


def test_the_checker_rejects_a_log_without_table_or_footer():
    assert _checker().check_log("hello\n")[0] == ["no bench table (no header line starting with 'size')"]
    text = "\n".join(report.bench_table_lines(_result().meta, _result().rows, 80))
    assert any("no footer" in p for p in _checker().check_log(text)[0])


def test_prose_folds_at_word_boundaries():
    line = "# " + " ".join(["MPI_Alltoall/MPI_Allgather"] * 6)
    parts = report.fold_prose(line, 40)
    assert all(p.startswith("#") for p in parts)
    assert " ".join(p.lstrip("# ") for p in parts).split() == line[2:].split()


def test_eager_sweeps_show_the_host_time_of_each_eager_call_beside_it():
    """host(us) (the CPU cost of one eager call) sits next to eager(us) wherever eager is measured."""
    result = _result()
    result.rows[1] = _row(4 << 10, "lossless", "oneshot", "ll", eager_us=12.25, host_us=4.5)
    names = [c.name for c in report.bench_columns_for(result.meta, result.rows)]
    assert names[names.index("eager(us)") + 1] == "host(us)"
    lines = report.bench_table_lines(result.meta, result.rows[:2], None)
    assert "host(us)" in lines[0] and " 4.5 " in "\n".join(lines)
    graph_only = dict(result.meta, config=dict(result.meta["config"], eager=False))
    rows = [_row(4 << 10, "lossless", "oneshot", eager_us=None)]
    assert "host(us)" not in [c.name for c in report.bench_columns_for(graph_only, rows)]
