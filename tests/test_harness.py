"""The benchmark harness: sizes, timing reduction, bandwidth and floor maths, checks,
result files, relaunch decisions, report rendering and RESULTS.md rendering.

Everything here runs in one process; the multi-rank wiring of the checks is
exercised for real under mpiexec at the end of the file.
"""
from __future__ import annotations

import importlib.util
import io
import json
import math
import os
import stat
from pathlib import Path

import numpy as np
import pytest

from flashcomm_cupy.backends.base import Backend, Timer
from flashcomm_cupy.config import Mode
from flashcomm_cupy.dtypes import bfloat16
from flashcomm_cupy.harness import checks, inputs, launch, metrics, timing
from flashcomm_cupy.harness.correctness import SizeCheck
from flashcomm_cupy.harness.results import (BenchResult, Row, dumps, loads, read_csv, read_json, write_csv,
                                            write_json)
from flashcomm_cupy.harness.sizes import format_size, parse_size, sweep_sizes
from flashcomm_cupy.harness.sweep import build_modes
from flashcomm_cupy.reference import flash_all_reduce_reference

REPO = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------- sizes
@pytest.mark.parametrize("text,expected", [("4096", 4096), ("4K", 4096), ("4k", 4096), ("256M", 256 << 20),
                                           ("1G", 1 << 30), ("1.5M", 3 << 19), ("64KiB", 64 << 10), (8, 8)])
