"""Conversion and validation of user arrays for a backend.

The user may pass NumPy arrays, CuPy arrays, PyTorch tensors (CPU or CUDA),
or any object exposing ``__cuda_array_interface__`` or ``__dlpack__``; the
result comes back as the same kind.  bf16 travels on the GPU as a ``uint16``
view with the logical dtype passed separately, so flashcomm does not depend
on CuPy's bf16 support.

Host arrays (NumPy, CPU tensors) are used through zero-copy NumPy views, so
``out=`` and in-place calls write into the caller's memory on every backend.
Calls with a host array are host-synchronous: they return once the result is
on the host, after re-checking the backend's error record, so a call that
failed raises itself (not the next call).

Temporaries on the GPU (the device copy of a host array) are allocated,
used and freed on the caller's stream: CuPy's memory pool hands a freed block
again only to later work on the stream it was allocated on, which is ordered
after the kernel that read it.  Host arrays cannot be used while that stream
is being captured into a CUDA graph (the graph would keep pointers to
temporaries freed when the call returns): such a call raises ``ValueError``.
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


def _torch():
    import torch
    return torch


def to_numpy(x) -> np.ndarray:
    """A host NumPy copy of any supported array (a view where ``x`` already is on the host)."""
    if isinstance(x, np.ndarray):
        return x
    if _is_torch(x):
        t = x.detach()
        if str(t.dtype) == "torch.bfloat16":
            return t.view(_torch().int16).cpu().numpy().view(np.uint16).view(bfloat16)
        return t.cpu().numpy()
    if hasattr(x, "get") and _module_root(x) == "cupy":
        return x.get()
    return np.asarray(x)


def _contiguity_fix(what: str, copy: str) -> str:
    """What to do about a non-contiguous ``what``: the input may be copied first, an ``out=`` may not
    (the result would land in the copy)."""
    return f"pass {copy}" if what == "x" else "pass a contiguous array of its own, and copy the result over"


def _validate_host(x: np.ndarray, what: str) -> np.dtype:
    dt = resolve_dtype(x.dtype)
    if not x.flags.c_contiguous:
        raise ValueError(f"{what} must be C-contiguous (got strides {x.strides}); "
                         f"{_contiguity_fix(what, 'np.ascontiguousarray(x)')}")
    return dt


# ----------------------------------------------------------------------------- host arrays
class HostArray:
    """A zero-copy NumPy view of a host array (NumPy or CPU tensor) and how to hand a result back."""

    __slots__ = ("array", "dtype", "orig")

    def __init__(self, array: np.ndarray, dtype: np.dtype, orig):
        self.array, self.dtype, self.orig = array, dtype, orig

    def wrap_new(self, result: np.ndarray):
        """``result`` (a fresh NumPy array) as the kind of ``orig``."""
        if not _is_torch(self.orig):
            return result
        torch = _torch()
        if self.dtype == bfloat16:
            return torch.from_numpy(result.view(np.int16)).view(torch.bfloat16)
        return torch.from_numpy(result)


def _host_array(x, what: str):
    """A :class:`HostArray` for NumPy arrays and CPU tensors; None for anything else."""
    if isinstance(x, np.ndarray):
        return HostArray(x, _validate_host(x, what), x)
    if _is_torch(x) and getattr(x, "device", None) is not None and x.device.type == "cpu":
        name = _torch_dtype_name(x)
        if not x.is_contiguous():
            raise ValueError(f"{what} must be contiguous; {_contiguity_fix(what, 'x.contiguous()')}")
        t = x.detach()
        if name == "bfloat16":
            view = t.view(_torch().int16).numpy().view(bfloat16)
        else:
            view = t.numpy()
        return HostArray(view, DTYPES[name], x)
    return None


def _span(ptr: int, nbytes: int):
    return ptr, ptr + nbytes


def check_overlap(x_span, out_span) -> None:
    """Raise ValueError when ``x`` and ``out`` partially overlap; the same memory (in place) is allowed.

    A kernel reads ``x`` while writing ``out``: with a partial overlap the
    writes land in inputs not yet read on this or another rank.
    """
    (x0, x1), (o0, o1) = x_span, out_span
    if (x0, x1) == (o0, o1) or x1 <= o0 or o1 <= x0:
        return
    raise ValueError(f"x and out partially overlap (x spans [{x0:#x}, {x1:#x}), out [{o0:#x}, {o1:#x})); "
                     "pass out=x to reduce in place, or a separate out")


def _host_span(a: np.ndarray):
    return _span(a.__array_interface__["data"][0], a.nbytes)


def _check_out_matches(x_shape, x_dtype, out_shape, out_dtype):
    if tuple(out_shape) != tuple(x_shape) or out_dtype != x_dtype:
        raise ValueError(f"out must have x's shape and dtype: x is {tuple(x_shape)} {x_dtype}, "
                         f"out is {tuple(out_shape)} {out_dtype}")


def check_backend(backend) -> None:
    """Raise the error a finished call recorded (a timeout, an abort); for host-synchronous calls."""
    check = getattr(backend, "check", None) or getattr(backend, "_raise_if_failed", None)
    if check is not None:
        check()


def run_all_reduce(backend, x, out, mode: Mode, stream):
    """Validate, convert, call ``backend.all_reduce`` and convert back."""
    if backend.xp is np:
        return _run_host(backend, x, out, mode)
    return _run_device(backend, x, out, mode, stream)


def _x_label(x, out) -> str:
    """How messages name ``x``: as the output too where the call is in place (a copy of it would
    receive the result)."""
    return "x (out=x)" if out is x else "x"


def _run_host(backend, x, out, mode):
    xh = _host_array(x, _x_label(x, out))
    if xh is None:
        raise TypeError(f"the CPU backend takes NumPy arrays or CPU tensors, got {_describe(x)}")
    if out is None:
        oh = HostArray(np.empty_like(xh.array), xh.dtype, x)
    elif out is x:
        oh = xh
    else:
        oh = _host_array(out, "out")
        if oh is None:
            raise TypeError(f"out must be a NumPy array or CPU tensor like x, got {_describe(out)}")
        _check_out_matches(xh.array.shape, xh.dtype, oh.array.shape, oh.dtype)
        check_overlap(_host_span(xh.array), _host_span(oh.array))
    backend.all_reduce(xh.array, oh.array, mode, dtype=xh.dtype)
    check_backend(backend)
    return oh.wrap_new(oh.array) if out is None else out


def _describe(x) -> str:
    if _is_torch(x):
        return f"a torch tensor on {x.device}"
    return type(x).__name__


# ----------------------------------------------------------------------------- device arrays
class DeviceView:
    """A CuPy array (bf16 as uint16) plus its logical dtype and how to hand it back."""

    def __init__(self, arr, dtype: np.dtype, wrap_back):
        self.arr = arr
        self.dtype = dtype
        self.wrap_back = wrap_back


def _cupy():
    import cupy
    return cupy


def _staged(host: HostArray, stream, copy: bool) -> DeviceView:
    """A device copy of a host array (``copy=False``: uninitialised), allocated on ``stream``."""
    cp = _cupy()
    raw = host.array.view(np.uint16) if host.dtype == bfloat16 else host.array
    with stream:  # allocated (and, when the caller drops it, freed) in ``stream``'s order
        arr = cp.asarray(raw) if copy else cp.empty(raw.shape, raw.dtype)
    return DeviceView(arr, host.dtype, None)


def _as_device_view(x, what: str) -> DeviceView:
    cp = _cupy()
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
    """A CUDA tensor as a CuPy array over the same memory."""
    cp = _cupy()
    name = _torch_dtype_name(t)
    if not t.is_contiguous():
        raise ValueError(f"{what} must be contiguous; {_contiguity_fix(what, 'x.contiguous()')}")
    raw = t.detach()
    if name == "bfloat16":
        raw = raw.view(_torch().int16)
    # On the tensor's own GPU: CuPy copies a foreign array of another device onto the current one,
    # and a result written into that copy would never reach the caller (nor would the device check see it).
    with cp.cuda.Device(t.get_device()):
        arr = cp.asarray(raw)
    if name == "bfloat16":
        arr = arr.view(cp.uint16)
    return DeviceView(arr, DTYPES[name], lambda v: t)


def _check_contiguous(arr, what):
    if not arr.flags.c_contiguous:
        raise ValueError(f"{what} must be C-contiguous (got strides {arr.strides}); "
                         f"{_contiguity_fix(what, 'a contiguous copy such as cupy.ascontiguousarray(x)')}")


def resolve_stream(stream, x):
    """The CuPy stream a call runs on: ``stream`` if given, else the current stream of ``x``'s library."""
    cp = _cupy()
    if stream is None:
        if _is_torch(x) and x.is_cuda:
            return cp.cuda.ExternalStream(_torch().cuda.current_stream(x.device).cuda_stream)
        return cp.cuda.get_current_stream()
    if isinstance(stream, (cp.cuda.Stream, cp.cuda.ExternalStream)):
        return stream
    if hasattr(stream, "cuda_stream"):  # torch.cuda.Stream
        return cp.cuda.ExternalStream(stream.cuda_stream)
    if isinstance(stream, int):
        return cp.cuda.ExternalStream(stream)
    raise TypeError(f"stream must be a CuPy/torch stream or a raw handle, got {type(stream).__name__}")


