"""Ctrl-C in a job of several ranks: every rank stops at the same check point (harness.interrupts)."""
import os
import signal
import time

import pytest

from flashcomm_cupy.harness.interrupts import AgreedInterrupt, AgreedInterrupts


class FakeComm:
    """Two ranks as seen from rank 0: the other rank reports ``peer_flag`` in every allgather."""

    def __init__(self, size=2, peer_flag=False):
        self.size, self.peer_flag, self.gathers = size, peer_flag, 0

    def Get_size(self):
        return self.size

    def allgather(self, value):
        self.gathers += 1
        return [value] + [self.peer_flag] * (self.size - 1)


def _sigint_self():
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.05)  # the handler runs at the next bytecode boundary; give the signal time to land


def test_a_sigint_is_noted_and_raised_on_every_rank_at_the_next_check():
    comm = FakeComm()
    with AgreedInterrupts(comm) as interrupts:
        assert interrupts.active
        interrupts.check()
        _sigint_self()  # no KeyboardInterrupt here, in the middle of "a collective"
        with pytest.raises(AgreedInterrupt):  # a KeyboardInterrupt that every rank raises at this point
            interrupts.check()
    assert comm.gathers == 2


def test_another_ranks_sigint_stops_this_rank_at_the_same_check():
    with AgreedInterrupts(FakeComm(peer_flag=False)) as interrupts:
        interrupts.check()  # nobody interrupted: the sweep goes on
    with AgreedInterrupts(FakeComm(peer_flag=True)) as interrupts:
        with pytest.raises(AgreedInterrupt):
            interrupts.check()
    assert issubclass(AgreedInterrupt, KeyboardInterrupt)  # whatever catches a Ctrl-C catches it


def test_every_further_sigint_is_only_noted_too():
    """Copies of one Ctrl-C (a terminal's reaches the ranks and mpiexec, and MPICH's mpiexec forwards
    it again) may come a second or more apart on a loaded machine: stopping at once is the launcher's."""
    with AgreedInterrupts(FakeComm()) as interrupts:
        for _ in range(3):
            _sigint_self()
        assert interrupts.noted == 3
        with pytest.raises(AgreedInterrupt):
            interrupts.check()


def test_the_previous_handler_is_back_after_the_block_and_one_rank_is_left_alone():
    with AgreedInterrupts(FakeComm()):
        assert signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    comm = FakeComm(size=1)
    with AgreedInterrupts(comm) as interrupts:
        assert not interrupts.active
        with pytest.raises(KeyboardInterrupt):
            _sigint_self()
        interrupts.check()  # one rank: no collective, nothing to agree on
    assert comm.gathers == 0
