"""Sign-randomised fast Walsh-Hadamard rotation inside each quantization group.

Forward, per group of ``g`` float32 values (``g`` a power of two):
``y = FWHT(s * x) * norm`` with ``s_j = sign(j)`` a fixed +-1 pattern and
``norm = float32(1/sqrt(g))``.  Inverse: ``x = s * (FWHT(y) * norm)``.

The butterflies run stage by stage with ``h = 1, 2, 4, ..., g/2``; each one
maps ``(a, b) -> (a + b, a - b)`` in float32 with ``a`` the lower index.  The
GPU kernels do the same operations in the same order (in-thread stages, then
warp-shuffle stages), so rotated values agree bit for bit.

The transform is orthogonal and linear, so sums may be taken in the rotated
domain; it spreads an outlier's energy over the group, which shrinks the
group's range and with it the quantization step.
"""
from __future__ import annotations

import numpy as np

F32 = np.float32


def signs(g: int) -> np.ndarray:
    """The +-1 float32 sign pattern for element ``j`` of a group (``j < g``).

    ``sign(j)`` is bit 31 of a 32-bit integer mix of ``j`` (the same mix as
    ``fc_rotation_sign_bit`` in ``kernels_cu/fc_quant.cuh``).
    """
    j = np.arange(g, dtype=np.uint64)
    m = np.uint64(0xFFFFFFFF)
    h = (j * np.uint64(0x9E3779B1)) & m
    h ^= h >> np.uint64(16)
    h = (h * np.uint64(0x85EBCA6B)) & m
    h ^= h >> np.uint64(13)
    bit = (h >> np.uint64(31)) & np.uint64(1)
    return (F32(1) - F32(2) * bit.astype(F32)).astype(F32)


def norm(g: int) -> np.float32:
    return F32(1.0 / np.sqrt(float(g)))


def _fwht_groups(y: np.ndarray) -> np.ndarray:
    """Unnormalised FWHT along axis 1 of a (groups, g) float32 array, in place."""
    groups, g = y.shape
    h = 1
    while h < g:
        v = y.reshape(groups, g // (2 * h), 2, h)
        a = v[:, :, 0, :].copy()
        b = v[:, :, 1, :]
        v[:, :, 0, :] = a + b
        v[:, :, 1, :] = a - b
        h *= 2
    return y


def rotate(x32: np.ndarray, g: int) -> np.ndarray:
    """Forward rotation of a float32 vector whose length is a multiple of ``g``."""
    y = (np.asarray(x32, dtype=F32).reshape(-1, g) * signs(g)).astype(F32)
    with np.errstate(invalid="ignore", over="ignore"):
        _fwht_groups(y)
        return (y * norm(g)).astype(F32).reshape(-1)


def unrotate(y32: np.ndarray, g: int) -> np.ndarray:
    """Inverse rotation: ``unrotate(rotate(x)) == x`` up to float32 rounding."""
    z = np.array(y32, dtype=F32).reshape(-1, g)
    with np.errstate(invalid="ignore", over="ignore"):
        _fwht_groups(z)
        z = (z * norm(g)).astype(F32)
    return (z * signs(g)).astype(F32).reshape(-1)
