"""What the GPU hierarchical backend decides before it touches a GPU (runs on CPU-only machines)."""
import types

import pytest

from flashcomm_cupy.backends.hierarchical import HierarchicalGpuBackend
from flashcomm_cupy.topology import NodeLayout


def test_nodes_of_different_sizes_are_refused_in_one_line():
    with pytest.raises(ValueError) as info:
        HierarchicalGpuBackend(comm=None, nodes=NodeLayout(((0, 1, 2), (3,))))
    assert "\n" not in str(info.value)


class FakeComm:
    """Rank ``rank`` of ``size`` as the construction sees it: Split records (color, key), allgather
    hands back ``failures`` (what every rank reported), nothing else is collective."""

    def __init__(self, rank, size, failures=None, name="world"):
        self.rank, self.size, self.name = rank, size, name
        self.failures = failures
        self.splits, self.freed = [], False

    def Get_rank(self):
        return self.rank

    def Get_size(self):
        return self.size

    def Split(self, color, key):
        sub = FakeComm(key, 0, name=f"split(color={color}, key={key})")
        self.splits.append(sub)
        return sub

    def allgather(self, value):
        return self.failures if self.failures is not None else [value] * self.size

    def Free(self):
        self.freed = True


@pytest.fixture
def stubbed(monkeypatch):
    """The hierarchical backend's GPU parts replaced by recorders: device, NCCL and the flash backend."""
    from flashcomm_cupy.backends import hierarchical
    from flashcomm_cupy.backends.flash import backend as flash_backend
    made = {"nccl": [], "flash": [], "closed": []}

    class Handle:
        def __init__(self, comm):
            made["nccl"].append(comm)
            self._pending, self.aborted = set(), None

        def abort(self, reason):
            self.aborted = reason
            made["closed"].append("nccl abort")

        def close(self):
            made["closed"].append("nccl")

    class Flash:
        fail = None
        # the flash error record's address; rank 2 of 4 on its node, its workspace at 0x1000
        flash_ws = types.SimpleNamespace(err_ptr=0xE0, args=[{"rank": 2, "world": 4, "peers": [0, 0, 0x1000, 0],
                                                               "poison_off": 0x40}])

        def __init__(self, comm, **options):
            if Flash.fail is not None:
                raise Flash.fail
            made["flash"].append((comm, options))

        def close(self):
            made["closed"].append("flash")

    monkeypatch.setattr(hierarchical, "select_device", lambda comm, device=None: 3 if device is None else device)
    monkeypatch.setattr(hierarchical, "NcclCommunicatorHandle", Handle)
    monkeypatch.setattr(hierarchical._mpi, "free", lambda comm: comm.Free())

    class Failure(hierarchical.NodeFailure):  # NodeFailure's logic on a plain list, no host-mapped memory
        def __init__(self, rank, flash_record=0, **node):
            made["failure"], made["failure_node"] = (rank, flash_record), node
            self.own_record, self.words = 1, [0] * len(hierarchical.NODE_RECORD_FIELDS)
            self._words = self.words

        def close(self):
            made["closed"].append("node failure record")

    monkeypatch.setattr(flash_backend, "FlashGpuBackend", Flash)
    monkeypatch.setattr(hierarchical, "NodeFailure", Failure)
    made["Flash"] = Flash
    return made


def test_several_gpus_per_node_build_the_node_flash_backend_and_the_cross_node_nccl(stubbed):
    """Rank 6 of 2 nodes x 4 ranks is local rank 2 of node 1: the node's ranks in local order run the
    flash backend (with the flash options given), the ranks of local rank 2 in node order the
    inter-node NCCL; flat NCCL (the lossless auto choice and the baseline) spans every rank."""
    comm = FakeComm(6, 8)
    backend = HierarchicalGpuBackend(comm, NodeLayout.blocks(8, 4), timeout_s=7, max_blocks=None, protocol="ll")
    node, cross = comm.splits
    assert (node.name, cross.name) == ("split(color=1, key=2)", "split(color=2, key=1)")
    assert stubbed["flash"] == [(node, {"device": 3, "timeout_s": 7})]
    assert stubbed["nccl"] == [comm, cross]
    assert backend.describe_layout()["intra_node"] == "flash two-shot halves"
    assert stubbed["failure"] == (6, 0xE0)  # its chunks report the node's flash record
    # and a failed sum poisons the node: this rank's poison words in its own workspace, node rank and size
    assert stubbed["failure_node"] == dict(node_poison=0x1040, node_rank=2, node_world=4)
    backend.close()
    assert node.freed and cross.freed and stubbed["closed"] == ["flash", "node failure record", "nccl", "nccl"]


