"""CPU backend: Flash All-Reduce across real MPI processes with NumPy and mpi4py.

It runs the same algorithm as :func:`flashcomm_cupy.reference.flash_all_reduce_reference`
with the same building blocks (:mod:`flashcomm_cupy.reference`,
:mod:`flashcomm_cupy.quant`), so every rank's result is bit-identical to the
reference for every mode, dtype, length and world size.  Only the data
movement is new: the packed wire bytes travel through ``MPI_Alltoall`` and
``MPI_Allgather`` as raw bytes, which also sidesteps MPI's lack of a bf16 type.

Algorithms:

* ``twoshot`` (what ``auto`` picks on one node): reduce-scatter of the non-owned
  segments through ``Alltoall``, owner-side sum, all-gather of the owner's
  re-encoded segment through ``Allgather``.
* ``oneshot``: ``Allgather`` of every rank's whole encoded message; every rank
  sums all ``N`` decoded contributions in rank order.
* ``hierarchical`` (what ``auto`` picks when the ranks span nodes of equal
  size): two-shot's reduce-scatter on the node's sub-communicator,
  ``Allgather`` of each owner's encoded partial among the ranks of the same
  local rank on the other nodes (the cross-node sub-communicator), then
  two-shot's all-gather on the node.  Nodes come from
  :func:`flashcomm_cupy._mpi.node_layout` (``ranks_per_node=`` overrides it
  for tests).
* ``mpi`` (the baseline): ``MPI_Allreduce(SUM)`` on a float32 copy, cast back
  to the input dtype.  fp16 and bf16 have no portable MPI datatype, so every
  dtype is reduced as float32; the summation order is MPI's, so the baseline
  is *not* bit-identical to the reference -- only close to the exact sum.

Every wait is bounded (``timeout_s``, see :mod:`flashcomm_cupy.errors`): each
call starts with every rank sending the others a short description of the
call (size, dtype, mode), so ranks that disagree all raise ValueError naming
what differs, and a rank that never comes is named by the others when the
bound runs out.  All MPI traffic is non-blocking and polled; a rank that gives
up sends every peer an abort message, which makes their pending and later
calls raise too (the CPU twin of the GPU kernels' poison, docs/reliability.md).
"""
from __future__ import annotations

import os
import socket
import time
from typing import Tuple

import numpy as np

from .. import _mpi, quant, reference
from ..config import Mode
from ..dtypes import DTYPES, dtype_name, from_f32, resolve_dtype, to_f32
from ..errors import FlashTimeoutError, PeerTransferError, resolve_timeout
from .base import Backend

F32 = np.float32

_ALGOS = ("oneshot", "twoshot", "hierarchical", "mpi")
_DTYPE_NAMES = tuple(DTYPES)
#: point-to-point tags on the backend's own (duplicated) communicator
_TAG_CALL, _TAG_ABORT = 0x0FC1, 0x0FC2
#: fields of the per-call description every rank sends the others
_CALL_FIELDS = ("call", "elements", "dtype", "rs_bits", "ag_bits", "group_size", "symmetric", "rotate", "algo")


def _show_call(desc) -> str:
    """A call's description as a person reads it: ``1000 x float32, int4 g128 [twoshot]``."""
    v = dict(zip(_CALL_FIELDS, (int(x) for x in desc)))
    bits = None if v["rs_bits"] == 0 else (v["rs_bits"], v["ag_bits"])
    mode = Mode.make(bits, v["group_size"], bool(v["symmetric"]), bool(v["rotate"]), _ALGOS[v["algo"]])
    return f"call {v['call']}, {v['elements']} x {_DTYPE_NAMES[v['dtype']]}, {mode.label}"