def test_parse_size_uses_binary_suffixes_like_nccl_tests(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", ["", "4X", "-1K", "0", "K", "1e3"])
def test_parse_size_rejects_garbage(bad):
    with pytest.raises(ValueError):
        parse_size(bad)


def test_format_size_is_exact_and_short():
    assert [format_size(n) for n in (1024, 3 << 20, 1 << 30, 1000, 1536)] == ["1K", "3M", "1G", "1000", "1536"]


def test_sweep_sizes_multiplies_from_min_to_max_inclusive():
    sizes = sweep_sizes(1024, 64 << 10, 4, 2)
    assert [s.nbytes for s in sizes] == [1024, 4096, 16384, 65536]
    assert [s.count for s in sizes] == [512, 2048, 8192, 32768]


def test_sweep_sizes_rounds_down_to_whole_elements_and_drops_repeats():
    assert [s.count for s in sweep_sizes(3, 12, 2, 2)] == [1, 3, 6]          # 3, 6, 12 bytes of fp16
    assert [s.count for s in sweep_sizes(1, 4, 2, 4)] == [1]                  # 1, 2, 4 bytes: one fp32 each
    assert [s.nbytes for s in sweep_sizes(6, 12, 2, 4)] == [4, 12]


@pytest.mark.parametrize("args", [(0, 10, 2), (10, 5, 2), (1, 10, 1), (1, 10, 0.5)])
def test_sweep_sizes_rejects_bad_ranges(args):
    with pytest.raises(ValueError):
        sweep_sizes(*args, itemsize=2)


# ----------------------------------------------------------------------------- metrics
def test_algbw_is_bytes_per_second_in_decimal_gigabytes():
    assert metrics.algbw_gbps(2_000_000_000, 2.0) == pytest.approx(1.0)
    assert metrics.algbw_gbps(1 << 20, 10e-6) == pytest.approx((1 << 20) / 10e-6 / 1e9)


@pytest.mark.parametrize("n,factor", [(2, 1.0), (4, 1.5), (8, 1.75)])
def test_busbw_scales_algbw_by_2_n_minus_1_over_n(n, factor):
    assert metrics.busbw_gbps(100.0, n) == pytest.approx(100.0 * factor)


def test_wire_floor_counts_both_steps_of_n_minus_1_over_n_of_the_message():
    count, n = 1 << 20, 4
    lossless = Mode.make(None)
    # fp16 lossless: 2 steps x 2 bytes x 3/4 of the message
    assert metrics.wire_bytes_per_rank(lossless, count, 2, n) == pytest.approx(count * 4 * 0.75)
    # int4 g128 asymmetric: 0.5 B codes + 8 B (scale, min) per 128 elements, per step
    int4 = Mode.make(4, 128)
    per_elem = 2 * (0.5 + 8 / 128)
    assert metrics.wire_bytes_per_rank(int4, count, 2, n) == pytest.approx(count * per_elem * 0.75)
    # int4 RS / int8 AG, symmetric (scale only)
    mixed = Mode.make("4/8", 64, symmetric=True)
    assert metrics.wire_bytes_per_rank(mixed, count, 2, n) == pytest.approx(
        count * ((0.5 + 4 / 64) + (1 + 4 / 64)) * 0.75)
    # seconds = bytes / (GB/s * 1e9)
    assert metrics.floor_seconds(lossless, count, 2, n, 350.0) == pytest.approx(count * 3 / 350e9)
    assert metrics.floor_seconds(lossless, count, 2, n, None) is None
    assert metrics.floor_seconds(lossless, count, 2, 1, 350.0) is None


# ----------------------------------------------------------------------------- timing
class ScriptedComm:
    """The view of one rank: ``allgather`` returns this rank's value followed by scripted others."""

    def __init__(self, others=(), rank=0):
        self.others = list(others)
        self.rank = rank

    def Get_rank(self):
        return self.rank

    def Get_size(self):
        return 1 + len(self.others)

    def allgather(self, value):
        if self.others and isinstance(self.others[0], list):  # one script per call
            return [value] + self.others.pop(0)
        return [value] + list(self.others)

    def bcast(self, obj, root=0):
        return obj

    def Bcast(self, buf, root=0):
        pass


class ScriptedTimer(Timer):
    def __init__(self, script):
        self.script = script

    def start(self):
        pass

    def stop(self):
        return self.script.pop(0)


class ScriptedBackend(Backend):
    """Counts calls; its timers return scripted elapsed times; graphs optional."""

    name = "scripted"

    def __init__(self, elapsed, graphs=False):
        self.elapsed = list(elapsed)
        self.graphs = graphs
        self.calls = 0
        self.barriers = 0

    @property
    def xp(self):
        return np

    def supported_algos(self):
        return ("oneshot",)

    def resolve_algo(self, nbytes, mode, itemsize=2):
        return "oneshot"

    def all_reduce(self, x, out, mode, stream=None, dtype=None):
        return out

    def barrier(self):
        self.barriers += 1

    def make_timer(self, stream=None):
        return ScriptedTimer(self.elapsed)

    def capture_graph(self, fn, iters, stream=None):
        if not self.graphs:
            return None
        return lambda: [fn() for _ in range(iters)]


def test_median_of_repeats():
    assert timing.median([3.0, 1.0, 2.0]) == 2.0
    assert timing.median([4.0, 1.0, 2.0, 3.0]) == 2.5
    with pytest.raises(ValueError):
        timing.median([])


def test_max_and_sum_across_ranks_use_every_rank():
    assert timing.max_across_ranks(ScriptedComm([5.0, 2.0]), 3.0) == 5.0
    assert timing.max_across_ranks(ScriptedComm([1.0]), 3.0) == 3.0
    assert timing.sum_across_ranks(ScriptedComm([2, 3]), 1) == 6
    assert timing.all_ranks_true(ScriptedComm([True]), True)
    assert not timing.all_ranks_true(ScriptedComm([False]), True)


def test_eager_figure_is_the_median_repeat_per_call_then_the_max_over_ranks():
    calls = []
    backend = ScriptedBackend(elapsed=[0.030, 0.010, 0.020])  # three repeats of 10 calls
    slower_rank_median = 0.0035  # this rank: median 0.020 s / 10 calls = 0.002 s per call
    t = timing.measure(backend, ScriptedComm([slower_rank_median]), lambda: calls.append(1),
                       warmup=2, iters=10, repeats=3, graph=False, eager=False)
    assert t.graph_s is None
    assert t.eager_s == pytest.approx(slower_rank_median)
    assert len(calls) == 2 + 3 * 10


def test_this_ranks_median_wins_when_it_is_the_slowest():
    backend = ScriptedBackend(elapsed=[0.030, 0.010, 0.020])
    t = timing.measure(backend, ScriptedComm([0.0001]), lambda: None,
                       warmup=0, iters=10, repeats=3, graph=False, eager=False)
    assert t.eager_s == pytest.approx(0.002)
    assert t.primary_s == t.eager_s


def test_graph_figure_is_primary_and_eager_only_on_request():
    backend = ScriptedBackend(elapsed=[0.005, 0.004, 0.006], graphs=True)
    t = timing.measure(backend, ScriptedComm([[True], [0.0]]), lambda: None,
                       warmup=0, iters=2, repeats=3, graph=True, eager=False)
    assert t.graph_s == pytest.approx(0.0025) and t.eager_s is None and t.primary_s == t.graph_s

    backend = ScriptedBackend(elapsed=[0.005, 0.004, 0.006, 0.010, 0.010, 0.010], graphs=True)
    t = timing.measure(backend, ScriptedComm([[True], [0.0], [0.0]]), lambda: None,
                       warmup=0, iters=2, repeats=3, graph=True, eager=True)
    assert t.graph_s == pytest.approx(0.0025) and t.eager_s == pytest.approx(0.005)


def test_host_figure_times_the_eager_call_loop_alone():
    import time as _time
    backend = ScriptedBackend(elapsed=[1.0, 1.0, 1.0])  # the GPU clock says 1 s; the host loop is far shorter
    t = timing.measure(backend, ScriptedComm([[0.0], [0.0]]), lambda: _time.sleep(0.002),
                       warmup=0, iters=3, repeats=3, graph=False, eager=False)
    assert t.eager_s == pytest.approx(1.0 / 3)
    assert 0.002 <= t.host_s < t.eager_s


def test_graphs_are_skipped_everywhere_when_one_rank_has_none():
    backend = ScriptedBackend(elapsed=[0.004, 0.004, 0.004], graphs=True)
    t = timing.measure(backend, ScriptedComm([[False], [0.0]]), lambda: None,
                       warmup=0, iters=2, repeats=3, graph=True, eager=False)
    assert t.graph_s is None and t.eager_s == pytest.approx(0.002)


# ----------------------------------------------------------------------------- checks
def test_bit_mismatch_count_catches_one_planted_wrong_element():
    a = np.linspace(-3, 3, 1000).astype(np.float16)
    b = a.copy()
    assert checks.count_bit_mismatches(a, b) == 0
    b[417] = np.nextafter(b[417], np.float16(10))
    assert checks.count_bit_mismatches(a, b) == 1


def test_bit_mismatch_count_is_about_bits_not_values():
    a = np.array([0.0, np.nan, 1.0], dtype=np.float32)
    b = np.array([-0.0, np.nan, 1.0], dtype=np.float32)
    assert checks.count_bit_mismatches(a, b) == 1  # -0.0 differs; identical NaNs agree
    bf = np.array([1.0, 2.0], dtype=bfloat16)
    assert checks.count_bit_mismatches(bf, bf.copy()) == 0


def test_fingerprint_changes_with_any_element_or_its_position():
    a = np.arange(100, dtype=np.float16)
    fp = checks.fingerprint(np, a)
    assert checks.fingerprint(np, a.copy()) == fp
    b = a.copy()
    b[50] = 51
    assert checks.fingerprint(np, b) != fp
    c = a.copy()
    c[[3, 4]] = c[[4, 3]]  # same multiset, swapped positions
    assert checks.fingerprint(np, c) != fp


def test_error_vs_exact_gives_relative_rms_and_max_abs():
    exact = np.array([3.0, -4.0, 0.0, 0.0])
    result = exact + np.array([0.1, 0.0, -0.2, 0.0])
    e = checks.error_vs_exact(np, result, exact)
    assert e["rel_rms"] == pytest.approx(math.sqrt(0.05 / 4) / math.sqrt(25 / 4))
    assert e["max_abs"] == pytest.approx(0.2) and e["nonfinite"] == 0
    e = checks.error_vs_exact(np, np.array([1.0, np.inf]), np.array([1.0, 1.0]))
    assert e["nonfinite"] == 1 and math.isnan(e["rel_rms"])


def test_bounds_follow_the_narrowest_bit_width_and_the_dtype():
    assert checks.rel_rms_bound(Mode.make(8), np.float32) == pytest.approx(0.02, abs=1e-6)
    assert checks.rel_rms_bound(Mode.make(6), np.float32) == pytest.approx(0.06, abs=1e-6)
    assert checks.rel_rms_bound(Mode.make("4/8"), np.float32) == pytest.approx(0.30, abs=1e-6)
    assert checks.rel_rms_bound(Mode.make(None), np.float16) == 4 * 2.0 ** -10
    assert checks.rel_rms_bound(Mode.make(None, algo="mpi"), bfloat16) == 4 * 2.0 ** -7
    assert checks.rel_rms_bound(Mode.make(8), bfloat16) == pytest.approx(0.02 + 2.0 ** -7)


def test_verdict_fails_on_wrong_elements_errors_and_rank_disagreement():
    int8, base = Mode.make(8), Mode.make(None, algo="nccl")
    assert checks.verdict(int8, np.float16, 0.01, 0, 0, 0) == (True, "")
    ok, why = checks.verdict(int8, np.float16, 0.01, 0, 3, 0)
    assert not ok and "3 wrong" in why
    ok, why = checks.verdict(int8, np.float16, 0.05, 0, 0, 0)
    assert not ok and "rel-RMS" in why
    ok, why = checks.verdict(int8, np.float16, float("nan"), 2, None, 0)
    assert not ok and "non-finite" in why
    ok, why = checks.verdict(int8, np.float16, 0.01, 0, 0, 1)
    assert not ok and "differ" in why
    assert checks.verdict(base, np.float16, 1e-4, 0, None, 1)[0]  # baselines need not agree bitwise


# ----------------------------------------------------------------------------- inputs and the size check
def test_inputs_depend_only_on_seed_rank_and_count():
    a = inputs.make_input(np, 7, 2, 1000, np.float16)
    assert a.dtype == np.float16 and a.shape == (1000,)
    assert np.array_equal(a, inputs.make_input(np, 7, 2, 1000, np.float16))
    assert not np.array_equal(a, inputs.make_input(np, 7, 3, 1000, np.float16))
    assert not np.array_equal(a, inputs.make_input(np, 8, 2, 1000, np.float16))
    b = inputs.make_input(np, 7, 2, 1000, bfloat16)
    assert b.dtype == bfloat16 and 0.8 < float(np.std(b.astype(np.float32))) < 1.2


class DeviceLikeNumpy:
    """NumPy posing as a device array module (like CuPy: not ``numpy`` itself, bf16 as uint16)."""

    class random:
        class RandomState:
            def __init__(self, seed):
                self.rng = np.random.default_rng(seed)

            def standard_normal(self, size, dtype=np.float64):
                return self.rng.standard_normal(size, dtype=dtype)

    def __getattr__(self, name):
        return getattr(np, name)


def test_device_bf16_storage_rounds_to_nearest_even_like_the_host():
    xp = DeviceLikeNumpy()
    rng = np.random.default_rng(0)
    x32 = rng.standard_normal(20000).astype(np.float32) * np.float32(1e3)
    # exact ties between two bf16 values: low 16 bits 0x8000, with even and odd bf16 mantissas
    ties = (np.arange(0x3F80, 0x3F80 + 64, dtype=np.uint32) << 16 | 0x8000).view(np.float32)
    x32 = np.concatenate([x32, ties, -ties])
    storage = inputs.f32_to_storage(xp, x32, bfloat16)
    assert storage.dtype == np.uint16 and inputs.storage_dtype(xp, bfloat16) == np.uint16
    assert np.array_equal(storage, x32.astype(bfloat16).view(np.uint16))
    assert np.array_equal(inputs.storage_to_f64(xp, storage, bfloat16), x32.astype(bfloat16).astype(np.float64))
    assert np.array_equal(inputs.to_host(storage, bfloat16).view(np.uint16), storage)
    out = inputs.empty_output(xp, 3, bfloat16)
    assert out.dtype == np.uint16 and np.isnan(out.view(bfloat16).astype(np.float32)).all()


@pytest.mark.parametrize("dtype", [np.float16, bfloat16, np.float32])
def test_device_inputs_widen_exactly(dtype):
    xp = DeviceLikeNumpy()
    x = inputs.make_input(xp, 5, 1, 999, dtype)
    assert x.dtype == inputs.storage_dtype(xp, dtype)
    host = inputs.to_host(x, dtype)
    assert host.dtype == np.dtype(dtype)
    assert np.array_equal(inputs.storage_to_f64(xp, x, dtype), host.astype(np.float64))
    assert np.array_equal(x, inputs.make_input(xp, 5, 1, 999, dtype))


def test_output_buffers_start_as_nan():
    for dt in (np.float16, bfloat16, np.float32):
        assert np.isnan(inputs.empty_output(np, 5, dt).astype(np.float32)).all()


class ReferenceBackend(ScriptedBackend):
    """One rank whose all-reduce is the reference, optionally with one corrupted element."""

    def __init__(self, corrupt_index=None):
        super().__init__(elapsed=[])
        self.corrupt_index = corrupt_index
        self.rank, self.world_size = 0, 1

    def resolve_algo(self, nbytes, mode, itemsize=2):
        return "twoshot" if mode.algo == "auto" else mode.algo

    def all_reduce(self, x, out, mode, stream=None, dtype=None):
        if mode.is_baseline:
            out[...] = x
        else:
            out[...] = flash_all_reduce_reference([x], mode=mode.with_algo(self.resolve_algo(0, mode)))[0]
        if self.corrupt_index is not None:
            out[self.corrupt_index] = out[self.corrupt_index] + 1
        return out


@pytest.mark.parametrize("dtype", [np.float16, bfloat16, np.float32])
def test_size_check_passes_an_exact_backend(dtype):
    sc = SizeCheck(ReferenceBackend(), ScriptedComm(), 1000, dtype, seed=1, reference_max_bytes=1 << 20)
    for mode in (Mode.make(None), Mode.make(4), Mode.make("4/8", rotate=True)):
        res = sc.run_and_check(mode, "twoshot")
        assert res["check"] == "reference" and res["wrong"] == 0 and res["ranks_differ"] == 0
        assert 0 <= res["rel_rms"] <= checks.rel_rms_bound(mode, dtype)


def test_size_check_counts_a_planted_wrong_element():
    sc = SizeCheck(ReferenceBackend(corrupt_index=123), ScriptedComm(), 1000, np.float16, seed=1,
                   reference_max_bytes=1 << 20)
    res = sc.run_and_check(Mode.make(8), "twoshot")
    assert res["wrong"] == 1
    assert not checks.verdict(Mode.make(8), np.float16, res["rel_rms"], res["nonfinite"],
                              res["wrong"], res["ranks_differ"])[0]


def test_size_check_above_the_reference_limit_reports_error_only():
    sc = SizeCheck(ReferenceBackend(), ScriptedComm(), 1000, np.float16, seed=1, reference_max_bytes=1000)
    res = sc.run_and_check(Mode.make(8), "twoshot")
    assert res["check"] == "exact" and res["wrong"] is None and 0 < res["rel_rms"] < 0.02


def test_build_modes_crosses_bits_algos_rotation_and_symmetry():
    modes = build_modes([(None, None), (4, 4)], ["auto", "oneshot"], [False, True], [False], 128)
    labels = [m.label for m in modes]
    # lossless appears once per algorithm: rotation applies to quantized modes only
    assert labels == ["lossless", "lossless [oneshot]", "int4 g128", "int4 g128 rot",
                      "int4 g128 [oneshot]", "int4 g128 rot [oneshot]"]


# ----------------------------------------------------------------------------- result files
def _rows():
    common = dict(count=512, dtype="float16", bits="none", group_size=128, rotate=False, symmetric=False)
    return [
        Row(size_bytes=1024, mode="mpi", algo="mpi", algo_resolved="mpi", baseline=True, time_us=10.0,
            eager_us=10.0, algbw_gbps=0.1, busbw_gbps=0.15, speedup=1.0, check="exact", rel_rms=2e-4,
            max_abs=1e-3, nonfinite=0, ranks_differ=0, bound=4e-3, **common),
        Row(size_bytes=1024, mode="int4 g128", algo="auto", algo_resolved="twoshot", baseline=False,
            time_us=5.0, graph_us=5.0, eager_us=6.5, algbw_gbps=0.2, busbw_gbps=0.3, speedup=2.0,
            floor_us=1.5, floor_ratio=3.3, check="reference", rel_rms=float("nan"), max_abs=float("inf"),
            nonfinite=1, wrong=7, ranks_differ=0, bound=0.3, ok=False, failure="7 wrong vs reference",
            **{**common, "bits": "4"}),
    ]


def _same(a, b):
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b


def test_json_round_trip_keeps_every_field_including_non_finite_errors(tmp_path):
    result = BenchResult(meta={"world_size": 4, "card": "cpu", "versions": {"mpi": "MPICH"}}, rows=_rows())
    path = tmp_path / "r.json"
    write_json(result, path)
    raw = json.loads(path.read_text())  # strict JSON: NaN/inf travel as strings
    assert raw["schema"] == "flashcomm.bench/1" and raw["rows"][1]["rel_rms"] == "nan"
    back = read_json(path)
    assert back.meta == result.meta and len(back.rows) == 2
    for a, b in zip(back.rows, result.rows):
        for name in a.__dataclass_fields__:
            assert _same(getattr(a, name), getattr(b, name)), name
    assert not back.ok and [r.mode for r in back.failures] == ["int4 g128"]
    assert loads(dumps(result)).rows[0].time_us == 10.0


def test_csv_round_trip(tmp_path):
    result = BenchResult(rows=_rows())
    path = tmp_path / "r.csv"
    write_csv(result, path)
    header = path.read_text().splitlines()[0].split(",")
    assert header[:4] == ["size_bytes", "count", "dtype", "mode"] and "wrong" in header
    back = read_csv(path)
    for a, b in zip(back, result.rows):
        for name in a.__dataclass_fields__:
            assert _same(getattr(a, name), getattr(b, name)), name


def test_a_file_is_replaced_whole_and_a_failed_write_leaves_the_old_one(tmp_path, monkeypatch):
    """Readers (and a job killed while rank 0 writes) see the old file or the new one: the new text
    goes to a temporary file beside it first, and nothing of that is left behind either way."""
    from flashcomm_cupy.harness import results as results_io
    path = tmp_path / "r.json"
    write_json(BenchResult(rows=_rows()[:1]), path)
    old = path.read_text()

    def no_disk_left(src, dst):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(results_io.os, "replace", no_disk_left)
    with pytest.raises(OSError, match="No space"):
        write_json(BenchResult(rows=_rows()), path)
    assert path.read_text() == old and sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]
    monkeypatch.undo()
    write_json(BenchResult(rows=_rows()), path)
    assert len(read_json(path).rows) == 2 and sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]


