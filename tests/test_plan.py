"""select_plan as a pure function: no GPU, no backend object, the hardware in a Limits.

Worlds 2..8, every dtype and codec, group sizes 32..1024, rotation and symmetric scaling, sizes
from one element to 2^28, forced launches, protocol settings, table fallbacks and the card
lookup.  (That it makes the same decisions as the backend before it: test_plan_fixture.py.)
"""
from __future__ import annotations

import itertools

import pytest

from flashcomm_cupy import codecs
from flashcomm_cupy.backends.flash import table as tuning
from flashcomm_cupy.backends.flash.layout import WorkspaceLayout
from flashcomm_cupy.backends.flash.plan import (ELEMS_PER_THREAD, NCCL_PLAN, Force, KernelKey, Limits,
                                                llq_unit_elems, select_plan, shares_rotation_code)
from flashcomm_cupy.config import Mode
from flashcomm_cupy.dtypes import KERNEL_DTYPE_CODE

H100, H200 = "NVIDIA H100 80GB HBM3", "NVIDIA H200"
SHIPPED = tuning.load(str(tuning.SHIPPED))
DTYPES = ("float16", "bfloat16", "float32")
MODES = ([Mode.make(None)] + [Mode.make(b, g) for b in (4, 6, 8, (4, 8), (8, 4)) for g in (32, 128, 1024)]
         + [Mode.make(4, 128, symmetric=True, rotate=True), Mode.make((4, 8), 64, rotate=True)])
SIZES = [1, 7, 33, 1000, 4099, 1 << 14, (1 << 17) + 5, 1 << 20, (1 << 22) - 3, 1 << 24, 1 << 28]


def limits(world, card=H100, per_sm=2, **kw):
    return Limits.of_layout(WorkspaceLayout(world, kw.pop("max_blocks", 264), 48 << 10), card=card,
                            blocks_per_sm=lambda kernel, build, threads, smem: per_sm, **kw)


def check_plan(p, n, dtype, mode, world, lim):
    """What every flash plan must satisfy: the kernel its protocol and algorithm name, the build its
    dtype and codec name, tiles that fit the slots, resident blocks, segments covering the message."""
    assert p.algo in ("oneshot", "twoshot") and p.protocol in ("ll", "flag", "staged")
    owners = world if p.algo == "twoshot" else 1
    assert p.seg_elems * owners >= n
    assert p.build.dtype_code == KERNEL_DTYPE_CODE[dtype]
    assert (p.build.rs_bits, p.build.ag_bits) == ((mode.rs_bits or 0), (mode.ag_bits or 0))
    resident = lim.max_blocks // (2 if p.threads > 256 else 1)
    if p.protocol == "ll" and mode.lossless:
        assert p.kernel == f"fc_ll_{p.algo}" and p.build.unit_elems == ELEMS_PER_THREAD
        assert p.ll_tile * 16 <= lim.ll_slot_bytes and 1 <= p.blocks <= resident
    elif p.protocol == "ll":
        elems = llq_unit_elems(mode.group_size, p.algo, n, rs_bits=mode.rs_bits)
        shared = p.algo == "oneshot" and shares_rotation_code(mode, p.blocks, p.threads, p.build.unit_elems)  # FcRotCode
        assert p.kernel == ("fc_llq_oneshot_rot" if shared else f"fc_llq_{p.algo}") and p.build.unit_elems == elems
        bits = (mode.rs_bits,) if p.algo == "oneshot" else (mode.rs_bits, mode.ag_bits)
        assert p.threads * p.units * max(codecs.spec(b).ll_unit_bytes(elems) for b in bits) <= lim.ll_slot_bytes
        assert 1 <= p.blocks <= lim.max_blocks and p.seg_elems % mode.group_size == 0
    else:
        quantum = ELEMS_PER_THREAD if mode.lossless else mode.group_size
        assert p.seg_elems % quantum == 0 and (p.threads * ELEMS_PER_THREAD * p.units) % quantum == 0
        assert 1 <= p.blocks <= resident and p.units >= 1
        if p.protocol == "staged":
            assert p.kernel == "fc_twoshot_staged" and p.smem > 0 and dtype != "float32" and not mode.lossless
            assert p.blocks <= lim.sm_count * 2
        else:
            assert p.kernel == f"fc_{p.algo}" and p.smem == 0


