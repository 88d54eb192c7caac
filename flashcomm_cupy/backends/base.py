"""The one interface every backend implements: CPU/MPI, NCCL and the flash GPU kernels.

The harness, the CLI, the tests and :class:`flashcomm_cupy.Communicator`
talk to backends only through this class, so they treat all of them alike.
"""
from __future__ import annotations

import abc
import time
from typing import Callable, Optional, Tuple

from ..config import Mode


class Timer(abc.ABC):
    """Measures one region; ``stop()`` returns elapsed seconds (synchronizing as needed)."""

    @abc.abstractmethod
    def start(self) -> None: ...

    @abc.abstractmethod
    def stop(self) -> float: ...


class WallTimer(Timer):
    """Host wall clock, for backends whose work is finished when the call returns."""

    def start(self) -> None:
        self._t0 = time.perf_counter()

    def stop(self) -> float:
        return time.perf_counter() - self._t0


class Backend(abc.ABC):
    """A communicator bound to one rank of an MPI communicator.

    Arrays passed to a backend are already native to it (``self.xp``):
    contiguous, 1-D or any shape, of a supported dtype, and validated by the
    caller.  ``all_reduce`` writes the sum into ``out`` (which may be ``x``)
    and returns ``out``.
    """

    #: short name: "cpu", "gpu" or "nccl"
    name: str = "abstract"
    #: the vendor collective measured as the baseline: "mpi" or "nccl"
    baseline_algo: str = "mpi"
    rank: int = 0
    world_size: int = 1

    @property
    @abc.abstractmethod
    def xp(self):
        """The array module (numpy or cupy)."""

    @abc.abstractmethod
    def supported_algos(self) -> Tuple[str, ...]:
        """Concrete algorithms this backend runs (never "auto")."""

    @abc.abstractmethod
    def resolve_algo(self, nbytes: int, mode: Mode, itemsize: int = 2) -> str:
        """The concrete algorithm ``mode.algo == "auto"`` picks for a message of ``nbytes``
        (``itemsize``-byte elements)."""

    def resolve_protocol(self, nbytes: int, mode: Mode, itemsize: int = 2) -> str:
        """How the chosen flash kernels signal ("flag" or "ll"; "staged": the flag two-shot that
        stages its reads in shared memory); "" where that does not apply."""
        return ""

    @abc.abstractmethod
    def all_reduce(self, x, out, mode: Mode, stream=None, dtype=None):
        """Sum ``x`` over all ranks into ``out`` according to ``mode``; return ``out``.

        ``dtype`` is the logical element type when ``x`` is a storage view
        (bf16 carried as uint16 on the GPU); None means ``x.dtype``.
        """

    @property
    def calls_made(self) -> int:
        """The calls this rank made, for backends that number their calls across ranks (the CPU
        backend); 0 for those that do not (the GPU backends: docs/reliability.md)."""
        return 0

    def note_call_not_made(self) -> None:
        """A call raised on this rank before it reached the backend (its arguments were refused):
        a backend that numbers its calls counts it, so its peers cannot take this rank's next call
        for it."""

    def barrier(self) -> None:
        """Host-side barrier across ranks."""

    def synchronize(self) -> None:
        """Wait for queued work; raise if a previous call recorded an error."""

    def check(self) -> None:
        """Raise the error a previous call recorded (a timeout, a peer that gave up), without waiting."""

    def wait(self, stream) -> None:
        """Wait, within the communicator's bound, until the work queued on ``stream`` has finished,
        then :meth:`check`.  Host-synchronous calls (NumPy arrays) end with it, so they raise on
        the call that failed."""
        self.synchronize()

    def close(self) -> None:
        """Release resources; idempotent."""

    def describe(self) -> dict:
        """Facts for ``flashcomm info`` (versions, devices, workspace, tuning table)."""
        return {"backend": self.name, "rank": self.rank, "world_size": self.world_size}

    def make_timer(self, stream=None) -> Timer:
        return WallTimer()

    def capture_graph(self, fn: Callable[[], None], iters: int, stream=None) -> Optional[Callable[[], None]]:
        """Capture ``iters`` back-to-back calls of ``fn`` into a replayable graph.

        Returns a function that replays the graph once, or None when the
        backend has no graphs (the CPU backend).
        """
        return None