def test_a_link_or_a_pipe_is_written_in_place_and_a_file_keeps_its_permissions(tmp_path):
    """Only a regular file named directly is replaced: ``/dev/stdout`` (a link to the terminal, a
    pipe, or a file the shell redirected to) and other links are written through, so whatever
    holds them open still sees the text."""
    from flashcomm_cupy.harness.results import replaceable, write_whole
    target, link = tmp_path / "real.csv", tmp_path / "link.csv"
    target.write_text("old\n")
    target.chmod(0o640)
    link.symlink_to(target)
    inode = target.stat().st_ino
    assert not replaceable(link) and replaceable(target) and replaceable(tmp_path / "new.json")
    write_csv(BenchResult(rows=_rows()), link)
    assert link.is_symlink() and target.stat().st_ino == inode and len(read_csv(target)) == 2
    write_csv(BenchResult(rows=_rows()[:1]), target)
    assert target.stat().st_ino != inode and oct(target.stat().st_mode & 0o777) == oct(0o640)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.csv", "real.csv"]
    read_end, write_end = os.pipe()
    try:
        assert not replaceable(f"/dev/fd/{write_end}")
        write_whole(f"/dev/fd/{write_end}", "through the pipe\n")
        assert os.read(read_end, 100) == b"through the pipe\n"
    finally:
        os.close(read_end)
        os.close(write_end)