def test_one_gpu_per_node_splits_nothing_and_runs_nccl_on_the_whole_communicator(stubbed):
    comm = FakeComm(1, 2)
    backend = HierarchicalGpuBackend(comm, NodeLayout.blocks(2, 1), timeout_s=7)
    assert comm.splits == [] and stubbed["flash"] == [] and stubbed["nccl"] == [comm]
    assert backend.cross_nccl is backend.nccl
    assert backend.describe_layout()["intra_node"] == "none (one GPU per node)"
    assert stubbed["failure"] == (1, 0)  # no flash record to report
    backend.close()
    assert stubbed["closed"] == ["node failure record", "nccl"]  # the one handle, once


@pytest.mark.parametrize("state, message", [
    (1, r"rank 1: the hierarchical all-reduce failed inside node 0: its rank 0 reported a failed intra-node call "
        r"\(local rank 1 timed out waiting for local rank 0\)"),
    (-1, r"rank 1: the hierarchical all-reduce failed inside node 0: its rank 0 reported a failed intra-node call "
         r"\(local rank 1 was poisoned by local rank 0\)"),
    (2, r"rank 1: rank 0 \(node 0\) reports that an earlier hierarchical all-reduce of this communicator failed"),
    (0xFFFFFFFF, r"rank 1: node 0's data never arrived \(the inter-node NCCL all-gather was aborted"),
])
def test_a_failure_another_node_reported_raises_on_check(stubbed, state, message):
    """What fc_node_sum recorded (the first chunk whose status was not OK) raises in check(), naming
    the node, the reporting rank and, for a failed intra-node call, who waited for whom; the results
    of that call are NaN (GPU-tested: tests/gpu/hierarchical_checks.py check_node_failure)."""
    from flashcomm_cupy.backends import hierarchical
    backend = HierarchicalGpuBackend(FakeComm(1, 2), NodeLayout.blocks(2, 1), timeout_s=7)
    backend.check()  # nothing recorded
    code = 2 if state == -1 else 1  # -1: a FAILED chunk whose flash record says POISON
    state = 1 if state == -1 else state
    fields = dict(state=state, node=0, sender=0, code=code, rank=1, peer=0, late=0, pad=0)
    backend.node_failure.words[:] = [fields[f] for f in hierarchical.NODE_RECORD_FIELDS]
    with pytest.raises(hierarchical.FlashTimeoutError, match=message):
        backend.check()
    backend.close()


def test_a_node_flash_backend_failing_on_one_rank_raises_on_every_rank_and_leaves_nothing(stubbed):
    # this rank's flash backend failed: its own error
    stubbed["Flash"].fail = RuntimeError("no peer access")
    comm = FakeComm(0, 4, failures=["RuntimeError: no peer access", None, None, None])
    with pytest.raises(RuntimeError, match="no peer access"):
        HierarchicalGpuBackend(comm, NodeLayout.blocks(4, 2))
    assert all(sub.freed for sub in comm.splits) and stubbed["nccl"] == []
    # another rank's failed: this rank closes its own and names the other
    stubbed["Flash"].fail = None
    comm = FakeComm(3, 4, failures=["RuntimeError: no peer access", None, None, None])
    with pytest.raises(RuntimeError, match="flash backend of a node could not start on another rank .rank 0: RuntimeError: no peer access"):
        HierarchicalGpuBackend(comm, NodeLayout.blocks(4, 2))
    assert stubbed["closed"] == ["flash"] and all(sub.freed for sub in comm.splits) and stubbed["nccl"] == []


