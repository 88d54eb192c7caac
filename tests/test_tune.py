"""``flashcomm tune``'s row building (harness/tune.py), on a simulated GPU backend.

The real sweep needs GPUs; here the backend, CuPy and the timer are stand-ins
whose "measured" time is a function of the forced launch and the mode, so
the rows tune writes can be checked against what the timings imply.
"""
from __future__ import annotations

import sys
import types

import numpy as np

from flashcomm_cupy.backends.flash import table as tuning
from flashcomm_cupy.harness import tune as harness_tune

LL_MAX_BYTES = 1 << 20  # the simulated LL slots hold messages up to 1 MB


def simulated_us(nbytes, bits, launch, staged_int8_us=9.0):
    """Per-call time of the simulated machine; launch = (algo, threads, blocks, units, protocol, staged)
    or None (NCCL)."""
    if launch is None:
        return 8.0
    algo, threads, _, _, protocol, staged = launch
    if bits is None:
        return {"ll": 4.0 if threads == 128 else 5.0, "flag": 10.0}[protocol]
    if staged:  # the staged two-shot: faster for INT4, and for INT8 as the test asks
        return 5.0 if bits == 4 else staged_int8_us
    if protocol == "flag":
        return 6.0 if algo == "oneshot" else 7.0
    if bits == 4:
        return 3.0 if threads == 64 else 3.5
    # INT8 in LL form: fast while small, slower than the flags once the message is large
    return (5.0 if threads == 128 else 5.5) if nbytes <= 4096 else 8.0


class SimulatedBackend:
    name = "gpu"

    def __init__(self):
        self.ws = types.SimpleNamespace(layout=types.SimpleNamespace(max_blocks=264))
        self.last = None

    def resolve_protocol(self, nbytes, mode, itemsize=2, force=None):
        if force is not None and force.protocol == "ll" and nbytes <= LL_MAX_BYTES:
            return "ll"
        staged = force is not None and force.staged and itemsize == 2 and not mode.lossless
        return "staged" if staged else "flag"

    def all_reduce(self, x, out, mode, dtype=None, force=None):
        self.last = (x.nbytes, None if mode.lossless else mode.rs_bits, mode.algo, force)

    def describe(self):
        return {"gpu": "simulated"}


def run_tune(monkeypatch, sizes, staged_int8_us=9.0):
    backend = SimulatedBackend()

    def fake_measure(backend_, mpi_comm, fn, **kwargs):
        fn()
        nbytes, bits, algo, force = backend_.last
        launch = None if force is None else (algo, force.threads, force.blocks, force.units, force.protocol,
                                             force.staged)
        return types.SimpleNamespace(primary_s=simulated_us(nbytes, bits, launch, staged_int8_us) * 1e-6)

    monkeypatch.setattr(harness_tune, "measure", fake_measure)
    monkeypatch.setitem(sys.modules, "cupy", types.SimpleNamespace(asarray=np.asarray, empty_like=np.empty_like))
    comm = types.SimpleNamespace(backend=backend, mpi_comm=None, rank=0, world_size=4)
    table = harness_tune.tune(comm, sizes)
    assert table["format"] == tuning.FORMAT
    (section,) = table["sections"]
    assert (section["card"], section["world"], section["transport"]) == ("simulated", 4, "ipc")
    return {row["max_bytes"]: row for row in section["rows"]}


def test_each_class_keeps_its_fastest_launch_and_its_best_flag_fallback(monkeypatch):
    rows = run_tune(monkeypatch, [4096, 64 << 20])
    small = rows[4096]
    assert (small["lossless"][0]["protocol"], small["lossless"][0]["threads"], small["lossless"][0]["us"]) == ("ll", 128, 4.0)
    # the fallback for calls LL cannot serve is the best other choice: NCCL (8 us) before the flag kernels (10)
    assert (small["lossless"][1]["algo"], small["lossless"][1]["us"]) == ("nccl", 8.0)
    assert (small["narrow"][0]["protocol"], small["narrow"][0]["threads"], small["narrow"][0]["us"]) == ("ll", 64, 3.0)
    assert (small["narrow"][1]["algo"], small["narrow"][1]["us"]) == ("oneshot", 6.0)
    # too large for the LL slots and past the one-shot's range: NCCL (8 us) beats the flag kernels for
    # lossless, the staged flag two-shot serves quantized modes, and no LL fallbacks are needed
    large = rows[64 << 20]
    assert [c["algo"] for c in large["lossless"]] == ["nccl"]
    assert large["narrow"] == [dict(large["narrow"][0], algo="twoshot", protocol="flag", staged=True, us=5.0)]
    assert "staged" not in large["lossless"][0]
    assert len(large["lossless"]) == len(large["narrow"]) == 1


def test_staged_is_a_candidate_only_for_large_quantized_messages():
    def staged(nbytes, lossless):
        return {c for c in harness_tune.candidates(nbytes, lossless, 264) if c[5]}
    assert not staged(1 << 20, False) and not staged(64 << 20, True)
    big = staged(64 << 20, False)
    assert big and all(c[0] == "twoshot" and c[4] == "flag" for c in big)


def test_staged_shapes_the_backend_would_not_stage_are_not_timed(monkeypatch):
    # float32: the backend runs the plain kernel for a staged request, so no row may claim staging
    backend = SimulatedBackend()

    def staged_looks_fastest(backend_, mpi_comm, fn, **kwargs):
        fn()
        force = backend_.last[3]
        return types.SimpleNamespace(primary_s=0.5e-6 if force is not None and force.staged else 1e-6)

    monkeypatch.setattr(harness_tune, "measure", staged_looks_fastest)
    monkeypatch.setitem(sys.modules, "cupy", types.SimpleNamespace(asarray=np.asarray, empty_like=np.empty_like))
    comm = types.SimpleNamespace(backend=backend, mpi_comm=None, rank=0, world_size=4)
    rows = harness_tune.tune(comm, [64 << 20], dtype=np.float32)["sections"][0]["rows"]
    assert not any(entry.get("staged") for row in rows for cls in ("lossless", "narrow", "wide") for entry in row[cls])


def test_int8_keeps_the_plain_two_shot_where_staging_slows_it(monkeypatch):
    # INT4 is fastest staged (5 us) but INT8 staged takes 9 us: INT8 gets the best plain flag choice (7 us)
    large = run_tune(monkeypatch, [64 << 20])[64 << 20]
    assert large["narrow"][0]["staged"] is True
    assert large["wide"] == [dict(large["wide"][0], algo="twoshot", us=7.0)]
    assert "staged" not in large["wide"][0]
    # where INT8 is faster staged too (6 us), it follows INT4's staged shape
    large = run_tune(monkeypatch, [64 << 20], staged_int8_us=6.0)[64 << 20]
    assert large["wide"] == [dict(large["narrow"][0], us=6.0)]  # flag kernels both: no LL fallback to record


def test_int8_gets_its_own_entry_where_int4_runs_ll(monkeypatch):
    rows = run_tune(monkeypatch, [4096, 1 << 20])
    # small: INT8 is fastest in LL form, with its own best shape (128 threads, not INT4's 64)
    small = rows[4096]
    assert (small["wide"][0]["protocol"], small["wide"][0]["threads"]) == ("ll", 128)
    assert small["wide"][0]["us"] == 5.0
    assert small["wide"][1] == small["narrow"][1]
    # 1 MB: INT4 still runs LL, but INT8's LL form (8 us) loses to the flag one-shot (6 us)
    mid = rows[1 << 20]
    assert mid["narrow"][0]["protocol"] == "ll"
    assert mid["wide"] == [dict(mid["narrow"][1], us=6.0)]
