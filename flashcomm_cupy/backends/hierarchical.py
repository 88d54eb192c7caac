"""Hierarchical all-reduce on GPUs spanning nodes: flash inside a node, NCCL between nodes.

The algorithm is :func:`flashcomm_cupy.reference.hierarchical_sum` (see the
reference's docstring and ``docs/wire-format.md``), and every rank's result is
bit-identical to the reference.  Ranks with the same local index ``p`` on
every node form the cross-node NCCL communicator (in node order).

**One GPU per node** (the intra-node steps have no peer and vanish):

1. encode the input as one wire chunk of the reduce-scatter codec
   (``fc_node_encode``: widened to float32, zero-padded to whole groups as
   ``SegmentLayout(L, 1, g)``, rotated when the mode rotates);
2. all-gather the chunks of all nodes through NCCL (``ncclAllGather`` of
   bytes);
3. ``fc_node_sum``: decode each chunk, sum them in node order in float32
   (rotated domain), rotate back, round to the input dtype.

The two kernels are in ``kernels_cu/fc_node.cuh``, built by flashcomm's own
NVRTC call as every flash kernel (``-ftz=false``: subnormals are summed as the
reference sums them).

**Several GPUs per node** (``P`` of them; the node's ranks run the flash
backend on their own sub-communicator):

1. intra-node reduce-scatter: the flag two-shot's first half
   (``fc_reduce_scatter``, :meth:`.flash.FlashGpuBackend.reduce_scatter`)
   leaves local owner ``p`` its segment of ``SegmentLayout(L, P, g)`` summed
   over the node, in float32 and in the rotated domain;
2. steps 1-3 above on that shard, in float32 (it is rotated already: the
   encoder does not rotate and the sum is not rotated back);
3. intra-node all-gather: the two-shot's second half (``fc_all_gather``)
   re-quantizes the total with the all-gather codec, and every rank of the
   node decodes it, rotates back and rounds.

Lossless: the inputs (shards: float32) are all-gathered as they are and summed
in node order.  The inter-node traffic is whatever NCCL uses between the nodes
(sockets, IB, ...).  A failed intra-node call leaves NaN (the flash poison
protocol) and raises on the next call or in ``synchronize``/``check``.
"""
from __future__ import annotations

import numpy as np

from .. import _kernels, _mpi, hadamard, quant
from ..config import Mode
from ..dtypes import KERNEL_DTYPE_CODE, dtype_name
from ..errors import FlashTimeoutError, resolve_timeout
from ..reference import SegmentLayout
from ..topology import NodeLayout
from .cuda_util import CudaBackend, run_on_aligned_copies, select_device
from .nccl import NcclCommunicatorHandle, wait_nccl_streams

_ALGOS = ("hierarchical", "nccl")
#: elements per thread of the chunk kernels (the default unit; groups of 32..1024 fit in a warp)
_UNIT_ELEMS = _kernels.DEFAULT_UNIT_ELEMS
_THREADS = 128


class NoNodeTransport(RuntimeError):
    """No transport for the flash kernels works inside some node (raised on every rank)."""


def make_cuda_backend(comm, ranks_per_node=None, **options):
    """The GPU backend for ``comm`` (collective): the flash backend on one node, else hierarchical.

    ``ranks_per_node`` (or ``$FLASHCOMM_RANKS_PER_NODE``) is the testing
    override of :func:`flashcomm_cupy._mpi.node_layout`.  Nodes of different
    sizes run NCCL, with a warning.
    """
    import warnings
    from .nccl import NcclBackend
    nodes = _mpi.node_layout(comm, ranks_per_node)
    if nodes.spans_nodes and nodes.uniform:
        try:
            return HierarchicalGpuBackend(comm, nodes, **options)
        except NoNodeTransport as exc:
            if comm.Get_rank() == 0:
                warnings.warn(f"flashcomm: no transport for the flash kernels works inside a node, falling back "
                              f"to NCCL: {exc}", RuntimeWarning, stacklevel=3)
            return NcclBackend.fallback(comm, options)
    if nodes.spans_nodes:
        if comm.Get_rank() == 0:
            warnings.warn(f"flashcomm: the ranks span {nodes.label()} of different sizes; the hierarchical "
                          "all-reduce needs the same number of ranks on every node: falling back to NCCL",
                          RuntimeWarning, stacklevel=3)
        return NcclBackend.fallback(comm, options)
    from .gpu import make_gpu_backend
    return make_gpu_backend(comm, **options)


