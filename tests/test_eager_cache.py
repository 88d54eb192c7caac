"""The eager fast path's cache (``flashcomm_cupy._eager``) with fake CUDA tensors: no GPU needed.

The launches a hit makes are recorded by a stub backend; every case the
general path must see again (another dtype or size at a cached address, a
non-contiguous or misaligned array, other mode arguments, a CPU tensor)
must miss, so no stale entry is ever served.
"""
from __future__ import annotations

import types

import pytest

from flashcomm_cupy._eager import EagerCache, _TorchReader
from flashcomm_cupy.config import Mode


class FakeCudaTensor:
    """What the torch reader reads of a tensor: device, pointer, size, dtype, shape, contiguity."""

    def __init__(self, ptr, numel, dtype="float16", device=0, contiguous=True, shape=None):
        self.ptr, self.n, self.dtype, self.device_index = ptr, numel, dtype, device
        self.contiguous, self.shape = contiguous, shape or (numel,)

    def get_device(self):
        return self.device_index

    def is_contiguous(self):
        return self.contiguous

    def data_ptr(self):
        return self.ptr

    def numel(self):
        return self.n


FAKE_TORCH = types.SimpleNamespace(
    Tensor=FakeCudaTensor,
    empty_like=lambda x: FakeCudaTensor(0x9000_0000, x.n, x.dtype, x.device_index),
    _C=types.SimpleNamespace(_cuda_getCurrentRawStream=lambda device: 0x5000 + device),
)


class LaunchRecorder:
    """A backend whose prepared launches record (n, dtype, mode, x, out, stream)."""

    def __init__(self):
        self.prepared, self.launches = [], []
        self.settings_changed = False

    def eager_launcher(self, n, name, mode):
        self.prepared.append((n, name, mode))

        def launch(x_ptr, out_ptr, stream_ptr):
            if self.settings_changed:
                return False
            self.launches.append((n, name, mode.label, x_ptr, out_ptr, stream_ptr))
            return True
        return launch


ARGS = (4, 128, "auto", False, False)  # bits, group_size, algo, rotate, symmetric


@pytest.fixture
def cache():
    backend = LaunchRecorder()
    c = EagerCache(backend)
    c._readers[FakeCudaTensor] = _TorchReader(FAKE_TORCH)
    for reader in c._readers.values():
        reader.dtype_name = staticmethod(lambda x: x.dtype)
    return c, backend


def remember(c, x, out, args=ARGS, stream=None):
    bits, group, algo, rotate, sym = args
    c.remember(x, out, stream, *args, Mode.make(bits, group, sym, rotate, algo))


def test_a_remembered_call_hits_and_launches_with_the_current_stream(cache):
    c, backend = cache
    x = FakeCudaTensor(0x1000, 2048)
    assert c.call(x, x, None, *ARGS) is None  # nothing cached yet: the general path runs
    remember(c, x, x)
    assert c.call(x, x, None, *ARGS) is x
    assert backend.launches == [(2048, "float16", "int4 g128", 0x1000, 0x1000, 0x5000)]
    o = FakeCudaTensor(0x2000, 2048)
    remember(c, x, o)
    assert c.call(x, o, None, *ARGS) is o
    assert backend.launches[-1][3:] == (0x1000, 0x2000, 0x5000)


def test_another_size_dtype_stream_or_out_at_a_cached_address_misses(cache):
    c, backend = cache
    x = FakeCudaTensor(0x1000, 2048)
    remember(c, x, x)
    assert c.call(FakeCudaTensor(0x1000, 1024), None, None, *ARGS) is None
    same_ptr_other_dtype = FakeCudaTensor(0x1000, 2048, dtype="bfloat16")
    assert c.call(same_ptr_other_dtype, same_ptr_other_dtype, None, *ARGS) is None
    assert c.call(x, x, 0x7777, *ARGS) is None  # an explicit other stream
    assert c.call(x, FakeCudaTensor(0x3000, 2048), None, *ARGS) is None
    assert c.call(x, None, None, *ARGS) is None  # a new result is another entry
    assert backend.launches == []