def test_loading_a_file_of_another_kind_is_refused():
    with pytest.raises(ValueError):
        loads(json.dumps({"schema": "something/else", "rows": []}))


# ----------------------------------------------------------------------------- relaunch decisions
CLEAN_ENV = {"PATH": os.environ.get("PATH", "")}


def test_no_relaunch_under_a_launcher_or_when_told():
    for var in ("OMPI_COMM_WORLD_SIZE", "PMI_RANK", "PMIX_RANK", launch.RELAUNCH_ENV):
        env = {**CLEAN_ENV, var: "1"}
        assert launch.plan_relaunch("auto", None, False, gpus=0, env=env) is None
    assert launch.plan_relaunch("auto", None, True, gpus=0, env=CLEAN_ENV) is None


@pytest.mark.parametrize("cores,nranks", [(1, 2), (2, 2), (3, 3), (4, 4), (64, 4)])
def test_gpuless_host_relaunches_one_cpu_rank_per_core_from_two_to_four(cores, nranks):
    plan = launch.plan_relaunch("auto", None, False, gpus=0, env=CLEAN_ENV, cores=cores)
    assert plan.nranks == nranks and "CPU backend" in plan.reason
    assert ("noisy" in plan.reason) == (nranks > cores)  # oversubscribing is said
    assert launch.plan_relaunch("cpu", None, False, gpus=0, env=CLEAN_ENV, cores=cores).nranks == nranks