def _refuse_capture(stream, why: str) -> None:
    from cupy.cuda import runtime
    try:
        capturing = runtime.streamIsCapturing(stream.ptr)
    except runtime.CUDARuntimeError:  # the legacy stream queried while another stream captures globally
        capturing = True
    if capturing:
        raise ValueError(f"flashcomm: {why} cannot be captured into a CUDA graph (the graph would keep "
                         "pointers to temporaries freed when the call returns); pass device arrays")


def _device_span(arr):
    return _span(arr.data.ptr, arr.nbytes)


def _run_device(backend, x, out, mode, stream):
    xh = _host_array(x, _x_label(x, out))
    oh = None if out is None or out is x else _host_array(out, "out")
    cs = resolve_stream(stream, out if xh is not None and oh is None and out is not None else x)
    host_sync = xh is not None or oh is not None
    if host_sync:
        _refuse_capture(cs, "a call with host (NumPy or CPU tensor) arrays")
    xv = _staged(xh, cs, copy=True) if xh is not None else _as_device_view(x, _x_label(x, out))
    dev = getattr(backend, "device_id", None)
    _check_device(xv, dev, "x")
    if out is x:
        ov = xv
    elif out is None:
        ov = _staged(xh, cs, copy=False) if xh is not None else _new_device_out(x, xv, cs)
    else:
        if oh is not None:
            _check_out_matches(xv.arr.shape, xv.dtype, oh.array.shape, oh.dtype)
            if xh is not None:
                check_overlap(_host_span(xh.array), _host_span(oh.array))
            ov = _staged(oh, cs, copy=False)
        else:
            ov = _as_device_view(out, "out")
            _check_device(ov, dev, "out")
            _check_out_matches(xv.arr.shape, xv.dtype, ov.arr.shape, ov.dtype)
            check_overlap(_device_span(xv.arr), _device_span(ov.arr))
    backend.all_reduce(xv.arr, ov.arr, mode, stream=cs, dtype=xv.dtype)
    if not host_sync:
        return out if out is not None else ov.wrap_back(ov.arr)
    backend.wait(cs)  # bounded; raises on the call that failed
    if out is not None and out is not x and oh is None:
        return out  # a device ``out`` of a host ``x``: the result is already there
    result = ov.arr.get(stream=cs)
    if ov.dtype == bfloat16:
        result = result.view(bfloat16)
    if out is None:
        return xh.wrap_new(result)
    np.copyto((oh if oh is not None else xh).array, result)
    return out


