"""The plans of the flag two-shot's halves (the hierarchical all-reduce's node-local steps)."""
from __future__ import annotations

import itertools
import types
from dataclasses import replace

import numpy as np
import pytest

from flashcomm_cupy.backends.flash import backend as flash_backend
from flashcomm_cupy.backends.flash.layout import FLAG_ROTATE
from flashcomm_cupy.backends.flash.plan import PHASE_KERNELS, select_phase_plan, select_plan
from flashcomm_cupy.config import Mode
from flashcomm_cupy.reference import SegmentLayout
from test_plan import H200, DTYPES, MODES, SHIPPED, SIZES, check_plan, limits

PHASES = tuple(PHASE_KERNELS)


@pytest.mark.parametrize("world", range(2, 9))
def test_both_halves_cut_the_message_as_the_flag_twoshot_and_the_reference(world):
    lim = limits(world)
    for n, dtype, mode in itertools.product(SIZES, DTYPES, MODES + [Mode.make(4, 128, algo="hierarchical")]):
        rs, ag = (select_phase_plan(n, dtype, mode, phase, world=world, table=SHIPPED, limits=lim) for phase in PHASES)
        assert (rs.kernel, ag.kernel) == ("fc_reduce_scatter", "fc_all_gather")
        assert replace(rs, kernel="") == replace(ag, kernel="")  # one shard layout for both halves
        assert rs.algo == "twoshot" and rs.protocol == "flag" and rs.smem == 0
        check_plan(replace(rs, kernel="fc_twoshot"), n, dtype, mode, world, lim)
        if not mode.lossless:  # the shard is the reference's segment (lossless: whole 32-element units)
            assert rs.seg_elems == SegmentLayout(n, world, mode.group_size).segment_elems


def test_the_halves_never_run_staged_or_ll_whatever_the_settings():
    """Where the table's row asks for LL (1 MB) or the staged two-shot (32 MB) the halves still run
    the flag protocol, at that row's best flag shape."""
    world, lim = 2, limits(2, card=H200, per_sm=2)
    mode = Mode.make(4, 128)
    for n, flat in ((1 << 20, "ll"), (1 << 24, "staged")):
        assert select_plan(n, "bfloat16", mode, world=world, table=SHIPPED, limits=lim).protocol == flat
        for phase in PHASES:
            plan = select_phase_plan(n, "bfloat16", mode, phase, world=world, table=SHIPPED, limits=lim)
            assert plan.protocol == "flag" and plan.kernel == PHASE_KERNELS[phase]


def test_a_forced_launch_shapes_the_halves():
    lim = limits(4)
    force = (128, 3, 2)
    plan = select_phase_plan(1 << 20, "float16", Mode.make(4, 128), "all_gather", world=4, table=SHIPPED,
                             limits=lim, force=force)
    assert (plan.threads, plan.blocks, plan.units) == (128, 3, 2)


def test_unknown_phases_and_single_ranks_are_refused():
    with pytest.raises(ValueError, match="phase must be one of"):
        select_phase_plan(100, "float16", Mode.make(4), "all_reduce", world=2, table=SHIPPED, limits=limits(2))
    with pytest.raises(ValueError, match="two or more ranks"):
        select_phase_plan(100, "float16", Mode.make(4), "reduce_scatter", world=1, table=SHIPPED, limits=limits(1))


# --------------------------------------------------------------------------- the flash backend's halves, faked GPU
from test_flash_backend import _Array, _Comm, fake_gpu  # noqa: E402,F401  (fake_gpu: the fixture)


class _Shard(_Array):
    def __init__(self, n, ptr=0x3000, dtype=np.float32):
        super().__init__(n, ptr)
        self.dtype = np.dtype(dtype)
        self.flags = types.SimpleNamespace(c_contiguous=True)


