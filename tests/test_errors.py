"""The bound every wait obeys, and the messages a failed call raises (no GPU needed)."""
from __future__ import annotations

import pytest

from flashcomm_cupy import FlashTimeoutError, _kernels
from flashcomm_cupy.errors import DEFAULT_TIMEOUT_S, resolve_timeout


def test_the_bound_comes_from_the_option_then_the_environment_then_the_default(monkeypatch):
    monkeypatch.delenv("FLASHCOMM_TIMEOUT_S", raising=False)
    assert resolve_timeout(None) == DEFAULT_TIMEOUT_S
    monkeypatch.setenv("FLASHCOMM_TIMEOUT_S", "7.5")
    assert resolve_timeout(None) == 7.5
    assert resolve_timeout(2) == 2.0


@pytest.mark.parametrize("bad", [0, -1, float("inf"), float("nan"), 1e9, "soon", None])
def test_a_bound_that_is_not_a_finite_positive_number_of_seconds_is_refused(bad, monkeypatch):
    if bad is None:
        monkeypatch.setenv("FLASHCOMM_TIMEOUT_S", "0")
        with pytest.raises(ValueError, match=r"\$FLASHCOMM_TIMEOUT_S"):
            resolve_timeout(None)
        return
    with pytest.raises(ValueError, match="timeout_s"):
        resolve_timeout(bad)


def _record(**values):
    rec = dict.fromkeys(_kernels.ERROR_FIELDS, 0)
    rec.update(values)
    return rec


def test_a_timeout_names_the_rank_that_was_waited_for():
    pytest.importorskip("numpy")
    from flashcomm_cupy.backends.gpu import error_from_record
    err = error_from_record(_record(code=_kernels.ERR_TIMEOUT, rank=0, peer=3, late=3, block=5, epoch=9), 2.0)
    assert isinstance(err, FlashTimeoutError) and err.late == 3
    assert "rank 0 timed out after 2 s waiting for rank 3" in str(err) and "NaN" in str(err)


def test_a_poisoned_rank_names_who_gave_up_and_who_was_late():
    from flashcomm_cupy.backends.gpu import error_from_record
    err = error_from_record(_record(code=_kernels.ERR_POISON, rank=1, peer=0, late=2), 30.0)
    assert err.late == 2
    assert "rank 1: rank 0 gave up" in str(err) and "waiting for rank 2" in str(err)


def test_a_failure_from_another_node_says_so_on_every_rank_of_the_node():
    """The hierarchical all-reduce: the rank whose inter-node sum failed poisons its node (ERR_NODE);
    its node-mates, poisoned with the other-node mark, say where the failure came from."""
    from flashcomm_cupy.backends.gpu import error_from_record
    err = error_from_record(_record(code=_kernels.ERR_NODE, rank=1, peer=1, late=_kernels.LATE_OTHER_NODE), 30.0)
    assert "inter-node step failed on this rank" in str(err) and err.late is None
    err = error_from_record(_record(code=_kernels.ERR_POISON, rank=0, peer=1, late=_kernels.LATE_OTHER_NODE), 30.0)
    assert "rank 1 of this node gave up" in str(err) and "another node" in str(err) and err.late is None
