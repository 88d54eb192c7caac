"""Dispatch decisions of the flash backend, checked on a CPU with the hardware faked.

``select_plan`` is a pure function of the call, the tuning table and the workspace's
:class:`Limits`; the launch it produces must always fit the workspace and keep every block
resident.  (``tests/test_plan_fixture.py`` checks it against every decision of the backend
before it existed; ``tests/test_plan.py`` checks its contract across worlds and modes.)
"""
import itertools
import types

import numpy as np
import pytest

from flashcomm_cupy import codecs
from flashcomm_cupy.backends.flash import table as tuning
from flashcomm_cupy.backends.flash.layout import ARGS_DTYPE, FLAG_ROTATE, FLAG_SYM, WorkspaceLayout
from flashcomm_cupy.backends.flash.plan import (ELEMS_PER_THREAD, LLQ_SMALL_UNIT_MAX_ELEMS,
                                                LLQ_SMALL_UNIT_MAX_ELEMS_MORE_BYTES, SHARED_ROTATION_MIN_WARPS,
                                                SHARED_ROTATION_MIN_WARPS_SMALL_UNITS, Force, KernelKey, Limits,
                                                llq_small_unit_max_elems, llq_threads, llq_unit_elems, select_plan,
                                                staged_twoshot_smem)
from flashcomm_cupy.config import Mode

TABLE = {"worlds": {"4": [
    {"max_bytes": 65536, "lossless": {"algo": "oneshot", "threads": 128, "blocks": 16},
     "quantized": {"algo": "oneshot", "threads": 128, "blocks": 32}},
    {"max_bytes": 4 << 20, "lossless": {"algo": "nccl"},
     "quantized": {"algo": "oneshot", "threads": 256, "blocks": 64}},
    {"max_bytes": 256 << 20, "lossless": {"algo": "nccl"},
     "quantized": {"algo": "twoshot", "threads": 512, "blocks": 132, "units": 4}},
]}}
LL_TABLE = {"worlds": {"4": [
    {"max_bytes": 1 << 20, "lossless": {"algo": "oneshot", "threads": 256, "blocks": 0, "protocol": "ll"},
     "quantized": {"algo": "oneshot", "threads": 128, "blocks": 32}},
    {"max_bytes": 256 << 20, "lossless": {"algo": "twoshot", "threads": 512, "blocks": 0, "protocol": "ll"},
     "quantized": {"algo": "twoshot", "threads": 512, "blocks": 132, "units": 4}},
]}}


def limits(world=4, max_blocks=264, slot_bytes=48 << 10, per_sm=2, **facts):
    """The limits of a 132-SM GPU's workspace; ``per_sm``: what the occupancy probe answers."""
    return Limits.of_layout(WorkspaceLayout(world, max_blocks, slot_bytes), max_threads=512,
                            sm_count=facts.pop("sm_count", 132),
                            blocks_per_sm=lambda kernel, build, threads, smem: per_sm, **facts)


def fake_backend(world=4, table=TABLE, protocol="auto", **lim):
    """A flash backend with real plans and no GPU (``resolve_algo``/``resolve_protocol`` only),
    for tests of code that asks a backend what it would run (cli/info)."""
    from flashcomm_cupy.backends.flash.backend import FlashGpuBackend
    b = object.__new__(FlashGpuBackend)
    b.world_size, b.protocol, b._forced, b._plans = world, protocol, None, {}
    b.table, b.limits = tuning.TuningTable(table, "test"), limits(world, **lim)
    return b


def test_the_backend_answers_resolve_questions_from_its_cached_plan():
    b = fake_backend(table=LL_TABLE)
    assert (b.resolve_algo(4096, Mode.make(None)), b.resolve_protocol(4096, Mode.make(None))) == ("oneshot", "ll")
    assert b.resolve_protocol(1 << 20, Mode.make(4), itemsize=4) == "flag"
    assert b.plan(2048, "float16", Mode.make(None)) is b.plan(2048, np.float16, Mode.make(None))
    assert b.resolve_algo(64 << 20, Mode.make(4, algo="twoshot"), force=Force(256, 264, 1)) == "twoshot"
    b.force_launch = (128, 16, 1, "ll")  # the deprecated alias: a Force for every later call
    assert b.force_launch == Force(128, 16, 1, "ll")
    assert b.plan(2048, "float16", Mode.make(None, algo="twoshot")).choice == tuning.Choice("twoshot", 128, 16, 1, "ll")