class HierarchicalGpuBackend(CudaBackend):
    """All-reduce across nodes: the flash two-shot's halves inside a node, a quantized
    inter-node all-gather through NCCL between them.

    ``auto`` runs ``hierarchical`` for quantized modes and flat NCCL
    (``nccl``) for lossless ones.  Options: ``device`` (GPU ordinal; default
    local rank), ``validate`` (all-gather sizes and modes before every call);
    with several GPUs per node :attr:`FLASH_OPTIONS` go to the node's flash
    backend; :attr:`IGNORED_OPTIONS` are accepted and have no effect.
    Calls are ordered on one stream, as with NCCL.  Construction is
    collective.
    """

    name = "hierarchical"
    baseline_algo = "nccl"

    #: options of the flash backend passed to the node's flash backend (several GPUs per node)
    FLASH_OPTIONS = ("timeout_s", "max_blocks", "transport")
    #: options of the flash backend accepted, as by the NCCL backend, without effect here
    IGNORED_OPTIONS = ("workspace_bytes", "protocol")

    def __init__(self, comm, nodes: NodeLayout, device=None, validate: bool = False, **options):
        unknown = set(options) - set(self.IGNORED_OPTIONS) - set(self.FLASH_OPTIONS)
        if unknown:
            accepted = ", ".join(f"{o}=" for o in ("device", "validate", "ranks_per_node") + self.FLASH_OPTIONS)
            raise TypeError(f"unknown option(s) for the hierarchical backend: {sorted(unknown)} (it accepts "
                            f"{accepted})")
        nodes.require_uniform()
        self.mpi_comm = comm
        self.rank = comm.Get_rank()
        self.world_size = comm.Get_size()
        self.nodes = nodes
        self.validate = bool(validate)
        #: the bound of every wait for the inter-node NCCL calls (and of the node's flash kernels)
        self.timeout_s = resolve_timeout(options.get("timeout_s"))
        self.device_id = select_device(comm, device)
        self.flash = None
        #: the failure records of the inter-node step (made once the flash backend exists)
        self.node_failure = None
        self._closed = False
        self._plans = {}
        self._node_comm = self._cross_comm = None
        #: NCCL over every rank (the flat baseline); ``cross_nccl``: over this rank's cross-node
        #: communicator, the same handle when each node holds one rank
        self.nccl = self.cross_nccl = None
        node, local = nodes.node_of(self.rank), nodes.local_rank(self.rank)
        try:
            if nodes.ranks_per_node > 1:
                # Keys order the sub-communicators' ranks as the reference sums: local rank, node.
                self._node_comm = comm.Split(color=node, key=local)
                self._cross_comm = comm.Split(color=local, key=node)
                self.flash = self._node_flash_backend(comm, {k: v for k, v in options.items()
                                                              if k in self.FLASH_OPTIONS and v is not None})
            self.nccl = NcclCommunicatorHandle(comm)
            # (one GPU per node: the cross-node communicator is the whole one, in node order)
            self.cross_nccl = self.nccl if self._cross_comm is None else NcclCommunicatorHandle(self._cross_comm)
            self.node_failure = NodeFailure.of_backend(self.rank, self.flash)
        except BaseException:
            self._release()
            raise

    def _node_flash_backend(self, comm, options: dict):
        """The flash backend of this rank's node, built on the node's sub-communicator; a failure
        on any rank raises on every rank (collective over ``comm``).

        Where the only failures are "no transport for the flash kernels" (:class:`PeerAccessError`)
        and no transport was asked for by name, every rank raises :class:`NoNodeTransport`
        instead, and :func:`make_cuda_backend` runs NCCL, as :func:`.gpu.make_gpu_backend` does
        on one node."""
        from .flash.backend import FlashGpuBackend
        from .ipc import PeerAccessError
        from .transport import resolve_transport
        flash, failure = None, None
        try:
            flash = FlashGpuBackend(self._node_comm, device=self.device_id, **options)
        except Exception as exc:
            failure = exc
        fallback = (PeerAccessError, NoNodeTransport) if resolve_transport(options.get("transport")) == "auto" else None
        try:
            _mpi.raise_everywhere(comm, failure, "the flash backend of a node", instead=fallback)
        except BaseException:
            if flash is not None:
                flash.close()
            raise
        return flash

    # ------------------------------------------------------------------ interface
    def supported_algos(self):
        return _ALGOS

    def resolve_algo(self, nbytes: int, mode: Mode, itemsize: int = 2) -> str:
        """``auto``: ``hierarchical`` when quantized, flat ``nccl`` when lossless.

        Lossless hierarchical all-gathers float32 partials (4 bytes per element
        from every node), more than NCCL's all-reduce moves; it exists for
        bit-exact node-order sums, not for speed.
        """
        if mode.algo == "auto":
            return "nccl" if mode.lossless else "hierarchical"
        if mode.algo not in _ALGOS:
            raise ValueError(f"across nodes the GPU backend runs {', '.join(_ALGOS)} (or auto), "
                             f"not {mode.algo!r}")
        return mode.algo

    def all_reduce(self, x, out, mode: Mode, stream=None, dtype=None):
        import cupy
        dt = np.dtype(dtype) if dtype is not None else np.dtype(x.dtype)
        name = dtype_name(dt)
        stream = stream or cupy.cuda.get_current_stream()
        self.check()
        if self.validate:
            _mpi.agree(self.mpi_comm, _mpi.call_description(int(x.size), name, mode), "all_reduce arguments")
        algo = self.resolve_algo(x.nbytes, mode, dt.itemsize)
        if algo == "nccl" or mode.is_baseline:
            if not mode.lossless and not mode.is_baseline:
                raise ValueError("algo='nccl' reduces losslessly: use bits=None")
            self.nccl.all_reduce(x.data.ptr, out.data.ptr, x.size, name, stream.ptr)
            return out
        if x.size == 0:
            return out
        plan = self._plan(int(x.size), name, mode)
        with stream:
            plan.run(x.reshape(-1), out.reshape(-1), self.cross_nccl, stream)
        return out

    def check(self):
        """Raise if this backend is closed, if a wait aborted one of its NCCL communicators, the
        recorded error of a failed intra-node call (several GPUs per node), or a failure another
        node reported in its chunk (:class:`NodeFailure`; no synchronization)."""
        if self._closed:
            raise RuntimeError("this flashcomm hierarchical backend is closed")
        for handle in self._nccl_handles():
            if handle.aborted:
                raise FlashTimeoutError(handle.aborted)
        rec = self.node_failure.record() if self.node_failure is not None else None
        if rec is not None:
            raise node_failure_error(rec, self.rank)
        if self.flash is not None:
            self.flash.check()

    def wait(self, stream):
        """Wait (bounded: past ``timeout_s`` every NCCL communicator with a call on ``stream`` is
        aborted and this raises) for ``stream``'s work, then :meth:`check`."""
        wait_nccl_streams(self._nccl_handles(), [stream.ptr], self.timeout_s, before_abort=self._before_abort)
        self.check()

    def synchronize(self):
        """Wait for this rank's calls (the NCCL ones bounded as in :meth:`wait`); raise a failed
        call's error."""
        import cupy
        wait_nccl_streams(self._nccl_handles(), None, self.timeout_s, before_abort=self._before_abort)
        cupy.cuda.Device(self.device_id).synchronize()
        self.check()

    def close(self):
        self._release()

    def _release(self):
        """Free whatever exists of the flash backend, NCCL and the sub-communicators, each even
        when another fails.  The NCCL calls still queued are waited for first, within the bound
        (past it their communicators are aborted): the flash backend's close synchronizes the
        device, which would otherwise wait behind a hung inter-node all-gather forever."""
        self._closed = True
        try:
            wait_nccl_streams(self._nccl_handles(), None, self.timeout_s, before_abort=self._before_abort)
        except Exception:  # noqa: BLE001 - aborted: nothing of ours runs any more
            pass
        try:
            if self.flash is not None:
                self.flash.close()
        finally:
            self.flash = None
            if self.node_failure is not None:  # after the device is idle: the kernels write it
                try:
                    import cupy
                    cupy.cuda.Device(self.device_id).synchronize()
                except Exception:  # noqa: BLE001 - a failed device: freeing is all that is left
                    pass
                self.node_failure.close()
                self.node_failure = None
            self._plans = {}  # their buffers go back to CuPy's pool once nothing of ours runs
            try:
                for handle in self._nccl_handles():
                    handle.close()
            finally:
                self.nccl = self.cross_nccl = None
                for sub in (self._node_comm, self._cross_comm):
                    if sub is not None:
                        _mpi.free(sub)
                self._node_comm = self._cross_comm = None

    def _before_abort(self) -> None:
        """Called before an NCCL communicator of this backend is aborted: mark the record, so the
        sums queued behind the aborted all-gather write NaN (NodeFailure.mark_aborted)."""
        if self.node_failure is not None:
            self.node_failure.mark_aborted()

    def _nccl_handles(self) -> list:
        """The NCCL handles that exist, each once."""
        return list({id(h): h for h in (self.nccl, self.cross_nccl) if h is not None}.values())

    def describe(self):
        info = super().describe()
        info.update(self.describe_layout())
        return info

    def describe_layout(self) -> dict:
        """The nodes and what runs inside and between them (no GPU query)."""
        return dict(nodes=self.nodes.label(), node_layout=[list(n) for n in self.nodes.nodes], algos=list(_ALGOS),
                    inter_node="nccl all-gather",
                    intra_node="flash two-shot halves" if self.flash is not None else "none (one GPU per node)")

    def _plan(self, n: int, name: str, mode: Mode):
        key = (n, name, mode.with_algo("hierarchical"))
        plan = self._plans.get(key)
        if plan is None:
            if self.flash is None:
                plan = _OneGpuPerNodePlan(n, name, mode, self.nodes.num_nodes, self.node_failure)
            else:
                plan = _NodeShardPlan(self.flash, n, name, mode, self.nodes.num_nodes, self.node_failure)
            self._plans[key] = plan
        return plan


