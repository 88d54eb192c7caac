"""Dispatch decisions of the GPU backend, checked on a CPU with the hardware faked.

``FlashGpuBackend._choose`` and ``_launch_shape`` are pure functions of the
tuning table, the workspace shape and the message; the launch they produce
must always fit the workspace and keep every block resident.
"""
import itertools
import types

import numpy as np
import pytest

from flashcomm_cupy import tuning
from flashcomm_cupy.backends.gpu import ELEMS_PER_THREAD, FlashGpuBackend
from flashcomm_cupy.backends.ipc import WorkspaceLayout
from flashcomm_cupy.config import Mode

TABLE = {"worlds": {"4": [
    {"max_bytes": 65536, "lossless": {"algo": "oneshot", "threads": 128, "blocks": 16},
     "quantized": {"algo": "oneshot", "threads": 128, "blocks": 32}},
    {"max_bytes": 4 << 20, "lossless": {"algo": "nccl"},
     "quantized": {"algo": "oneshot", "threads": 256, "blocks": 64}},
    {"max_bytes": 256 << 20, "lossless": {"algo": "nccl"},
     "quantized": {"algo": "twoshot", "threads": 512, "blocks": 132, "units": 4}},
]}}


def fake_backend(world=4, max_blocks=264, slot_bytes=48 << 10, table=TABLE):
    b = object.__new__(FlashGpuBackend)
    b.world_size = world
    b.max_threads = 512
    b.force_launch = None
    b.protocol = "auto"
    b.table = tuning.TuningTable(table, "test")
    b.ws = types.SimpleNamespace(layout=WorkspaceLayout(world, max_blocks, slot_bytes), transport="ipc")
    b.sm_count, b.staged_ok = 132, True
    return b


def test_auto_follows_the_table_and_never_sends_quantized_modes_to_nccl():
    b = fake_backend()
    assert b.resolve_algo(4096, Mode.make(None)) == "oneshot"
    assert b.resolve_algo(1 << 20, Mode.make(None)) == "nccl"
    assert b.resolve_algo(1 << 20, Mode.make(4)) == "oneshot"
    assert b.resolve_algo(64 << 20, Mode.make((4, 8))) == "twoshot"
    assert b.resolve_algo(1 << 30, Mode.make(8)) == "twoshot"  # past the last row: last row
    assert b.resolve_algo(1 << 20, Mode.make(4, algo="twoshot")) == "twoshot"  # explicit wins
    assert b.resolve_algo(1 << 20, Mode.make(None, algo="nccl")) == "nccl"


def test_world_sizes_without_a_table_row_use_the_heuristic():
    b = fake_backend(world=8)
    assert b.resolve_algo(128 << 10, Mode.make(4)) == "oneshot"
    assert b.resolve_algo(1 << 20, Mode.make(4)) == "twoshot"


