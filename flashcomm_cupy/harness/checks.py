"""Correctness measures of one all-reduce result, and the pass/fail rule.

Three independent measures, in the spirit of nccl-tests' ``#wrong``:

* ``wrong``: elements that are not bit-identical to the NumPy reference
  (:func:`flashcomm_cupy.reference.flash_all_reduce_reference`), summed over
  ranks.  Every flash mode, lossless or quantized, must score 0: the backends
  implement the reference's arithmetic exactly.
* ``ranks_differ``: ranks whose output is not bit-identical to rank 0's,
  judged by a position-weighted checksum of the raw bits
  (:func:`fingerprint`; cheap on the device, so it runs at every size).
* error vs the float64 exact sum of the inputs: relative RMS error and max
  abs error.  Quantized modes must stay below a bound derived from the
  quantization step (:func:`rel_rms_bound`); lossless modes and the baseline
  below a few ulps of the data type.
"""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np

from .. import codecs
from ..config import Mode

#: rel-RMS bounds by the narrowest bit width of a mode (:attr:`flashcomm_cupy.codecs.CodecSpec.rel_rms_bound`,
#: which says where they come from)
QUANTIZED_REL_RMS_BOUND = {bits: spec.rel_rms_bound for bits, spec in codecs.CODECS.items()}

#: lossless results round once to the data type; allow a few ulps of slack
#: for the float32 summation order.
LOSSLESS_ULPS = 4


def dtype_eps(dtype) -> float:
    """Machine epsilon of ``dtype`` (fp16 2**-10, bf16 2**-7, fp32 2**-23)."""
    dtype = np.dtype(dtype)
    try:
        return float(np.finfo(dtype).eps)
    except ValueError:  # bfloat16: NumPy does not know it, ml_dtypes does
        import ml_dtypes
        return float(ml_dtypes.finfo(dtype).eps)


def rel_rms_bound(mode: Mode, dtype) -> float:
    """The largest relative RMS error ``mode`` may show on Gaussian inputs of ``dtype``.

    Lossless modes and the baseline: ``LOSSLESS_ULPS`` epsilons of the data
    type.  Quantized modes: the bound of their narrowest step plus one epsilon
    for the final rounding to the data type.
    """
    eps = dtype_eps(dtype)
    if mode.is_baseline or mode.lossless:
        return LOSSLESS_ULPS * eps
    return QUANTIZED_REL_RMS_BOUND[min(mode.rs_bits, mode.ag_bits)] + eps


def count_bit_mismatches(result: np.ndarray, expected: np.ndarray) -> int:
    """Elements whose bit patterns differ (NaN equals NaN only with the same bits)."""
    a = np.ascontiguousarray(result).reshape(-1)
    b = np.ascontiguousarray(expected).reshape(-1)
    if a.size != b.size or a.dtype.itemsize != b.dtype.itemsize:
        raise ValueError(f"cannot compare {a.size} x {a.dtype} with {b.size} x {b.dtype}")
    uint = np.dtype(f"u{a.dtype.itemsize}")
    return int(np.count_nonzero(a.view(uint) != b.view(uint)))


def fingerprint(xp, arr) -> Tuple[int, int]:
    """A checksum of ``arr``'s raw bits that changes when any element changes.

    ``(sum of the bit patterns, sum of bit patterns times (index mod 65521) + 1)``,
    in wrapping uint64 arithmetic, computed on ``xp`` (so on the GPU for CuPy).
    """
    flat = arr.reshape(-1)
    uint = np.dtype(f"u{flat.dtype.itemsize}")
    bits = flat.view(uint).astype(xp.uint64)
    weights = (xp.arange(bits.size, dtype=xp.uint64) % xp.uint64(65521)) + xp.uint64(1)
    with np.errstate(over="ignore"):
        return int(bits.sum(dtype=xp.uint64)), int((bits * weights).sum(dtype=xp.uint64))


def error_vs_exact(xp, result64, exact64) -> dict:
    """Relative RMS and max abs error of ``result64`` against ``exact64`` (both float64 on ``xp``).

    Non-finite results give NaN errors and a positive ``nonfinite`` count.
    """
    diff = result64 - exact64
    nonfinite = int((~xp.isfinite(diff)).sum())
    if nonfinite:
        return {"rel_rms": float("nan"), "max_abs": float("nan"), "nonfinite": nonfinite}
    if diff.size == 0:
        return {"rel_rms": 0.0, "max_abs": 0.0, "nonfinite": 0}
    rms = float(xp.sqrt(xp.mean(diff * diff)))
    denom = float(xp.sqrt(xp.mean(exact64 * exact64)))
    rel = rms / denom if denom > 0 else (0.0 if rms == 0 else float("inf"))
    return {"rel_rms": rel, "max_abs": float(xp.abs(diff).max()), "nonfinite": 0}


def verdict(mode: Mode, dtype, rel_rms: Optional[float], nonfinite: Optional[int],
            wrong: Optional[int], ranks_differ: Optional[int]) -> Tuple[bool, str]:
    """``(ok, reason)`` for one checked result; None measures were not taken.

    Fails on any ``wrong`` element, on non-finite output, on a relative RMS
    error above :func:`rel_rms_bound`, and -- for flash modes, which promise
    bit-identical ranks -- on ranks that disagree.  The baseline's rank
    disagreement is reported but not failed: MPI and NCCL do not promise it.
    """
    reasons = []
    if wrong:
        reasons.append(f"{wrong} wrong vs reference")
    if ranks_differ and not mode.is_baseline:
        reasons.append(f"{ranks_differ} rank(s) differ from rank 0")
    if nonfinite:
        reasons.append(f"{nonfinite} non-finite")
    elif rel_rms is not None:
        bound = rel_rms_bound(mode, dtype)
        if not np.isfinite(rel_rms) or rel_rms > bound:
            reasons.append(f"rel-RMS {rel_rms:.3g} > {bound:.3g}")
    return (not reasons, "; ".join(reasons))
