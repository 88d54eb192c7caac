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
    b.table = tuning.TuningTable(table, "test")
    b.ws = types.SimpleNamespace(layout=WorkspaceLayout(world, max_blocks, slot_bytes))
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


def test_shipped_table_loads_and_covers_four_ranks():
    t = tuning.TuningTable(__import__("json").loads(tuning.SHIPPED.read_text()), str(tuning.SHIPPED)) \
        if tuning.SHIPPED.is_file() else None
    if t is None:
        pytest.skip("no shipped table yet")
    assert 4 in t.rows
    for row in t.rows[4]:
        assert row["quantized"]["algo"] in ("oneshot", "twoshot")
        assert row["lossless"]["algo"] in ("oneshot", "twoshot", "nccl")
