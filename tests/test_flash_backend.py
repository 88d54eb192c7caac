"""The flash backend's wiring on a CPU: CuPy, the transport and NCCL faked, the plans and the
argument blocks real.  What runs for a call is select_plan's plan (cached), its launch carries
the plan's shape, forced launches are arguments, and closing frees everything once."""
from __future__ import annotations

import ctypes
import sys
import types

import numpy as np
import pytest

from flashcomm_cupy.backends.flash import backend as flash_backend
from flashcomm_cupy.backends.flash import workspace as flash_workspace
from flashcomm_cupy.backends.flash.layout import ERROR_FIELDS
from flashcomm_cupy.backends.flash.plan import Force, select_plan
from flashcomm_cupy.config import Mode

TABLE = {"worlds": {"2": [
    {"max_bytes": 64 << 10, "lossless": {"algo": "oneshot", "threads": 128, "protocol": "ll"},
     "quantized": {"algo": "oneshot", "threads": 128, "blocks": 8}},
    {"max_bytes": 1 << 30, "lossless": {"algo": "nccl"},
     "quantized": {"algo": "twoshot", "threads": 256, "blocks": 264, "units": 2}}]}}


class _Comm:
    """A one-process stand-in for a 2-rank communicator whose peer always agrees."""

    def Get_rank(self):
        return 0

    def Get_size(self):
        return 2

    def allgather(self, value):
        return [value, value]


class _Array:
    def __init__(self, n, ptr=0x1000):
        self.size, self.dtype = n, np.dtype(np.float16)
        self.data = types.SimpleNamespace(ptr=ptr)


@pytest.fixture
def fake_gpu(monkeypatch, tmp_path):
    """CuPy, the transport, NCCL and the kernels faked; returns what they saw."""
    seen = {"launches": [], "nccl": [], "freed": [], "closed": 0, "kernels": []}
    host = {}

    def host_alloc(nbytes, flags):
        buf = ctypes.create_string_buffer(nbytes)
        host[ctypes.addressof(buf)] = buf
        return ctypes.addressof(buf)

    runtime = types.SimpleNamespace(
        getDeviceProperties=lambda d: {"name": b"NVIDIA H200", "multiProcessorCount": 132, "major": 9, "minor": 0,
                                       "sharedMemPerMultiprocessor": 233472, "regsPerMultiprocessor": 65536},
        hostAlloc=host_alloc, freeHost=lambda p: seen["freed"].append(p), memcpy=lambda *a: None,
        memcpyDefault=4, streamIsCapturing=lambda s: False)
    cupy = types.SimpleNamespace(cuda=types.SimpleNamespace(
        runtime=runtime, Device=lambda d=0: types.SimpleNamespace(synchronize=lambda: None),
        get_current_stream=lambda: types.SimpleNamespace(ptr=7), ExternalStream=lambda p: p))
    monkeypatch.setitem(sys.modules, "cupy", cupy)
    monkeypatch.setattr(flash_backend, "select_device", lambda comm, device=None: 0)

    class _Nccl:
        def __init__(self, comm):
            self.comm = types.SimpleNamespace(allReduce=None)

        def all_reduce(self, *args):
            seen["nccl"].append(args)

        def close(self):
            seen["closed"] += 1

    monkeypatch.setattr(flash_backend, "NcclCommunicatorHandle", _Nccl)

    def open_workspace(comm, layout, device_id, transport):
        return types.SimpleNamespace(layout=layout, peer_ptrs=[0x10000, 0x20000], transport="ipc", handles="legacy",
                                     ptr=0x10000, close=lambda: seen.__setitem__("closed", seen["closed"] + 1))

    monkeypatch.setattr(flash_workspace, "open_workspace", open_workspace)

    def kernel(name, key, build):
        seen["kernels"].append((name, key))
        return lambda grid, block, args, stream=None, shared_mem=0: seen["launches"].append(
            (name, grid, block, args[0][0].copy(), shared_mem))

    monkeypatch.setattr(flash_backend.kernels, "kernel", kernel)
    monkeypatch.setattr(flash_backend, "_launch_kernel", None)  # the RawKernel path: observable here
    table = tmp_path / "table.json"
    table.write_text(__import__("json").dumps(TABLE))
    return seen, str(table)