def test_explicit_rank_counts_win():
    assert launch.plan_relaunch("cpu", 3, False, gpus=8, env=CLEAN_ENV).nranks == 3
    assert launch.plan_relaunch("cpu", 1, False, gpus=0, env=CLEAN_ENV) is None


def test_multi_gpu_host_relaunches_one_rank_per_gpu():
    assert launch.plan_relaunch("auto", None, False, gpus=8, env=CLEAN_ENV).nranks == 8
    assert launch.plan_relaunch("gpu", None, False, gpus=4, env=CLEAN_ENV).nranks == 4
    assert launch.plan_relaunch("gpu", 2, False, gpus=4, env=CLEAN_ENV).nranks == 2
    assert launch.plan_relaunch("auto", None, False, gpus=1, env=CLEAN_ENV) is None


def test_more_ranks_than_gpus_or_no_gpu_is_an_error():
    with pytest.raises(launch.LaunchError, match="more ranks than the 4 GPU"):
        launch.plan_relaunch("gpu", 8, False, gpus=4, env=CLEAN_ENV)
    with pytest.raises(launch.LaunchError, match="needs a CUDA GPU"):
        launch.plan_relaunch("gpu", None, False, gpus=0, env=CLEAN_ENV)


def test_open_mpi_as_root_gets_allow_run_as_root_and_oversubscribe():
    cmd = launch.build_command("/x/mpiexec", "openmpi", 4, ["bench", "-b", "1K"], python="/py", root=True)
    assert cmd == ["/x/mpiexec", "--allow-run-as-root", "--oversubscribe", "-n", "4", "/py", "-m",
                   "flashcomm_cupy.cli.main", "bench", "-b", "1K"]
    assert "--allow-run-as-root" not in launch.build_command("m", "openmpi", 2, [], python="p", root=False)
    assert launch.build_command("m", "mpich", 2, ["info"], python="p", root=True) == \
        ["m", "-n", "2", "p", "-m", "flashcomm_cupy.cli.main", "info"]


