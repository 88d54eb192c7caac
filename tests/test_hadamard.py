"""Spec of the sign-randomised Walsh-Hadamard rotation (flashcomm_cupy.hadamard).

The GPU kernels use the same sign hash and butterfly order, so the sign
pattern is pinned here: changing the hash breaks rotated all-reduces between
a GPU and the reference.
"""
import numpy as np
import pytest

from flashcomm_cupy import hadamard, quant
from flashcomm_cupy.config import SUPPORTED_GROUP_SIZES, Codec

F32 = np.float32
U = 2.0 ** -24


def sylvester(g):
    """Natural-order Hadamard matrix: H[i, j] = (-1)**popcount(i & j)."""
    h = np.array([[1.0]])
    while h.shape[0] < g:
        h = np.block([[h, h], [h, -h]])
    return h


def python_sign(j):
    """The documented hash, in plain Python integers: bit 31 of a murmur-style mix of j."""
    h = (j * 0x9E3779B1) & 0xFFFFFFFF
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & 0xFFFFFFFF
    h ^= h >> 13
    return -1.0 if (h >> 31) & 1 else 1.0


def data(groups, g, seed=0):
    return np.random.default_rng(seed).standard_normal(groups * g).astype(F32)


def rounding_bound(x, g):
    """Per-group bound on the 2-norm of float32 rounding in one rotation.

    Each of the log2(g) butterfly stages and the final scaling round every
    element once, relative error u of a value no larger than the group's
    1-norm / sqrt(g) <= 2-norm: (log2 g + 1) u ||x|| per element, sqrt(g)
    elements.
    """
    norms = np.linalg.norm(x.reshape(-1, g).astype(np.float64), axis=1)
    return np.sqrt(g) * (np.log2(g) + 1) * U * norms


# ---------------------------------------------------------------------------- signs
def test_sign_pattern_is_pinned():
    first64 = "++---+++--+-+---++----+---+-+---+-+-++-+-+--++---++--+--++-++--+"
    got = "".join("+" if s > 0 else "-" for s in hadamard.signs(64))
    assert got == first64


def test_signs_follow_the_documented_hash_for_every_element_of_the_largest_group():
    want = np.array([python_sign(j) for j in range(1024)], dtype=F32)
    assert np.array_equal(hadamard.signs(1024), want)
    # spot checks a reader can verify by hand from the hash
    assert [python_sign(j) for j in (0, 1, 2, 100, 1023)] == [1.0, 1.0, -1.0, 1.0, -1.0]


@pytest.mark.parametrize("g", SUPPORTED_GROUP_SIZES[:-1])
def test_sign_depends_only_on_the_element_index(g):
    assert np.array_equal(hadamard.signs(2 * g)[:g], hadamard.signs(g))


def test_signs_are_balanced():
    s = hadamard.signs(1024)
    assert set(np.unique(s)) == {-1.0, 1.0}
    assert abs(int(s.sum())) < 100  # a fixed pattern, roughly half of each sign


# ---------------------------------------------------------------------------- the transform
@pytest.mark.parametrize("g", [32, 128])
def test_rotation_is_the_scaled_sylvester_matrix_times_the_signs(g):
    x = data(3, g, seed=g)
    want = (x.reshape(-1, g).astype(np.float64) * hadamard.signs(g)) @ sylvester(g).T / np.sqrt(g)
    got = hadamard.rotate(x, g).reshape(-1, g)
    assert np.all(np.abs(got - want) <= rounding_bound(x, g)[:, None])


@pytest.mark.parametrize("g", SUPPORTED_GROUP_SIZES)
def test_rotation_preserves_each_groups_norm(g):
    x = data(4, g, seed=1)
    y = hadamard.rotate(x, g)
    nx = np.linalg.norm(x.reshape(-1, g).astype(np.float64), axis=1)
    ny = np.linalg.norm(y.reshape(-1, g).astype(np.float64), axis=1)
    assert np.all(np.abs(nx - ny) <= rounding_bound(x, g))


@pytest.mark.parametrize("g", SUPPORTED_GROUP_SIZES)
def test_unrotate_inverts_rotate(g):
    x = data(4, g, seed=2)
    back = hadamard.unrotate(hadamard.rotate(x, g), g)
    err = np.linalg.norm((back.astype(np.float64) - x).reshape(-1, g), axis=1)
    assert np.all(err <= 2 * rounding_bound(x, g))
    y = hadamard.rotate(hadamard.unrotate(x, g), g)
    err = np.linalg.norm((y.astype(np.float64) - x).reshape(-1, g), axis=1)
    assert np.all(err <= 2 * rounding_bound(x, g))