def test_calls_run_the_cached_plan_with_its_shape(fake_gpu):
    seen, table = fake_gpu
    b = flash_backend.FlashGpuBackend(_Comm(), tuning_path=table, protocol="auto")
    assert b.limits.card == "NVIDIA H200" and b.limits.max_blocks == 264 and b.limits.transport == "ipc"
    mode = Mode.make(4)
    want = select_plan(1 << 16, "float16", mode, world=2, table=b.table, limits=b.limits)
    assert b.plan(1 << 16, np.float16, mode) is b.plan(1 << 16, "float16", mode) == want
    assert (b.resolve_algo(1 << 17, mode), b.resolve_protocol(1 << 17, mode)) == (want.algo, want.protocol)
    b.all_reduce(_Array(1 << 16), _Array(1 << 16, 0x2000), mode)
    (name, grid, block, args, smem), = seen["launches"]
    assert (name, grid, block, smem) == (want.kernel, (want.blocks,), (want.threads,), 0)
    assert (int(args["in_ptr"]), int(args["out_ptr"]), int(args["n"])) == (0x1000, 0x2000, 1 << 16)
    assert (int(args["seg_elems"]), int(args["units"]), int(args["group"])) == (want.seg_elems, want.units, 128)
    assert int(args["world"]) == 2 and list(args["peers"][:2]) == [0x10000, 0x20000]
    # a forced launch is an argument: the next plain call runs the table's plan again
    b.all_reduce(_Array(1 << 16), _Array(1 << 16, 0x2000), Mode.make(4, algo="oneshot"), force=Force(64, 4, 1))
    assert seen["launches"][-1][1:3] == ((4,), (64,))
    b.all_reduce(_Array(1 << 16), _Array(1 << 16, 0x2000), mode)
    assert seen["launches"][-1][1:3] == ((want.blocks,), (want.threads,))
    # lossless past the LL row: NCCL
    b.all_reduce(_Array(1 << 20), _Array(1 << 20, 0x2000), Mode.make(None))
    assert len(seen["nccl"]) == 1
    b.close()
    b.close()
    assert seen["closed"] == 2 and len(seen["freed"]) == 1  # workspace, NCCL, error record: once each
    with pytest.raises(RuntimeError, match="closed"):
        b.all_reduce(_Array(8), _Array(8, 0x2000), mode)


def test_a_filled_error_record_raises_before_any_launch(fake_gpu):
    seen, table = fake_gpu
    b = flash_backend.FlashGpuBackend(_Comm(), tuning_path=table)
    rec = b.flash_ws.error
    for i, v in enumerate((2, 0, 1, 0, 0, 0, 1, 0)):  # code POISON, rank 0, peer 1, late 1
        rec[i] = v
    assert len(rec) == len(ERROR_FIELDS)
    with pytest.raises(Exception, match="rank 1 gave up"):
        b.all_reduce(_Array(1 << 10), _Array(1 << 10, 0x2000), Mode.make(4))
    assert not seen["launches"]
    b.close()


def test_settings_are_checked(fake_gpu):
    _, table = fake_gpu
    with pytest.raises(ValueError, match="protocol"):
        flash_backend.FlashGpuBackend(_Comm(), tuning_path=table, protocol="lamport")
    with pytest.raises(ValueError, match="max_threads"):
        flash_backend.FlashGpuBackend(_Comm(), tuning_path=table, max_threads=100)


def test_eager_calls_routed_to_nccl_go_through_the_bounded_handle(fake_gpu):
    # The eager fast path of a call the plan gives to NCCL must use the handle's all_reduce, which
    # refuses calls after an NCCL abort and remembers the stream, so synchronize()/wait()/close()
    # bound the wait for it; the raw communicator's allReduce would do neither.
    seen, table = fake_gpu
    b = flash_backend.FlashGpuBackend(_Comm(), tuning_path=table)
    launch = b.eager_launcher(1 << 20, "float16", Mode.make(None))  # lossless past the LL row: NCCL
    assert launch is not None and launch(0x1000, 0x2000, 7)
    assert seen["nccl"] == [(0x1000, 0x2000, 1 << 20, "float16", 7)]
    b.close()


def test_a_setting_that_fails_on_one_rank_raises_on_every_rank(fake_gpu):
    # A rank whose local set-up fails (here: the peer's) must not leave this rank waiting in the
    # next collective: every rank learns the failure in one exchange and raises.
    _, table = fake_gpu

    class PeerFails(_Comm):
        def allgather(self, value):
            if value is None:  # the exchange of local failures: the peer had one
                return [None, "ValueError: protocol (or $FLASHCOMM_PROTOCOL) must be one of auto, flag, ll"]
            return [value, value]

    with pytest.raises(RuntimeError, match="could not start on another rank.*rank 1: ValueError: protocol"):
        flash_backend.FlashGpuBackend(PeerFails(), tuning_path=table)