def plan(n, mode, dtype="float16", world=4, table=TABLE, force=None, protocol="auto", **lim):
    return select_plan(n, dtype, mode, world=world, table=tuning.TuningTable(table, "test"),
                       limits=limits(world, **lim), force=force, protocol=protocol)


def algo(nbytes, mode, **kw):
    return plan(max(1, nbytes // 2), mode, **kw).algo


def protocol(nbytes, mode, itemsize=2, **kw):
    return plan(max(1, nbytes // itemsize), mode, dtype="float32" if itemsize == 4 else "float16", **kw).protocol


def test_auto_follows_the_table_and_never_sends_quantized_modes_to_nccl():
    assert algo(4096, Mode.make(None)) == "oneshot"
    assert algo(1 << 20, Mode.make(None)) == "nccl"
    assert algo(1 << 20, Mode.make(4)) == "oneshot"
    assert algo(64 << 20, Mode.make((4, 8))) == "twoshot"
    assert algo(1 << 30, Mode.make(8)) == "twoshot"  # past the last row: last row
    assert algo(1 << 20, Mode.make(4, algo="twoshot")) == "twoshot"  # explicit wins
    assert algo(1 << 20, Mode.make(None, algo="nccl")) == "nccl"
    with pytest.raises(ValueError, match="mpi"):
        algo(4096, Mode.make(None, algo="mpi"))


def test_world_sizes_without_a_table_row_use_the_heuristic():
    assert algo(128 << 10, Mode.make(4), world=8) == "oneshot"
    assert algo(1 << 20, Mode.make(4), world=8) == "twoshot"


@pytest.mark.parametrize("world", [2, 3, 4, 8])
def test_every_launch_fits_the_workspace_and_covers_the_message(world):
    lim = limits(world)
    sizes = [1, 31, 32, 1000, 4099, 65537, 1 << 20, (64 << 20) + 3]
    modes = [Mode.make(bits, g, algo=a) for bits, g, a in
             itertools.product((None, 4, 6, 8, (4, 8)), (32, 128, 1024), ("oneshot", "twoshot"))]
    for n, mode, dtype, threads, units, blocks in itertools.product(
            sizes, modes, ("float16", "float32"), (64, 128, 256, 512), (1, 4, 16), (0, 8, 264)):
        p = plan(n, mode, dtype, world, force=Force(threads, blocks, units))
        quantum = ELEMS_PER_THREAD if mode.lossless else mode.group_size
        per_elem = np.dtype(dtype).itemsize if mode.lossless else max(
            mode.rs_codec.wire_bytes_per_element(), mode.ag_codec.wire_bytes_per_element())
        assert p.protocol == "flag" and p.kernel == f"fc_{mode.algo}"
        assert p.seg_elems % quantum == 0
        assert p.seg_elems * (world if mode.algo == "twoshot" else 1) >= n
        tile = p.threads * ELEMS_PER_THREAD * p.units
        assert tile % quantum == 0  # groups never straddle tiles
        assert tile * per_elem + 4 * 16 <= lim.slot_bytes  # a tile's wire chunk fits its slot
        assert 1 <= p.blocks <= (lim.max_blocks // 2 if p.threads > 256 else lim.max_blocks)
        assert 64 <= p.threads <= 512 and p.units >= 1


def test_a_forced_launch_overrides_the_table_for_tuning_sweeps():
    p = plan(128 << 20, Mode.make(4, algo="twoshot"), force=Force(256, 132, 8))
    assert (p.algo, p.threads, p.blocks, p.units) == ("twoshot", 256, 132, 8)
    assert p.choice == tuning.Choice("twoshot", 256, 132, 8)
    # only modes naming a flash algorithm are forced: auto follows the table
    assert plan(128 << 20, Mode.make(4), force=Force(256, 132, 8)).choice == tuning.Choice("twoshot", 512, 132, 4)
    # the old positional form still reads
    assert Force.of((128, 16, 1, "ll")) == Force(128, 16, 1, "ll") and Force.of(None) is None
    assert Force.of({"threads": 256, "blocks": 0, "units": 2, "protocol": "flag", "staged": True}) == \
        Force(256, 0, 2, "flag", True)


def test_shipped_table_loads_and_covers_two_and_four_ranks_of_every_card():
    t = tuning.load(str(tuning.SHIPPED))
    assert {(k[1], k[2]) for k in t.sections} >= {(2, "ipc"), (4, "ipc")}
    for rows in t.sections.values():
        for _, classes in rows:
            assert set(classes) == set(codecs.CLASSES)
            assert all(c.algo in ("oneshot", "twoshot") for cls in ("narrow", "wide") for c in classes[cls])
            assert all(c.algo in ("oneshot", "twoshot", "nccl") for c in classes["lossless"])
            for cands in classes.values():  # every list ends in a flag choice, for calls LL cannot serve
                assert cands[-1].protocol == "flag"


@pytest.mark.parametrize("world", [2, 3, 4, 8])
def test_every_ll_launch_fits_its_slots_and_gives_every_block_data(world):
    lim = limits(world)
    slot_vecs = lim.ll_slot_bytes // 16
    for n, dtype, a, threads, blocks in itertools.product(
            [1, 7, 8, 9, 2048, 4099, 65537, 1 << 20, 3 << 20], ("float16", "float32"), ("oneshot", "twoshot"),
            (64, 128, 256, 512), (0, 1, 8, 132, 264)):
        p = plan(n, Mode.make(None, algo=a), dtype, world, force=Force(threads, blocks, 1, "ll"))
        per = 16 // np.dtype(dtype).itemsize
        vecs = -(-(n if a == "oneshot" else -(-n // world)) // per)
        resident = lim.max_blocks // (2 if threads > 256 else 1)
        if p.protocol != "ll":  # only when the message cannot fit the LL slots of all resident blocks
            assert vecs > resident * slot_vecs and p.protocol == "flag"
            continue
        assert p.kernel == f"fc_ll_{a}" and p.build == KernelKey(0 if dtype == "float16" else 2, 0, 0)
        assert p.seg_elems == vecs * per and p.seg_elems * (1 if a == "oneshot" else world) >= n
        assert 1 <= p.ll_tile <= slot_vecs
        assert 1 <= p.blocks <= resident
        assert p.blocks * p.ll_tile >= vecs  # the tiles cover the segment ...
        assert (p.blocks - 1) * p.ll_tile < vecs  # ... and the last block's tile is not empty
        assert p.threads == min(max(threads, 64), 512)


def test_ll_applies_to_lossless_calls_that_fit_and_falls_back_to_flags_otherwise():
    assert protocol(4096, Mode.make(None), table=LL_TABLE) == "ll"
    assert protocol(4096, Mode.make(4), table=LL_TABLE) == "flag"  # the table's quantized rows use flags
    assert protocol(4 << 20, Mode.make(None), table=LL_TABLE) == "ll"  # two-shot: a quarter per owner
    assert protocol(64 << 20, Mode.make(None), table=LL_TABLE) == "flag"  # beyond the LL slots
    assert protocol(4096, Mode.make(None, algo="nccl"), table=LL_TABLE) == ""
    assert protocol(4096, Mode.make(None), table=LL_TABLE, protocol="flag") == "flag"
    p = plan(2048, Mode.make(None, algo="twoshot"), table=LL_TABLE, force=Force(128, 16, 1, "ll"))
    assert p.choice == tuning.Choice("twoshot", 128, 16, 1, "ll") and p.protocol == "ll"


def test_heuristic_and_table_protocols():
    assert tuning.heuristic(4, 4096, True).protocol == "ll"
    assert tuning.heuristic(4, 4096, False).protocol == "flag"
    assert tuning.TuningTable(LL_TABLE, "x").choose(4, 100, True).protocol == "ll"
    assert tuning.TuningTable(TABLE, "x").choose(4, 100, True).protocol == "flag"  # absent: flag
    with pytest.raises(ValueError, match="protocol"):
        tuning.Choice("oneshot", protocol="lamport")


@pytest.mark.parametrize("world", [2, 3, 4, 8])
def test_every_quantized_ll_launch_fits_its_slots_and_gives_every_block_data(world):
    lim = limits(world)
    for n, bits, g, a, threads, units in itertools.product(
            [1, 127, 4099, 65537, 1 << 18, 1 << 19, (1 << 21) + 5, 1 << 23], (4, 6, 8, (4, 8)), (32, 128, 1024),
            ("oneshot", "twoshot"), (64, 128, 256, 512), (1, 2, 4)):
        mode = Mode.make(bits, g, algo=a)
        p = plan(n, mode, world=world, force=Force(threads, 0, units, "ll"))
        small = a == "oneshot" and n <= llq_small_unit_max_elems(mode.rs_bits) and g <= 256
        elems = p.build.unit_elems if p.protocol == "ll" else llq_unit_elems(g)
        assert llq_unit_elems(g, a, n, rs_bits=mode.rs_bits) == (8 if small else 16 if g <= 512 else 32)  # <= a warp
        assert elems == (16 if g <= 512 else 32) or (small and elems == 8 and p.units == 1)  # 8: one unit a lane
        used = (mode.rs_bits,) if a == "oneshot" else (mode.rs_bits, mode.ag_bits)
        wire = max(codecs.spec(b).ll_unit_bytes(elems) for b in used)
        groups = -(-n // g)
        seg = (groups if a == "oneshot" else -(-groups // world)) * g  # whole groups, as the reference
        cap = llq_threads(elems, 2, a, mode.rs_bits, mode.ag_bits)
        if p.protocol != "ll":  # even the largest tiles would need more blocks than can be resident
            most = cap * elems * (lim.ll_slot_bytes // wire // cap)
            assert -(-seg // most) > lim.max_blocks
            continue
        assert p.kernel == f"fc_llq_{a}" and p.build == KernelKey(0, mode.rs_bits, mode.ag_bits, elems)
        assert p.seg_elems == seg and p.threads <= cap
        tile = p.threads * elems * p.units
        assert tile % g == 0  # groups never straddle tiles
        assert p.threads * p.units * wire <= lim.ll_slot_bytes  # a tile's LL units fit one slot
        assert 1 <= p.blocks <= lim.max_blocks and p.blocks * tile >= seg and (p.blocks - 1) * tile < seg
    # two-shots with an INT8 step need more than 128 registers at 16-element units: 128 threads
    for bits, a, want in (((8, 8), "twoshot", 128), ((4, 8), "twoshot", 128), ((6, 6), "twoshot", 256),
                          ((8, 8), "oneshot", 256), ((4, 4), "twoshot", 256)):
        for dtype in ("float16", "float32"):
            p = plan(1 << 15, Mode.make(bits, 128, algo=a), dtype, world, force=Force(512, 0, 1, "ll"))
            assert p.threads == want, (bits, a, dtype)


def test_the_small_one_shot_takes_8_element_units_only_as_far_as_their_wire_bytes_allow():
    """INT6/INT8 send 2 bytes an element in LL form at 8- and 16-element units alike; INT4 sends 2
    at 8 elements against 1 at 16, which the link pays for, so its 8-element one-shot stops sooner."""
    for bits in (6, 8):
        assert llq_small_unit_max_elems(bits) == LLQ_SMALL_UNIT_MAX_ELEMS
    assert llq_small_unit_max_elems(4) == LLQ_SMALL_UNIT_MAX_ELEMS_MORE_BYTES < LLQ_SMALL_UNIT_MAX_ELEMS
    largest = LLQ_SMALL_UNIT_MAX_ELEMS_MORE_BYTES
    for bits, n, elems in ((4, largest, 8), (4, largest + 128, 16), (6, largest + 128, 8), (8, largest + 128, 8),
                           (8, LLQ_SMALL_UNIT_MAX_ELEMS, 8), (8, LLQ_SMALL_UNIT_MAX_ELEMS + 128, 16)):
        p = plan(n, Mode.make(bits, 128, algo="oneshot"), world=2, force=Force(256, 0, 1, "ll"))
        assert (p.kernel, p.build.unit_elems, p.units) == ("fc_llq_oneshot", elems, 1), (bits, n)
    with pytest.raises(ValueError, match="rs_bits"):
        llq_unit_elems(128, "oneshot", 4096)  # a one-shot's unit size needs its codec


def test_the_1mb_one_shot_runs_8_element_units_only_where_each_lane_then_holds_one():
    """1 MB of float16 in 8-element units is 256 blocks of 256 threads, one unit a lane: a 132-SM
    GPU's workspace (264 blocks) holds them; an A100's (108 SMs: 216 blocks) would need two units
    a lane, so its plan keeps 16-element units, as do 128-thread blocks."""
    mode = Mode.make(8, 128, algo="oneshot")
    n = LLQ_SMALL_UNIT_MAX_ELEMS
    assert n * 2 == 1 << 20
    p = plan(n, mode, world=2, force=Force(256, 0, 1, "ll"))
    assert (p.kernel, p.build.unit_elems, p.units, p.blocks, p.threads) == ("fc_llq_oneshot", 8, 1, 256, 256)
    smaller = plan(n, mode, world=2, force=Force(256, 0, 1, "ll"), max_blocks=216, sm_count=108)
    assert (smaller.build.unit_elems, smaller.units) == (16, 1), smaller
    narrower = plan(n, mode, world=2, force=Force(128, 0, 1, "ll"))
    assert (narrower.build.unit_elems, narrower.threads) == (16, 128), narrower


def test_modes_with_an_int6_or_int8_step_use_the_rows_wide_entry_where_it_has_one():
    ll = {"algo": "oneshot", "threads": 256, "blocks": 0, "units": 1, "protocol": "ll"}
    flag = {"algo": "oneshot", "threads": 128, "blocks": 32, "units": 1, "protocol": "flag"}
    table = {"worlds": {"2": [
        {"max_bytes": 256 << 10, "lossless": ll, "quantized": ll, "quantized_flag": flag,
         "quantized_wide": ll, "quantized_wide_flag": flag},
        {"max_bytes": 1 << 20, "lossless": ll, "quantized": ll, "quantized_flag": flag, "quantized_wide": flag},
        {"max_bytes": 4 << 20, "lossless": ll, "quantized": ll, "quantized_flag": flag},  # an older table's row
    ]}}
    kw = dict(world=2, table=table)
    for bits in (4, 8, 6, (4, 8)):
        assert protocol(256 << 10, Mode.make(bits), **kw) == "ll"
    assert protocol(1 << 20, Mode.make(4), **kw) == "ll"
    for bits in (8, 6, (4, 8)):
        assert protocol(1 << 20, Mode.make(bits), **kw) == "flag"
        # a row from before INT8 was timed: INT4's LL shape is no guide, the row's flag choice runs
        assert plan((2 << 20) // 2, Mode.make(bits), **kw).choice == tuning.Choice("oneshot", 128, 32, 1, "flag")
    assert protocol(2 << 20, Mode.make(4), **kw) == "ll"
    t = tuning.TuningTable(table, "x")
    assert t.choose(2, 1000, False, flag_only=True, wide=True) == tuning.Choice("oneshot", 128, 32, 1, "flag")
    assert t.choose(2, 1000, True, wide=True).protocol == "ll"  # lossless ignores it


def test_tune_keeps_ll_for_int8_only_where_int8_measured_faster_with_it():
    from flashcomm_cupy.harness.tune import wide_entries
    ll64 = {"algo": "oneshot", "threads": 64, "blocks": 0, "units": 1, "protocol": "ll"}
    ll128 = dict(ll64, threads=128)
    ll_two = dict(ll64, algo="twoshot")
    flag = {"algo": "oneshot", "threads": 128, "blocks": 32, "units": 1, "protocol": "flag", "us": 14.0}
    times = {id(ll64): 12e-6, id(ll128): 10e-6, id(ll_two): None, id(flag): 13e-6}
    assert wide_entries([ll64, ll128, ll_two], flag, lambda e: times[id(e)]) == \
        [dict(ll128, us=10.0), flag]  # INT8's own best LL shape, then the flag choice
    times[id(flag)] = 9e-6
    assert wide_entries([ll64, ll128, ll_two], flag, lambda e: times[id(e)]) == [dict(flag, us=9.0)]
    assert wide_entries([ll_two], flag, lambda e: times[id(e)]) == [dict(flag, us=9.0)]
    times[id(flag)] = None
    assert wide_entries([ll_two], flag, lambda e: times[id(e)]) == []


def test_calls_the_ll_kernels_cannot_serve_fall_back_to_the_rows_flag_choice():
    table = {"worlds": {"4": [
        {"max_bytes": 256 << 20,
         "lossless": {"algo": "oneshot", "threads": 256, "blocks": 0, "protocol": "ll"},
         "quantized": {"algo": "twoshot", "threads": 64, "blocks": 0, "units": 1, "protocol": "ll"},
         "quantized_flag": {"algo": "oneshot", "threads": 128, "blocks": 32, "units": 1, "protocol": "flag"}},
    ]}}
    assert (algo(4096, Mode.make(4), table=table), protocol(4096, Mode.make(4), table=table)) == ("twoshot", "ll")
    # no quantized_wide entry in this row: INT8 takes the row's flag choice
    assert (algo(4096, Mode.make(8), table=table), protocol(4096, Mode.make(8), table=table)) == ("oneshot", "flag")
    # 64 MB would need more LL tiles than blocks can be resident: the row's best flag choice,
    # not the LL row's algorithm with flags
    big = 64 << 20
    p = plan(big // 2, Mode.make(4), table=table)
    assert (p.algo, p.protocol, p.choice) == ("oneshot", "flag", tuning.Choice("oneshot", 128, 32, 1, "flag"))
    # a row without a recorded flag choice keeps its algorithm and shape, with flags
    del table["worlds"]["4"][0]["quantized_flag"]
    assert plan(big // 2, Mode.make(4), table=table).choice == tuning.Choice("twoshot", 64, 0, 1, "flag")


def test_a_launch_hands_the_driver_a_pointer_to_its_own_argument_block():
    from flashcomm_cupy.backends.flash import backend
    fn = types.SimpleNamespace(kernel=types.SimpleNamespace(ptr=0xABC))
    args = np.zeros(1, dtype=ARGS_DTYPE)
    launch = backend.Launch(fn, 7, 128, args)
    assert (launch.grid, launch.block) == ((7,), (128,))
    assert launch.func == (0xABC if backend._launch_kernel is not None else 0)
    # kernelParams[0] is the address of the FcArgs bytes the driver copies at launch
    params = np.frombuffer((np.ctypeslib.as_ctypes_type(np.uintp) * 1).from_address(launch.params_ptr), np.uintp)
    assert int(params[0]) == args.ctypes.data
    launch.ptrs[0], launch.ptrs[1] = 11, 22  # the per-call pointers land in the same bytes
    assert (int(args[0]["in_ptr"]), int(args[0]["out_ptr"])) == (11, 22)


def test_forcing_the_flag_protocol_runs_the_rows_best_flag_choice():
    table = {"worlds": {"4": [
        {"max_bytes": 1 << 20,
         "lossless": {"algo": "twoshot", "threads": 256, "blocks": 32, "protocol": "ll"},
         "lossless_flag": {"algo": "oneshot", "threads": 256, "blocks": 64, "protocol": "flag"},
         "quantized": {"algo": "oneshot", "threads": 128, "blocks": 32}},
    ]}}
    assert plan(2048, Mode.make(None), table=table).choice == tuning.Choice("twoshot", 256, 32, 1, "ll")
    p = plan(2048, Mode.make(None), table=table, protocol="flag")
    assert (p.choice, p.protocol) == (tuning.Choice("oneshot", 256, 64, 1, "flag"), "flag")


def test_backend_settings_must_agree_on_every_rank():
    from flashcomm_cupy._mpi import require_same_everywhere

    class FakeComm:
        def __init__(self, others):
            self.others = others

        def allgather(self, mine):
            return [mine] + self.others

    same = {"max_blocks": 264, "protocol": "auto"}
    require_same_everywhere(FakeComm([dict(same), dict(same)]), same, "settings")
    with pytest.raises(ValueError, match=r"max_blocks: rank 0=264, rank 1=264, rank 2=228"):
        require_same_everywhere(FakeComm([dict(same), dict(same, max_blocks=228)]), same, "settings")


def test_launch_arguments_carry_each_plans_shape_and_the_modes_flags(monkeypatch):
    from flashcomm_cupy.backends.flash import plan as plan_module
    from flashcomm_cupy.backends.flash.backend import launch_args
    base = np.zeros(1, dtype=ARGS_DTYPE)
    p = plan(2048, Mode.make(None), table=LL_TABLE)  # lossless LL one-shot, one vector per thread
    a = launch_args(base, p, 2048, Mode.make(None))[0]
    assert (p.kernel, p.threads, int(a["n"]), int(a["seg_elems"])) == ("fc_ll_oneshot", 256, 2048, 2048)
    assert p.blocks * int(a["ll_tile"]) >= 256 and int(a["units"]) == 0
    mode = Mode.make(4, rotate=True)
    p = plan(1 << 21, mode, table=LL_TABLE, protocol="ll")  # INT4 LL two-shot, 16-element units
    a = launch_args(base, p, 1 << 21, mode)[0]
    assert (p.kernel, p.threads, int(a["seg_elems"]), int(a["group"])) == ("fc_llq_twoshot", 256, 1 << 19, 128)
    assert p.build == KernelKey(0, 4, 4, 16)
    assert int(a["flags"]) == FLAG_ROTATE and np.isclose(a["rot_norm"], 128 ** -0.5)
    assert p.blocks * 256 * 16 * int(a["units"]) >= 1 << 19
    p = plan(3000, Mode.make(8, 64), table=LL_TABLE, protocol="ll")  # quantized LL one-shot: the whole message
    assert (p.kernel, p.threads, p.seg_elems, p.build) == ("fc_llq_oneshot", 128, 3008, KernelKey(0, 8, 8, 8))
    assert p.blocks * 128 * 8 * p.units >= 3008  # a small one-shot: 8-element units
    rotating = Mode.make(8, 64, rotate=True)  # the shared butterflies from SHARED_ROTATION_MIN_WARPS warps
    p = plan(3000, rotating, table=LL_TABLE, protocol="ll")
    assert (p.kernel, p.blocks, p.build) == ("fc_llq_oneshot", 3, KernelKey(0, 8, 8, 8))
    # 8-element units (blocks of 128 threads, 4 warps): from 64 warps for every codec; 16-element
    # ones (small units off): INT4's call costs more than it saves below 32 warps, the others' below 16
    assert SHARED_ROTATION_MIN_WARPS_SMALL_UNITS == 64
    for elems, small_max in ((8, LLQ_SMALL_UNIT_MAX_ELEMS), (16, -1)):
        monkeypatch.setattr(plan_module, "LLQ_SMALL_UNIT_MAX_ELEMS", small_max)
        for bits, warps in ((8, 16), (6, 16), (4, 32)):
            assert SHARED_ROTATION_MIN_WARPS[bits] == warps
            warps = warps if elems == 16 else SHARED_ROTATION_MIN_WARPS_SMALL_UNITS
            mode = Mode.make(bits, 64, rotate=True)
            n = warps * 32 * elems
            p = plan(n, mode, table=LL_TABLE, protocol="ll")
            q = plan(n - 128 * elems, mode, table=LL_TABLE, protocol="ll")  # one block fewer
            assert (p.kernel, p.threads, p.blocks, p.build.unit_elems, q.kernel, q.blocks) == \
                ("fc_llq_oneshot_rot", 128, warps // 4, elems, "fc_llq_oneshot", warps // 4 - 1), (bits, elems)
            assert plan(n, Mode.make(bits, 64), table=LL_TABLE, protocol="ll").kernel == "fc_llq_oneshot"  # unrotated
    p = plan(1 << 21, Mode.make(4, 1024), table=LL_TABLE, protocol="ll")  # a 1024-group spans 32 lanes of 32
    assert (p.kernel, p.threads, p.build) == ("fc_llq_twoshot", 128, KernelKey(0, 4, 4, 32))
    assert p.blocks * 128 * 32 * p.units >= 1 << 19
    mode = Mode.make(8, symmetric=True)
    p = plan(1 << 20, mode, table=LL_TABLE, protocol="ll")  # INT8 LL two-shot: 32-byte units
    assert (p.kernel, int(launch_args(base, p, 1 << 20, mode)[0]["flags"]), p.seg_elems) == \
        ("fc_llq_twoshot", FLAG_SYM, 1 << 18)
    assert p.threads == 128  # an INT8 step: two 256-thread blocks would not fit an SM (llq_threads)
    assert p.blocks * 128 * 16 * p.units >= 1 << 18 and 128 * p.units * 32 <= 8 << 10
    p = plan(1 << 20, mode, table=LL_TABLE, protocol="flag")  # the flag kernels on request
    assert (p.kernel, p.seg_elems) == ("fc_twoshot", 1 << 18)


STAGED_TABLE = {"worlds": {"4": [{"max_bytes": 1 << 30, "lossless": {"algo": "nccl"},
                                  "quantized": {"algo": "twoshot", "threads": 256, "blocks": 264, "units": 4,
                                                "staged": True}}]}}


def test_staged_entries_and_forced_launches_carry_the_staged_kernel():
    assert plan(32 << 20, Mode.make(4), table=STAGED_TABLE).choice.staged
    assert not plan(32 << 20, Mode.make(4)).choice.staged  # tables before it: plain
    # a forced LL launch the LL slots cannot hold runs its shape with flags, staged as asked
    p = plan(32 << 20, Mode.make(4, algo="twoshot"), force=Force(256, 264, 2, "ll", True))
    assert p.choice == tuning.Choice("twoshot", 256, 264, 2, "flag", True) and p.protocol == "staged"


def test_the_staged_kernel_serves_only_quantized_16_bit_two_shots_that_fit_an_sm():
    staged = Force(256, 264, 2, "flag", True)
    p = plan(32 << 20, Mode.make(4, algo="twoshot"), force=staged)
    assert (p.kernel, p.protocol, p.smem) == ("fc_twoshot_staged", "staged", staged_twoshot_smem(2, 4, 4, 4, 256))
    p = plan(32 << 20, Mode.make((4, 8), algo="twoshot"), "bfloat16", force=Force(128, 264, 2, "flag", True))
    assert p.smem == staged_twoshot_smem(2, 4, 8, 4, 128) and p.build == KernelKey(1, 4, 8)
    for mode, dtype, force in ((Mode.make(4, algo="twoshot"), "float32", staged),
                               (Mode.make(None, algo="twoshot"), "float16", staged),
                               (Mode.make(4, algo="twoshot"), "float16", Force(256, 264, 2)),
                               (Mode.make(4, algo="oneshot"), "float16", staged)):
        p = plan(32 << 20, mode, dtype, force=force)
        assert (p.protocol, p.smem) == ("flag", 0) and p.kernel != "fc_twoshot_staged"
    # not one block fits an SM: the plain kernel runs
    assert plan(32 << 20, Mode.make(8, algo="twoshot"), force=staged, per_sm=0).kernel == "fc_twoshot"
    # ranks on different kinds of GPU could size different grids: plain kernel
    assert plan(32 << 20, Mode.make(4, algo="twoshot"), force=staged, uniform_gpus=False).kernel == "fc_twoshot"


def test_staged_shared_memory_grows_with_world_and_codec():
    # 4 ranks, INT4, fp16, 256 threads: two blocks fit an H100 SM's 228 KiB
    assert 2 * (staged_twoshot_smem(2, 4, 4, 4, 256) + 1024) <= 228 << 10
    assert staged_twoshot_smem(2, 8, 8, 4, 256) > staged_twoshot_smem(2, 4, 4, 4, 256)
    assert staged_twoshot_smem(2, 4, 4, 8, 256) > staged_twoshot_smem(2, 4, 4, 2, 256)
    assert staged_twoshot_smem(2, 4, 8, 4, 256) == staged_twoshot_smem(2, 8, 8, 4, 256)  # the wider codec sizes it


def test_a_staged_plan_passes_its_shared_memory_and_launches_only_resident_blocks():
    force = Force(256, 264, 1, "flag", True)
    p = plan(32 << 20, Mode.make(8, algo="twoshot"), force=force, per_sm=1)  # e.g. INT8: one block per SM
    assert (p.kernel, p.threads, p.smem) == ("fc_twoshot_staged", 256, staged_twoshot_smem(2, 8, 8, 4, 256))
    assert p.blocks == 132  # one per SM, though 264 were asked for
    # a larger workspace than two blocks per SM
    p = plan(32 << 20, Mode.make(8, algo="twoshot"), force=Force(256, 528, 1, "flag", True), per_sm=1,
             max_blocks=528)
    assert p.blocks == 132
    p = plan(32 << 20, Mode.make(8, algo="twoshot"), "float32", force=force, per_sm=1)  # float32: the plain kernel
    assert (p.kernel, p.smem, p.blocks) == ("fc_twoshot", 0, 264)
    # what bench rows report
    assert protocol(64 << 20, Mode.make(8, algo="twoshot"), force=force) == "staged"
    assert protocol(64 << 20, Mode.make(8, algo="twoshot"), itemsize=4, force=force) == "flag"
    assert protocol(64 << 20, Mode.make(None, algo="twoshot"), force=force) == "flag"  # lossless: plain
