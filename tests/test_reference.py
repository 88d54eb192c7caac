"""Spec of the NumPy Flash All-Reduce reference (flashcomm_cupy.reference).

Every backend is tested bit for bit against this reference, so here it is
tested against first principles: exact float32 sums, error bounds built from
the quantization steps, hand-written one-shot and two-shot algorithms.
"""
import numpy as np
import pytest

from flashcomm_cupy import quant, reference
from flashcomm_cupy.config import Mode
from flashcomm_cupy.dtypes import DTYPES, from_f32, to_f32
from flashcomm_cupy.reference import SegmentLayout, flash_all_reduce_reference as far

F32 = np.float32
U = 2.0 ** -24


def ranks_data(n, length, seed=0, dtype=np.float32, scale=1.0):
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal(length) * scale).astype(np.float32).astype(dtype) for _ in range(n)]


def bits_of(a):
    a = np.ascontiguousarray(a)
    return a.view(np.uint8).tobytes()


def step_error(x32, codec):
    """Per-group bound on one round trip: half a step plus float32 rounding (see test_quant.error_bound)."""
    _, scales, _ = quant.quantize(x32, codec)
    amax = np.abs(x32.reshape(-1, codec.group_size)).max(axis=1).astype(np.float64)
    s = scales.astype(np.float64)
    return s / 2 + 8 * U * (codec.qmax * s + amax)


def quantized_error_bound(inputs, mode):
    """Per-element bound on |all-reduce - float64 sum| derived from the quantization steps (no rotation).

    Two-shot: the owner's sum carries every non-owner's reduce-scatter error
    plus float32 summation error E; the sum it re-quantizes differs from the
    exact sum by at most E, so its all-gather step is at most
    (range(exact) + 2E) / qmax (asymmetric) or (amax(exact) + E) / qmax
    (symmetric).  One-shot: every rank's reduce-scatter error, own included.
    """
    n = len(inputs)
    layout = SegmentLayout(np.asarray(inputs[0]).size, n, mode.group_size)
    g = mode.group_size
    padded = [np.zeros(layout.padded_length, F32) for _ in inputs]
    for p, x in zip(padded, inputs):
        p[:layout.length] = to_f32(x)
    groups = layout.padded_length // g
    owner = np.arange(groups) // layout.groups_per_segment
    rs_err = np.stack([step_error(p, mode.rs_codec) for p in padded])       # [rank, group]
    amax = np.stack([np.abs(p.reshape(-1, g)).max(1) for p in padded]).astype(np.float64)
    oneshot = mode.algo == "oneshot"
    carried = rs_err.sum(0) if oneshot else rs_err.sum(0) - rs_err[owner, np.arange(groups)]
    e_sum = 2 * n * U * (amax.sum(0) + carried)
    e = carried + e_sum
    if oneshot:
        return np.repeat(e, g)[:layout.length]
    exact = np.sum([p.astype(np.float64) for p in padded], axis=0).reshape(-1, g)
    ag = mode.ag_codec
    if mode.symmetric:
        spread = np.abs(exact).max(1) + e
    else:
        spread = exact.max(1) - exact.min(1) + 2 * e
    ag_scale = spread / ag.qmax * (1 + 4 * U)
    ag_err = ag_scale / 2 + 8 * U * (ag.qmax * ag_scale + np.abs(exact).max(1) + e)
    return np.repeat(e + ag_err, g)[:layout.length]


# ---------------------------------------------------------------------------- lossless
@pytest.mark.parametrize("algo", ["twoshot", "oneshot"])
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_lossless_is_the_float32_rank_order_sum_rounded_once(dtype, algo):
    xs = ranks_data(5, 1000, seed=1, dtype=DTYPES[dtype])
    acc = np.zeros(1000, F32)
    for x in xs:
        acc = (acc + to_f32(x)).astype(F32)
    want = from_f32(acc, DTYPES[dtype])
    for out in far(xs, bits=None, algo=algo):
        assert out.dtype == DTYPES[dtype] and bits_of(out) == bits_of(want)
    # and within float rounding of the float64 sum: float32 summation, then one rounding to dtype
    exact = reference.exact_sum(xs).astype(np.float64)
    absum = np.sum([np.abs(to_f32(x).astype(np.float64)) for x in xs], axis=0)
    u_dt = {"float32": 2.0 ** -24, "float16": 2.0 ** -11, "bfloat16": 2.0 ** -8}[dtype]
    sum_err = len(xs) * U * absum
    bound = sum_err + u_dt * (np.abs(exact) + sum_err) + 2.0 ** -25  # fp16 subnormal spacing
    assert np.all(np.abs(to_f32(want) - exact) <= bound)