def test_unknown_options_are_refused_first():
    with pytest.raises(TypeError, match="slot_bytes"):
        HierarchicalGpuBackend(comm=None, nodes=NodeLayout.blocks(2, 1), slot_bytes=3, timeout_s=3)


def test_nodes_of_different_sizes_fall_back_to_nccl_with_one_warning(monkeypatch):
    """A multi-node job whose nodes hold different numbers of ranks gets NCCL and a warning naming
    why, not an error (the hierarchical algorithm needs one shard per local rank on every node)."""
    import types
    from flashcomm_cupy.backends import hierarchical, nccl

    class StubNccl(nccl.NcclBackend):  # the real option filter (fallback), no NCCL
        def __init__(self, comm, **options):
            self.options = options

    layout = NodeLayout(((0, 1, 2), (3,)))
    monkeypatch.setattr(hierarchical._mpi, "node_layout", lambda comm, per_node=None: layout)
    monkeypatch.setattr(nccl, "NcclBackend", StubNccl)
    comm = types.SimpleNamespace(Get_rank=lambda: 0)
    with pytest.warns(RuntimeWarning, match=r"2 nodes \(3, 1 ranks\) of different sizes.*falling back to NCCL"):
        backend = hierarchical.make_cuda_backend(comm, timeout_s=5, max_blocks=8, protocol="ll")
    assert isinstance(backend, StubNccl) and backend.options == {"timeout_s": 5, "max_blocks": 8}


@pytest.mark.parametrize("per_node", [1, 2])
def test_uniform_nodes_get_the_hierarchical_backend(monkeypatch, per_node):
    from flashcomm_cupy.backends import hierarchical
    built = []
    monkeypatch.setattr(hierarchical._mpi, "node_layout", lambda comm, override=None: NodeLayout.blocks(4, per_node))
    monkeypatch.setattr(hierarchical, "HierarchicalGpuBackend", lambda comm, nodes, **options: built.append(
        (nodes, options)) or "hier")
    assert hierarchical.make_cuda_backend("comm", timeout_s=5) == "hier"
    assert built == [(NodeLayout.blocks(4, per_node), {"timeout_s": 5})]


# ----------------------------------------------------------------------------- waits, close, fallback
@pytest.fixture
def never_done(monkeypatch):
    """A fake ``cupy`` whose events never complete (an NCCL call whose peer never came)."""
    import sys
    import types
    event = type("Event", (), {"__init__": lambda self, **kw: None, "record": lambda self, stream: None,
                               "done": property(lambda self: False)})
    fake = types.SimpleNamespace(cuda=types.SimpleNamespace(Event=event, ExternalStream=lambda ptr: ptr))
    monkeypatch.setitem(sys.modules, "cupy", fake)
    return fake


class _Handle:
    def __init__(self, pending=()):
        self._pending, self.aborted = set(pending), None

    def abort(self, reason):
        self.aborted = reason


def test_a_bounded_wait_aborts_every_communicator_with_a_call_on_the_stream_and_only_those(never_done):
    import time
    from flashcomm_cupy.backends.nccl import wait_nccl_streams
    from flashcomm_cupy.errors import FlashTimeoutError
    flat, cross = _Handle(), _Handle(pending=[5])  # only the inter-node handle queued on stream 5
    start = time.monotonic()
    with pytest.raises(FlashTimeoutError, match="did not complete within 0.05 s"):
        wait_nccl_streams([flat, cross], [5], 0.05)
    assert time.monotonic() - start < 5
    assert cross.aborted and flat.aborted is None