#: bytes after each node's chunk on the wire: the sender's status (FcNodeStatus, fc_node.cuh)
NODE_TAIL_BYTES = 32
#: FcNodeRecord (fc_node.cuh): what a rank records of the first failed chunk it received
NODE_RECORD_FIELDS = ("state", "node", "sender", "code", "rank", "peer", "late", "pad")
NODE_FAILED, NODE_PROPAGATED, NODE_MISSING = 1, 2, 0xFFFFFFFF
#: FcNodeRecord.node when the host aborted the all-gather (no node is known to have failed)
NODE_UNKNOWN = 0xFFFFFFFF


class NodeFailure:
    """How a failure on one node reaches every node: this rank's host-mapped record (filled by
    ``fc_node_sum`` when a chunk reports a failure or never arrived, or by :meth:`mark_aborted`
    when the host aborts the all-gather; while it holds a failure every later sum is NaN and
    every later chunk of this rank says so) and, with several GPUs per node, what the sum needs
    to poison the node's flash backend (its error record, this rank's poison words, the node
    rank and size: 0 with one GPU per node).  ``rank``: this rank in the whole communicator
    (the chunk's sender)."""

    def __init__(self, rank: int, flash_record: int = 0, node_poison: int = 0, node_rank: int = 0,
                 node_world: int = 0):
        import ctypes

        import cupy
        self.rank, self.flash_record = int(rank), int(flash_record)
        self.node_poison, self.node_rank, self.node_world = int(node_poison), int(node_rank), int(node_world)
        self.own_record = cupy.cuda.runtime.hostAlloc(4 * len(NODE_RECORD_FIELDS), 0x3)  # portable | mapped
        ctypes.memset(self.own_record, 0, 4 * len(NODE_RECORD_FIELDS))
        self._words = (ctypes.c_uint32 * len(NODE_RECORD_FIELDS)).from_address(self.own_record)

    @classmethod
    def of_backend(cls, rank: int, flash=None) -> "NodeFailure":
        """The records of global rank ``rank`` whose node runs ``flash`` (None: one GPU per node)."""
        if flash is None:
            return cls(rank)
        args = flash.flash_ws.args[0]
        node_rank = int(args["rank"])
        return cls(rank, flash_record=int(flash.flash_ws.err_ptr),
                   node_poison=int(args["peers"][node_rank]) + int(args["poison_off"]),
                   node_rank=node_rank, node_world=int(args["world"]))

    def record(self):
        """The record as a dict, or None while no failure reached this rank."""
        return node_failure_record(list(self._words)) if self.own_record else None

    def mark_aborted(self) -> None:
        """The host is about to abort the inter-node all-gather: the sums queued behind it must
        not trust chunks it may have delivered in part (called before the abort; sticky)."""
        if self.own_record and not self._words[0]:
            self._words[1] = NODE_UNKNOWN
            self._words[0] = NODE_MISSING

    def close(self) -> None:
        import ctypes

        import cupy
        if self.own_record:
            self._words = (ctypes.c_uint32 * len(NODE_RECORD_FIELDS))()  # no view of freed memory
            cupy.cuda.runtime.freeHost(self.own_record)
            self.own_record = 0


