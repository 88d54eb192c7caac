"""Ctrl-C in a job of several ranks: every rank stops at the same check point (harness.interrupts)."""
import os
import signal
import time

import pytest

from flashcomm_cupy.harness.interrupts import INSIST_AFTER_S, AgreedInterrupts


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
        _sigint_self()  # no KeyboardInterrupt here, in the middle of "a collective"
        with pytest.raises(KeyboardInterrupt):
            interrupts.check()
    assert comm.gathers == 1


def test_another_ranks_sigint_stops_this_rank_at_the_same_check():
    with AgreedInterrupts(FakeComm(peer_flag=False)) as interrupts:
        interrupts.check()  # nobody interrupted: the sweep goes on
    with AgreedInterrupts(FakeComm(peer_flag=True)) as interrupts:
        with pytest.raises(KeyboardInterrupt):
            interrupts.check()


def test_copies_of_one_ctrl_c_wait_for_the_check_and_a_later_one_raises_at_once():
    """A terminal's Ctrl-C reaches the ranks and mpiexec, and MPICH's mpiexec forwards it again."""
    with AgreedInterrupts(FakeComm()):
        _sigint_self()
        _sigint_self()  # a copy, milliseconds later: still only noted
        time.sleep(INSIST_AFTER_S)
        with pytest.raises(KeyboardInterrupt):
            _sigint_self()  # the user insists: raised where it lands, as Python would


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