def test_the_flash_backend_launches_each_half_with_its_plan(fake_gpu):
    seen, table = fake_gpu
    b = flash_backend.FlashGpuBackend(_Comm(), tuning_path=table)
    mode, n = Mode.make(4, 128, rotate=True, algo="hierarchical"), 100_003
    seg = b.shard_elems(n, np.float16, mode)
    assert seg == SegmentLayout(n, 2, 128).segment_elems
    b.reduce_scatter(_Array(n, 0x1000), _Shard(seg), mode)
    b.all_gather(_Shard(seg), _Array(n, 0x2000), mode)
    for (name, grid, block, args, smem), phase, ptrs in zip(
            seen["launches"], PHASES, ((0x1000, 0x3000), (0x3000, 0x2000))):
        want = select_phase_plan(n, "float16", mode, phase, world=2, table=b.table, limits=b.limits)
        assert (name, grid, block, smem) == (want.kernel, (want.blocks,), (want.threads,), 0)
        assert (int(args["in_ptr"]), int(args["out_ptr"]), int(args["n"])) == ptrs + (n,)
        assert (int(args["seg_elems"]), int(args["units"]), int(args["flags"])) == (seg, want.units, FLAG_ROTATE)
    b.close()


def test_a_wrong_shard_or_a_failed_call_launches_nothing(fake_gpu):
    seen, table = fake_gpu
    b = flash_backend.FlashGpuBackend(_Comm(), tuning_path=table)
    mode, n = Mode.make(4), 4099
    seg = b.shard_elems(n, np.float16, mode)
    for shard in (_Shard(seg + 128), _Shard(seg, dtype=np.float16)):
        with pytest.raises(ValueError, match=f"contiguous float32 array of {seg} elements"):
            b.reduce_scatter(_Array(n), shard, mode)
        with pytest.raises(ValueError, match=f"contiguous float32 array of {seg} elements"):
            b.all_gather(shard, _Array(n, 0x2000), mode)
    b.flash_ws.error[0], b.flash_ws.error[2], b.flash_ws.error[6] = 2, 1, 1  # rank 1 gave up
    with pytest.raises(Exception, match="rank 1 gave up"):
        b.all_gather(_Shard(seg), _Array(n, 0x2000), mode)
    assert not seen["launches"]
    b.close()


@pytest.mark.parametrize("dtype", DTYPES)
def test_lossless_shards_of_whole_units_give_the_references_bits(dtype):
    """Lossless halves cut segments of 32-element units, not of the mode's groups (the reference's
    SegmentLayout): the hierarchical sum composed over those shards is still the reference's."""
    from flashcomm_cupy.dtypes import DTYPES as NP_DTYPES, from_f32, to_f32
    from flashcomm_cupy.reference import (flash_all_reduce_reference, gather_segment, reduce_owner_segment,
                                          sum_decoded)
    from flashcomm_cupy.topology import NodeLayout
    nodes, per_node, n = 2, 3, 1000
    mode = Mode.make(None, 128, algo="hierarchical")
    rng = np.random.default_rng(3)
    ins = [rng.standard_normal(n).astype(np.float32).astype(NP_DTYPES[dtype]) for _ in range(nodes * per_node)]
    seg = select_phase_plan(n, dtype, mode, "reduce_scatter", world=per_node, table=SHIPPED,
                            limits=limits(per_node)).seg_elems
    assert seg != SegmentLayout(n, per_node, 128).segment_elems  # the case this test is about
    padded = [np.concatenate([to_f32(x), np.zeros(seg * per_node - n, np.float32)]) for x in ins]
    full = np.empty(seg * per_node, np.float32)
    for p in range(per_node):
        part = slice(p * seg, (p + 1) * seg)
        shards = [reduce_owner_segment(p, [padded[k * per_node + q][part] for q in range(per_node)], mode)
                  for k in range(nodes)]
        full[part] = gather_segment(sum_decoded(shards, mode), mode, NP_DTYPES[dtype])
    want = flash_all_reduce_reference(ins, mode=mode, nodes=NodeLayout.blocks(nodes * per_node, per_node))[0]
    got = from_f32(full[:n], NP_DTYPES[dtype])
    assert np.array_equal(got.view(np.uint8), want.view(np.uint8))