def node_failure_record(words) -> "dict | None":
    """:data:`NODE_RECORD_FIELDS` -> values, or None when ``state`` is 0 (nothing recorded)."""
    return dict(zip(NODE_RECORD_FIELDS, words)) if words[0] else None


def node_failure_error(rec: dict, rank: int) -> FlashTimeoutError:
    """The exception for rank ``rank`` holding a non-empty node failure record."""
    node, sender = rec["node"], rec["sender"]
    tail = (" Every node's result of that call and of every later call of this communicator is NaN; close it "
            "and create a new one.")
    if rec["state"] == NODE_FAILED:
        return FlashTimeoutError(
            f"flashcomm: rank {rank}: the hierarchical all-reduce failed inside node {node}: its rank {sender} "
            f"reported a failed intra-node call (local rank {rec['rank']} "
            f"{'was poisoned by' if rec['code'] == _kernels.ERR_POISON else 'timed out waiting for'} local rank "
            f"{rec['peer']}).{tail}", late=None)
    if rec["state"] == NODE_PROPAGATED:
        return FlashTimeoutError(f"flashcomm: rank {rank}: rank {sender} (node {node}) reports that an earlier "
                                 f"hierarchical all-reduce of this communicator failed.{tail}")
    if node == NODE_UNKNOWN:
        return FlashTimeoutError(f"flashcomm: rank {rank}: the inter-node NCCL all-gather did not complete within "
                                 f"the bound and was aborted (a node is late or gone).{tail}")
    return FlashTimeoutError(f"flashcomm: rank {rank}: node {node}'s data never arrived (the inter-node NCCL "
                             f"all-gather was aborted, or a rank is gone).{tail}")


