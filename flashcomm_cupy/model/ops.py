"""The model's elementwise and matrix primitives, for NumPy and for CuPy.

Each function takes arrays of one array module and returns arrays of the
same.  On the GPU, 16-bit GEMMs go straight to cuBLAS (:mod:`._cublas`:
tensor cores, bf16, capturable in CUDA graphs) and the row-wise operations (RMSNorm, masked softmax, SiLU gating) are single fused
CUDA kernels, so the benchmark's compute time is not inflated by chains of
small elementwise launches -- the share of time left to communication would
otherwise look smaller than in a real serving stack.  On the CPU the same
operations run in NumPy with float32 arithmetic, which is what the tests
compare against.

Numerics (both backends): products accumulate in float32 and round once to
the storage dtype; norms and softmax compute in float32.
"""
from __future__ import annotations

import numpy as np

F32 = np.float32


def is_numpy(xp) -> bool:
    return xp is np


# ----------------------------------------------------------------------------- GEMM
def matmul(xp, a, b):
    """``a @ b`` (batched over leading axes), float32 accumulation, result in ``a.dtype``.

    NumPy has no fast fp16/bf16 GEMM and would accumulate in the narrow
    type, so the host path widens to float32 and rounds once.
    """
    if is_numpy(xp) and a.dtype != F32:
        return np.matmul(a.astype(F32), b.astype(F32)).astype(a.dtype)
    if not is_numpy(xp) and a.dtype.itemsize == 2:
        from ._cublas import matmul16  # capturable in CUDA graphs; has bf16
        return matmul16(xp, a, b)
    return xp.matmul(a, b)


# ----------------------------------------------------------------------------- host versions
def _rms_norm_host(x, weight, eps):
    x32 = x.astype(F32)
    inv = 1.0 / np.sqrt(np.mean(x32 * x32, axis=-1, keepdims=True) + F32(eps))
    return ((x32 * inv) * weight.astype(F32)).astype(x.dtype)


def _silu_mul_host(gate_up):
    width = gate_up.shape[-1] // 2
    g = gate_up[..., :width].astype(F32)
    u = gate_up[..., width:].astype(F32)
    return (g / (1.0 + np.exp(-g)) * u).astype(gate_up.dtype)


def _softmax_host(scores, queries, scale):
    rows, cols = scores.shape
    s = scores.astype(F32) * F32(scale)
    last = (np.arange(rows) % queries) + (cols - queries)  # last visible key per row
    s = np.where(np.arange(cols)[None, :] <= last[:, None], s, -np.inf)
    s = s - s.max(axis=1, keepdims=True)
    e = np.exp(s)
    scores[...] = (e / e.sum(axis=1, keepdims=True)).astype(scores.dtype)
    return scores


# ----------------------------------------------------------------------------- public ops
def rms_norm(xp, x, weight, eps: float):
    """``x / rms(x) * weight`` over the last axis (float32 inside); a new array."""
    if is_numpy(xp):
        return _rms_norm_host(x, weight, eps)
    rows, cols = x.size // x.shape[-1], x.shape[-1]
    out = xp.empty_like(x)
    _kernel(x.dtype, "rms_norm")((rows,), (_threads(cols),),
                                 (x, weight, out, np.int32(cols), np.float32(eps)))
    return out


def silu_mul(xp, gate_up):
    """``silu(gate) * up`` where ``gate_up = [gate | up]`` along the last axis; a new array."""
    if is_numpy(xp):
        return _silu_mul_host(gate_up)
    width = gate_up.shape[-1] // 2
    rows = gate_up.size // gate_up.shape[-1]
    out = xp.empty(gate_up.shape[:-1] + (width,), dtype=gate_up.dtype)
    total = rows * width
    blocks = min(-(-total // 256), 65535 * 8)
    _kernel(gate_up.dtype, "silu_mul")((blocks,), (256,),
                                       (gate_up, out, np.int64(total), np.int32(width)))
    return out


def masked_softmax_(xp, scores, queries: int, scale: float):
    """Causal softmax of ``scale * scores`` in place, row by row, float32 inside.

    ``scores`` is viewed as ``(rows, keys)``.  Row ``r`` is query
    ``r % queries`` of a block of ``queries`` consecutive positions that end
    at the last key, so it sees keys ``0 .. (r % queries) + keys - queries``:
    ``queries == keys`` is prefill's causal mask, ``queries == 1`` a decode
    step that sees its whole cache.  Masked entries become exactly 0.
    """
    keys = scores.shape[-1]
    flat = scores.reshape(-1, keys)
    if is_numpy(xp):
        _softmax_host(flat, queries, scale)
        return scores
    _kernel(scores.dtype, "masked_softmax")((flat.shape[0],), (_threads(keys),),
                                            (flat, np.int32(keys), np.int32(queries), np.float32(scale)))
    return scores


# ----------------------------------------------------------------------------- CUDA kernels
_modules = {}


def _threads(cols: int) -> int:
    """Threads per row: enough to cover short rows, at most 1024."""
    if cols >= 1024:
        return 1024
    return max(32, 1 << (cols - 1).bit_length())


def _kernel(dtype, name: str):
    """The compiled kernel ``name`` for ``dtype`` (``kernels_cu/fc_model_ops.cu``, compiled once per process)."""
    import cupy

    from ..backends.flash import kernels
    from ..dtypes import KERNEL_DTYPE_CODE, dtype_name
    key = dtype_name(dtype)
    if key not in _modules:
        _modules[key] = cupy.RawModule(code=kernels.read_source("fc_model_ops.cu"),
                                       options=("--std=c++17", f"-DFC_MODEL_DT={KERNEL_DTYPE_CODE[key]}"))
    return _modules[key].get_function(name)
