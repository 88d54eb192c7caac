"""The CPU backend's failure paths under real MPI: bounded waits, every rank raises, never a hang.

The checks themselves live in ``mpi_scripts/cpu_backend_failures.py`` (a rank that
skips a call, a rank that raises before the collective, sizes and modes that differ
between ranks, the bound's validation); here they run on 2 and 3 ranks.  A hang
fails the test through the launcher's timeout.
"""
from __future__ import annotations

import pytest

from mpi_util import SCRIPTS, run_mpi

pytestmark = pytest.mark.mpi


@pytest.mark.parametrize("nprocs", [2, 3])
def test_every_rank_raises_within_the_bound_and_nobody_hangs(nprocs):
    proc = run_mpi(SCRIPTS / "cpu_backend_failures.py", nprocs, timeout=90)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stdout[-4000:]


@pytest.mark.parametrize("nprocs", [2, 3])
def test_a_canary_failure_on_one_rank_reaches_every_rank_without_a_hang(nprocs):
    """The peer-access check is collective whatever fails locally, so construction falls back
    on every rank (issue: the failing rank skipped a barrier the others sat in)."""
    proc = run_mpi(SCRIPTS / "canary_failure.py", nprocs, timeout=60)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stdout[-4000:]