@pytest.mark.parametrize("world", range(2, 9))
def test_every_auto_plan_of_the_shipped_table_is_a_valid_launch(world):
    for card in (H100, H200, "some other GPU"):
        lim = limits(world, card)
        for n, dtype, mode in itertools.product(SIZES, DTYPES, MODES):
            p = select_plan(n, dtype, mode, world=world, table=SHIPPED, limits=lim)
            if p.uses_nccl:
                assert mode.lossless  # quantized modes never run NCCL
                assert p == NCCL_PLAN
                continue
            check_plan(p, n, dtype, mode, world, lim)


def test_the_plan_is_a_pure_function_of_its_arguments():
    lim = limits(4)
    a = select_plan(1 << 20, "bfloat16", Mode.make(4), world=4, table=SHIPPED, limits=lim)
    b = select_plan(1 << 20, "bfloat16", Mode.make(4), world=4, table=SHIPPED, limits=lim)
    assert a == b and hash(a) == hash(b)


@pytest.mark.parametrize("world", [2, 3, 5, 8])
def test_explicit_algorithms_and_forced_launches_are_honoured(world):
    lim = limits(world)
    for n, algo, dtype, bits in itertools.product((1, 4099, 1 << 20, 1 << 26), ("oneshot", "twoshot"), DTYPES,
                                                  (None, 4, (4, 8))):
        mode = Mode.make(bits, 128, algo=algo)
        p = select_plan(n, dtype, mode, world=world, table=SHIPPED, limits=lim)
        assert p.algo == algo
        p = select_plan(n, dtype, mode, world=world, table=SHIPPED, limits=lim, force=Force(128, 8, 1))
        assert (p.algo, p.protocol, p.choice) == (algo, "flag", tuning.Choice(algo, 128, 8, 1))
        check_plan(p, n, dtype, mode, world, lim)
    assert select_plan(4096, "float16", Mode.make(None, algo="nccl"), world=world, table=SHIPPED,
                       limits=lim).uses_nccl


