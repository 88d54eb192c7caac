"""Deterministic per-rank inputs, generated on the backend's array module.

Rank ``r``'s input for a message of ``count`` elements depends only on
``(seed, r, count)`` and the array module, so rank 0 can regenerate every
other rank's input for the correctness check without any communication.
NumPy and CuPy draw different (but each deterministic) numbers; a check
always regenerates with the module that produced the data.

On CuPy, bfloat16 data is carried as ``uint16`` storage (the GPU backend's
convention, see :mod:`flashcomm_cupy._arrays`); the helpers here convert
between that storage and float32/float64 on the device so 256 MB messages
never need a host round trip.
"""
from __future__ import annotations

import numpy as np

from ..dtypes import bfloat16, from_f32


def is_numpy(xp) -> bool:
    return xp is np


def input_seed(seed: int, rank: int, count: int) -> int:
    """A 32-bit seed mixing ``(seed, rank, count)`` (both NumPy and CuPy accept it)."""
    return int(np.random.SeedSequence([int(seed), int(rank), int(count)]).generate_state(1)[0])


def storage_dtype(xp, dtype: np.dtype) -> np.dtype:
    """dtype of the array that holds ``dtype`` data on ``xp`` (bf16 is uint16 on CuPy)."""
    dtype = np.dtype(dtype)
    if not is_numpy(xp) and dtype == bfloat16:
        return np.dtype(np.uint16)
    return dtype


def f32_to_storage(xp, x32, dtype: np.dtype):
    """Round a float32 ``xp`` array to ``dtype`` (nearest even), in storage form."""
    dtype = np.dtype(dtype)
    if is_numpy(xp):
        return from_f32(np.asarray(x32, dtype=np.float32), dtype)
    if dtype == bfloat16:
        # Round-to-nearest-even on the bit pattern; inputs here are finite.
        u = x32.view(xp.uint32)
        rounding = ((u >> 16) & 1) + 0x7FFF
        return ((u + rounding) >> 16).astype(xp.uint16)
    return x32.astype(dtype)


def storage_to_f64(xp, arr, dtype: np.dtype):
    """Widen storage-form data of logical ``dtype`` to float64 on ``xp`` (exact)."""
    dtype = np.dtype(dtype)
    if not is_numpy(xp) and dtype == bfloat16:
        return (arr.astype(xp.uint32) << 16).view(xp.float32).astype(xp.float64)
    return arr.astype(xp.float64)


def to_host(arr, dtype: np.dtype) -> np.ndarray:
    """Host NumPy copy of storage-form data, viewed as the logical ``dtype``."""
    dtype = np.dtype(dtype)
    host = arr if isinstance(arr, np.ndarray) else arr.get()
    if host.dtype != dtype:
        host = host.view(dtype)
    return host


def make_input(xp, seed: int, rank: int, count: int, dtype: np.dtype):
    """Rank ``rank``'s input: ``count`` standard-normal values rounded to ``dtype``.

    Returns an ``xp`` array in storage form (see :func:`storage_dtype`).
    """
    s = input_seed(seed, rank, count)
    if is_numpy(xp):
        x32 = np.random.default_rng(s).standard_normal(count, dtype=np.float32)
    else:
        x32 = xp.random.RandomState(s).standard_normal(count, dtype=xp.float32)
    return f32_to_storage(xp, x32, dtype)


def empty_output(xp, count: int, dtype: np.dtype):
    """An output buffer in storage form, filled with NaN so stale data cannot pass a check."""
    out = xp.empty(count, dtype=storage_dtype(xp, dtype))
    fill_nan(xp, out, dtype)
    return out


def fill_nan(xp, arr, dtype: np.dtype) -> None:
    """Overwrite ``arr`` with quiet NaNs of the logical ``dtype``."""
    if arr.dtype == np.uint16:  # bf16 storage on CuPy: quiet NaN bit pattern
        arr.fill(0x7FC0)
    else:
        arr.fill(np.nan)
