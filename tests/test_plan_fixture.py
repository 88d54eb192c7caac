"""select_plan makes every decision the flash backend made before it existed.

``tests/plan_fixture/decisions.json.gz`` holds 115k decisions (algo, protocol, kernel, build,
threads, blocks, segment, units, LL tile, shared memory) of the backend at commit ce74c20,
recorded by ``tests/plan_fixture/record_decisions.py`` over tables, workspace shapes, worlds
2..8, dtypes, modes, sizes 1..2^28, protocol settings and forced launches.  Here the same grid
goes through the pure ``select_plan`` and every field must match.
"""
import gzip
import json
import sys
from pathlib import Path

import pytest

from flashcomm_cupy.backends.flash.plan import Force, Limits, select_plan, shares_rotation_code
from flashcomm_cupy.backends.flash.table import TuningTable

HERE = Path(__file__).resolve().parent / "plan_fixture"
sys.path.insert(0, str(HERE))
import record_decisions as grid  # noqa: E402

sys.path.remove(str(HERE))


def _limits(ws):
    _, max_blocks, slot_bytes, max_threads, sm_count, uniform, transport = next(w for w in grid.WORKSPACES if w[0] == ws)
    return Limits(max_blocks=max_blocks, max_threads=max_threads, slot_bytes=max(slot_bytes, 2 * 32 * 128 + 256),
                  sm_count=sm_count, uniform_gpus=uniform, transport=transport,
                  blocks_per_sm=lambda kernel, build, threads, smem: grid.fake_blocks_per_sm(threads, smem))


def _recorded_kernel(plan, mode):
    """The kernel's name as the fixture knows it.  One change since it was recorded, on purpose: a
    rotating quantized LL one-shot of enough warps (plan.SHARED_ROTATION_MIN_WARPS) runs its own build,
    fc_llq_oneshot_rot (benchmarks/NOTES.md v32, v36), with the launch the fixture recorded."""
    if plan.kernel == "fc_llq_oneshot_rot":
        assert shares_rotation_code(mode, plan.blocks, plan.threads, plan.build.unit_elems), plan
        return "fc_llq_oneshot"
    return plan.kernel


def _as_recorded(plan, mode):
    rec = {"algo": plan.algo, "protocol": plan.protocol}
    if not plan.uses_nccl:
        b = plan.build
        rec.update(kernel=_recorded_kernel(plan, mode), build=[b.dtype_code, b.rs_bits, b.ag_bits, b.unit_elems],
                   threads=plan.threads, blocks=plan.blocks, seg=plan.seg_elems, units=plan.units,
                   ll_tile=plan.ll_tile, smem=plan.smem)
    return rec


@pytest.fixture(scope="module")
def recorded():
    """(decisions, tables by name, limits by workspace) of the fixture, read once."""
    with gzip.open(HERE / "decisions.json.gz", "rt") as fh:
        fixture = json.load(fh)
    tables = {name: TuningTable(data, name) for name, data in fixture["tables"].items()}
    return fixture["decisions"], tables, {w[0]: _limits(w[0]) for w in grid.WORKSPACES}


def test_select_plan_reproduces_every_recorded_decision(monkeypatch, recorded):
    """With the one change since made on purpose undone: small quantized LL one-shots run 8-element
    units (plan.LLQ_SMALL_UNIT_ELEMS, benchmarks/NOTES.md v37); the next test holds those."""
    from flashcomm_cupy.backends.flash import plan as plan_module
    monkeypatch.setattr(plan_module, "LLQ_SMALL_UNIT_MAX_ELEMS", -1)
    decisions, tables, limits = recorded
    modes = {}
    cases = list(grid.cases())
    assert len(cases) == len(decisions)
    wrong = []
    for (table, ws, world, protocol, force, dtype, spec, algo, n), want in zip(cases, decisions):
        mode = modes.get((spec, algo)) or modes.setdefault((spec, algo), grid.mode_of(spec, algo))
        try:
            plan = select_plan(n, dtype, mode, world=world, table=tables[table], limits=limits[ws],
                               force=Force.of(force), protocol=protocol)
        except Exception as exc:  # noqa: BLE001 - the recorded decision may be an error
            got = {"error": type(exc).__name__}
        else:
            got = _as_recorded(plan, mode)
        if "build" in want and len(want["build"]) == 3:  # recorded before the unit size was explicit
            want = dict(want, build=want["build"] + [32])
        if got != want:
            wrong.append(((table, ws, world, protocol, force, dtype, spec, algo, n), want, got))
    assert not wrong, f"{len(wrong)} decisions differ, e.g.:\n" + "\n".join(map(str, wrong[:5]))


def test_small_quantized_ll_one_shots_differ_from_the_record_only_in_their_unit_size(recorded):
    """Where a recorded quantized LL one-shot ran 16-element units on a call of at most
    plan.llq_small_unit_max_elems elements in groups of at most 256, the plan either runs 8-element
    units with one unit a lane (the same kernel, threads and segment, the blocks the smaller units
    need) or, where its table, forced launch or blocks would give a lane more, the recorded launch;
    INT4 calls past their own limit and within the others' run the recorded launch."""
    from flashcomm_cupy.backends.flash.plan import (LLQ_SMALL_UNIT_ELEMS, LLQ_SMALL_UNIT_MAX_ELEMS,
                                                    llq_small_unit_max_elems)
    decisions, tables, limits = recorded
    checked, small_ones, beyond, wrong = 0, 0, 0, []
    for (table, ws, world, protocol, force, dtype, spec, algo, n), want in zip(grid.cases(), decisions):
        if want.get("kernel") != "fc_llq_oneshot" or want["build"][3] != 16:
            continue
        mode = grid.mode_of(spec, algo)
        if mode.group_size > 32 * LLQ_SMALL_UNIT_ELEMS or n > LLQ_SMALL_UNIT_MAX_ELEMS:
            continue
        plan = select_plan(n, dtype, mode, world=world, table=tables[table], limits=limits[ws],
                           force=Force.of(force), protocol=protocol)
        got = _as_recorded(plan, mode)
        if n > llq_small_unit_max_elems(mode.rs_bits):  # INT4 past its own limit: the recorded launch
            beyond += 1
            if got != want:
                wrong.append(((table, ws, world, protocol, force, dtype, spec, algo, n), want, got))
            continue
        units = -(-want["seg"] // LLQ_SMALL_UNIT_ELEMS)
        small = dict(want, build=want["build"][:3] + [LLQ_SMALL_UNIT_ELEMS], units=1,
                     blocks=-(-units // want["threads"]))
        checked += 1
        small_ones += got == small
        if got not in (small, want):
            wrong.append(((table, ws, world, protocol, force, dtype, spec, algo, n), small, got))
    assert checked > 1000 and small_ones > checked // 2 and beyond > 10
    assert not wrong, f"{len(wrong)} of {checked} differ, e.g.:\n" + "\n".join(map(str, wrong[:5]))