def test_the_running_cards_rows_serve_it_and_other_cards_fall_back_to_the_first_listed():
    h200 = SHIPPED.candidates(4, 1 << 20, "narrow", card=H200)
    h100 = SHIPPED.candidates(4, 1 << 20, "narrow", card=H100)
    assert SHIPPED.section(4, card=H200) == (H200, 4, "ipc")
    assert SHIPPED.section(4, card="NVIDIA B200") == (H100, 4, "ipc")  # untuned card: the first listed
    assert SHIPPED.section(2, card=H200) == (H200, 2, "ipc")
    assert SHIPPED.section(2, card=H200, transport="host") == (H200, 2, "host")
    assert SHIPPED.section(4, card=H200, transport="host") is None  # no host rows at 4 ranks: the heuristic
    assert SHIPPED.section(3, card=H200) is None  # no rows at all: the heuristic
    assert SHIPPED.candidates(4, 1 << 20, "narrow", card=None) == h100
    # the plan follows the card's candidates
    for card, cands in ((H200, h200), (H100, h100)):
        p = select_plan((1 << 20) // 2, "float16", Mode.make(4), world=4, table=SHIPPED, limits=limits(4, card))
        assert p.choice in cands


def test_worlds_without_rows_take_the_heuristic():
    for world, nbytes, lossless in itertools.product((3, 5, 6, 7, 8), (4096, 300 << 10, 64 << 20), (True, False)):
        mode = Mode.make(None if lossless else 4)
        p = select_plan(nbytes // 2, "float16", mode, world=world, table=SHIPPED, limits=limits(world))
        rule = tuning.heuristic(world, nbytes, lossless)
        assert p.algo == rule.algo
        assert p.choice in (rule, tuning.Choice(rule.algo, rule.threads, rule.blocks, rule.units, "flag"))


def test_candidates_are_walked_in_order():
    ll = {"algo": "twoshot", "threads": 256, "blocks": 0, "units": 1, "protocol": "ll"}
    flag = {"algo": "oneshot", "threads": 128, "blocks": 32, "units": 1, "protocol": "flag"}
    data = {"format": tuning.FORMAT, "sections": [{"card": H100, "world": 2, "transport": "ipc", "rows": [
        {"max_bytes": 1 << 30, "lossless": [ll, flag], "narrow": [ll, {"algo": "nccl"}], "wide": [flag]}]}]}
    t = tuning.TuningTable(data, "test")
    lim = limits(2)
    assert select_plan(1000, "float16", Mode.make(None), world=2, table=t, limits=lim).protocol == "ll"
    # too large for the LL slots: the next candidate
    p = select_plan(1 << 27, "float16", Mode.make(None), world=2, table=t, limits=lim)
    assert p.choice == tuning.Choice("oneshot", 128, 32, 1) and p.protocol == "flag"
    # a quantized mode whose fallback is NCCL gets the heuristic instead
    p = select_plan(1 << 27, "float16", Mode.make(4), world=2, table=t, limits=lim)
    assert p.choice == tuning.heuristic(2, 1 << 28, False)
    # wide modes read their own list; the protocol settings apply to every list
    assert select_plan(1000, "float16", Mode.make(8), world=2, table=t, limits=lim).choice == \
        tuning.Choice("oneshot", 128, 32, 1)
    assert select_plan(1000, "float16", Mode.make(None), world=2, table=t, limits=lim, protocol="flag").protocol == \
        "flag"
    p = select_plan(1000, "float16", Mode.make(8), world=2, table=t, limits=lim, protocol="ll")
    assert (p.protocol, p.kernel) == ("ll", "fc_llq_oneshot")


def test_host_transport_rows_are_their_own():
    data = {"worlds": {"2": [{"max_bytes": 1 << 30, "lossless": {"algo": "oneshot", "threads": 128},
                              "quantized": {"algo": "oneshot", "threads": 128}}],
                       "2/host": [{"max_bytes": 1 << 30, "lossless": {"algo": "twoshot", "threads": 512},
                                   "quantized": {"algo": "twoshot", "threads": 512, "units": 4}}]}}
    t = tuning.TuningTable(data, "test")
    for transport, algo in (("ipc", "oneshot"), ("host", "twoshot")):
        p = select_plan(1 << 20, "float16", Mode.make(4), world=2, table=t, limits=limits(2, transport=transport))
        assert p.algo == algo


def test_staged_needs_uniform_gpus_and_room_on_an_sm():
    mode = Mode.make(4, algo="twoshot")
    force = Force(256, 264, 2, "flag", True)
    run = dict(world=4, table=SHIPPED, force=force)
    assert select_plan(1 << 24, "bfloat16", mode, limits=limits(4), **run).protocol == "staged"
    assert select_plan(1 << 24, "bfloat16", mode, limits=limits(4, uniform_gpus=False), **run).protocol == "flag"
    assert select_plan(1 << 24, "bfloat16", mode, limits=limits(4, per_sm=0), **run).protocol == "flag"
    assert select_plan(1 << 24, "bfloat16", mode, limits=Limits(264), **run).protocol == "flag"  # no probe


def test_mpi_and_unknown_protocols_are_refused_and_builds_name_their_module():
    with pytest.raises(ValueError, match="mpi"):
        select_plan(1, "float16", Mode.make(None, algo="mpi"), world=2, table=SHIPPED, limits=limits(2))
    with pytest.raises(ValueError, match="protocol"):
        select_plan(1, "float16", Mode.make(None), world=2, table=SHIPPED, limits=limits(2), protocol="lamport")
    p = select_plan(1 << 20, "float32", Mode.make((4, 8), 1024, algo="twoshot"), world=2, table=SHIPPED,
                    limits=limits(2), force=Force(128, 0, 1, "ll"))
    assert p.build == KernelKey(2, 4, 8, 32)
