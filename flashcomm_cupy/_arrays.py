"""Conversion and validation of user arrays for a backend.

The user may pass NumPy, CuPy, PyTorch tensors, or any object exposing
``__cuda_array_interface__`` or ``__dlpack__``; the result comes back as the
same kind.  bf16 travels on the GPU as a ``uint16`` view with the logical
dtype passed separately, so flashcomm does not depend on CuPy's bf16 support.
"""
from __future__ import annotations

import sys

import numpy as np

from .config import Mode
from .dtypes import DTYPES, bfloat16, resolve_dtype


def _module_root(x) -> str:
    return type(x).__module__.split(".")[0]


def _is_torch(x) -> bool:
    return _module_root(x) == "torch"


def _torch_dtype_name(t) -> str:
    name = str(t.dtype).replace("torch.", "")
    if name not in DTYPES:
        raise TypeError(f"unsupported dtype torch.{name}; flashcomm reduces float16, bfloat16 and float32")
    return name


def to_numpy(x) -> np.ndarray:
    """A host NumPy copy of any supported array."""
    if isinstance(x, np.ndarray):
        return x
    if _is_torch(x):
        t = x.detach()
        if str(t.dtype) == "torch.bfloat16":
            return t.view(_torch_int16()).cpu().numpy().view(np.uint16).view(bfloat16)
        return t.cpu().numpy()
    if hasattr(x, "get") and _module_root(x) == "cupy":
        return x.get()
    return np.asarray(x)


def _torch_int16():
    import torch
    return torch.int16


def _validate_host(x: np.ndarray, what: str) -> np.dtype:
    dt = resolve_dtype(x.dtype)
    if not x.flags.c_contiguous:
        raise ValueError(f"{what} must be C-contiguous (got strides {x.strides}); pass np.ascontiguousarray(x)")
    return dt


def run_all_reduce(backend, x, out, mode: Mode, stream):
    """Validate, convert, call ``backend.all_reduce`` and convert back."""
    if backend.xp is np:
        return _run_host(backend, x, out, mode)
    return _run_device(backend, x, out, mode, stream)


# ----------------------------------------------------------------------------- host
def _run_host(backend, x, out, mode):
    if not isinstance(x, np.ndarray):
        if _is_torch(x) and not x.is_cuda:
            raise TypeError("the CPU backend takes NumPy arrays; pass tensor.numpy()")
        raise TypeError(f"the CPU backend takes NumPy arrays, got {type(x).__name__}")
    _validate_host(x, "x")
    if out is None:
        out = np.empty_like(x)
    elif out is not x:
        if not isinstance(out, np.ndarray) or out.shape != x.shape or out.dtype != x.dtype:
            raise ValueError("out must be a NumPy array of x's shape and dtype")
        _validate_host(out, "out")
    return backend.all_reduce(x, out, mode, dtype=x.dtype)


# ----------------------------------------------------------------------------- device
class DeviceView:
    """A CuPy array (bf16 as uint16) plus its logical dtype and how to hand it back."""

    def __init__(self, arr, dtype: np.dtype, wrap_back):
        self.arr = arr
        self.dtype = dtype
        self.wrap_back = wrap_back


def _cupy():
    import cupy
    return cupy


def _as_device_view(x, what: str) -> DeviceView:
    cp = _cupy()
    if isinstance(x, np.ndarray):
        dt = _validate_host(x, what)
        host = x.view(np.uint16) if dt == bfloat16 else x
        return DeviceView(cp.asarray(host), dt, lambda v: _back_to_numpy(v, dt))
    if isinstance(x, cp.ndarray):
        dt = resolve_dtype(x.dtype) if x.dtype != np.uint16 else None
        if dt is None:
            raise TypeError(f"{what}: uint16 arrays are not reducible; bf16 CuPy arrays need a bfloat16 dtype")
        _check_contiguous(x, what)
        arr = x.view(cp.uint16) if dt == bfloat16 else x
        return DeviceView(arr, dt, (lambda v: v.view(x.dtype)) if dt == bfloat16 else (lambda v: v))
    if _is_torch(x):
        return _torch_view(x, what)
    if hasattr(x, "__cuda_array_interface__"):
        arr = cp.asarray(x)
        _check_contiguous(arr, what)
        return DeviceView(arr, resolve_dtype(arr.dtype), lambda v: v)
    if hasattr(x, "__dlpack__"):
        arr = cp.from_dlpack(x)
        _check_contiguous(arr, what)
        dt = resolve_dtype(arr.dtype)
        mod = sys.modules.get(_module_root(x))
        back = (lambda v: mod.from_dlpack(v)) if mod is not None and hasattr(mod, "from_dlpack") else (lambda v: v)
        return DeviceView(arr.view(cp.uint16) if dt == bfloat16 else arr, dt, back)
    raise TypeError(f"{what}: unsupported array type {type(x).__name__}")