def test_non_contiguous_cpu_and_mismatched_out_always_miss(cache):
    c, _ = cache
    x = FakeCudaTensor(0x1000, 2048)
    o = FakeCudaTensor(0x2000, 2048)
    remember(c, x, x)
    remember(c, x, o)
    assert c.call(FakeCudaTensor(0x1000, 2048, contiguous=False), x, None, *ARGS) is None
    assert c.call(FakeCudaTensor(0x1000, 2048, device=-1), x, None, *ARGS) is None
    assert c.call(x, FakeCudaTensor(0x2000, 2048, contiguous=False), None, *ARGS) is None
    assert c.call(x, FakeCudaTensor(0x2000, 2048, shape=(2, 1024)), None, *ARGS) is None
    assert c.call(x, FakeCudaTensor(0x2000, 2048, dtype="float32"), None, *ARGS) is None
    # out on another GPU: the general path raises, so the fast path must not take it
    assert c.call(x, FakeCudaTensor(0x2000, 2048, device=1), None, *ARGS) is None


def test_other_mode_arguments_miss_and_unhashable_ones_fall_back(cache):
    c, backend = cache
    x = FakeCudaTensor(0x1000, 2048)
    remember(c, x, x)
    assert c.call(x, x, None, 8, 128, "auto", False, False) is None
    assert c.call(x, x, None, 4.0, 128, "auto", False, False) is None  # 4.0 == 4, but the general path rejects it
    assert c.call(x, x, None, 4, 128, "auto", True, False) is None
    assert c.call(x, x, None, [4, 4], 128, "auto", False, False) is None
    remember(c, x, x, args=((4, 8), 128, "auto", False, False))
    assert c.call(x, x, None, (4, 8), 128, "auto", False, False) is x
    assert backend.launches[-1][2] == "int4/8 g128"


def test_misaligned_pointers_are_never_cached(cache):
    c, backend = cache
    x = FakeCudaTensor(0x1002, 2048)
    remember(c, x, x)
    o = FakeCudaTensor(0x2008, 2048)
    remember(c, FakeCudaTensor(0x1000, 2048), o)
    assert backend.prepared == [] and len(c) == 0


def test_a_new_result_is_allocated_per_hit(cache):
    c, backend = cache
    x = FakeCudaTensor(0x1000, 2048)
    remember(c, x, None)
    got = c.call(x, None, None, *ARGS)
    assert isinstance(got, FakeCudaTensor) and got is not x and got.n == 2048
    assert backend.launches == [(2048, "float16", "int4 g128", 0x1000, 0x9000_0000, 0x5000)]


def test_backends_without_a_prepared_launch_are_never_cached(cache):
    c, _ = cache
    c._backend = types.SimpleNamespace(eager_launcher=lambda n, name, mode: None)
    x = FakeCudaTensor(0x1000, 2048)
    remember(c, x, x)
    assert len(c) == 0 and c.call(x, x, None, *ARGS) is None


def test_a_new_result_on_an_explicit_stream_is_not_cached(cache):
    """The fast path allocates new results on the current stream; another stream's work takes the general path."""
    c, backend = cache
    x = FakeCudaTensor(0x1000, 2048)
    remember(c, x, None, stream=0x7777)
    assert len(c) == 0 and c.call(x, None, 0x7777, *ARGS) is None


def test_an_entry_whose_backend_settings_changed_is_dropped(cache):
    c, backend = cache
    x = FakeCudaTensor(0x1000, 2048)
    remember(c, x, x)
    backend.settings_changed = True  # e.g. backend.protocol switched: the plan may differ now
    assert c.call(x, x, None, *ARGS) is None and len(c) == 0 and backend.launches == []