@pytest.mark.parametrize("world", [2, 3, 4, 8])
def test_every_launch_fits_the_workspace_and_covers_the_message(world):
    b = fake_backend(world=world)
    sizes = [1, 31, 32, 1000, 4099, 65537, 1 << 20, (64 << 20) + 3]
    modes = [Mode.make(bits, g) for bits, g in itertools.product((None, 4, 6, 8, (4, 8)), (32, 128, 1024))]
    for n, mode, dtype, algo, threads, units, blocks in itertools.product(
            sizes, modes, ("float16", "float32"), ("oneshot", "twoshot"), (64, 128, 256, 512), (1, 4, 16),
            (0, 8, 264)):
        choice = tuning.Choice(algo, threads, blocks, units)
        t, nb, seg, u = b._launch_shape(choice, n, dtype, mode)
        quantum = ELEMS_PER_THREAD if mode.lossless else mode.group_size
        per_elem = np.dtype(dtype).itemsize if mode.lossless else max(
            mode.rs_codec.wire_bytes_per_element(), mode.ag_codec.wire_bytes_per_element())
        assert seg % quantum == 0
        assert seg * (world if algo == "twoshot" else 1) >= n
        tile = t * ELEMS_PER_THREAD * u
        assert tile % quantum == 0  # groups never straddle tiles
        assert tile * per_elem + 4 * 16 <= b.ws.layout.slot_bytes  # a tile's wire chunk fits its slot
        assert 1 <= nb <= (b.ws.layout.max_blocks // 2 if t > 256 else b.ws.layout.max_blocks)
        assert 64 <= t <= 512 and u >= 1


def test_force_launch_overrides_the_table_for_tuning_sweeps():
    b = fake_backend()
    b.force_launch = (256, 132, 8)
    c = b._choose(256 << 20, Mode.make(4, algo="twoshot"))
    assert (c.algo, c.threads, c.blocks, c.units) == ("twoshot", 256, 132, 8)


def test_tuning_table_rows_and_merge(tmp_path):
    from flashcomm_cupy.harness.tune import merge
    t = tuning.TuningTable(TABLE, "x")
    assert t.choose(4, 100, False) == tuning.Choice("oneshot", 128, 32, 1)
    assert t.choose(4, 65537, True).algo == "nccl"
    merged = merge(TABLE, {"worlds": {"2": TABLE["worlds"]["4"]}, "card": "H100"})
    assert sorted(merged["worlds"]) == ["2", "4"] and merged["card"] == "H100"
    path = tmp_path / "t.json"
    tuning.TuningTable(merged, "x").save(path)
    assert tuning.load(str(path)).choose(2, 100, False).algo == "oneshot"
    # re-tuning some sizes replaces just those rows of that world size
    rows = TABLE["worlds"]["4"]
    retuned = dict(rows[0], quantized={"algo": "twoshot", "threads": 256, "blocks": 0, "units": 1, "protocol": "ll"})
    again = merge(merged, {"worlds": {"4": [retuned]}})
    assert again["worlds"]["4"] == [retuned] + rows[1:] and again["worlds"]["2"] == rows
    extra = dict(rows[0], max_bytes=rows[-1]["max_bytes"] * 4)
    assert merge(merged, {"worlds": {"4": [extra]}})["worlds"]["4"] == rows + [extra]  # kept sorted by size
    # rows inside the re-tuned range go even when the new grid skips their sizes
    a, b = dict(rows[0], max_bytes=rows[0]["max_bytes"] // 2), dict(rows[-1], max_bytes=rows[-1]["max_bytes"] * 2)
    assert merge(merged, {"worlds": {"4": [a, b]}})["worlds"]["4"] == [a, b]
    assert merge(merged, {"worlds": {"4": []}})["worlds"]["4"] == rows


def test_shipped_table_loads_and_covers_two_and_four_ranks():
    t = tuning.TuningTable(__import__("json").loads(tuning.SHIPPED.read_text()), str(tuning.SHIPPED)) \
        if tuning.SHIPPED.is_file() else None
    if t is None:
        pytest.skip("no shipped table yet")
    assert 4 in t.rows and 2 in t.rows
    for rows in t.rows.values():
        for row in rows:
            assert row["quantized"]["algo"] in ("oneshot", "twoshot")
            assert row["lossless"]["algo"] in ("oneshot", "twoshot", "nccl")
            for cls in ("lossless", "quantized"):
                if row[cls].get("protocol") == "ll":  # LL rows say what runs where LL cannot
                    assert row[cls + "_flag"]["protocol"] == "flag"
            if row["quantized"].get("protocol") == "ll":  # and INT6/INT8 were measured on their own
                assert row["quantized_wide"]["algo"] in ("oneshot", "twoshot")


# ------------------------------------------------------------------ LL (data-as-signal) kernels
LL_TABLE = {"worlds": {"4": [
    {"max_bytes": 1 << 20, "lossless": {"algo": "oneshot", "threads": 256, "blocks": 0, "protocol": "ll"},
     "quantized": {"algo": "oneshot", "threads": 128, "blocks": 32}},
    {"max_bytes": 256 << 20, "lossless": {"algo": "twoshot", "threads": 512, "blocks": 0, "protocol": "ll"},
     "quantized": {"algo": "twoshot", "threads": 512, "blocks": 132, "units": 4}},
]}}


@pytest.mark.parametrize("world", [2, 3, 4, 8])
def test_every_ll_launch_fits_its_slots_and_gives_every_block_data(world):
    b = fake_backend(world=world)
    layout = b.ws.layout
    slot_vecs = layout.ll_slot_bytes // 16
    for n, itemsize, algo, threads, blocks in itertools.product(
            [1, 7, 8, 9, 2048, 4099, 65537, 1 << 20, 3 << 20], (2, 4), ("oneshot", "twoshot"),
            (64, 128, 256, 512), (0, 1, 8, 132, 264)):
        choice = tuning.Choice(algo, threads, blocks, 1, "ll")
        shape = b._ll_shape(choice, n, itemsize, Mode.make(None))
        per = 16 // itemsize
        vecs = -(-(n if algo == "oneshot" else -(-n // world)) // per)
        resident = layout.max_blocks // (2 if threads > 256 else 1)
        if shape is None:  # only when the message cannot fit the LL slots of all resident blocks
            assert vecs > resident * slot_vecs
            continue
        t, nb, seg, tile = shape
        assert seg == vecs * per and seg * (1 if algo == "oneshot" else world) >= n
        assert 1 <= tile <= slot_vecs
        assert 1 <= nb <= resident
        assert nb * tile >= vecs  # the tiles cover the segment ...
        assert (nb - 1) * tile < vecs  # ... and the last block's tile is not empty
        assert t == min(max(threads, 64), 512)


def test_ll_applies_to_lossless_calls_that_fit_and_falls_back_to_flags_otherwise():
    b = fake_backend(table=LL_TABLE)
    assert b.resolve_protocol(4096, Mode.make(None)) == "ll"
    assert b.resolve_protocol(4096, Mode.make(4)) == "flag"  # the table's quantized rows use flags
    assert b.resolve_protocol(4 << 20, Mode.make(None)) == "ll"  # two-shot: a quarter per owner
    assert b.resolve_protocol(64 << 20, Mode.make(None)) == "flag"  # beyond the LL slots
    assert b.resolve_protocol(4096, Mode.make(None, algo="nccl")) == ""
    b.protocol = "flag"
    assert b.resolve_protocol(4096, Mode.make(None)) == "flag"
    b.protocol = "auto"
    b.force_launch = (128, 16, 1, "ll")
    assert b._choose(4096, Mode.make(None, algo="twoshot")) == tuning.Choice("twoshot", 128, 16, 1, "ll")


def test_heuristic_and_table_protocols():
    assert tuning.heuristic(4, 4096, True).protocol == "ll"
    assert tuning.heuristic(4, 4096, False).protocol == "flag"
    assert tuning.TuningTable(LL_TABLE, "x").choose(4, 100, True).protocol == "ll"
    assert tuning.TuningTable(TABLE, "x").choose(4, 100, True).protocol == "flag"  # absent: flag
    with pytest.raises(ValueError, match="protocol"):
        tuning.Choice("oneshot", protocol="lamport")


def test_workspace_layout_keeps_regions_apart():
    for world, max_blocks in itertools.product((2, 4, 8), (8, 264)):
        lay = WorkspaceLayout(world, max_blocks, 48 << 10)
        # flags: three sets, the flag kernels' epochs, then the LL counters (fc_ll_epochs)
        ll_counters_end = lay.flags_off + 3 * lay.flag_set_bytes + 2 * 4 * max_blocks
        assert ll_counters_end <= lay.rs_off
        assert lay.rs_off + lay.region_bytes <= lay.ag_off
        assert lay.ag_off + lay.region_bytes <= lay.os_off
        assert lay.os_off + 2 * lay.region_bytes <= lay.ll_off
        assert lay.ll_bytes == 2 * 2 * world * max_blocks * lay.ll_slot_bytes
        assert lay.ll_off + lay.ll_bytes <= lay.total
        assert lay.ll_off % 16 == 0 and lay.ll_slot_bytes % 16 == 0


@pytest.mark.parametrize("world", [2, 3, 4, 8])
def test_every_quantized_ll_launch_fits_its_slots_and_gives_every_block_data(world):
    from flashcomm_cupy.backends.gpu import LLQ_UNIT_BYTES, llq_threads, llq_unit_elems
    b = fake_backend(world=world)
    layout = b.ws.layout
    for n, bits, g, algo, threads, units in itertools.product(
            [1, 127, 4099, 65537, 1 << 19, (1 << 21) + 5, 1 << 23], (4, 6, 8, (4, 8)), (32, 128, 1024),
            ("oneshot", "twoshot"), (64, 128, 256, 512), (1, 2, 4)):
        mode = Mode.make(bits, g)
        shape = b._ll_shape(tuning.Choice(algo, threads, 0, units, "ll"), n, 2, mode)
        elems = llq_unit_elems(g)
        assert elems == (16 if g <= 512 else 32)  # a group spans at most one warp's units
        used = (mode.rs_bits,) if algo == "oneshot" else (mode.rs_bits, mode.ag_bits)
        wire = max(LLQ_UNIT_BYTES[elems, b_] for b_ in used)
        groups = -(-n // g)
        seg = (groups if algo == "oneshot" else -(-groups // world)) * g  # whole groups, as the reference
        cap = llq_threads(elems, 2, algo, mode.rs_bits, mode.ag_bits)
        if shape is None:  # even the largest tiles would need more blocks than can be resident
            most = cap * elems * (layout.ll_slot_bytes // wire // cap)
            assert -(-seg // most) > layout.max_blocks
            continue
        t, nb, s, u = shape
        assert s == seg and t <= cap
        tile = t * elems * u
        assert tile % g == 0  # groups never straddle tiles
        assert t * u * wire <= layout.ll_slot_bytes  # a tile's LL units fit one slot
        assert 1 <= nb <= layout.max_blocks and nb * tile >= s and (nb - 1) * tile < s
    # two-shots with an INT8 step need more than 128 registers at 16-element units: 128 threads
    for bits, algo, want in (((8, 8), "twoshot", 128), ((4, 8), "twoshot", 128), ((6, 6), "twoshot", 256),
                             ((8, 8), "oneshot", 256), ((4, 4), "twoshot", 256)):
        for itemsize in (2, 4):
            shape = b._ll_shape(tuning.Choice(algo, 512, 0, 1, "ll"), 1 << 16, itemsize, Mode.make(bits, 128))
            assert shape[0] == want, (bits, algo, itemsize)
    # the flag protocol never runs the LL kernels
    assert b._ll_shape(tuning.Choice("oneshot", 128, 0, 1, "flag"), 4096, 2, Mode.make(4)) is None


def test_modes_with_an_int6_or_int8_step_use_the_rows_wide_entry_where_it_has_one():
    ll = {"algo": "oneshot", "threads": 256, "blocks": 0, "units": 1, "protocol": "ll"}
    flag = {"algo": "oneshot", "threads": 128, "blocks": 32, "units": 1, "protocol": "flag"}
    table = {"worlds": {"2": [
        {"max_bytes": 256 << 10, "lossless": ll, "quantized": ll, "quantized_flag": flag,
         "quantized_wide": ll, "quantized_wide_flag": flag},
        {"max_bytes": 1 << 20, "lossless": ll, "quantized": ll, "quantized_flag": flag, "quantized_wide": flag},
        {"max_bytes": 4 << 20, "lossless": ll, "quantized": ll, "quantized_flag": flag},  # an older table's row
    ]}}
    b = fake_backend(world=2, table=table)
    for bits in (4, 8, 6, (4, 8)):
        assert b.resolve_protocol(256 << 10, Mode.make(bits), 2) == "ll"
    assert b.resolve_protocol(1 << 20, Mode.make(4), 2) == "ll"
    for bits in (8, 6, (4, 8)):
        assert b.resolve_protocol(1 << 20, Mode.make(bits), 2) == "flag"
        # a row from before INT8 was timed: INT4's LL shape is no guide, the row's flag choice runs
        assert b.resolve_protocol(2 << 20, Mode.make(bits), 2) == "flag"
        assert b._resolve((2 << 20) // 2, 2, Mode.make(bits))[0] == tuning.Choice("oneshot", 128, 32, 1, "flag")
    assert b.resolve_protocol(2 << 20, Mode.make(4), 2) == "ll"
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
        {"quantized_wide": dict(ll128, us=10.0), "quantized_wide_flag": flag}  # INT8's own best LL shape
    times[id(flag)] = 9e-6
    assert wide_entries([ll64, ll128, ll_two], flag, lambda e: times[id(e)]) == {"quantized_wide": dict(flag, us=9.0)}
    assert wide_entries([ll_two], flag, lambda e: times[id(e)]) == {"quantized_wide": dict(flag, us=9.0)}


def test_calls_the_ll_kernels_cannot_serve_fall_back_to_the_rows_flag_choice():
    table = {"worlds": {"4": [
        {"max_bytes": 256 << 20,
         "lossless": {"algo": "oneshot", "threads": 256, "blocks": 0, "protocol": "ll"},
         "quantized": {"algo": "twoshot", "threads": 64, "blocks": 0, "units": 1, "protocol": "ll"},
         "quantized_flag": {"algo": "oneshot", "threads": 128, "blocks": 32, "units": 1, "protocol": "flag"}},
    ]}}
    b = fake_backend(table=table)
    assert (b.resolve_algo(4096, Mode.make(4)), b.resolve_protocol(4096, Mode.make(4))) == ("twoshot", "ll")
    # no quantized_wide entry in this row: INT8 takes the row's flag choice
    assert (b.resolve_algo(4096, Mode.make(8)), b.resolve_protocol(4096, Mode.make(8))) == ("oneshot", "flag")
    # 64 MB would need more LL tiles than blocks can be resident: the row's best flag choice,
    # not the LL row's algorithm with flags
    big = 64 << 20
    assert (b.resolve_algo(big, Mode.make(4)), b.resolve_protocol(big, Mode.make(4))) == ("oneshot", "flag")
    choice, ll = b._resolve(big // 2, 2, Mode.make(4))
    assert ll is None and choice == tuning.Choice("oneshot", 128, 32, 1, "flag")
    # a row without a recorded flag choice keeps its algorithm and shape, with flags
    del table["worlds"]["4"][0]["quantized_flag"]
    b = fake_backend(table=table)
    assert b._resolve(big // 2, 2, Mode.make(4))[0] == tuning.Choice("twoshot", 64, 0, 1, "flag")


def test_a_plan_hands_the_driver_a_pointer_to_its_own_argument_block():
    from flashcomm_cupy import _kernels
    from flashcomm_cupy.backends import gpu
    fn = types.SimpleNamespace(kernel=types.SimpleNamespace(ptr=0xABC))
    args = np.zeros(1, dtype=_kernels.ARGS_DTYPE)
    plan = gpu._Plan(fn, 7, 128, args)
    assert (plan.grid, plan.block) == ((7,), (128,))
    assert plan.func == (0xABC if gpu._launch_kernel is not None else 0)
    # kernelParams[0] is the address of the FcArgs bytes the driver copies at launch
    params = np.frombuffer((np.ctypeslib.as_ctypes_type(np.uintp) * 1).from_address(plan.params_ptr), np.uintp)
    assert int(params[0]) == args.ctypes.data
    plan.ptrs[0], plan.ptrs[1] = 11, 22  # the per-call pointers land in the same bytes
    assert (int(args[0]["in_ptr"]), int(args[0]["out_ptr"])) == (11, 22)


def test_forcing_the_flag_protocol_runs_the_rows_best_flag_choice():
    table = {"worlds": {"4": [
        {"max_bytes": 1 << 20,
         "lossless": {"algo": "twoshot", "threads": 256, "blocks": 32, "protocol": "ll"},
         "lossless_flag": {"algo": "oneshot", "threads": 256, "blocks": 64, "protocol": "flag"},
         "quantized": {"algo": "oneshot", "threads": 128, "blocks": 32}},
    ]}}
    b = fake_backend(table=table)
    assert b._resolve(2048, 2, Mode.make(None))[0] == tuning.Choice("twoshot", 256, 32, 1, "ll")
    b.protocol = "flag"
    assert b._resolve(2048, 2, Mode.make(None)) == (tuning.Choice("oneshot", 256, 64, 1, "flag"), None)
    assert b.resolve_protocol(4096, Mode.make(None)) == "flag"


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


def test_plans_fill_the_argument_block_for_each_kernel_family(monkeypatch):
    from flashcomm_cupy import _kernels
    monkeypatch.setattr(_kernels, "function", lambda name, *spec: types.SimpleNamespace(name=name, spec=spec))
    b = fake_backend(table=LL_TABLE)
    b._args = np.zeros(1, dtype=_kernels.ARGS_DTYPE)
    b._plans = {}

    def plan(n, mode):
        p = b._plan(n, "float16", mode)
        return p.fn.name, p.grid, p.block, p.args[0]

    name, grid, block, a = plan(2048, Mode.make(None))  # lossless LL one-shot, one vector per thread
    assert (name, block, int(a["n"]), int(a["seg_elems"])) == ("fc_ll_oneshot", (256,), 2048, 2048)
    assert grid[0] * int(a["ll_tile"]) >= 256
    b.protocol = "ll"  # the table's quantized rows use flags
    name, grid, block, a = plan(1 << 21, Mode.make(4, rotate=True))  # INT4 LL two-shot, 16-element units
    assert (name, block, int(a["seg_elems"]), int(a["group"])) == ("fc_llq_twoshot", (256,), 1 << 19, 128)
    assert b._plan(1 << 21, "float16", Mode.make(4, rotate=True)).fn.spec == (0, 4, 4, 16)
    assert int(a["flags"]) == _kernels.FLAG_ROTATE and np.isclose(a["rot_norm"], 128 ** -0.5)
    assert grid[0] * 256 * 16 * int(a["units"]) >= 1 << 19
    name, grid, block, a = plan(3000, Mode.make(8, 64))  # quantized LL one-shot: the whole message, any codec
    assert (name, block, int(a["seg_elems"]), int(a["group"])) == ("fc_llq_oneshot", (128,), 3008, 64)
    assert b._plan(3000, "float16", Mode.make(8, 64)).fn.spec == (0, 8, 8, 16)
    assert grid[0] * 128 * 16 * int(a["units"]) >= 3008
    name, grid, block, a = plan(1 << 21, Mode.make(4, 1024))  # a 1024-group spans 32 lanes of 32 elements
    assert (name, block) == ("fc_llq_twoshot", (128,))
    assert b._plan(1 << 21, "float16", Mode.make(4, 1024)).fn.spec == (0, 4, 4, 32)
    assert grid[0] * 128 * 32 * int(a["units"]) >= 1 << 19
    name, grid, block, a = plan(1 << 20, Mode.make(8, symmetric=True))  # INT8 LL two-shot: 32-byte units
    assert (name, int(a["flags"]), int(a["seg_elems"])) == ("fc_llq_twoshot", _kernels.FLAG_SYM, 1 << 18)
    assert block == (128,)  # an INT8 step: two 256-thread blocks would not fit an SM (llq_threads)
    assert grid[0] * 128 * 16 * int(a["units"]) >= 1 << 18 and 128 * int(a["units"]) * 32 <= 8 << 10
    b.protocol = "flag"
    name, grid, block, a = plan(1 << 20, Mode.make(8, symmetric=True))  # the flag kernels on request
    assert (name, int(a["flags"]), int(a["seg_elems"])) == ("fc_twoshot", _kernels.FLAG_SYM, 1 << 18)
    assert b._plan(1 << 20, "float16", Mode.make(8, symmetric=True)) is b._plan(1 << 20, "float16",
                                                                                   Mode.make(8, symmetric=True))


def test_staged_entries_and_forced_launches_carry_the_staged_kernel():
    table = {"worlds": {"4": [{"max_bytes": 1 << 30, "lossless": {"algo": "nccl"},
                               "quantized": {"algo": "twoshot", "threads": 256, "blocks": 264, "units": 4,
                                             "staged": True}}]}}
    b = fake_backend(table=table)
    assert b._choose(64 << 20, Mode.make(4)).staged
    assert not tuning.TuningTable(TABLE, "x").choose(4, 64 << 20, False).staged  # tables before it: plain
    b.force_launch = (256, 264, 2, "ll", True)
    assert b._choose(64 << 20, Mode.make(4, algo="twoshot"), flag_only=True) == \
        tuning.Choice("twoshot", 256, 264, 2, "flag", True)


def test_the_staged_kernel_serves_only_quantized_16_bit_two_shots_that_fit_an_sm(monkeypatch):
    from flashcomm_cupy.backends import gpu
    occupancy = {"blocks": 2}
    monkeypatch.setattr(gpu._kernels, "function", lambda name, *a: name)
    monkeypatch.setattr(gpu, "_resident_blocks", lambda fn, threads, smem: occupancy["blocks"])
    b = fake_backend(world=4)
    staged = tuning.Choice("twoshot", 256, 264, 2, "flag", True)
    assert b._staged_launch(staged, "float16", Mode.make(4), 256) == (
        "fc_twoshot_staged", 2, gpu.staged_twoshot_smem(2, 4, 4, 4, 256))
    assert b._staged_launch(staged, "bfloat16", Mode.make((4, 8)), 128)[2] == gpu.staged_twoshot_smem(2, 4, 8, 4, 128)
    for choice, name, mode in ((staged, "float32", Mode.make(4)), (staged, "float16", Mode.make(None)),
                               (tuning.Choice("twoshot", 256, 264, 2), "float16", Mode.make(4)),
                               (tuning.Choice("oneshot", 256, 264, 2, "flag", True), "float16", Mode.make(4))):
        assert b._staged_launch(choice, name, mode, 256) is None
    occupancy["blocks"] = 0  # not one block fits an SM: the plain kernel runs
    assert b._staged_launch(staged, "float16", Mode.make(8), 512) is None
    occupancy["blocks"] = 2
    b.staged_ok = False  # ranks on different kinds of GPU could size different grids: plain kernel
    assert b._staged_launch(staged, "float16", Mode.make(4), 256) is None


def test_staged_shared_memory_grows_with_world_and_codec():
    from flashcomm_cupy.backends.gpu import staged_twoshot_smem
    # 4 ranks, INT4, fp16, 256 threads: two blocks fit an H100 SM's 228 KiB
    assert 2 * (staged_twoshot_smem(2, 4, 4, 4, 256) + 1024) <= 228 << 10
    assert staged_twoshot_smem(2, 8, 8, 4, 256) > staged_twoshot_smem(2, 4, 4, 4, 256)
    assert staged_twoshot_smem(2, 4, 4, 8, 256) > staged_twoshot_smem(2, 4, 4, 2, 256)
    assert staged_twoshot_smem(2, 4, 8, 4, 256) == staged_twoshot_smem(2, 8, 8, 4, 256)  # the wider codec sizes it


def test_a_staged_plan_passes_its_shared_memory_and_launches_only_resident_blocks(monkeypatch):
    from flashcomm_cupy import _kernels
    from flashcomm_cupy.backends import gpu
    monkeypatch.setattr(_kernels, "function", lambda name, *spec: types.SimpleNamespace(name=name, spec=spec))
    monkeypatch.setattr(gpu, "_resident_blocks", lambda fn, threads, smem: 1)  # e.g. INT8: one block per SM
    b = fake_backend(world=4)
    b._args = np.zeros(1, dtype=_kernels.ARGS_DTYPE)
    b._plans = {}
    b.force_launch = (256, 264, 1, "flag", True)
    p = b._plan(64 << 20, "float16", Mode.make(8, algo="twoshot"))
    assert (p.fn.name, p.block, p.smem) == ("fc_twoshot_staged", (256,), gpu.staged_twoshot_smem(2, 8, 8, 4, 256))
    assert p.grid[0] == b.sm_count  # one per SM, though 264 were asked for
    big = fake_backend(world=4, max_blocks=528)  # a larger workspace than two blocks per SM
    big._args, big._plans = b._args, {}
    big.force_launch = (256, 528, 1, "flag", True)
    assert big._plan(64 << 20, "float16", Mode.make(8, algo="twoshot")).grid[0] == big.sm_count
    p = b._plan(64 << 20, "float32", Mode.make(8, algo="twoshot"))  # float32: the plain kernel
    assert (p.fn.name, p.smem, p.grid[0]) == ("fc_twoshot", 0, 264)
    # what bench rows report
    assert b.resolve_protocol(64 << 20, Mode.make(8, algo="twoshot")) == "staged"
    assert b.resolve_protocol(64 << 20, Mode.make(8, algo="twoshot"), itemsize=4) == "flag"
    assert b.resolve_protocol(64 << 20, Mode.make(None, algo="twoshot")) == "flag"  # lossless: plain