# ---------------------------------------------------------------------------- quantized bounds
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("bits", [8, 6, 4, (4, 8)])
@pytest.mark.parametrize("algo", ["twoshot", "oneshot"])
@pytest.mark.parametrize("n", [2, 3, 8])
def test_quantized_result_is_within_the_bound_from_the_steps(n, algo, bits, symmetric):
    xs = ranks_data(n, 4000, seed=n, scale=3.0)
    xs[0][:50] += 40  # a shifted region so groups differ in range and offset
    mode = Mode.make(bits, 64, symmetric, False, algo)
    out = far(xs, mode=mode)[0]
    err = np.abs(out.astype(np.float64) - reference.exact_sum(xs))
    bound = quantized_error_bound(xs, mode)
    assert np.all(err <= bound)
    # the bound is a real one: the error reaches a sizeable part of it somewhere
    assert (err / bound).max() > 0.25


@pytest.mark.parametrize("n", range(1, 9))
@pytest.mark.parametrize("length", [1, 2, 3, 31, 127, 131, 257, 1009, 2 * 3 * 5 * 64 + 1])
def test_any_length_and_world_size_gives_identical_ranks_within_the_bound(n, length):
    xs = ranks_data(n, length, seed=length + n)
    for mode in (Mode.make(4, 32), Mode.make((4, 8), 32, True), Mode.make(8, 128, algo="oneshot")):
        outs = far(xs, mode=mode)
        assert len(outs) == n and all(o.shape == (length,) for o in outs)
        assert all(bits_of(o) == bits_of(outs[0]) for o in outs)
        err = np.abs(outs[0].astype(np.float64) - reference.exact_sum(xs))
        assert np.all(err <= quantized_error_bound(xs, mode))
    lossless = far(xs, bits=None)[0]
    acc = np.zeros(length, F32)
    for x in xs:
        acc = (acc + x).astype(F32)
    assert bits_of(lossless) == bits_of(acc)


def test_segment_layout_pads_to_whole_groups_per_owner():
    lay = SegmentLayout(length=1000, world_size=3, group_size=64)
    assert (lay.groups, lay.groups_per_segment, lay.segment_elems, lay.padded_length) == (16, 6, 384, 1152)
    assert lay.segment(2) == slice(768, 1152)
    assert SegmentLayout(1, 8, 32).padded_length == 8 * 32


@pytest.mark.parametrize("rotate", [False, True])
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_every_rank_is_bit_identical(dtype, rotate):
    xs = ranks_data(4, 3000, seed=9, dtype=DTYPES[dtype])
    for bits in (4, 6, 8, (4, 8)):
        outs = far(xs, bits=bits, group_size=128, rotate=rotate)
        assert all(o.dtype == DTYPES[dtype] for o in outs)
        assert all(bits_of(o) == bits_of(outs[0]) for o in outs)


def test_output_keeps_the_input_shape():
    xs = [x.reshape(10, 30) for x in ranks_data(3, 300)]
    outs = far(xs, bits=4)
    assert all(o.shape == (10, 30) for o in outs)
    assert reference.exact_sum(xs).shape == (10, 30)


# ---------------------------------------------------------------------------- the owner's own data
@pytest.mark.parametrize("bits", [(4, 8), (6, 8), (4, 6)])
def test_owner_contribution_is_exact_and_only_the_all_gather_quantizes_it(bits):
    n, g = 4, 32
    mode = Mode.make(bits, g)
    xs = ranks_data(n, 8 * g, seed=bits[0])           # 8 groups, 2 per owner: owner 2 holds [128, 192)
    seg = SegmentLayout(8 * g, n, g).segment(2)
    for r in range(n):
        if r != 2:
            xs[r][seg] = 0
    xs[2][seg] *= 5
    own = xs[2][seg]
    # the owner's sum of its own segment is its own data, bit for bit (zeros quantize exactly)
    reduced = reference.reduce_owner_segment(2, [x[seg] for x in xs], mode)
    assert bits_of(reduced) == bits_of(own)
    # so the result is one all-gather round trip of the owner's data, within the AG step
    out = far(xs, mode=mode)[0][seg]
    assert bits_of(out) == bits_of(quant.fake_quantize(own, mode.ag_codec))
    assert np.all(np.abs(out.astype(np.float64) - own) <= np.repeat(step_error(own, mode.ag_codec), g))
    # the same data on a non-owner crosses the coarser reduce-scatter codec too, and loses more
    moved = [x.copy() for x in xs]
    moved[1][seg], moved[2][seg] = own, 0
    out_moved = far(moved, mode=mode)[0][seg]
    twice = quant.fake_quantize(quant.fake_quantize(own, mode.rs_codec), mode.ag_codec)
    assert bits_of(out_moved) == bits_of(twice)
    assert np.linalg.norm(out_moved - own) > np.linalg.norm(out - own)


# ---------------------------------------------------------------------------- algorithm semantics
def manual_twoshot(xs, rs_codec, ag_codec):
    """Two-shot written out: owners sum (own exact, others through RS), then one AG round trip each."""
    n, g = len(xs), rs_codec.group_size
    lay = SegmentLayout(xs[0].size, n, g)
    padded = [np.concatenate([x, np.zeros(lay.padded_length - x.size, F32)]) for x in xs]
    out = np.empty(lay.padded_length, F32)
    for o in range(n):
        seg = lay.segment(o)
        acc = np.zeros(lay.segment_elems, F32)
        for s in range(n):
            part = padded[s][seg] if s == o else quant.fake_quantize(padded[s][seg], rs_codec)
            acc = (acc + part).astype(F32)
        out[seg] = quant.fake_quantize(acc, ag_codec)
    return out[:xs[0].size]


