"""Transport selection and the host layout, checked on a CPU with the workspaces faked.

The workspaces themselves need GPUs (tests/gpu); here: which transport
``auto``/``ipc``/``host`` try and in which order, the reasons reported when
none works, ``$FLASHCOMM_TRANSPORT``, when the GPU backend falls back to NCCL,
the one-GPU-per-rank rule, and the sentinel fill of the shared segment.
"""
from __future__ import annotations

import types
import warnings

import numpy as np
import pytest

from flashcomm_cupy.backends import gpu, transport
from flashcomm_cupy.backends.cuda_util import local_device_problem
from flashcomm_cupy.backends.host import HostWorkspace, fill_sentinels
from flashcomm_cupy.backends.ipc import IpcWorkspace, PeerAccessError, WorkspaceLayout
from flashcomm_cupy.backends.vmm import VmmWorkspace


def _fake(name, transport_name, handles, works, tried):
    def init(self, comm, layout, device_id):
        tried.append(name)
        if not works:
            raise PeerAccessError(f"{name} does not work")
    return type(name, (), {"transport": transport_name, "handles": handles, "__init__": init})


@pytest.fixture
def fakes(monkeypatch):
    """Fake legacy-IPC, virtual-memory and host workspaces; set which work, see which were tried."""
    state = types.SimpleNamespace(tried=[], works={"legacy": False, "vmm": False, "host": True})

    def candidates(name):
        make = {"legacy": ("ipc", "legacy"), "vmm": ("ipc", "virtual-memory"), "host": ("host", "shared memory")}
        order = {"ipc": ["legacy", "vmm"], "host": ["host"], "auto": ["legacy", "vmm", "host"]}[name]
        return [_fake(k, *make[k], state.works[k], state.tried) for k in order]

    monkeypatch.setattr(transport, "_candidates", candidates)
    return state


def test_auto_prefers_legacy_ipc(fakes):
    fakes.works["legacy"] = True
    ws = transport.open_workspace(None, None, 0, "auto")
    assert type(ws).__name__ == "legacy" and fakes.tried == ["legacy"]


def test_auto_takes_virtual_memory_handles_where_legacy_handles_fail(fakes):
    fakes.works["vmm"] = True
    ws = transport.open_workspace(None, None, 0, "auto")
    assert type(ws).__name__ == "vmm" and fakes.tried == ["legacy", "vmm"]


def test_auto_takes_host_memory_only_where_no_peer_path_exists(fakes):
    ws = transport.open_workspace(None, None, 0, "auto")
    assert type(ws).__name__ == "host" and fakes.tried == ["legacy", "vmm", "host"]


def test_ipc_never_falls_to_host_and_names_every_reason(fakes):
    with pytest.raises(PeerAccessError) as info:
        transport.open_workspace(None, None, 0, "ipc")
    assert fakes.tried == ["legacy", "vmm"]
    assert "ipc (legacy): legacy does not work; ipc (virtual-memory): vmm does not work" == str(info.value)


def test_host_is_tried_alone(fakes):
    fakes.works.update(legacy=True, host=False)
    with pytest.raises(PeerAccessError, match="host does not work"):
        transport.open_workspace(None, None, 0, "host")
    assert fakes.tried == ["host"]


def test_transport_comes_from_the_argument_then_the_environment(monkeypatch):
    monkeypatch.delenv(transport.ENV_VAR, raising=False)
    assert transport.resolve_transport() == "auto"
    monkeypatch.setenv(transport.ENV_VAR, "host")
    assert transport.resolve_transport() == "host"
    assert transport.resolve_transport("ipc") == "ipc"
    monkeypatch.setenv(transport.ENV_VAR, "nvlink")
    with pytest.raises(ValueError, match=r"\(or \$FLASHCOMM_TRANSPORT\) must be one of auto, ipc, host, got 'nvlink'"):
        transport.resolve_transport()


def test_the_real_candidates_and_their_labels():
    assert transport._candidates("auto") == [IpcWorkspace, VmmWorkspace, HostWorkspace]
    assert transport._candidates("ipc") == [IpcWorkspace, VmmWorkspace]
    labels = [transport.describe(c) for c in transport._candidates("auto")]
    assert labels == ["ipc (legacy handles)", "ipc (virtual-memory handles)", "host (shared memory)"]


class _Comm:
    def Get_rank(self):
        return 0