@pytest.mark.parametrize("g", [32, 256, 1024])
def test_rotation_is_linear(g):
    a, b = data(2, g, seed=3), data(2, g, seed=4)
    lhs = hadamard.rotate((a + b).astype(F32), g).astype(np.float64)
    rhs = hadamard.rotate(a, g).astype(np.float64) + hadamard.rotate(b, g)
    err = np.linalg.norm((lhs - rhs).reshape(-1, g), axis=1)
    # each side is within its rounding bound of the exact rotation of a + b (plus a + b's own rounding)
    bound = rounding_bound(a + b, g) + rounding_bound(a, g) + rounding_bound(b, g) \
        + U * np.linalg.norm((a + b).reshape(-1, g), axis=1)
    assert np.all(err <= bound)
    # scaling by a power of two is exact in float32, so homogeneity holds bit for bit
    assert np.array_equal(hadamard.rotate(a * F32(4), g), hadamard.rotate(a, g) * F32(4))


def test_groups_rotate_independently():
    g = 64
    x = data(4, g, seed=5)
    y = x.copy()
    y[g:2 * g] *= 7  # change group 1 only
    rx, ry = hadamard.rotate(x, g).reshape(-1, g), hadamard.rotate(y, g).reshape(-1, g)
    assert np.array_equal(rx[[0, 2, 3]], ry[[0, 2, 3]]) and not np.array_equal(rx[1], ry[1])


def test_non_finite_values_stay_in_their_group():
    g = 32
    x = data(3, g, seed=6)
    x[g + 4] = np.nan
    y = hadamard.rotate(x, g).reshape(-1, g)
    assert np.all(np.isnan(y[1])) and np.all(np.isfinite(y[[0, 2]]))


# ---------------------------------------------------------------------------- the kernels' shortcuts
def every_kind_of_float32(n=1 << 16, seed=0):
    """Random bit patterns (normals, subnormals, zeros, infinities, NaNs) plus the edge values."""
    bits = np.random.default_rng(seed).integers(0, 1 << 32, size=n, dtype=np.uint64).astype(np.uint32)
    edges = np.array([0, 0x80000000, 1, 0x80000001, 0x007FFFFF, 0x00800000, 0x7F7FFFFF, 0x7F800000,
                      0xFF800000, 0x7FC00000, 0x3F800000, 0xBF800000], dtype=np.uint32)
    return np.concatenate([edges, bits]).view(F32)


def same_float32(a, b):
    """Bit for bit, any NaN equal to any NaN (the GPU returns its canonical NaN)."""
    return (a.view(np.uint32) == b.view(np.uint32)) | (np.isnan(a) & np.isnan(b))


def test_a_sign_flip_is_the_references_multiply_by_minus_one():
    """fc_rotate_fwd flips the sign bit where the reference multiplies by -1: the same float32,
    zeros, subnormals and infinities included (a NaN stays a NaN)."""
    x = every_kind_of_float32()
    with np.errstate(invalid="ignore"):
        want = x * F32(-1)
    got = (x.view(np.uint32) ^ np.uint32(0x80000000)).view(F32)
    assert same_float32(got, want).all()


@pytest.mark.parametrize("g", SUPPORTED_GROUP_SIZES)
def test_one_multiply_by_signed_norm_is_the_references_two(g):
    """fc_rotate_inv computes (v * norm) * s as v * (s * norm): s * norm is exact and rounding
    to nearest is symmetric in the sign, so both are the same float32 for every v."""
    v = every_kind_of_float32(seed=g)
    n = hadamard.norm(g)
    with np.errstate(invalid="ignore", over="ignore", under="ignore"):
        for s in (F32(1), F32(-1)):
            want = (v * n).astype(F32) * s
            got = v * F32(s * n)
            assert same_float32(got, want).all()


# ---------------------------------------------------------------------------- why it is there
def test_rotation_spreads_an_outlier_and_shrinks_the_quantization_step():
    g = 128
    x = data(64, g, seed=7).reshape(-1, g)
    x[:, 17] *= 50  # one outlier per group, 50x the typical value
    x = x.reshape(-1)
    y = hadamard.rotate(x, g)
    codec = Codec(4, g)
    step_plain = quant.quantize(x, codec)[1]
    step_rot = quant.quantize(y, codec)[1]
    # the outlier's energy is spread over 128 elements: |50 z| / sqrt(128) ~ 4.4 |z|
    assert np.abs(y).max() < 0.35 * np.abs(x).max()
    assert np.median(step_rot / step_plain) < 0.3
    # so the round trip through INT4 loses much less (measured in the original domain)
    err_plain = np.linalg.norm(quant.fake_quantize(x, codec) - x)
    err_rot = np.linalg.norm(hadamard.unrotate(quant.fake_quantize(y, codec), g) - x)
    assert err_rot < 0.4 * err_plain