def _fake_mpiexec(tmp_path, text):
    path = tmp_path / "mpiexec"
    path.write_text(f"#!/bin/sh\necho '{text}'\n")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return str(path)


@pytest.mark.parametrize("text,flavor", [("mpiexec (OpenRTE) 4.1.5", "openmpi"),
                                         ("mpirun (Open MPI) 5.0.3", "openmpi"),
                                         ("HYDRA build details:", "mpich"), ("something else", "unknown")])
def test_mpiexec_flavor_is_read_from_version_output(tmp_path, text, flavor):
    assert launch.mpiexec_flavor(_fake_mpiexec(tmp_path, text)) == flavor


def test_missing_mpiexec_says_how_to_install_it(tmp_path):
    with pytest.raises(launch.LaunchError, match=r'pip install "flashcomm-cupy\[mpi\]"'):
        launch.find_mpiexec({"PATH": str(tmp_path)})
    assert launch.find_mpiexec({"PATH": str(tmp_path), "FLASHCOMM_MPIEXEC": "/opt/mpiexec"}) == "/opt/mpiexec"


def test_child_env_marks_the_relaunch():
    env = launch.child_env({"A": "1"})
    assert env == {"A": "1", launch.RELAUNCH_ENV: "1"} and launch.under_launcher(env)


def test_the_relaunch_passes_the_terminal_width_unless_columns_is_set():
    assert launch.child_env({}, terminal_columns=97)["COLUMNS"] == "97"
    assert launch.child_env({"COLUMNS": "120"}, terminal_columns=97)["COLUMNS"] == "120"
    assert "COLUMNS" not in launch.child_env({}, terminal_columns=None)


# ----------------------------------------------------------------------------- report rendering
def _render(renderable):
    from rich.console import Console
    buf = io.StringIO()
    Console(file=buf, width=220, no_color=True).print(renderable)
    return buf.getvalue()


def test_bench_table_shows_columns_values_and_verdicts():
    from flashcomm_cupy.cli import report
    text = "\n".join(report.bench_table_lines({"baseline": "mpi", "dtype": "float16"}, _rows()))
    for col in ("size", "count", "type", "mode", "algo", "time(us)", "eager(us)", "algbw", "busbw",
                "speedup", "floor(us)", "xfloor", "rel-RMS", "max-abs", "#wrong", "check"):
        assert col in text, col
    lines = text.splitlines()
    base = next(line for line in lines if " mpi " in line)
    assert "1K" in base and "512" in base and "float16" in base and "10.0" in base and "1.00x" in base
    assert "2.00e-04" in base and " ok" in base
    int4 = next(line for line in lines if "int4 g128" in line)
    assert "twoshot" in int4 and " 5.0 " in int4 and " 6.5 " in int4 and "2.00x" in int4 and "nan" in int4 and " 7 " in int4 and "FAIL" in int4


