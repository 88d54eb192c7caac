"""CPU backend: Flash All-Reduce across real MPI processes with NumPy and mpi4py.

It runs the same algorithm as :func:`flashcomm_cupy.reference.flash_all_reduce_reference`
with the same building blocks (:mod:`flashcomm_cupy.reference`,
:mod:`flashcomm_cupy.quant`), so every rank's result is bit-identical to the
reference for every mode, dtype, length and world size.  Only the data
movement is new: the packed wire bytes travel through ``MPI_Alltoall`` and
``MPI_Allgather`` as raw bytes, which also sidesteps MPI's lack of a bf16 type.

Algorithms:

* ``twoshot`` (also what ``auto`` picks): reduce-scatter of the non-owned
  segments through ``Alltoall``, owner-side sum, all-gather of the owner's
  re-encoded segment through ``Allgather``.
* ``oneshot``: ``Allgather`` of every rank's whole encoded message; every rank
  sums all ``N`` decoded contributions in rank order.
* ``mpi`` (the baseline): ``MPI_Allreduce(SUM)`` on a float32 copy, cast back
  to the input dtype.  fp16 and bf16 have no portable MPI datatype, so every
  dtype is reduced as float32; the summation order is MPI's, so the baseline
  is *not* bit-identical to the reference -- only close to the exact sum.
"""
from __future__ import annotations

import os
import socket
from typing import Tuple

import numpy as np

from .. import _mpi, quant, reference
from ..config import Mode
from ..dtypes import dtype_name, from_f32, resolve_dtype, to_f32
from .base import Backend

F32 = np.float32

_ALGOS = ("oneshot", "twoshot", "mpi")


