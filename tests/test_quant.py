"""Spec of the NumPy reference quantization and wire format (flashcomm_cupy.quant).

The GPU kernels are tested bit for bit against this module, so these tests pin
its numbers: the error bound of one round trip, the byte layout of a wire
chunk, the special cases (constant groups, NaN/Inf, huge values).
"""
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flashcomm_cupy import quant
from flashcomm_cupy.config import SUPPORTED_BITS, SUPPORTED_GROUP_SIZES, Codec
from flashcomm_cupy.dtypes import DTYPES, to_f32

F32 = np.float32
U = 2.0 ** -24  # unit roundoff of float32 (round to nearest)


def group_data(groups, g, dtype, seed=0):
    """Per-group different scales and offsets (so metadata varies), stored in ``dtype``, widened exactly."""
    rng = np.random.default_rng(seed)
    scale = 10.0 ** rng.uniform(-3, 3, size=(groups, 1))
    offset = rng.normal(size=(groups, 1)) * scale * rng.uniform(0, 4, size=(groups, 1))
    x = rng.normal(size=(groups, g)) * scale + offset
    return to_f32(x.astype(np.float32).astype(dtype))


def error_bound(x32, scales, codec):
    """Per-element bound on |x - dequantize(quantize(x))|.

    Half a step (``scale/2``), plus float32 rounding: the code is computed with
    three roundings (x - min, 1/scale, product) that move it by at most
    3u*qmax code units, and the dequantized value rounds twice (code*scale,
    + min), each off by u times a magnitude at most qmax*scale or max|x| of
    the group.  8u*(qmax*scale + max|x|) covers these five terms and their
    second-order products.
    """
    g = codec.group_size
    xg = x32.reshape(-1, g).astype(np.float64)
    amax = np.abs(xg).max(axis=1)
    s = scales.astype(np.float64)
    return np.repeat(s / 2 + 8 * U * (codec.qmax * s + amax), g)


# ---------------------------------------------------------------------------- round-trip error
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("g", SUPPORTED_GROUP_SIZES)
@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_round_trip_error_is_at_most_half_a_step(bits, g, symmetric, dtype):
    codec = Codec(bits, g, symmetric)
    x = group_data(8, g, DTYPES[dtype], seed=bits * 7 + g)
    codes, scales, mins = quant.quantize(x, codec)
    back = quant.dequantize(codes, scales, mins, codec)
    err = np.abs(back.astype(np.float64) - x)
    assert np.all(err <= error_bound(x, scales, codec))
    # the step is the group's range (asym) or abs-max (sym) over the code range
    xg = x.reshape(-1, g).astype(np.float64)
    spread = np.abs(xg).max(1) if symmetric else xg.max(1) - xg.min(1)
    np.testing.assert_allclose(scales, spread / codec.qmax, rtol=4 * U)


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_codes_span_the_code_range(bits):
    x = np.linspace(-1, 1, 256, dtype=F32)
    asym, _, _ = quant.quantize(x, Codec(bits, 256))
    assert asym.min() == 0 and asym.max() == (1 << bits) - 1
    sym, _, _ = quant.quantize(x, Codec(bits, 256, symmetric=True))
    # symmetric codes are offset binary: 2**(b-1) is zero, +-qmax around it
    mid = 1 << (bits - 1)
    assert sym.min() == 1 and sym.max() == (1 << bits) - 1
    assert sym[np.argmin(np.abs(x))] == mid


def test_symmetric_code_for_zero_is_the_offset_and_dequantizes_to_exact_zero():
    x = np.zeros(32, F32)
    x[5] = 3.0
    x[6] = -3.0
    for bits in SUPPORTED_BITS:
        codec = Codec(bits, 32, symmetric=True)
        codes, scales, _ = quant.quantize(x, codec)
        assert codes[0] == 1 << (bits - 1)
        assert codes[5] == (1 << (bits - 1)) + codec.qmax and codes[6] == (1 << (bits - 1)) - codec.qmax
        back = quant.dequantize(codes, scales, None, codec)
        assert np.all(back[x == 0] == 0)


# ---------------------------------------------------------------------------- constant groups
@pytest.mark.parametrize("value", [0.0, 1.0, -3.25, 1e-30, -7e37, 65504.0, 1e30])
@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_asymmetric_constant_group_is_exact(bits, value):
    codec = Codec(bits, 64)
    x = np.full(64 * 3, value, dtype=F32)
    codes, scales, mins = quant.quantize(x, codec)
    assert np.all(scales == 0) and np.all(codes == 0)
    assert np.array_equal(quant.dequantize(codes, scales, mins, codec), x)


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_near_constant_group_below_flt_min_stores_zero_scale(bits):
    codec = Codec(bits, 32)
    x = np.zeros(32, F32)
    x[3] = np.float32(1e-45)  # a subnormal: range / qmax < FLT_MIN
    codes, scales, mins = quant.quantize(x, codec)
    assert scales[0] == 0 and mins[0] == 0 and np.all(codes == 0)


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_symmetric_zero_group_is_exact_and_constant_group_within_half_step(bits):
    codec = Codec(bits, 32, symmetric=True)
    zero = np.zeros(32, F32)
    codes, scales, _ = quant.quantize(zero, codec)
    assert scales[0] == 0 and np.all(codes == 1 << (bits - 1))
    assert np.array_equal(quant.dequantize(codes, scales, None, codec), zero)
    # a non-zero constant is amax: code +qmax, back to qmax * (c / qmax) -- two roundings
    c = np.full(32, -5.3, F32)
    back = quant.fake_quantize(c, codec)
    assert np.all(np.abs(back - c) <= 2 * U * 5.3 * 1.0001)