def test_bench_table_hides_columns_nobody_measured():
    from flashcomm_cupy.cli import report
    rows = _rows()[:1]
    text = "\n".join(report.bench_table_lines({"baseline": "mpi", "dtype": "float16"}, rows))
    assert "eager(us)" not in text and "floor(us)" not in text and "time(us)" in text


def test_footer_says_ok_or_failed():
    from flashcomm_cupy.cli import report
    rows = _rows()
    assert report.bench_footer(BenchResult(rows=rows))[-1].startswith("# FAILED (1 of 2")
    assert any("7 wrong" in line for line in report.bench_footer(BenchResult(rows=rows)))
    assert report.bench_footer(BenchResult(rows=rows[:1]))[-1] == "# OK"


def test_verify_table_aggregates_cases_per_mode():
    from flashcomm_cupy.cli import report
    from flashcomm_cupy.harness.verify import VerifyRow
    common = dict(bits="4", algo="auto", algo_resolved="twoshot", group_size=128, rotate=False,
                  symmetric=False, baseline=False, max_abs=0.1, nonfinite=0, ranks_differ=0,
                  inplace_wrong=0, bound=0.3)
    rows = [VerifyRow(dtype="float16", count=n, mode="int4 g128", rel_rms=0.1, wrong=0, ok=True, failure="",
                      **common) for n in (1, 7)]
    rows.append(VerifyRow(dtype="float32", count=1, mode="int4 g128", rel_rms=0.2, wrong=2, ok=False,
                          failure="2 wrong", **common))
    text = "\n".join(report.verify_table_lines(rows))
    assert "ok 2/2" in text and "FAIL 1/1" in text and "2.00e-01" in text