def _no_transport(monkeypatch):
    def fail(comm, **options):
        raise PeerAccessError("no peer path")
    monkeypatch.setattr(gpu, "FlashGpuBackend", fail)
    class StubNccl(gpu.NcclBackend):  # the real option filter (fallback), no NCCL
        def __init__(self, comm, **options):
            self.options = options

        def __eq__(self, other):
            return other == "nccl backend"
    monkeypatch.setattr(gpu, "NcclBackend", StubNccl)
    monkeypatch.setattr(gpu, "_warned", False)


def test_auto_falls_back_to_nccl_with_a_warning_when_no_transport_works(monkeypatch):
    monkeypatch.delenv(transport.ENV_VAR, raising=False)
    _no_transport(monkeypatch)
    with pytest.warns(RuntimeWarning, match="no transport for the flash kernels works here.*no peer path"):
        assert gpu.make_gpu_backend(_Comm()) == "nccl backend"


def test_the_nccl_fallback_keeps_the_bound_and_the_device(monkeypatch):
    monkeypatch.delenv(transport.ENV_VAR, raising=False)
    _no_transport(monkeypatch)
    with pytest.warns(RuntimeWarning):
        backend = gpu.make_gpu_backend(_Comm(), timeout_s=5, device=1, validate=True, protocol="ll", max_threads=256)
    assert backend.options == {"timeout_s": 5, "device": 1, "validate": True}


@pytest.mark.parametrize("how", ["argument", "environment"])
def test_a_transport_asked_for_by_name_raises_instead_of_running_nccl(monkeypatch, how):
    _no_transport(monkeypatch)
    options = {"transport": "host"} if how == "argument" else {}
    if how == "environment":
        monkeypatch.setenv(transport.ENV_VAR, "host")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(PeerAccessError, match="no peer path"):
            gpu.make_gpu_backend(_Comm(), **options)


@pytest.mark.parametrize("nlocal, ndev, ok", [
    (2, 2, True), (2, 8, True), (1, 1, True),
    (2, 1, True),    # one GPU visible per rank (CUDA_VISIBLE_DEVICES per rank): select_device checks they differ
    (4, 2, False),   # two GPUs for four ranks: ambiguous
    (2, 0, False)])
def test_one_gpu_per_rank_rule(nlocal, ndev, ok):
    problem = local_device_problem(nlocal, ndev)
    assert (problem is None) == ok, problem
    if not ok and ndev:
        assert f"{nlocal} ranks on this host but only {ndev} GPUs visible" in problem
        assert "CUDA_VISIBLE_DEVICES per rank" in problem


@pytest.mark.parametrize("world", [2, 3])
def test_fill_sentinels_marks_exactly_every_ranks_ll_slots(world):
    layout = WorkspaceLayout(world, 4, 4096, 1024)
    buf = bytearray(world * layout.total)
    fill_sentinels(memoryview(buf), layout, world)
    data = np.frombuffer(buf, dtype=np.uint8).reshape(world, layout.total)
    for k in range(world):
        assert (data[k, layout.ll_off: layout.ll_off + layout.ll_bytes] == 0xFF).all()
        assert not data[k, : layout.ll_off].any()
        assert not data[k, layout.ll_off + layout.ll_bytes:].any()


def test_bench_header_names_the_transport_and_the_nccl_shm_baseline():
    from flashcomm_cupy.cli import report
    meta = {"transport": "host (shared memory)", "nccl_p2p_disabled": True, "config": {}, "versions": {}}
    lines = report.bench_header_lines(meta)
    assert ("# transport host (shared memory); baseline NCCL with NCCL_P2P_DISABLE=1 (through host memory, "
            "the same configuration)") in lines
    meta.update(transport="ipc (virtual-memory handles)", nccl_p2p_disabled=False)
    assert "# transport ipc (virtual-memory handles)" in report.bench_header_lines(meta)


def test_host_transport_has_tuning_rows_of_its_own():
    from flashcomm_cupy import tuning
    ipc_row = {"max_bytes": 1 << 30, "lossless": {"algo": "oneshot", "threads": 128},
               "quantized": {"algo": "oneshot", "threads": 128}}
    host_row = {"max_bytes": 1 << 30, "lossless": {"algo": "nccl"},
                "quantized": {"algo": "twoshot", "threads": 512, "units": 4}}
    table = tuning.TuningTable({"worlds": {tuning.world_key(2): [ipc_row],
                                           tuning.world_key(2, "host"): [host_row],
                                           tuning.world_key(4): [ipc_row]}}, "x")
    assert tuning.world_key(2, "host") == "2/host" and tuning.world_key(2, "ipc") == "2"
    assert table.choose(2, 4096, True).algo == "oneshot"
    assert table.choose(2, 4096, True, transport="host").algo == "nccl"
    assert table.choose(2, 4096, False, transport="host") == tuning.Choice("twoshot", 512, 0, 4)
    # no host rows for 4 ranks: the heuristic, not the NVLink measurements
    assert table.choose(4, 64 << 20, False, transport="host") == tuning.heuristic(4, 64 << 20, False)
    assert table.describe()["worlds"] == [2, 4] and table.describe()["worlds_host"] == [2]