def _check_device(view: DeviceView, dev, what: str) -> None:
    """Raise unless ``view``'s memory is on GPU ``dev``.  Asks the driver where the pointer lives:
    an array made from another library's tensor (``__cuda_array_interface__``) may report CuPy's
    current device instead of its own."""
    if dev is None:
        return
    where = view.arr.device.id
    try:
        where = _cupy().cuda.runtime.pointerGetAttributes(view.arr.data.ptr).device
    except Exception:  # not a device pointer CUDA knows: keep what the array says
        pass
    if where != dev:
        raise ValueError(f"{what} is on GPU {where} but this rank's communicator uses GPU {dev}")


def _new_device_out(x, xv: DeviceView, stream) -> DeviceView:
    """The result array of an out-of-place call on device memory, of ``x``'s kind."""
    if _is_torch(x):
        torch = _torch()
        if torch.cuda.current_stream(x.device).cuda_stream == stream.ptr:
            return _torch_view(torch.empty_like(x), "out")
        # allocated on the stream the kernel writes it on: torch's allocator hands a freed
        # block again only to that stream's later work
        with torch.cuda.stream(torch.cuda.ExternalStream(stream.ptr, device=x.device)):
            return _torch_view(torch.empty_like(x), "out")
    with stream:
        arr = _cupy().empty_like(xv.arr)
    return DeviceView(arr, xv.dtype, xv.wrap_back)