def _torch_view(t, what) -> DeviceView:
    cp = _cupy()
    name = _torch_dtype_name(t)
    if not t.is_contiguous():
        raise ValueError(f"{what} must be contiguous; call .contiguous() first")
    if not t.is_cuda:
        host = to_numpy(t)
        view = _as_device_view(host, what)
        import torch
        return DeviceView(view.arr, view.dtype,
                          lambda v: torch.from_numpy(np.ascontiguousarray(_back_to_numpy(v, view.dtype))
                                                     .view(np.int16)).view(torch.bfloat16)
                          if name == "bfloat16" else torch.from_numpy(_back_to_numpy(v, view.dtype)))
    raw = t.detach()
    if name == "bfloat16":
        raw = raw.view(_torch_int16())
    arr = cp.asarray(raw)
    if name == "bfloat16":
        arr = arr.view(cp.uint16)
    return DeviceView(arr, DTYPES[name], lambda v: t)


def _back_to_numpy(v, dt):
    host = v.get()
    return host.view(bfloat16) if dt == bfloat16 else host


def _check_contiguous(arr, what):
    if not arr.flags.c_contiguous:
        raise ValueError(f"{what} must be C-contiguous (got strides {arr.strides})")


def _resolve_stream(stream, x):
    cp = _cupy()
    if stream is None:
        if _is_torch(x) and x.is_cuda:
            import torch
            return cp.cuda.ExternalStream(torch.cuda.current_stream(x.device).cuda_stream)
        return cp.cuda.get_current_stream()
    if isinstance(stream, (cp.cuda.Stream, cp.cuda.ExternalStream)):
        return stream
    if hasattr(stream, "cuda_stream"):  # torch.cuda.Stream
        return cp.cuda.ExternalStream(stream.cuda_stream)
    if isinstance(stream, int):
        return cp.cuda.ExternalStream(stream)
    raise TypeError(f"stream must be a CuPy/torch stream or a raw handle, got {type(stream).__name__}")


def _run_device(backend, x, out, mode, stream):
    xv = _as_device_view(x, "x")
    dev = getattr(backend, "device_id", None)
    if dev is not None and xv.arr.device.id != dev:
        raise ValueError(f"x is on GPU {xv.arr.device.id} but this rank's communicator uses GPU {dev}")
    cs = _resolve_stream(stream, x)
    if out is x:
        ov = xv
    elif out is None:
        if isinstance(x, np.ndarray):
            ov = DeviceView(_cupy().empty_like(xv.arr), xv.dtype, xv.wrap_back)
        elif _is_torch(x) and x.is_cuda:
            import torch
            o = torch.empty_like(x)
            ov = _torch_view(o, "out")
        else:
            ov = DeviceView(_cupy().empty_like(xv.arr), xv.dtype, xv.wrap_back)
    else:
        ov = _as_device_view(out, "out")
        if ov.arr.shape != xv.arr.shape or ov.dtype != xv.dtype:
            raise ValueError("out must have x's shape and dtype")
    backend.all_reduce(xv.arr, ov.arr, mode, stream=cs, dtype=xv.dtype)
    if isinstance(out, np.ndarray):
        backend.wait(cs)  # bounded; raises on this call if it failed
        np.copyto(out, _back_to_numpy(ov.arr, ov.dtype))
        return out
    if isinstance(x, np.ndarray) and out is None:
        backend.wait(cs)  # bounded; raises on this call if it failed
    if isinstance(x, np.ndarray) and out is x:
        backend.wait(cs)  # bounded; raises on this call if it failed
        np.copyto(x, _back_to_numpy(ov.arr, ov.dtype))
        return x
    if out is not None and not isinstance(out, np.ndarray):
        return out
    return ov.wrap_back(ov.arr)