def test_parallel_compiles_report_each_failed_module_as_a_line(tmp_path):
    """compile_in_parallel never raises for a module that does not build: it returns one line per
    such module (whoever loads it compiles it again and raises there), each module once."""
    from flashcomm_cupy.backends.flash import kernels
    missing = kernels.KernelBuild(str(tmp_path))  # no fc_allreduce.cu there
    lines = kernels.compile_in_parallel([(missing, 0, 4, 4, 32), (missing, 0, 4, 4, 32), (missing, 1, 0, 0, 32)],
                                        timeout_s=120, workers=2)
    assert len(lines) == 2, lines
    assert all("failed" in line for line in lines), lines
    assert any("(0, 4, 4, 32)" in line for line in lines) and any("(1, 0, 0, 32)" in line for line in lines)


def test_a_new_device_workspace_is_zeros_up_to_the_ll_slots_and_0xff_from_there(monkeypatch):
    """Every device workspace (CUDA IPC, VMM, the one-GPU loopback) starts alike: flags, epochs and
    the poison area zero, every LL slot empty (0xFF bytes) to the allocation's end."""
    from flashcomm_cupy.backends.flash.layout import WorkspaceLayout
    from flashcomm_cupy.backends.ipc import fill_new_workspace
    calls = []
    runtime = types.SimpleNamespace(memset=lambda ptr, value, n: calls.append((ptr, value, n)),
                                    deviceSynchronize=lambda: calls.append("synchronized"))
    monkeypatch.setitem(sys.modules, "cupy", types.SimpleNamespace(cuda=types.SimpleNamespace(runtime=runtime)))
    layout = WorkspaceLayout(2, 8, 48 << 10)
    fill_new_workspace(4096, layout, layout.total + 512)  # VMM rounds the allocation up
    assert calls == [(4096, 0, layout.ll_off), (4096 + layout.ll_off, 0xFF, layout.total + 512 - layout.ll_off),
                     "synchronized"]


def test_an_older_kernel_tree_runs_the_stand_in_of_a_kernel_it_lacks(monkeypatch, tmp_path):
    """A/B runs load kernel trees from before a kernel existed: there its stand-in (the kernel that
    computes the same results) runs; the shipped tree, which has every kernel, never falls back."""
    from flashcomm_cupy.backends.flash import kernels

    class Module:  # an older tree's module: fc_llq_oneshot only
        def get_function(self, name):
            if name != "fc_llq_oneshot":
                raise RuntimeError("CUDA_ERROR_NOT_FOUND: named symbol not found")
            return name

    monkeypatch.setattr(kernels, "module", lambda *args: Module())
    older = kernels.KernelBuild(str(tmp_path))
    assert kernels.function("fc_llq_oneshot_rot", 0, 4, 4, 16, older) == "fc_llq_oneshot"
    with pytest.raises(RuntimeError, match="NOT_FOUND"):
        kernels.function("fc_llq_twoshot", 0, 4, 4, 16, older)  # no stand-in
    with pytest.raises(RuntimeError, match="NOT_FOUND"):
        kernels.function("fc_llq_oneshot_rot", 0, 4, 4, 16)  # the shipped tree


@pytest.mark.parametrize("world", [1, 9])
def test_a_loopback_job_needs_two_to_eight_ranks(world):
    """The one-GPU loopback (tests/gpu/test_loopback_gpu.py) refuses a world the kernels cannot
    run, before it touches a GPU."""
    from flashcomm_cupy.backends.flash.loopback import LoopbackJob
    with pytest.raises(ValueError, match="world must be 2 to 8"):
        LoopbackJob(world)


def test_a_loopback_job_allows_unfit_grids_only_to_two_ranks():
    """With three or more ranks, grids that do not fit the GPU together could fill it with blocks
    that all wait for unstarted ones (LoopbackJob's ``unfit_ll_grids``): refused up front."""
    from flashcomm_cupy.backends.flash.loopback import LoopbackJob
    with pytest.raises(ValueError, match="unfit_ll_grids needs 2 ranks"):
        LoopbackJob(3, unfit_ll_grids=True)