# ----------------------------------------------------------------------------- RESULTS.md
def _load_renderer():
    spec = importlib.util.spec_from_file_location("render_results", REPO / "benchmarks" / "render_results.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_render_results_makes_one_table_per_bench_file_and_keeps_prose(tmp_path):
    rr = _load_renderer()
    results = tmp_path / "results"
    results.mkdir()
    rows = _rows()
    rows[1].ok, rows[1].failure = True, ""
    write_json(BenchResult(meta={"world_size": 4, "card": "NVIDIA H100", "dtype": "float16",
                                 "baseline": "nccl", "command": "flashcomm bench"}, rows=rows),
               results / "bench-h100.json")
    (results / "model.json").write_text(json.dumps({"kind": "model", "columns": ["tokens", "ttft_ratio"],
                                                    "rows": [{"tokens": 1024, "ttft_ratio": 1.25}]}))
    (results / "junk.json").write_text("[1, 2]")
    out = tmp_path / "RESULTS.md"
    out.write_text(f"# Intro by hand\n\n{rr.BEGIN}\nold\n{rr.END}\n\nOutro by hand\n")
    assert rr.main(["--results", str(results), "--out", str(out)]) == 0
    text = out.read_text()
    assert text.startswith("# Intro by hand") and text.rstrip().endswith("Outro by hand") and "old" not in text
    assert "### 4 x NVIDIA H100 -- float16" in text
    assert "| size | mpi us | int4 g128 us (speedup) |" in text
    assert "| 1K | 10.0 | 5.0 (2.00x) |" in text
    assert "| tokens | ttft_ratio |" in text and "| 1024 | 1.25 |" in text
    assert "Skipped: junk.json" in text
    assert rr.main(["--results", str(results), "--out", str(out), "--check"]) == 0
    out.write_text(text.replace("| 1K | 10.0 |", "| 1K | 11.0 |"))  # a stale generated table
    assert rr.main(["--results", str(results), "--out", str(out), "--check"]) == 1


# ----------------------------------------------------------------------------- multi-rank checks, for real
PLANTED = r"""
import numpy as np
from flashcomm_cupy import Communicator
from flashcomm_cupy.config import Mode
from flashcomm_cupy.harness.correctness import SizeCheck

with Communicator(backend="cpu") as comm:
    backend = comm.backend
    honest = backend.all_reduce

    def corrupt_on_rank_2(x, out, mode, stream=None, dtype=None):
        honest(x, out, mode, stream=stream, dtype=dtype)
        if backend.rank == 2:
            out[10] = out[10] + 1
        return out

    for count in (1, 1000, 4099):
        sc = SizeCheck(backend, comm.mpi_comm, count, np.float16, seed=3, reference_max_bytes=1 << 20)
        for mode in (Mode.make(None), Mode.make(4), Mode.make("4/8", rotate=True, algo="oneshot")):
            res = sc.run_and_check(mode, backend.resolve_algo(count * 2, mode))
            assert res["wrong"] == 0 and res["ranks_differ"] == 0, (count, mode, res)
    backend.all_reduce = corrupt_on_rank_2
    sc = SizeCheck(backend, comm.mpi_comm, 1000, np.float16, seed=3, reference_max_bytes=1 << 20)
    res = sc.run_and_check(Mode.make(8), "twoshot")
    assert res["wrong"] == 1 and res["ranks_differ"] == 1, res
    big = SizeCheck(backend, comm.mpi_comm, 1000, np.float16, seed=3, reference_max_bytes=100)
    res = big.run_and_check(Mode.make(8), "twoshot")
    assert res["wrong"] is None and res["ranks_differ"] == 1, res
    if comm.rank == 0:
        print("PLANTED OK")
"""


@pytest.mark.mpi
def test_checks_count_wrong_elements_and_disagreeing_ranks_across_four_real_ranks():
    from mpi_util import run_mpi_code
    proc = run_mpi_code(PLANTED, 4, timeout=120)
    assert proc.returncode == 0 and "PLANTED OK" in proc.stdout, proc.stdout


# ----------------------------------------------------------------------------- the sweep, in process
class GraphReferenceBackend(ReferenceBackend):
    """The reference on one rank, with wall-clock timers and graph replays on a stream of their own."""

    baseline_algo = "nccl"

    def __init__(self):
        super().__init__()
        self.timer_streams = []

    def make_timer(self, stream=None):
        from flashcomm_cupy.backends.base import WallTimer
        self.timer_streams.append(stream)
        return WallTimer()

    def capture_graph(self, fn, iters, stream=None):
        def replay():
            for _ in range(iters):
                fn()
        replay.stream = "graph-stream"
        return replay


def test_sweep_rows_carry_graph_and_eager_times_speedups_floors_and_checks():
    from types import SimpleNamespace

    from flashcomm_cupy.harness.sweep import SweepConfig, run_sweep
    backend = GraphReferenceBackend()
    comm = SimpleNamespace(backend=backend, mpi_comm=ScriptedComm())
    config = SweepConfig(counts=[64, 4096], dtype=np.float16, modes=build_modes(
        [(None, None), (8, 8)], ["auto"], [False], [False], 128), warmup=1, iters=2, repeats=2,
        graph=True, eager=True, peer_bw_gbps=100.0)
    seen, streamed = [], []
    rows = run_sweep(comm, config, progress=lambda done, total, what: seen.append((done, total)),
                     on_row=streamed.append)
    assert streamed == rows  # each row handed out as it finished, in order
    assert [(r.count, r.mode) for r in rows] == [(64, "nccl"), (64, "lossless"), (64, "int8 g128"),
                                                 (4096, "nccl"), (4096, "lossless"), (4096, "int8 g128")]
    assert seen == [(i, 6) for i in range(1, 7)]
    assert "graph-stream" in backend.timer_streams  # graph replays are timed on their own stream
    for r in rows:
        assert r.graph_us > 0 and r.eager_us > 0 and r.time_us == r.graph_us
        assert r.floor_us is None  # one rank sends nothing: no floor
        assert r.ok and r.check == ("exact" if r.baseline else "reference")
        base = next(b for b in rows if b.baseline and b.count == r.count)
        assert r.speedup == pytest.approx(base.time_us / r.time_us)
    assert [r.wrong for r in rows if not r.baseline] == [0, 0, 0, 0]


def test_render_results_drops_control_characters_from_metadata(tmp_path):
    """Open MPI's library version string ends in a NUL; RESULTS.md must stay a text file."""
    rr = _load_renderer()
    results = tmp_path / "results"
    results.mkdir()
    write_json(BenchResult(meta={"world_size": 2, "card": "GPU", "dtype": "float16", "baseline": "nccl",
                                 "versions": {"mpi": "Open MPI v4.1.6, Sep 30, 2023\x00"}}, rows=_rows()),
               results / "bench.json")
    out = tmp_path / "RESULTS.md"
    assert rr.main(["--results", str(results), "--out", str(out)]) == 0
    text = out.read_text()
    assert "Open MPI v4.1.6, Sep 30, 2023" in text
    assert not any(ch < " " and ch not in "\t\n" for ch in text)


def test_mpi_library_version_is_one_clean_line():
    from flashcomm_cupy import _mpi
    assert _mpi.clean_version("Open MPI v4.1.6, ident: 4.1.6, Sep 30, 2023\x00") == \
        "Open MPI v4.1.6, ident: 4.1.6, Sep 30, 2023"
    assert _mpi.clean_version("MPICH Version: 4.2\nMPICH Release date: ...\n") == "MPICH Version: 4.2"
    assert _mpi.clean_version("") == ""


def test_the_table_names_the_kernels_that_ran():
    import types
    from flashcomm_cupy.cli.report import algo_text
    assert algo_text(types.SimpleNamespace(algo_resolved="twoshot", protocol="staged")) == "twoshot/staged"
    assert algo_text(types.SimpleNamespace(algo_resolved="oneshot", protocol="ll")) == "oneshot/ll"
    assert algo_text(types.SimpleNamespace(algo_resolved="twoshot", protocol="flag")) == "twoshot"
    assert algo_text(types.SimpleNamespace(algo_resolved="nccl", protocol="")) == "nccl"