# ---------------------------------------------------------------------------- non-finite inputs
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_nan_and_inf_poison_exactly_their_group(bits, symmetric):
    g = 32
    codec = Codec(bits, g, symmetric)
    x = group_data(8, g, np.float32, seed=3)
    dirty = x.copy()
    dirty[2 * g + 7] = np.nan
    dirty[5 * g] = np.inf
    dirty[7 * g + g - 1] = -np.inf
    clean = x.copy()
    bad_groups = [2, 5, 7]
    back = quant.decode(quant.encode(dirty, codec), dirty.size, codec).reshape(-1, g)
    want = quant.decode(quant.encode(clean, codec), clean.size, codec).reshape(-1, g)
    for grp in range(8):
        if grp in bad_groups:
            assert np.all(np.isnan(back[grp]))
        else:
            assert np.array_equal(back[grp].view(np.uint32), want[grp].view(np.uint32))
    # on the wire: NaN metadata, zero codes for the poisoned groups
    codes, scales, mins = quant.quantize(dirty, codec)
    assert np.all(np.isnan(scales[bad_groups]))
    assert np.all(codes.reshape(-1, g)[bad_groups] == 0)
    if not symmetric:
        assert np.all(np.isnan(mins[bad_groups]))


def test_asymmetric_group_whose_range_overflows_float32_is_nan():
    codec = Codec(8, 32)
    x = np.zeros(64, F32)
    x[0], x[1] = 3e38, -3e38  # max - min = 6e38 > FLT_MAX
    back = quant.fake_quantize(x, codec)
    assert np.all(np.isnan(back[:32])) and np.all(np.isfinite(back[32:]))


# ---------------------------------------------------------------------------- large values
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_values_beyond_fp16_range_round_trip_finite_and_close(bits, dtype):
    # metadata is fp32, so bf16/fp32 magnitudes up to ~3e38 survive (fp16 metadata would be inf)
    dt = DTYPES[dtype]
    rng = np.random.default_rng(bits)
    for codec, x in [
        (Codec(bits, 32), rng.uniform(-1, 1, 64) * 1e30),
        (Codec(bits, 32), rng.uniform(0, 1, 64) * 3e38),           # asym: range must stay finite
        (Codec(bits, 32, symmetric=True), rng.uniform(-1, 1, 64) * 3e38),
        (Codec(bits, 32, symmetric=True), rng.uniform(-1, 1, 64) * 1e30),
    ]:
        x32 = to_f32(x.astype(np.float32).astype(dt))
        codes, scales, mins = quant.quantize(x32, codec)
        back = quant.dequantize(codes, scales, mins, codec)
        assert np.all(np.isfinite(back)) and np.all(np.isfinite(scales))
        assert np.all(np.abs(back.astype(np.float64) - x32) <= error_bound(x32, scales, codec))


# ---------------------------------------------------------------------------- byte layout
def test_int4_packs_two_codes_per_byte_low_nibble_first():
    codec = Codec(4, 32)
    codes = np.arange(32, dtype=np.uint8) % 16
    buf = quant.pack(codes, np.array([1.5], F32), np.array([-2.0], F32), codec)
    assert buf[0] == 0x10 and buf[1] == 0x32 and buf[7] == 0xFE and buf[8] == 0x10
    assert buf.size == 48
    assert bytes(buf[16:20]) == struct.pack("<f", 1.5)
    assert bytes(buf[32:36]) == struct.pack("<f", -2.0)
    assert not buf[20:32].any() and not buf[36:48].any()  # alignment padding is zero


def test_int8_stores_one_byte_per_code():
    codec = Codec(8, 32, symmetric=True)
    codes = (np.arange(96) * 37 % 256).astype(np.uint8)
    scales = np.array([0.25, 1e-3, 7.0], F32)
    buf = quant.pack(codes, scales, None, codec)
    assert np.array_equal(buf[:96], codes)
    assert bytes(buf[96:108]) == struct.pack("<3f", *scales)
    assert buf.size == 112  # 96 + 12 rounded up to 16


