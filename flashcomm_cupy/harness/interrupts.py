"""Ctrl-C in a job of several ranks, taken by every rank at the same point.

Python turns SIGINT into a ``KeyboardInterrupt`` wherever the interpreter happens to be.  In an
MPI job that is a different place on each rank: one rank may leave the sweep while another
waits in a collective for it, and that one then never returns to Python to keep its finished
rows; or a second copy of the signal (a terminal's Ctrl-C reaches ``mpiexec`` and the ranks, and
MPICH's ``mpiexec`` forwards it once more) lands inside the handler that is writing them.
:class:`AgreedInterrupts` only notes the signal; :meth:`AgreedInterrupts.check`, called by every
rank at the same point of a collective loop, raises :class:`AgreedInterrupt` (a
``KeyboardInterrupt``) on all of them at once when any rank got one, and the CLI then ends the job
without ``MPI_Abort``.

Every further SIGINT is noted too: copies of one Ctrl-C can arrive a second or more apart on a
loaded machine, so none of them can mean "stop at once".  That is the launcher's to do, and they
do it: MPICH's ``mpiexec`` kills the ranks at its second Ctrl-C, Open MPI's ``mpirun`` and SLURM's
``srun`` end the job themselves, and a relaunching ``flashcomm --np`` sends ``mpiexec`` its second
SIGINT at the user's second Ctrl-C or a minute after the first (``harness.launch``).  With one
rank, or outside the main thread, nothing changes.
"""
from __future__ import annotations

import signal
import threading


class AgreedInterrupt(KeyboardInterrupt):
    """Raised by :meth:`AgreedInterrupts.check` on every rank at the same point: the job may end
    cleanly (every rank exits), where an ``MPI_Abort`` could lose rank 0's last lines in the
    launcher's output pipes."""


class AgreedInterrupts:
    """A context manager: within it, SIGINT is noted, and :meth:`check` raises on every rank.

    ``mpi_comm``: the ranks that agree (anything with ``allgather`` and ``Get_size``).  ``check``
    is collective: every rank must call it the same number of times.
    """

    def __init__(self, mpi_comm):
        self.mpi_comm = mpi_comm
        self.noted = 0
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
        self.noted += 1

    def check(self) -> None:
        """Raise :class:`AgreedInterrupt` on every rank if any rank got SIGINT (collective)."""
        if self.mpi_comm is None or self.mpi_comm.Get_size() < 2:
            return
        if any(self.mpi_comm.allgather(self.noted > 0)):
            raise AgreedInterrupt
