"""The collective correctness check of one message size (nccl-tests style).

For a message of ``count`` elements every rank generates its deterministic
input (:mod:`.inputs`); rank 0 regenerates all ranks' inputs with the same
generator on the same array module and forms the float64 exact sum on the
device.  Each mode is then checked with one call into a NaN-filled output:

* error vs the exact sum, computed by rank 0 on the device (every size);
* ranks that differ from rank 0, from device-side checksums (every size);
* ``wrong`` elements vs the NumPy reference, summed over ranks, for flash
  modes when the message is at most ``reference_max_bytes`` (the reference
  runs on rank 0's host and is slow for big messages).  Rank 0 broadcasts
  the reference result; every rank compares its own output bit for bit.

All results are broadcast from rank 0 so every rank returns the same dict,
and the exit status of a command is the same on every rank.
"""
from __future__ import annotations

from typing import List, Optional

import numpy as np

from ..config import Mode
from ..reference import flash_all_reduce_reference
from . import checks, inputs


class SizeCheck:
    """Correctness context for one message size; create it on every rank (collective)."""

    def __init__(self, backend, mpi_comm, count: int, dtype, seed: int, reference_max_bytes: int,
                 x=None, out=None):
        """``x``/``out``: this rank's input (as :func:`.inputs.make_input` made it) and an
        output buffer, when the caller already has them; otherwise they are made here."""
        self.backend = backend
        self.mpi_comm = mpi_comm
        self.xp = backend.xp
        self.count = int(count)
        self.dtype = np.dtype(dtype)
        self.seed = seed
        self.rank = mpi_comm.Get_rank()
        self.world_size = mpi_comm.Get_size()
        self.with_reference = self.count * self.dtype.itemsize <= reference_max_bytes
        self.x = x if x is not None else inputs.make_input(self.xp, seed, self.rank, self.count, self.dtype)
        self.out = out if out is not None else inputs.empty_output(self.xp, self.count, self.dtype)
        self._host_inputs: Optional[List[np.ndarray]] = None
        self._exact64 = None
        if self.rank == 0:
            self._exact64 = self.xp.zeros(self.count, dtype=self.xp.float64)
            host = []
            for r in range(self.world_size):
                xr = self.x if r == 0 else inputs.make_input(self.xp, seed, r, self.count, self.dtype)
                self._exact64 += inputs.storage_to_f64(self.xp, xr, self.dtype)
                if self.with_reference:
                    host.append(inputs.to_host(xr, self.dtype))
            self._host_inputs = host if self.with_reference else None

    def run_and_check(self, mode: Mode, algo_resolved: str, stream=None) -> dict:
        """One all-reduce of this size's inputs under ``mode``, then every check (collective).

        Returns ``{check, rel_rms, max_abs, nonfinite, wrong, ranks_differ}``;
        ``wrong`` is None for the baseline and for sizes above the reference limit.
        """
        xp = self.xp
        inputs.fill_nan(xp, self.out, self.dtype)
        self.backend.all_reduce(self.x, self.out, mode, stream=stream, dtype=self.dtype)
        self.backend.synchronize()

        prints = self.mpi_comm.allgather(checks.fingerprint(xp, self.out))
        ranks_differ = sum(1 for p in prints if p != prints[0])

        stats = None
        if self.rank == 0:
            stats = checks.error_vs_exact(
                xp, inputs.storage_to_f64(xp, self.out, self.dtype), self._exact64)
        stats = self.mpi_comm.bcast(stats, root=0)

        wrong = None
        check = "exact"
        # A flash mode whose "auto" picked the vendor collective sums in the vendor's
        # order: only the error vs the exact sum applies to it.
        if self.with_reference and not mode.is_baseline and algo_resolved not in ("nccl", "mpi"):
            wrong = self._wrong_vs_reference(mode, algo_resolved)
            check = "reference"
        return {"check": check, "rel_rms": stats["rel_rms"], "max_abs": stats["max_abs"],
                "nonfinite": stats["nonfinite"], "wrong": wrong, "ranks_differ": ranks_differ}

    def _wrong_vs_reference(self, mode: Mode, algo_resolved: str) -> int:
        expected_bits = np.empty(self.count, dtype=f"u{self.dtype.itemsize}")
        if self.rank == 0:
            ref = flash_all_reduce_reference(self._host_inputs, mode=mode.with_algo(algo_resolved),
                                             nodes=getattr(self.backend, "nodes", None))[0]
            expected_bits[:] = np.ascontiguousarray(ref).reshape(-1).view(expected_bits.dtype)
        self.mpi_comm.Bcast(expected_bits, root=0)
        mine = inputs.to_host(self.out, self.dtype)
        local = checks.count_bit_mismatches(mine, expected_bits.view(self.dtype))
        return int(sum(self.mpi_comm.allgather(local)))

    def close(self) -> None:
        """Drop the buffers (large on the GPU) before the next size."""
        self.x = self.out = self._exact64 = self._host_inputs = None