def test_int6_low_nibble_plane_plus_two_bit_high_plane_four_per_byte():
    codec = Codec(6, 32)
    codes = np.zeros(32, np.uint8)
    codes[0] = 0b10_0001  # hi 2, lo 1
    codes[1] = 0b01_1111  # hi 1, lo 15
    codes[6] = 0b11_0100  # hi 3, lo 4 -> hi byte 1, bits 4..5
    buf = quant.pack(codes, np.array([1.0], F32), np.array([0.0], F32), codec)
    lay = quant.plane_layout(32, codec)
    assert lay["lo"] == (0, 16) and lay["hi"] == (16, 8)
    assert buf[0] == 0xF1 and buf[3] == 0x04
    assert buf[16] == (2 | (1 << 2)) and buf[17] == (3 << 4)
    assert lay["scales"] == (32, 4) and lay["mins"] == (48, 4) and lay["total"] == (0, 64)


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("g", [32, 128, 1024])
@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_region_offsets_are_16_byte_aligned_and_sized_exactly(bits, g, symmetric):
    codec = Codec(bits, g, symmetric)
    for groups in (1, 3, 5):
        n = g * groups
        lay = quant.plane_layout(n, codec)
        expect = {"lo": n if bits == 8 else n // 2, "scales": 4 * groups}
        if bits == 6:
            expect["hi"] = n // 4
        if not symmetric:
            expect["mins"] = 4 * groups
        assert set(lay) == set(expect) | {"total"}
        end = 0
        for region in ("lo", "hi", "scales", "mins"):
            if region in lay:
                off, size = lay[region]
                assert off % 16 == 0 and size == expect[region]
                assert end <= off < end + 16  # no gap of a whole line between regions
                end = off + size
        assert lay["total"][1] == -(-end // 16) * 16 == quant.wire_nbytes(n, codec)


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_unpack_inverts_pack(bits, symmetric):
    codec = Codec(bits, 64, symmetric)
    rng = np.random.default_rng(bits)
    codes = rng.integers(0, 1 << bits, 64 * 5).astype(np.uint8)
    scales = rng.random(5).astype(F32)
    mins = None if symmetric else rng.normal(size=5).astype(F32)
    c2, s2, m2 = quant.unpack(quant.pack(codes, scales, mins, codec), codes.size, codec)
    assert np.array_equal(c2, codes) and np.array_equal(s2, scales)
    assert (m2 is None) if symmetric else np.array_equal(m2, mins)


def test_wire_bytes_per_element_matches_the_chunk_size_for_large_chunks():
    for bits in SUPPORTED_BITS:
        for g in SUPPORTED_GROUP_SIZES:
            for sym in (False, True):
                codec = Codec(bits, g, sym)
                n = 1 << 20
                assert quant.wire_nbytes(n, codec) == pytest.approx(n * codec.wire_bytes_per_element(), abs=48)


def test_shape_errors():
    with pytest.raises(ValueError, match="multiple of group size"):
        quant.quantize(np.zeros(33, F32), Codec(4, 32))
    with pytest.raises(ValueError, match="multiple of group size"):
        quant.plane_layout(48, Codec(4, 32))
    with pytest.raises(ValueError, match="bytes"):
        quant.unpack(np.zeros(10, np.uint8), 32, Codec(4, 32))


# ---------------------------------------------------------------------------- properties
@settings(max_examples=80, deadline=None)
@given(groups=st.integers(1, 6), g=st.sampled_from(SUPPORTED_GROUP_SIZES), bits=st.sampled_from(SUPPORTED_BITS),
       symmetric=st.booleans(), dtype=st.sampled_from(list(DTYPES)), seed=st.integers(0, 2 ** 32 - 1),
       log_scale=st.floats(-20, 20))
def test_property_encode_decode_is_fake_quantize_within_the_bound(groups, g, bits, symmetric, dtype, seed,
                                                                  log_scale):
    codec = Codec(bits, g, symmetric)
    if dtype == "float16":  # stay inside fp16's range (|x| < 65504) so inputs are finite
        log_scale = min(max(log_scale, -4.0), 3.0)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(groups * g) * 10.0 ** log_scale + rng.normal() * 10.0 ** log_scale
    x32 = to_f32(x.astype(np.float32).astype(DTYPES[dtype]))
    buf = quant.encode(x32, codec)
    assert buf.size == quant.wire_nbytes(x32.size, codec)
    back = quant.decode(buf, x32.size, codec)
    assert np.array_equal(back.view(np.uint32), quant.fake_quantize(x32, codec).view(np.uint32))
    _, scales, _ = quant.quantize(x32, codec)
    assert np.all(np.abs(back.astype(np.float64) - x32) <= error_bound(x32, scales, codec))


@settings(max_examples=40, deadline=None)
@given(groups=st.integers(1, 4), g=st.sampled_from([32, 64, 256]), bits=st.sampled_from(SUPPORTED_BITS),
       symmetric=st.booleans(), seed=st.integers(0, 2 ** 32 - 1))
def test_property_groups_are_independent(groups, g, bits, symmetric, seed):
    """Quantizing a group alone gives the same bytes as quantizing it inside a longer chunk."""
    codec = Codec(bits, g, symmetric)
    x = np.random.default_rng(seed).standard_normal(groups * g).astype(F32)
    whole = quant.fake_quantize(x, codec).reshape(groups, g)
    for k in range(groups):
        alone = quant.fake_quantize(x[k * g:(k + 1) * g], codec)
        assert np.array_equal(alone.view(np.uint32), whole[k].view(np.uint32))