class CpuBackend(Backend):
    """Flash All-Reduce for NumPy arrays over the ranks of an mpi4py communicator.

    Parameters
    ----------
    comm : mpi4py communicator
        The ranks taking part; the backend works on a duplicate so its
        messages never mix with the caller's.
    validate : bool, default False
        Kept for compatibility: every call now checks that all ranks pass
        the same element count, dtype and mode, and raises
        :class:`ValueError` on every rank, naming the ranks that differ.
    timeout_s : float, optional
        Bound of every wait for a peer (default ``$FLASHCOMM_TIMEOUT_S`` or
        30 s); past it the call raises :class:`FlashTimeoutError` on every rank.
    ranks_per_node : int, optional
        Testing aid: pretend consecutive blocks of this many ranks are nodes
        (default ``$FLASHCOMM_RANKS_PER_NODE``, else MPI's shared-memory
        split).  See :func:`flashcomm_cupy._mpi.node_layout`.

    Any other keyword raises :class:`TypeError`.  Construction is collective.
    """

    name = "cpu"
    baseline_algo = "mpi"

    def __init__(self, comm, validate: bool = False, timeout_s=None, ranks_per_node=None, **unknown):
        if unknown:
            raise TypeError(f"CpuBackend got unexpected option(s): {', '.join(sorted(unknown))}"
                            " (the CPU backend accepts validate=, timeout_s= and ranks_per_node=)")
        self.timeout_s = resolve_timeout(timeout_s)
        if comm is None:
            comm = _mpi.get_comm()
        self._comm = comm.Dup()
        self.rank = self._comm.Get_rank()
        self.world_size = self._comm.Get_size()
        self.validate = bool(validate)
        self._closed = False
        #: the calls this rank made, also those that raised on this rank alone before they reached
        #: the peers (note_call_not_made): every call's description carries the number
        self._calls = 0
        #: the error every call raises once this communicator gave up or was told a peer did
        self._aborted = None
        #: which ranks share a node (:class:`flashcomm_cupy.topology.NodeLayout`)
        self.nodes = _mpi.node_layout(self._comm, ranks_per_node)
        self._node_comm = self._cross_comm = None
        # (a torch.distributed group cannot split: no hierarchical algorithm there)
        if self.nodes.uniform and hasattr(self._comm, "Split"):
            node, local = self.nodes.node_of(self.rank), self.nodes.local_rank(self.rank)
            # Keys order the sub-communicators' ranks as the reference sums: local rank, node.
            self._node_comm = self._comm.Split(color=node, key=local)
            self._cross_comm = self._comm.Split(color=local, key=node)

    # ------------------------------------------------------------------ interface
    @property
    def xp(self):
        return np

    def supported_algos(self) -> Tuple[str, ...]:
        return _ALGOS

    @property
    def auto_algo(self) -> str:
        """What ``auto`` runs at every size: ``hierarchical`` when the ranks span nodes of
        equal size, else ``twoshot``.

        Two-shot sends each rank ``2 (N-1)/N`` of the message; one-shot sends
        ``N - 1`` whole messages.  On CPUs there is no kernel-launch latency
        for one-shot to hide, so fewer bytes (and fewer decodes) always win.
        Across nodes, hierarchical sends only ``1/P`` of the message per rank
        over the slower inter-node links.
        """
        return "hierarchical" if self.nodes.spans_nodes and self._node_comm is not None else "twoshot"

    def resolve_algo(self, nbytes: int, mode: Mode, itemsize: int = 2) -> str:
        """``auto`` -> :attr:`auto_algo`; any other supported algorithm as given."""
        algo = mode.algo
        if algo == "auto":
            return self.auto_algo
        if algo not in _ALGOS:
            raise ValueError(f"the CPU backend runs {', '.join(_ALGOS)} (or auto), not {algo!r}")
        if algo == "hierarchical":
            self.nodes.require_uniform()
            if self._node_comm is None:
                raise ValueError("flashcomm: algo='hierarchical' on the CPU backend needs an MPI communicator "
                                 "(a torch.distributed group cannot be split into node and cross-node groups)")
        return algo

    def all_reduce(self, x, out, mode: Mode, stream=None, dtype=None):
        """Sum ``x`` over all ranks into ``out`` (which may be ``x``); return ``out``.

        ``x`` and ``out`` are C-contiguous NumPy arrays of the same shape and
        of a supported dtype (``dtype`` overrides ``x.dtype`` when ``x`` is a
        same-size storage view, e.g. bf16 carried as uint16).  ``stream`` is
        ignored: the work is finished when the call returns.
        """
        self._check_open()
        self._calls += 1
        dt = resolve_dtype(dtype if dtype is not None else x.dtype)
        x = np.asarray(x)
        if x.dtype != dt:
            x = x.view(dt)
        algo = self.resolve_algo(x.nbytes, mode)
        self._agree_on_call(x.size, dt, mode, algo)
        if algo == "mpi":
            result = self._baseline(x, dt)
        else:
            mode = mode.with_algo(algo)
            owners = self.nodes.ranks_per_node if algo == "hierarchical" else self.world_size
            layout = reference.SegmentLayout(x.size, owners, mode.group_size)
            prepared = reference.prepare(x, layout, mode)
            if algo == "oneshot":
                full = self._oneshot(prepared, mode, dt)
            elif algo == "hierarchical":
                full = self._hierarchical(prepared, layout, mode, dt)
            else:
                full = self._all_gather(self._comm, self._reduce_scatter(self._comm, prepared, layout, mode, dt),
                                        layout, mode, dt)
            result = reference.finish(full, layout, mode, dt)
        out_view = out if out.dtype == dt else out.view(dt)
        np.copyto(out_view, result.reshape(out_view.shape))
        return out

    def barrier(self) -> None:
        self._check_open()
        self._wait([self._comm.Ibarrier()], "barrier")

    def synchronize(self) -> None:
        """Nothing is ever queued: calls complete before they return."""
        self._check_open()

    def check(self) -> None:
        self._check_open()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        # After an abort, collectives may still be pending on the communicators: leave them to exit.
        if self._aborted is None:
            for sub in (self._node_comm, self._cross_comm):
                if sub is not None:
                    _mpi.free(sub)
            _mpi.free(self._comm)

    def describe(self) -> dict:
        info = super().describe()
        info.update({
            "mpi_library": _mpi.library_version(self._comm),
            "hostname": socket.gethostname(),
            "pid": os.getpid(),
            "algos": list(_ALGOS),
            "auto_algo": self.auto_algo,
            "nodes": self.nodes.label(),
            "node_layout": [list(node) for node in self.nodes.nodes],
            "validate": self.validate,
        })
        return info

    # ------------------------------------------------------------------ algorithms
    def _bytes_of(self, x32: np.ndarray, mode: Mode, dt) -> np.ndarray:
        """Wire bytes of a float32 chunk: the packed codes, or raw ``dt`` items when lossless.

        Lossless chunks are exact in ``dt`` (they are widened inputs or sums
        the reference rounds to ``dt`` anyway), so sending ``dt`` is exact and
        cheaper than float32.
        """
        if mode.lossless:
            return np.ascontiguousarray(from_f32(x32, dt)).view(np.uint8)
        return quant.encode(x32, mode.rs_codec)

    def _chunk_nbytes(self, n: int, mode: Mode, dt, codec=None) -> int:
        if mode.lossless:
            return n * dt.itemsize
        return quant.wire_nbytes(n, codec or mode.rs_codec)

    @staticmethod
    def _decode(buf: np.ndarray, n: int, mode: Mode, dt, codec=None) -> np.ndarray:
        if mode.lossless:
            return to_f32(buf.view(dt))
        return quant.decode(buf, n, codec or mode.rs_codec)

    def _oneshot(self, prepared: np.ndarray, mode: Mode, dt) -> np.ndarray:
        """Every rank receives every rank's encoded message and sums them in rank order."""
        n = prepared.size
        chunk = self._chunk_nbytes(n, mode, dt)
        send = self._bytes_of(prepared, mode, dt)
        recv = np.empty(self.world_size * chunk, dtype=np.uint8)
        self._wait([self._comm.Iallgather(send, recv)], "the one-shot all-gather")
        acc = np.zeros(n, dtype=F32)
        for s in range(self.world_size):
            part = self._decode(recv[s * chunk:(s + 1) * chunk], n, mode, dt)
            acc = (acc + part).astype(F32)
        return acc

    def _reduce_scatter(self, comm, prepared: np.ndarray, layout, mode: Mode, dt) -> np.ndarray:
        """Two-shot's first half on ``comm``: this rank's segment summed over ``comm``'s ranks.

        Every rank sends each segment it does not own to its owner
        (``Alltoall``); the owner sums in ``comm`` rank order, as
        :func:`reference.reduce_owner_segment`, its own values exactly.
        """
        world, me = comm.Get_size(), comm.Get_rank()
        seg_n = layout.segment_elems
        # Slot o of the send buffer goes to owner o.  Our own slot stays empty.
        rs_chunk = self._chunk_nbytes(seg_n, mode, dt)
        send = np.zeros(world * rs_chunk, dtype=np.uint8)
        for owner in range(world):
            if owner != me:
                send[owner * rs_chunk:(owner + 1) * rs_chunk] = \
                    self._bytes_of(prepared[layout.segment(owner)], mode, dt)
        recv = np.empty_like(send)
        self._wait([comm.Ialltoall(send, recv)], "the reduce-scatter (all-to-all)")
        acc = np.zeros(seg_n, dtype=F32)
        for s in range(world):
            if s == me:
                part = prepared[layout.segment(me)]
            else:
                part = self._decode(recv[s * rs_chunk:(s + 1) * rs_chunk], seg_n, mode, dt)
            acc = (acc + part).astype(F32)
        return acc

    def _all_gather(self, comm, reduced: np.ndarray, layout, mode: Mode, dt) -> np.ndarray:
        """Two-shot's second half on ``comm``: every rank, the owner too, decodes the same bytes
        (:func:`reference.gather_segment`)."""
        world = comm.Get_size()
        seg_n = layout.segment_elems
        ag_codec = mode.ag_codec
        ag_chunk = self._chunk_nbytes(seg_n, mode, dt, ag_codec)
        mine = (np.ascontiguousarray(from_f32(reduced, dt)).view(np.uint8) if mode.lossless
                else quant.encode(reduced, ag_codec))
        gathered = np.empty(world * ag_chunk, dtype=np.uint8)
        self._wait([comm.Iallgather(mine, gathered)], "the all-gather")
        full = np.empty(layout.padded_length, dtype=F32)
        for owner in range(world):
            full[layout.segment(owner)] = self._decode(
                gathered[owner * ag_chunk:(owner + 1) * ag_chunk], seg_n, mode, dt, ag_codec)
        return full

    def _across_nodes(self, partial: np.ndarray, mode: Mode) -> np.ndarray:
        """Sum of the float32 partials of this rank's shard over all nodes, in node order.

        Each rank of the cross-node communicator (one per node, ranked by
        node) contributes its partial encoded with the reduce-scatter codec,
        or as exact float32 bytes when lossless (partial sums are not exact in
        the input dtype); everyone decodes all of them, its own too, as
        :func:`reference.sum_decoded`.
        """
        n = partial.size
        nodes = self._cross_comm.Get_size()
        send = partial.view(np.uint8) if mode.lossless else quant.encode(partial, mode.rs_codec)
        recv = np.empty(nodes * send.size, dtype=np.uint8)
        self._wait([self._cross_comm.Iallgather(send, recv)], "the all-gather across nodes")
        acc = np.zeros(n, dtype=F32)
        for k in range(nodes):
            buf = recv[k * send.size:(k + 1) * send.size]
            part = buf.view(F32) if mode.lossless else quant.decode(buf, n, mode.rs_codec)
            acc = (acc + part).astype(F32)
        return acc

    def _hierarchical(self, prepared: np.ndarray, layout, mode: Mode, dt) -> np.ndarray:
        """Reduce-scatter on the node, exchange across nodes, all-gather on the node.

        ``layout`` has one segment per local rank.  Steps without a peer are
        skipped, as in :func:`reference.hierarchical_sum`.
        """
        if self._node_comm.Get_size() == 1:
            partial = prepared
        else:
            partial = self._reduce_scatter(self._node_comm, prepared, layout, mode, dt)
        total = self._across_nodes(partial, mode) if self._cross_comm.Get_size() > 1 else partial
        if self._node_comm.Get_size() == 1:
            return total
        return self._all_gather(self._node_comm, total, layout, mode, dt)

    def _baseline(self, x: np.ndarray, dt) -> np.ndarray:
        """``MPI_Allreduce(SUM)`` in float32 (MPI has no fp16/bf16), rounded back to ``dt``."""
        x32 = to_f32(x).copy()
        total = np.empty_like(x32)
        self._wait([self._comm.Iallreduce(x32, total)], "MPI_Allreduce")  # op=SUM, the default
        return from_f32(total, dt)

    # ------------------------------------------------------------------ agreement and bounded waits
    def _describe_call(self, size: int, dt, mode: Mode, algo: str) -> np.ndarray:
        return np.array([self._calls, size, _DTYPE_NAMES.index(dtype_name(dt)), mode.rs_bits or 0,
                         mode.ag_bits or 0, mode.group_size, int(mode.symmetric), int(mode.rotate),
                         _ALGOS.index(algo)], dtype=np.int64)

    def _agree_on_call(self, size: int, dt, mode: Mode, algo: str) -> None:
        """Exchange this call's description with every peer (bounded); raise ValueError on every
        rank when they differ, naming the ranks and fields, and FlashTimeoutError naming the
        ranks that never sent theirs."""
        mine = self._describe_call(size, dt, mode, algo)
        if hasattr(self._comm, "Iprobe"):  # MPI: point-to-point, so the ranks that never sent are known
            peers = [r for r in range(self.world_size) if r != self.rank]
            got = {r: np.empty_like(mine) for r in peers}
            recvs = [self._comm.Irecv(got[r], source=r, tag=_TAG_CALL) for r in peers]
            sends = [self._comm.Isend(mine, dest=r, tag=_TAG_CALL) for r in peers]
            self._wait(recvs, f"call {self._calls}",
                       late=lambda: [r for r, q in zip(peers, recvs) if not q.Test()])
            self._wait(sends, f"call {self._calls}")
            everyone = [got[r] if r != self.rank else mine for r in range(self.world_size)]
        else:  # torch.distributed: gloo's point-to-point requests complete only when waited for
            gathered = np.empty((self.world_size, mine.size), dtype=mine.dtype)
            self._wait([self._comm.Iallgather(mine, gathered)], f"call {self._calls}")
            everyone = list(gathered)
        fields = [f for i, f in enumerate(_CALL_FIELDS) if len({int(v[i]) for v in everyone}) > 1]
        if fields:
            differ = [r for r in range(self.world_size) if not np.array_equal(everyone[r], everyone[0])]
            hint = ("; a call raised on some ranks only (their arguments were refused there) or a rank skipped "
                    "one: the ranks' calls no longer line up" if "call" in fields
                    else "; every rank must make the same calls in the same order with the same arguments")
            message = (f"flashcomm: all_reduce arguments differ between ranks (ranks {differ} differ from rank 0 in "
                       + ", ".join(fields) + "): "
                       + "; ".join(f"rank {r}: {_show_call(everyone[r])}" for r in range(self.world_size)
                                   if r == 0 or r in differ) + hint)
            if "call" in fields:  # for good: every later call would pair with another rank's other call
                self._aborted = message + ". Every rank raises; close this communicator and create a new one."
            raise ValueError(message)

    @property
    def calls_made(self) -> int:
        return self._calls

    def note_call_not_made(self) -> None:
        self._calls += 1

    def _wait(self, requests, what: str, late=None) -> None:
        """Complete ``requests`` within the bound, watching for a peer's abort message.

        Past the bound this rank gives up: it tells every peer (abort message)
        and raises FlashTimeoutError naming ``late()`` (the ranks still
        missing) where known.  A peer's abort message raises at once.
        """
        self._raise_if_aborted()
        deadline = time.monotonic() + self.timeout_s
        polls = 0
        while not self._all_done(requests, what):
            polls += 1
            if polls % 64 == 0:
                self._receive_abort()
                if time.monotonic() > deadline:
                    missing = late() if late is not None else []
                    who = (f"rank {missing[0]}" if len(missing) == 1 else f"ranks {missing}") if missing \
                        else "a peer"
                    self._give_up(f"flashcomm: rank {self.rank} timed out after {self.timeout_s:g} s waiting for "
                                  f"{who} ({what}): it did not call all_reduce in time, or called it with a "
                                  "different size or mode", missing[0] if missing else -1)
            if polls > 256:
                time.sleep(1e-5 if polls < 4096 else 1e-4)  # ranks may outnumber cores: yield

    def _all_done(self, requests, what: str) -> bool:
        """Whether every request completed (each one tested, so every one progresses).  A transfer
        that failed (over torch.distributed: a peer closed its connection, having given up or
        exited) gives up the communicator: its buffers hold no data to sum."""
        try:
            return all([q.Test() for q in requests])
        except PeerTransferError as exc:
            self._give_up(f"flashcomm: rank {self.rank} lost a peer ({what}): {exc}", -1)

    def _give_up(self, message: str, late: int):
        """Abort this communicator: tell every peer (rank ``late`` was the one waited for) and raise."""
        note = np.array([self.rank, late], dtype=np.int32)
        for r in range(self.world_size):
            if r != self.rank and hasattr(self._comm, "Iprobe"):  # see _receive_abort
                self._comm.Isend(note, dest=r, tag=_TAG_ABORT).Free()
        self._aborted = message + ". Every rank raises; close this communicator and create a new one."
        raise FlashTimeoutError(self._aborted, late=late if late >= 0 else None)

    def _receive_abort(self) -> None:
        """Raise if a peer sent an abort message (it gave up on a call).  Over torch.distributed
        (no probe in gloo) peers are not told: each rank gives up on its own bound."""
        if not hasattr(self._comm, "Iprobe"):
            return
        MPI = _mpi.mpi()
        status = MPI.Status()
        if not self._comm.Iprobe(source=MPI.ANY_SOURCE, tag=_TAG_ABORT, status=status):
            return
        note = np.empty(2, dtype=np.int32)
        self._comm.Recv(note, source=status.Get_source(), tag=_TAG_ABORT)
        src, late = int(note[0]), int(note[1])
        waited = f"rank {late}" if late >= 0 else "a peer"
        self._aborted = (f"flashcomm: rank {self.rank}: rank {src} gave up on a call after {self.timeout_s:g} s "
                         f"waiting for {waited}. Every rank raises; close this communicator and create a new one.")
        raise FlashTimeoutError(self._aborted, late=late if late >= 0 else None)

    def _raise_if_aborted(self) -> None:
        if self._aborted is not None:
            raise FlashTimeoutError(self._aborted)
        self._receive_abort()

    def _check_open(self):
        if self._closed:
            raise RuntimeError("this CpuBackend is closed")
        self._raise_if_aborted()