def test_transport_option_sets_the_environment_for_every_rank(monkeypatch):
    import click
    from click.testing import CliRunner

    from flashcomm_cupy import settings
    from flashcomm_cupy.cli.options import transport_option
    monkeypatch.delenv(transport.ENV_VAR, raising=False)
    monkeypatch.setattr(settings, "_overrides", {})  # the flag's override ends with the test
    seen = []

    @click.command()
    @transport_option
    def cmd():
        seen.append(transport.resolve_transport())

    assert CliRunner().invoke(cmd, []).exit_code == 0 and seen == ["auto"]
    assert CliRunner().invoke(cmd, ["--transport", "host"]).exit_code == 0 and seen[-1] == "host"
    result = CliRunner().invoke(cmd, ["--transport", "nvlink"])
    assert result.exit_code == 2 and "'nvlink' is not one of 'auto', 'ipc', 'host'" in result.output


def test_model_report_notes_the_transport_and_its_baseline():
    from flashcomm_cupy.cli import model
    report = {"meta": {"notes": [], "device": {"transport": "host (shared memory)", "nccl_p2p_disabled": True}},
              "rows": []}
    assert model._footnotes(report) == [
        "transport host (shared memory); baseline NCCL with NCCL_P2P_DISABLE=1 (through host memory, "
        "the same configuration)"]
    assert model._footnotes({"meta": {"notes": ["n"], "device": {"error": "x"}}, "rows": []}) == ["n"]


class _NodeComm:
    """Rank ``rank`` of ``len(others)`` ranks on one host; ``others`` is what allgather returns
    for the other ranks, given this rank's own entry."""

    def __init__(self, rank, entries):
        self.rank, self.entries = rank, entries

    def Get_rank(self):
        return self.rank

    def Get_size(self):
        return len(self.entries)

    def Split_type(self, *args):
        return self

    def Free(self):
        pass

    def allgather(self, mine):
        return [mine if r == self.rank else e for r, e in enumerate(self.entries)]


def _fake_cupy(monkeypatch, buses):
    """CuPy seeing GPUs with these PCI bus ids; returns the list of devices made current."""
    used = []
    runtime = types.SimpleNamespace(getDeviceCount=lambda: len(buses), deviceGetPCIBusId=lambda d: buses[d])
    device = lambda d: types.SimpleNamespace(use=lambda: used.append(d))  # noqa: E731
    monkeypatch.setitem(__import__("sys").modules, "cupy",
                        types.SimpleNamespace(cuda=types.SimpleNamespace(runtime=runtime, Device=device)))
    monkeypatch.setenv("OMPI_COMM_WORLD_LOCAL_RANK", "0")
    return used


def test_one_visible_gpu_per_rank_is_accepted(monkeypatch):
    import socket
    from flashcomm_cupy.backends.cuda_util import select_device
    used = _fake_cupy(monkeypatch, ["0000:1b:00.0"])   # CUDA_VISIBLE_DEVICES=<local rank>
    comm = _NodeComm(0, [None, (socket.gethostname(), "0000:2c:00.0", None)])
    assert select_device(comm) == 0 and used == [0]


def test_ranks_sharing_one_gpu_are_refused_on_every_rank(monkeypatch):
    import socket
    from flashcomm_cupy.backends.cuda_util import select_device
    _fake_cupy(monkeypatch, ["0000:1b:00.0"])
    comm = _NodeComm(0, [None, (socket.gethostname(), "0000:1b:00.0", None)])
    with pytest.raises(RuntimeError, match="ranks 0 and 1 share the GPU at 0000:1b:00.0"):
        select_device(comm)


def test_another_ranks_device_problem_is_raised_here_too(monkeypatch):
    import socket
    from flashcomm_cupy.backends.cuda_util import select_device
    _fake_cupy(monkeypatch, ["0000:1b:00.0", "0000:2c:00.0"])
    comm = _NodeComm(0, [None, (socket.gethostname(), None, "no CUDA device visible to this process")])
    with pytest.raises(RuntimeError, match="rank 1: no CUDA device visible"):
        select_device(comm)
