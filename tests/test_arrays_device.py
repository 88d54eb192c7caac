"""The array layer's device path (``_arrays._run_device``) on a CPU, with a stand-in for CuPy.

The GPU backend's array handling (staging host arrays, handing results back
into the caller's NumPy arrays and CPU tensors, the out= checks, refusing
host arrays under graph capture, the stream every temporary belongs to) is
plain Python over CuPy calls.  Here ``cupy`` is a small fake whose "device"
arrays are NumPy arrays that remember the stream they were allocated on, and
the backend doubles ``x`` into ``out`` (two ranks with equal inputs), so a
result that lands anywhere but the caller's memory shows as 1.0, not 2.0.
The same paths run on real GPUs in ``tests/gpu/torch_gpu_checks.py``.
"""
from __future__ import annotations

import sys
import types

import numpy as np
import pytest

from flashcomm_cupy import _arrays
from flashcomm_cupy.config import Mode

torch = pytest.importorskip("torch")

MODE = Mode.make(None)


class FakeStream:
    current = None

    def __init__(self, ptr, capturing=False):
        self.ptr, self.capturing, self.synchronized = ptr, capturing, 0

    def __enter__(self):
        self.saved, FakeStream.current = FakeStream.current, self
        return self

    def __exit__(self, *exc):
        FakeStream.current = self.saved

    def synchronize(self):
        self.synchronized += 1


class FakeDeviceArray:
    """A "device" array: NumPy storage, the device it is on, the stream it was allocated on."""

    def __init__(self, host: np.ndarray, device=0):
        self.host, self.device = host, types.SimpleNamespace(id=device)
        self.stream = FakeStream.current
        self.data = types.SimpleNamespace(ptr=host.__array_interface__["data"][0])

    shape = property(lambda self: self.host.shape)
    dtype = property(lambda self: self.host.dtype)
    nbytes = property(lambda self: self.host.nbytes)
    strides = property(lambda self: self.host.strides)
    flags = property(lambda self: self.host.flags)

    def view(self, dtype):
        v = FakeDeviceArray(self.host.view(dtype), self.device.id)
        v.stream = self.stream
        return v

    def get(self, stream=None):
        return self.host.copy()


def _fake_cupy(capturing=False):
    cp = types.ModuleType("cupy")
    cp.ndarray = FakeDeviceArray
    cp.uint16 = np.uint16
    default = FakeStream(0, capturing)
    FakeStream.current = default
    cp.asarray = lambda a: FakeDeviceArray(np.array(a))
    cp.empty = lambda shape, dtype: FakeDeviceArray(np.full(shape, 7, dtype))
    cp.empty_like = lambda a: FakeDeviceArray(np.full_like(a.host, 7))
    runtime = types.SimpleNamespace(CUDARuntimeError=RuntimeError,
                                    streamIsCapturing=lambda ptr: capturing)
    cp.cuda = types.SimpleNamespace(Stream=FakeStream, ExternalStream=FakeStream, runtime=runtime,
                                    get_current_stream=lambda: FakeStream.current)
    return cp, default


class DoublingGpuStub:
    """A device backend: ``out = 2 * x`` on the fake device; records the stream of every call."""

    device_id = 0

    def __init__(self, cp):
        self.xp, self.streams = cp, []

    def all_reduce(self, x, out, mode, stream=None, dtype=None):
        assert isinstance(x, FakeDeviceArray) and isinstance(out, FakeDeviceArray)
        self.streams.append((stream, x.stream, out.stream))
        logical = np.dtype(dtype)
        xs, os_ = x.host.view(logical), out.host.view(logical)
        np.copyto(os_, (xs.astype(np.float32) * 2).astype(logical))
        return out

    def check(self):
        pass

    def wait(self, stream):
        """Backend.wait: the stream's work finished (bounded), then the error record is checked."""
        stream.synchronize()
        self.check()


@pytest.fixture
def gpu(monkeypatch):
    cp, default = _fake_cupy()
    monkeypatch.setitem(sys.modules, "cupy", cp)
    monkeypatch.setitem(sys.modules, "cupy.cuda", cp.cuda)
    monkeypatch.setattr(_arrays, "_cupy", lambda: cp)
    runtime_module = types.ModuleType("cupy.cuda.runtime")
    runtime_module.__dict__.update(vars(cp.cuda.runtime))
    monkeypatch.setitem(sys.modules, "cupy.cuda.runtime", runtime_module)
    cp.cuda.runtime = runtime_module
    return DoublingGpuStub(cp), default, runtime_module