def manual_oneshot(xs, codec):
    """One-shot written out: every rank's whole message through the RS codec, summed in rank order."""
    g = codec.group_size
    length = xs[0].size
    padded_len = -(-length // g) * g
    acc = np.zeros(padded_len, F32)
    for x in xs:
        p = np.concatenate([x, np.zeros(padded_len - length, F32)])
        acc = (acc + quant.fake_quantize(p, codec)).astype(F32)
    return acc[:length]


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("bits", [(4, 4), (4, 8), (8, 4), (6, 6)])
def test_twoshot_and_oneshot_follow_their_definitions(bits, symmetric):
    xs = ranks_data(3, 1000, seed=11)
    mode = Mode.make(bits, 64, symmetric)
    two = far(xs, mode=mode)[0]
    assert bits_of(two) == bits_of(manual_twoshot(xs, mode.rs_codec, mode.ag_codec))
    one = far(xs, mode=mode.with_algo("oneshot"))[0]
    # one-shot sends each message once, with the reduce-scatter codec only
    assert bits_of(one) == bits_of(manual_oneshot(xs, mode.rs_codec))
    assert bits_of(one) != bits_of(two)


def test_auto_is_twoshot_in_the_reference():
    xs = ranks_data(3, 500, seed=12)
    assert bits_of(far(xs, bits=4, algo="auto")[0]) == bits_of(far(xs, bits=4, algo="twoshot")[0])


def test_mixed_widths_lie_between_the_pure_ones():
    xs = ranks_data(4, 1 << 16, seed=13)
    exact = reference.exact_sum(xs)
    err = {b: reference.error_stats(far(xs, bits=b)[0], exact)["rel_rms"] for b in ("8", "4/8", "4")}
    assert err["8"] < err["4/8"] < err["4"]
    assert err["4/8"] < 0.8 * err["4"]  # the 8-bit all-gather removes a large share of INT4's error


def test_rotation_lowers_the_error_on_outlier_data():
    rng = np.random.default_rng(14)
    xs = []
    for _ in range(4):
        x = rng.standard_normal(1 << 16).astype(F32)
        x[rng.choice(x.size, x.size // 1000, replace=False)] *= 50
        xs.append(x)
    exact = reference.exact_sum(xs)
    for bits in (4, 8):
        plain = reference.error_stats(far(xs, bits=bits)[0], exact)["rel_rms"]
        rotated = reference.error_stats(far(xs, bits=bits, rotate=True)[0], exact)["rel_rms"]
        assert rotated < 0.5 * plain


# ---------------------------------------------------------------------------- non-finite inputs
@pytest.mark.parametrize("mode", [Mode.make(4, 32), Mode.make(8, 32, rotate=True),
                                  Mode.make((4, 8), 32, True, algo="oneshot")], ids=lambda m: m.label)
def test_nan_poisons_only_its_group_in_the_full_all_reduce(mode):
    xs = ranks_data(4, 1000, seed=15)
    clean = far(xs, mode=mode)[0]
    xs[1][300] = np.nan                       # group 9 = elements [288, 320)
    out = far(xs, mode=mode)[0]
    in_group = np.zeros(1000, bool)
    in_group[288:320] = True
    assert np.all(np.isnan(out[in_group]))
    assert bits_of(out[~in_group]) == bits_of(clean[~in_group])


def test_nan_poisons_only_its_element_when_lossless():
    xs = ranks_data(3, 100, seed=16)
    xs[2][40] = np.nan
    out = far(xs, bits=None)[0]
    assert np.isnan(out[40]) and np.isfinite(np.delete(out, 40)).all()


# ---------------------------------------------------------------------------- validation
def test_input_validation():
    a32, b32 = np.zeros(10, F32), np.zeros(11, F32)
    with pytest.raises(ValueError, match="elements"):
        far([a32, b32])
    with pytest.raises(ValueError, match="dtype"):
        far([a32, np.zeros(10, np.float16)])
    with pytest.raises(ValueError, match="unsupported dtype"):
        far([np.zeros(10), np.zeros(10)])
    with pytest.raises(ValueError, match="unsupported dtype"):
        far([np.zeros(10, np.int32)] * 2)
    with pytest.raises(ValueError, match="at least one rank"):
        far([])
    with pytest.raises(ValueError, match="oneshot, twoshot and hierarchical"):
        far([a32, a32], algo="nccl")
    with pytest.raises(ValueError, match="rotate"):
        far([a32, a32], bits=None, rotate=True)
    with pytest.raises(ValueError, match="bits"):
        far([a32, a32], bits=5)
    with pytest.raises(ValueError, match="group_size"):
        far([a32, a32], group_size=100)
