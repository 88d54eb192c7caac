"""Ctrl-C in a job of several ranks, taken by every rank at the same point.

Python turns SIGINT into a ``KeyboardInterrupt`` wherever the interpreter happens to be.  In an
MPI job that is a different place on each rank: one rank may leave the sweep while another
waits in a collective for it, and that one then never returns to Python to keep its finished
rows; or a second copy of the signal (a terminal's Ctrl-C reaches ``mpiexec`` and the ranks, and
MPICH's ``mpiexec`` forwards it once more) lands inside the handler that is writing them.
:class:`AgreedInterrupts` only notes the signal; :meth:`AgreedInterrupts.check`, called by every
rank at the same point of a collective loop, raises ``KeyboardInterrupt`` on all of them at once
when any rank got one.

A SIGINT that comes :data:`INSIST_AFTER_S` or later after the first one raises at once, as
Python's own handler would: the user insists, or no check point is coming (a stuck call).  The
launcher's own escalation (``harness.launch``: SIGINT again after a grace, then a kill) stays as
it was.  With one rank, or outside the main thread, nothing changes.
"""
from __future__ import annotations

import signal
import threading
import time
from typing import Optional

#: seconds after the first SIGINT from which another one raises at once instead of waiting for the
#: next check point (copies of one Ctrl-C arrive within milliseconds of each other)
INSIST_AFTER_S = 1.0


class AgreedInterrupts:
    """A context manager: within it, SIGINT is noted, and :meth:`check` raises on every rank.

    ``mpi_comm``: the ranks that agree (anything with ``allgather`` and ``Get_size``).  ``check``
    is collective: every rank must call it the same number of times.
    """

    def __init__(self, mpi_comm, insist_after_s: float = INSIST_AFTER_S):
        self.mpi_comm = mpi_comm
        self.insist_after_s = float(insist_after_s)
        self.first_at: Optional[float] = None
        self._previous = None
        self._installed = False

    def __enter__(self) -> "AgreedInterrupts":
        several = self.mpi_comm is not None and self.mpi_comm.Get_size() > 1
        if (several and threading.current_thread() is threading.main_thread()
                and signal.getsignal(signal.SIGINT) is signal.default_int_handler):
            self._previous = signal.signal(signal.SIGINT, self._on_sigint)
            self._installed = True
        return self

    def __exit__(self, *exc) -> None:
        if self._installed:
            signal.signal(signal.SIGINT, self._previous)
            self._installed = False

    @property
    def active(self) -> bool:
        """True while SIGINT is being noted rather than raised."""
        return self._installed

    def _on_sigint(self, signum, frame) -> None:
        now = time.monotonic()
        if self.first_at is None:
            self.first_at = now
        elif now - self.first_at >= self.insist_after_s:
            signal.default_int_handler(signum, frame)

    def check(self) -> None:
        """Raise ``KeyboardInterrupt`` on every rank if any rank got SIGINT (collective)."""
        if self.mpi_comm is None or self.mpi_comm.Get_size() < 2:
            return
        if any(self.mpi_comm.allgather(self.first_at is not None)):
            raise KeyboardInterrupt