class CpuBackend(Backend):
    """Flash All-Reduce for NumPy arrays over the ranks of an mpi4py communicator.

    Parameters
    ----------
    comm : mpi4py communicator
        The ranks taking part; the backend works on a duplicate so its
        messages never mix with the caller's.
    validate : bool, default False
        When True, every call first all-gathers each rank's element count,
        dtype and mode and raises :class:`ValueError` on every rank, naming
        the ranks that differ, instead of failing inside MPI.

    Any other keyword raises :class:`TypeError`.
    """

    name = "cpu"
    baseline_algo = "mpi"

    def __init__(self, comm, validate: bool = False, **unknown):
        if unknown:
            raise TypeError(f"CpuBackend got unexpected option(s): {', '.join(sorted(unknown))}"
                            " (the CPU backend accepts only validate=)")
        if comm is None:
            comm = _mpi.get_comm()
        self._comm = comm.Dup()
        self.rank = self._comm.Get_rank()
        self.world_size = self._comm.Get_size()
        self.validate = bool(validate)
        self._closed = False

    # ------------------------------------------------------------------ interface
    @property
    def xp(self):
        return np

    def supported_algos(self) -> Tuple[str, ...]:
        return _ALGOS

    def resolve_algo(self, nbytes: int, mode: Mode, itemsize: int = 2) -> str:
        """``auto`` -> ``twoshot`` at every size.

        Two-shot sends each rank ``2 (N-1)/N`` of the message; one-shot sends
        ``N - 1`` whole messages.  On CPUs there is no kernel-launch latency
        for one-shot to hide, so fewer bytes (and fewer decodes) always win.
        """
        algo = mode.algo
        if algo == "auto":
            return "twoshot"
        if algo not in _ALGOS:
            raise ValueError(f"the CPU backend runs {', '.join(_ALGOS)} (or auto), not {algo!r}")
        return algo

    def all_reduce(self, x, out, mode: Mode, stream=None, dtype=None):
        """Sum ``x`` over all ranks into ``out`` (which may be ``x``); return ``out``.

        ``x`` and ``out`` are C-contiguous NumPy arrays of the same shape and
        of a supported dtype (``dtype`` overrides ``x.dtype`` when ``x`` is a
        same-size storage view, e.g. bf16 carried as uint16).  ``stream`` is
        ignored: the work is finished when the call returns.
        """
        self._check_open()
        dt = resolve_dtype(dtype if dtype is not None else x.dtype)
        x = np.asarray(x)
        if x.dtype != dt:
            x = x.view(dt)
        algo = self.resolve_algo(x.nbytes, mode)
        if self.validate:
            self._validate(x.size, dt, mode)
        if algo == "mpi":
            result = self._baseline(x, dt)
        else:
            mode = mode.with_algo(algo)
            layout = reference.SegmentLayout(x.size, self.world_size, mode.group_size)
            prepared = reference.prepare(x, layout, mode)
            if algo == "oneshot":
                full = self._oneshot(prepared, mode, dt)
            else:
                full = self._twoshot(prepared, layout, mode, dt)
            result = reference.finish(full, layout, mode, dt)
        out_view = out if out.dtype == dt else out.view(dt)
        np.copyto(out_view, result.reshape(out_view.shape))
        return out

    def barrier(self) -> None:
        self._check_open()
        self._comm.Barrier()

    def synchronize(self) -> None:
        """Nothing is ever queued: calls complete before they return."""
        self._check_open()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        _mpi.free(self._comm)

    def describe(self) -> dict:
        info = super().describe()
        info.update({
            "mpi_library": _mpi.library_version(self._comm),
            "hostname": socket.gethostname(),
            "pid": os.getpid(),
            "algos": list(_ALGOS),
            "auto_algo": "twoshot",
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
        self._comm.Allgather(send, recv)
        acc = np.zeros(n, dtype=F32)
        for s in range(self.world_size):
            part = self._decode(recv[s * chunk:(s + 1) * chunk], n, mode, dt)
            acc = (acc + part).astype(F32)
        return acc

    def _twoshot(self, prepared: np.ndarray, layout, mode: Mode, dt) -> np.ndarray:
        """Reduce-scatter (Alltoall) to segment owners, then all-gather (Allgather)."""
        world, me = self.world_size, self.rank
        seg_n = layout.segment_elems
        # Reduce-scatter: slot o of the send buffer goes to owner o.  Our own
        # slot stays empty; the owner adds its own values exactly.
        rs_chunk = self._chunk_nbytes(seg_n, mode, dt)
        send = np.zeros(world * rs_chunk, dtype=np.uint8)
        for owner in range(world):
            if owner != me:
                send[owner * rs_chunk:(owner + 1) * rs_chunk] = \
                    self._bytes_of(prepared[layout.segment(owner)], mode, dt)
        recv = np.empty_like(send)
        self._comm.Alltoall(send, recv)
        # Same float32 rank-order sum as reference.reduce_owner_segment.
        acc = np.zeros(seg_n, dtype=F32)
        for s in range(world):
            if s == me:
                part = prepared[layout.segment(me)]
            else:
                part = self._decode(recv[s * rs_chunk:(s + 1) * rs_chunk], seg_n, mode, dt)
            acc = (acc + part).astype(F32)
        # All-gather: every rank, the owner too, decodes the same bytes.
        ag_codec = mode.ag_codec
        ag_chunk = self._chunk_nbytes(seg_n, mode, dt, ag_codec)
        mine = (np.ascontiguousarray(from_f32(acc, dt)).view(np.uint8) if mode.lossless
                else quant.encode(acc, ag_codec))
        gathered = np.empty(world * ag_chunk, dtype=np.uint8)
        self._comm.Allgather(mine, gathered)
        full = np.empty(layout.padded_length, dtype=F32)
        for owner in range(world):
            full[layout.segment(owner)] = self._decode(
                gathered[owner * ag_chunk:(owner + 1) * ag_chunk], seg_n, mode, dt, ag_codec)
        return full

    def _baseline(self, x: np.ndarray, dt) -> np.ndarray:
        """``MPI_Allreduce(SUM)`` in float32 (MPI has no fp16/bf16), rounded back to ``dt``."""
        x32 = to_f32(x).copy()
        total = np.empty_like(x32)
        self._comm.Allreduce(x32, total)  # op=SUM, mpi4py's default
        return from_f32(total, dt)

    # ------------------------------------------------------------------ checks
    def _validate(self, size: int, dt, mode: Mode) -> None:
        """Raise ValueError on every rank when ranks disagree on size, dtype or mode."""
        mine = (int(size), dtype_name(dt), mode.label, mode.algo)
        everyone = self._comm.allgather(mine)
        differ = [r for r, v in enumerate(everyone) if v != everyone[0]]
        if differ:
            lines = [f"rank {r}: {v[0]} x {v[1]}, mode {v[2]!r}"
                     for r, v in enumerate(everyone) if r == 0 or r in differ]
            raise ValueError(
                f"all_reduce arguments differ across ranks (ranks {differ} differ from rank 0): "
                + "; ".join(lines))

    def _check_open(self):
        if self._closed:
            raise RuntimeError("this CpuBackend is closed")