class _InterNodeSum:
    """The inter-node step on one vector of ``n`` elements of ``dtype`` per rank (a node's shard:
    float32): every node's vector as one wire chunk of the reduce-scatter codec (lossless: its
    elements as they are) plus its sender's status, all-gathered through NCCL, then decoded and
    summed in node order in float32 from +0.0 -- the reference's ``sum_decoded`` over nodes --
    rotated back where ``rotate`` says and rounded to ``dtype`` into the output (``fc_node_encode``,
    ``fc_node_sum``: kernels_cu/fc_node.cuh, built like every flash kernel, so subnormals are
    not flushed).  ``padded``: the encoder's zero-padded length (whole groups).  ``rotate``: the
    encoder rotates (the input is not rotated yet) and the sum is rotated back; a shard arrives
    rotated and leaves rotated.

    ``failure``: :class:`NodeFailure`, the statuses' two ends -- the node's flash error record
    the encoder reports (several GPUs per node) and this rank's record the sum fills when a
    chunk reports a failure or never arrived (then the output is NaN).  Allocates nothing per
    call (graph-capturable)."""

    def __init__(self, n: int, padded: int, dtype: str, mode: Mode, nodes: int, rotate: bool,
                 failure: "NodeFailure"):
        import cupy
        self.n, self.nodes = n, nodes
        itemsize = 4 if dtype == "float32" else 2
        code = KERNEL_DTYPE_CODE[dtype]
        if mode.lossless:
            self.padded, bits, group, flags = n, 0, _UNIT_ELEMS, 0
            data = n * itemsize
        else:
            codec = mode.rs_codec
            self.padded, bits, group = padded, codec.bits, mode.group_size
            data = quant.wire_nbytes(padded, codec)
            flags = ((_kernels.FLAG_SYM if mode.symmetric else 0)
                     | (_kernels.FLAG_ROTATE if rotate and mode.rotate else 0))
        #: bytes per node on the wire: the chunk, 16-byte aligned, then the sender's status
        self.stride = -(-data // 16) * 16 + NODE_TAIL_BYTES
        self.send = cupy.zeros(self.stride, dtype=cupy.uint8)
        self.recv = cupy.zeros(nodes * self.stride, dtype=cupy.uint8)  # node order
        #: this rank's record's state word, copied here after each all-gather: the sum's blocks
        #: read it from device memory (a host-mapped read per block costs a PCIe round trip each)
        self.own_state = cupy.zeros(1, dtype=cupy.uint32)
        self.own_record = failure.own_record
        self.encode = _kernels.function("fc_node_encode", code, bits, bits, _UNIT_ELEMS)
        self.sum = _kernels.function("fc_node_sum", code, bits, bits, _UNIT_ELEMS)
        units = -(-self.padded // _UNIT_ELEMS)
        self.grid, self.block = ((units + _THREADS - 1) // _THREADS,), (_THREADS,)
        wire = (np.int64(self.stride), np.int32(nodes))
        elems = (np.int64(n), np.int64(self.padded), np.int32(group), np.int32(flags), np.float32(hadamard.norm(group)))
        own, flash_record = np.uint64(failure.own_record), np.uint64(failure.flash_record)
        self.encode_args = wire + elems + (flash_record, own, np.int32(failure.rank))
        self.sum_wire = wire
        self.sum_elems = elems + (own, np.uint64(self.own_state.data.ptr), flash_record,
                                  np.uint64(failure.node_poison), np.int32(failure.node_rank),
                                  np.int32(failure.node_world))

    def run(self, x, out, nccl: NcclCommunicatorHandle, stream) -> None:
        """``out`` = the node-order sum of every node's ``x`` as its receivers decode it, or NaN
        when a node reported a failure (``x``, ``out``: 16-byte aligned, ``n`` elements of the
        dtype; on ``stream``)."""
        self.encode_into_send(x, stream)
        nccl.all_gather(self.send.data.ptr, self.recv.data.ptr, self.stride, "uint8", stream.ptr)
        self.sum_received(out, stream)

    def encode_into_send(self, x, stream) -> None:
        """``x`` as this rank's wire chunk and status in ``send`` (``fc_node_encode``)."""
        self.encode(self.grid, self.block, (x, self.send, self.recv) + self.encode_args, stream=stream)

    def sum_received(self, out, stream) -> None:
        """``out`` from the chunks in ``recv`` (``fc_node_sum``), after the all-gather filled it."""
        import cupy
        rt = cupy.cuda.runtime
        # after the all-gather, so a mark the host made while aborting it is seen (pinned memory:
        # the copy reads it when it runs, in a graph replay too)
        rt.memcpyAsync(self.own_state.data.ptr, self.own_record, 4, rt.memcpyHostToDevice, stream.ptr)
        self.sum(self.grid, self.block, (self.recv,) + self.sum_wire + (out,) + self.sum_elems, stream=stream)


class _OneGpuPerNodePlan:
    """One GPU per node, one (count, dtype, mode): the inter-node step on the input itself
    (steps 1-3 of the module docstring in two kernels around the all-gather).  Allocates nothing
    per call, so it can be captured in a CUDA graph (with 16-byte aligned ``x`` and ``out``)."""

    def __init__(self, n: int, name: str, mode: Mode, nodes: int, failure: "NodeFailure"):
        padded = SegmentLayout(n, 1, mode.group_size).padded_length
        self.inter = _InterNodeSum(n, padded, name, mode, nodes, rotate=True, failure=failure)

    def run(self, x, out, nccl: NcclCommunicatorHandle, stream) -> None:
        """On ``stream``; misaligned ``x`` or ``out`` run on aligned copies (not in capture)."""
        if x.data.ptr % 16 == 0 and out.data.ptr % 16 == 0:
            self.inter.run(x, out, nccl, stream)
        else:
            run_on_aligned_copies(x, out, stream, lambda src, dst: self.inter.run(src, dst, nccl, stream))


class _NodeShardPlan:
    """Several GPUs per node, one (count, dtype, mode): the node's two-shot halves around the
    inter-node sum of this rank's shard.  Allocates nothing per call (graph-capturable)."""

    def __init__(self, flash, n: int, name: str, mode: Mode, nodes: int, failure: "NodeFailure"):
        import cupy
        self.flash = flash
        self.reduce_scatter = flash.phase_launch(n, name, mode, "reduce_scatter")
        self.all_gather = flash.phase_launch(n, name, mode, "all_gather")
        shard = flash.shard_elems(n, name, mode)
        self.shard = cupy.zeros(shard, dtype=cupy.float32)
        self.total = cupy.zeros(shard, dtype=cupy.float32)  # the shard summed over the nodes
        self.inter = _InterNodeSum(shard, shard, "float32", mode, nodes, rotate=False,  # rotated already
                                   failure=failure)

    def run(self, x, out, nccl: NcclCommunicatorHandle, stream) -> None:
        """Steps 1-3 of the module docstring (several GPUs per node) on ``stream``."""
        self.flash.run_launch(self.reduce_scatter, x, self.shard, stream)
        self.inter.run(self.shard, self.total, nccl, stream)
        self.flash.run_launch(self.all_gather, self.total, out, stream)
