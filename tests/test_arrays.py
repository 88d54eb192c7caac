"""The array layer (``flashcomm_cupy._arrays``) on host arrays, with a stub backend: no MPI, no GPU.

The stub stands for two ranks holding the same input: it writes ``2 * x``
into ``out`` the way a backend does (after reading all of ``x``), so a result
that lands anywhere but the caller's memory shows up as 1.0 or 0.0 instead of 2.0.
"""
from __future__ import annotations

import numpy as np
import pytest

from flashcomm_cupy import _arrays
from flashcomm_cupy.config import Mode
from flashcomm_cupy.dtypes import bfloat16

torch = pytest.importorskip("torch")

MODE = Mode.make(None)


class TwoRanksStub:
    """A host backend whose ``all_reduce`` doubles ``x`` into ``out``; ``fail`` makes ``check()`` raise."""

    xp = np

    def __init__(self, fail=None):
        self.fail = fail
        self.calls = []

    def all_reduce(self, x, out, mode, stream=None, dtype=None):
        assert isinstance(x, np.ndarray) and isinstance(out, np.ndarray)
        self.calls.append((x.__array_interface__["data"][0], out.__array_interface__["data"][0], dtype))
        total = (x.astype(np.float32) * 2).astype(x.dtype)
        np.copyto(out, total)
        return out

    def check(self):
        if self.fail:
            raise RuntimeError(self.fail)


TORCH_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@pytest.mark.parametrize("dtype", sorted(TORCH_DTYPES))
def test_cpu_tensor_in_place_writes_the_callers_tensor(dtype):
    x = torch.ones(1000, dtype=TORCH_DTYPES[dtype])
    backend = TwoRanksStub()
    got = _arrays.run_all_reduce(backend, x, x, MODE, None)
    assert got is x
    assert torch.equal(x, torch.full((1000,), 2.0, dtype=x.dtype))
    # zero-copy: the backend wrote the tensor's own memory, with the logical dtype
    assert backend.calls[0][:2] == (x.data_ptr(), x.data_ptr())
    assert np.dtype(backend.calls[0][2]) == (bfloat16 if dtype == "bfloat16" else np.dtype(dtype))


@pytest.mark.parametrize("dtype", sorted(TORCH_DTYPES))
def test_cpu_tensor_out_and_new_result(dtype):
    tdt = TORCH_DTYPES[dtype]
    x = torch.arange(12, dtype=tdt).reshape(3, 4)
    out = torch.zeros(3, 4, dtype=tdt)
    got = _arrays.run_all_reduce(TwoRanksStub(), x, out, MODE, None)
    assert got is out
    assert torch.equal(out, x * 2)
    assert torch.equal(x, torch.arange(12, dtype=tdt).reshape(3, 4))  # x untouched
    fresh = _arrays.run_all_reduce(TwoRanksStub(), x, None, MODE, None)
    assert isinstance(fresh, torch.Tensor) and fresh.dtype == tdt and fresh.shape == (3, 4)
    assert torch.equal(fresh, x * 2)


def test_numpy_in_place_and_out():
    x = np.ones(64, dtype=np.float16)
    _arrays.run_all_reduce(TwoRanksStub(), x, x, MODE, None)
    assert (x == 2).all()
    out = np.zeros_like(x)
    assert _arrays.run_all_reduce(TwoRanksStub(), x, out, MODE, None) is out
    assert (out == 4).all()


def test_exact_alias_through_another_view_is_in_place():
    x = np.ones(64, dtype=np.float32)
    alias = x.view()
    _arrays.run_all_reduce(TwoRanksStub(), x, alias, MODE, None)
    assert (x == 2).all()


@pytest.mark.parametrize("shift", [1, -1, 32])
def test_partial_overlap_raises(shift):
    base = np.zeros(200, dtype=np.float32)
    x = base[50:150]
    out = base[50 + shift:150 + shift]
    backend = TwoRanksStub()
    with pytest.raises(ValueError, match="partially overlap"):
        _arrays.run_all_reduce(backend, x, out, MODE, None)
    assert backend.calls == []


def test_partial_overlap_of_cpu_tensors_raises():
    base = torch.zeros(200)
    with pytest.raises(ValueError, match="partially overlap"):
        _arrays.run_all_reduce(TwoRanksStub(), base[:100], base[10:110], MODE, None)


def test_out_of_another_shape_or_dtype_raises():
    x = torch.ones(8)
    with pytest.raises(ValueError, match="shape and dtype"):
        _arrays.run_all_reduce(TwoRanksStub(), x, torch.ones(8, dtype=torch.float16), MODE, None)
    with pytest.raises(ValueError, match="shape and dtype"):
        _arrays.run_all_reduce(TwoRanksStub(), x, torch.ones(2, 4), MODE, None)
    with pytest.raises(TypeError, match="NumPy array or CPU tensor"):
        _arrays.run_all_reduce(TwoRanksStub(), x, [0.0] * 8, MODE, None)


def test_non_contiguous_and_unsupported_tensors_raise():
    with pytest.raises(ValueError, match="contiguous"):
        _arrays.run_all_reduce(TwoRanksStub(), torch.ones(4, 4).t(), None, MODE, None)
    with pytest.raises(TypeError, match="unsupported dtype"):
        _arrays.run_all_reduce(TwoRanksStub(), torch.ones(4, dtype=torch.float64), None, MODE, None)


def test_a_non_contiguous_out_is_not_advised_to_be_copied():
    """Copying ``x`` first is fine; copying ``out`` would put the result in the copy."""
    x = np.ones(64, np.float16)
    with pytest.raises(ValueError, match=r"^out must be C-contiguous .*; pass a contiguous array of its own"):
        _arrays.run_all_reduce(TwoRanksStub(), x, np.broadcast_to(np.float16(0), (64,)), MODE, None)
    with pytest.raises(ValueError, match=r"^x must be C-contiguous .*; pass np.ascontiguousarray\(x\)$"):
        _arrays.run_all_reduce(TwoRanksStub(), np.ones((8, 8), np.float16).T, None, MODE, None)
    with pytest.raises(ValueError, match="^out must be contiguous; pass a contiguous array of its own"):
        _arrays.run_all_reduce(TwoRanksStub(), torch.ones(4, 4), torch.ones(4, 4).t(), MODE, None)
    in_place = np.ones((8, 8), np.float16).T
    with pytest.raises(ValueError, match=r"^x \(out=x\) must be C-contiguous .*; pass a contiguous array of its own"):
        _arrays.run_all_reduce(TwoRanksStub(), in_place, in_place, MODE, None)


def test_a_failed_call_raises_itself():
    """Host-synchronous calls re-check the backend's error record before returning."""
    x = torch.ones(8)
    with pytest.raises(RuntimeError, match="rank 1 aborted"):
        _arrays.run_all_reduce(TwoRanksStub(fail="rank 1 aborted"), x, x, MODE, None)


def test_requires_grad_tensor_is_reduced_through_its_data():
    x = torch.ones(8, requires_grad=True)
    out = torch.zeros(8)
    _arrays.run_all_reduce(TwoRanksStub(), x, out, MODE, None)
    assert torch.equal(out, torch.full((8,), 2.0))
