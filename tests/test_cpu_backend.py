"""The CPU/MPI backend, run for real under ``mpiexec -n 2``, ``-n 3`` and ``-n 4``.

The checks themselves live in ``tests/mpi_scripts/`` (they must run inside
every rank); each script exits non-zero and prints ``FAIL`` lines when a
check fails, and prints a summary line that is asserted here.
"""
from __future__ import annotations

import re

import pytest

from mpi_util import SCRIPTS, run_mpi, run_mpi_code

pytestmark = pytest.mark.mpi

WORLD_SIZES = (2, 3, 4)


def _assert_clean(proc, world_size):
    assert proc.returncode == 0, f"mpiexec -n {world_size} exited {proc.returncode}:\n{proc.stdout}"
    assert "FAIL" not in proc.stdout, proc.stdout


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_every_rank_matches_the_reference_bit_for_bit(world_size):
    proc = run_mpi(SCRIPTS / "cpu_backend_matches_reference.py", world_size)
    _assert_clean(proc, world_size)
    summary = re.search(r"world_size=(\d+): (\d+) cases, (\d+) failures", proc.stdout)
    assert summary, proc.stdout
    assert int(summary.group(1)) == world_size
    # every dtype x bits x rotate x symmetric x algo x length combination ran
    assert int(summary.group(2)) >= 1500
    assert int(summary.group(3)) == 0


@pytest.mark.parametrize("world_size", (1,) + WORLD_SIZES)
def test_options_validation_and_lifecycle(world_size):
    proc = run_mpi(SCRIPTS / "cpu_backend_api.py", world_size)
    _assert_clean(proc, world_size)
    assert f"world_size={world_size}: 0 failures" in proc.stdout, proc.stdout


def test_a_failing_rank_fails_the_run():
    """The harness itself must report failure: a rank that raises makes mpiexec exit non-zero."""
    code = ("from mpi4py import MPI\n"
            "if MPI.COMM_WORLD.Get_rank() == 1:\n"
            "    raise SystemExit('rank 1 fails')\n"
            "MPI.COMM_WORLD.Barrier()\n")
    proc = run_mpi_code(code, 2, timeout=60)
    assert proc.returncode != 0
    assert "rank 1 fails" in proc.stdout