def test_several_gpus_per_node_wait_is_bounded_by_the_cross_node_call(stubbed, never_done):
    """The all-ranks handle first, the cross-node one holding the stream: the wait still ends at the
    bound (it waited on the first handle's stream set, unbounded, before)."""
    import types
    from flashcomm_cupy.errors import FlashTimeoutError
    backend = HierarchicalGpuBackend(FakeComm(6, 8), NodeLayout.blocks(8, 4), timeout_s=0.05)
    backend.cross_nccl._pending.add(9)
    with pytest.raises(FlashTimeoutError):
        backend.wait(types.SimpleNamespace(ptr=9))
    assert backend.cross_nccl.aborted and backend.nccl.aborted is None
    # marked before the abort: the sums queued behind the all-gather must not trust what it left
    from flashcomm_cupy.backends import hierarchical
    rec = backend.node_failure.record()
    assert (rec["state"], rec["node"]) == (hierarchical.NODE_MISSING, hierarchical.NODE_UNKNOWN)
    assert "all-gather did not complete within the bound" in str(hierarchical.node_failure_error(rec, 6))
    with pytest.raises(FlashTimeoutError):  # and every later call says so before launching anything
        backend.check()


def test_close_waits_for_nccl_within_the_bound_before_the_flash_backend_and_refuses_later_calls(stubbed,
                                                                                                never_done):
    """The flash backend's close synchronizes the device: behind a hung inter-node all-gather it would
    wait forever, so the NCCL calls are bounded (and aborted) first; a closed backend launches nothing."""
    backend = HierarchicalGpuBackend(FakeComm(6, 8), NodeLayout.blocks(8, 4), timeout_s=0.05)
    backend.cross_nccl._pending.add(9)
    backend._plans[("a plan",)] = "cached"
    backend.close()
    assert stubbed["closed"] == ["nccl abort", "flash", "node failure record", "nccl", "nccl"]
    assert backend._plans == {}
    with pytest.raises(RuntimeError, match="closed"):
        backend.check()


@pytest.mark.parametrize("transport, falls_back", [(None, True), ("ipc", False)])
def test_no_transport_inside_a_node_falls_back_to_nccl_unless_one_was_named(stubbed, transport, falls_back):
    """As on one node (gpu.make_gpu_backend): when the only failures are missing transports, every
    rank falls back to NCCL; a transport asked for by name raises its reason instead."""
    from flashcomm_cupy.backends.hierarchical import NoNodeTransport
    from flashcomm_cupy.backends.ipc import PeerAccessError
    stubbed["Flash"].fail = PeerAccessError("no peer access between GPU 0 and GPU 1")
    comm = FakeComm(0, 4, failures=["PeerAccessError: no peer access between GPU 0 and GPU 1", None, None, None])
    with pytest.raises(NoNodeTransport if falls_back else PeerAccessError, match="no peer access"):
        HierarchicalGpuBackend(comm, NodeLayout.blocks(4, 2), transport=transport)
    assert all(sub.freed for sub in comm.splits)
    # another rank's other failure: no fallback, the error names it
    stubbed["Flash"].fail = None
    comm = FakeComm(1, 4, failures=["PeerAccessError: no peer access", None, "RuntimeError: out of memory", None])
    with pytest.raises(RuntimeError, match="could not start on another rank") as info:
        HierarchicalGpuBackend(comm, NodeLayout.blocks(4, 2))
    assert not isinstance(info.value, NoNodeTransport)


def test_make_cuda_backend_runs_nccl_with_a_warning_when_a_node_has_no_transport(monkeypatch):
    import types
    from flashcomm_cupy.backends import hierarchical, nccl

    class StubNccl(nccl.NcclBackend):
        def __init__(self, comm, **options):
            self.options = options

    def no_transport(comm, nodes, **options):
        raise hierarchical.NoNodeTransport("rank 2: PeerAccessError: no peer access")

    monkeypatch.setattr(hierarchical._mpi, "node_layout", lambda comm, per_node=None: NodeLayout.blocks(4, 2))
    monkeypatch.setattr(hierarchical, "HierarchicalGpuBackend", no_transport)
    monkeypatch.setattr(nccl, "NcclBackend", StubNccl)
    comm = types.SimpleNamespace(Get_rank=lambda: 0)
    with pytest.warns(RuntimeWarning, match="no transport for the flash kernels works inside a node.*rank 2"):
        backend = hierarchical.make_cuda_backend(comm, timeout_s=5)
    assert isinstance(backend, StubNccl) and backend.options == {"timeout_s": 5}