@pytest.mark.parametrize("tdt", [torch.float16, torch.bfloat16, torch.float32])
def test_cpu_tensor_in_place_and_out_land_in_the_callers_tensor(gpu, tdt):
    backend, default, _ = gpu
    x = torch.ones(100, dtype=tdt)
    assert _arrays.run_all_reduce(backend, x, x, MODE, None) is x
    assert torch.equal(x, torch.full((100,), 2.0, dtype=tdt))
    x = torch.ones(100, dtype=tdt)
    o = torch.zeros(100, dtype=tdt)
    assert _arrays.run_all_reduce(backend, x, o, MODE, None) is o
    assert torch.equal(o, torch.full((100,), 2.0, dtype=tdt)) and torch.equal(x, torch.ones(100, dtype=tdt))
    fresh = _arrays.run_all_reduce(backend, x, None, MODE, None)
    assert isinstance(fresh, torch.Tensor) and fresh.dtype == tdt and torch.equal(fresh, o)
    assert default.synchronized == 3  # every host-synchronous call waited for its stream


def test_numpy_staging_lives_on_the_callers_stream(gpu):
    backend, default, _ = gpu
    mine = FakeStream(0x1234)
    x = np.ones(64, dtype=np.float16)
    out = np.zeros_like(x)
    _arrays.run_all_reduce(backend, x, out, MODE, mine)
    assert (out == 2).all() and (x == 1).all()
    stream, x_alloc, out_alloc = backend.streams[-1]
    assert stream is mine and x_alloc is mine and out_alloc is mine  # not CuPy's current stream
    assert mine.synchronized == 1 and default.synchronized == 0


def test_device_out_of_a_host_x_is_returned_and_x_untouched(gpu):
    backend, _, _ = gpu
    x = np.ones(32, dtype=np.float32)
    o = FakeDeviceArray(np.zeros(32, dtype=np.float32))
    assert _arrays.run_all_reduce(backend, x, o, MODE, None) is o
    assert (o.host == 2).all() and (x == 1).all()


def test_host_arrays_are_refused_under_graph_capture(gpu):
    backend, _, runtime = gpu
    runtime.streamIsCapturing = lambda ptr: True
    x = torch.ones(16)
    with pytest.raises(ValueError, match="CUDA graph"):
        _arrays.run_all_reduce(backend, x, x, MODE, None)

    def legacy_stream_during_global_capture(ptr):
        raise runtime.CUDARuntimeError("cudaErrorStreamCaptureImplicit")
    runtime.streamIsCapturing = legacy_stream_during_global_capture
    with pytest.raises(ValueError, match="CUDA graph"):
        _arrays.run_all_reduce(backend, np.ones(16, dtype=np.float32), None, MODE, None)
    assert backend.streams == []


def test_device_out_checks(gpu):
    backend, _, _ = gpu
    base = np.zeros(300, dtype=np.float32)
    x = FakeDeviceArray(base[:100])
    with pytest.raises(ValueError, match="partially overlap"):
        _arrays.run_all_reduce(backend, x, FakeDeviceArray(base[50:150]), MODE, None)
    with pytest.raises(ValueError, match="GPU 1"):
        _arrays.run_all_reduce(backend, x, FakeDeviceArray(np.zeros(100, np.float32), device=1), MODE, None)
    with pytest.raises(ValueError, match="GPU 1"):
        _arrays.run_all_reduce(backend, FakeDeviceArray(np.zeros(100, np.float32), device=1), None, MODE, None)
    with pytest.raises(ValueError, match="shape and dtype"):
        _arrays.run_all_reduce(backend, x, FakeDeviceArray(np.zeros(100, np.float16)), MODE, None)
    alias = FakeDeviceArray(base[:100])  # another object over the same memory: in place
    base[:100] = 1
    assert _arrays.run_all_reduce(backend, x, alias, MODE, None) is alias
    assert (base[:100] == 2).all()
    assert backend.streams[-1][0] is FakeStream.current


def test_a_host_synchronous_call_that_failed_raises_itself(gpu):
    backend, _, _ = gpu

    def failed():
        raise RuntimeError("flashcomm: rank 1 timed out")
    backend.check = failed
    x = torch.ones(16)
    with pytest.raises(RuntimeError, match="rank 1 timed out"):
        _arrays.run_all_reduce(backend, x, x, MODE, None)
    # device arrays return before the GPU finished: their errors surface at synchronize()/check()
    d = FakeDeviceArray(np.ones(16, dtype=np.float32))
    assert _arrays.run_all_reduce(backend, d, d, MODE, None) is d
