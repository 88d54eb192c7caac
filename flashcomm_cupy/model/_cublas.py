"""16-bit GEMMs through cuBLAS called directly (ctypes), so that CUDA graphs can capture them.

CuPy's matmul has no bf16 path, and CuPy's cuBLAS wrappers refuse to run
while a stream is being captured (its ``setStream`` raises), which would
leave decode steps launch-bound.  cuBLAS itself supports capture when the
handle has a fixed user workspace, so this module keeps its own handle per
device, with a workspace from CuPy's pool, and calls ``cublasGemmEx`` /
``cublasGemmStridedBatchedEx`` with float32 accumulation (tensor cores).
"""
from __future__ import annotations

import ctypes

import numpy as np

_CUDA_R_16F, _CUDA_R_16BF = 2, 14
_CUBLAS_COMPUTE_32F, _CUBLAS_GEMM_DEFAULT, _CUBLAS_OP_N = 68, -1, 0
_WORKSPACE_BYTES = 32 << 20

_lib = None
_handles = {}        # device id -> (handle, workspace array, [current stream ptr])
_ONE = ctypes.c_float(1.0)
_ZERO = ctypes.c_float(0.0)


def _library():
    global _lib
    if _lib is None:
        import cupy_backends.cuda.libs.cublas  # noqa: F401  (loads CuPy's libcublas first)
        errors = []
        for name in ("libcublas.so.13", "libcublas.so.12", "libcublas.so.11", "libcublas.so"):
            try:
                lib = ctypes.CDLL(name)
                break
            except OSError as exc:
                errors.append(str(exc))
        else:
            raise RuntimeError(f"cannot load cuBLAS: {'; '.join(errors)}")
        lib.cublasCreate_v2.argtypes = [ctypes.POINTER(ctypes.c_void_p)]
        lib.cublasSetStream_v2.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
        lib.cublasSetWorkspace_v2.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
        i, p, ll = ctypes.c_int, ctypes.c_void_p, ctypes.c_longlong
        lib.cublasGemmEx.argtypes = [p, i, i, i, i, i, p, p, i, i, p, i, i, p, p, i, i, i, i]
        lib.cublasGemmStridedBatchedEx.argtypes = [p, i, i, i, i, i, p, p, i, i, ll, p, i, i, ll, p, p, i, i,
                                                   ll, i, i, i]
        _lib = lib
    return _lib


def _check(status: int, what: str) -> None:
    if status != 0:
        raise RuntimeError(f"{what} failed with cuBLAS status {status}")


def _handle(cp):
    """This device's handle, bound to CuPy's current stream."""
    lib = _library()
    dev = cp.cuda.runtime.getDevice()
    entry = _handles.get(dev)
    if entry is None:
        h = ctypes.c_void_p()
        _check(lib.cublasCreate_v2(ctypes.byref(h)), "cublasCreate")
        ws = cp.empty(_WORKSPACE_BYTES, dtype=cp.uint8)
        _check(lib.cublasSetWorkspace_v2(h, ctypes.c_void_p(ws.data.ptr), _WORKSPACE_BYTES), "cublasSetWorkspace")
        entry = _handles[dev] = (h, ws, [None])
    h, _, current = entry
    stream = cp.cuda.get_current_stream().ptr
    if current[0] != stream:
        _check(lib.cublasSetStream_v2(h, ctypes.c_void_p(stream)), "cublasSetStream")
        current[0] = stream
    return h


def matmul16(cp, a, b):
    """``a @ b`` for fp16/bf16 CuPy arrays: ``a (..., M, K)`` with ``b (K, N)`` or ``b (..., K, N)``.

    Row-major ``C = A @ B`` is column-major ``C^T = B^T A^T``, so B goes first.
    """
    from ..dtypes import bfloat16

    a = cp.ascontiguousarray(a)
    b = cp.ascontiguousarray(b)
    m_rows, k = a.shape[-2], a.shape[-1]
    n = b.shape[-1]
    if b.shape[-2] != k or b.dtype != a.dtype:
        raise ValueError(f"matmul operands {a.shape} {a.dtype} and {b.shape} {b.dtype} do not match")
    code = _CUDA_R_16BF if a.dtype == bfloat16 else _CUDA_R_16F
    out = cp.empty(a.shape[:-1] + (n,), dtype=a.dtype)
    lib, h = _library(), _handle(cp)
    ptr = ctypes.c_void_p
    one, zero = ctypes.byref(_ONE), ctypes.byref(_ZERO)
    if b.ndim == 2:  # weights: fold the leading axes of a into its rows
        _check(lib.cublasGemmEx(h, _CUBLAS_OP_N, _CUBLAS_OP_N, n, a.size // k, k, one,
                                ptr(b.data.ptr), code, n, ptr(a.data.ptr), code, k, zero,
                                ptr(out.data.ptr), code, n, _CUBLAS_COMPUTE_32F, _CUBLAS_GEMM_DEFAULT),
               "cublasGemmEx")
        return out
    if a.shape[:-2] != b.shape[:-2]:
        raise ValueError(f"batched matmul needs equal leading axes, got {a.shape} and {b.shape}")
    batch = int(np.prod(a.shape[:-2]))
    _check(lib.cublasGemmStridedBatchedEx(h, _CUBLAS_OP_N, _CUBLAS_OP_N, n, m_rows, k, one,
                                          ptr(b.data.ptr), code, n, k * n, ptr(a.data.ptr), code, k, m_rows * k,
                                          zero, ptr(out.data.ptr), code, n, m_rows * n, batch,
                                          _CUBLAS_COMPUTE_32F, _CUBLAS_GEMM_DEFAULT),
           "cublasGemmStridedBatchedEx")
    return out
