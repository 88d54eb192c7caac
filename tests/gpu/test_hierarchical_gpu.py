"""GPU test of the hierarchical backend: two GPUs of one host as two nodes of one GPU each.

Run on a GPU host with:  python -m pytest -m gpu tests/gpu/test_hierarchical_gpu.py
It launches ``tests/gpu/hierarchical_checks.py`` under ``mpiexec -n 2`` with
``FLASHCOMM_RANKS_PER_NODE=1`` and NCCL forced onto sockets
(``NCCL_P2P_DISABLE=1 NCCL_SHM_DISABLE=1``), as between hosts without
InfiniBand.  Skipped on machines with fewer than two CUDA GPUs.
"""
import os
import shutil
import subprocess
import sys

import pytest

from test_gpu import HERE, requires_gpus

pytestmark = pytest.mark.gpu


@requires_gpus
@pytest.mark.parametrize("quick", [True, False])
def test_two_gpus_as_two_nodes_match_the_reference(quick):
    exe = shutil.which("mpiexec") or shutil.which("mpirun")
    if exe is None:
        pytest.skip("no mpiexec on PATH")
    env = dict(os.environ, FLASHCOMM_RANKS_PER_NODE="1", NCCL_P2P_DISABLE="1", NCCL_SHM_DISABLE="1",
               NCCL_NVLS_ENABLE="0", OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               PYTHONPATH=str(HERE.parent.parent) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [exe, "-n", "2", sys.executable, str(HERE / "hierarchical_checks.py")] + (["--quick"] if quick else [])
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "OK:" in out, out[-4000:]
