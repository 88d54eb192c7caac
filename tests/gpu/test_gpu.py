"""GPU tests: the flash backend against the NumPy reference on real GPUs.

Run on a GPU host with:  python -m pytest -m gpu tests/gpu
(it launches ``tests/gpu/gpu_checks.py`` under mpiexec on every GPU, up to 8,
and once more on 2 ranks).  Skipped on machines without CUDA GPUs.
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.gpu

HERE = Path(__file__).resolve().parent


def _gpu_count() -> int:
    try:
        import cupy
        return cupy.cuda.runtime.getDeviceCount() if cupy.is_available() else 0
    except Exception:
        return 0


NGPU = _gpu_count()
requires_gpus = pytest.mark.skipif(NGPU < 2, reason="needs at least 2 CUDA GPUs (found %d)" % NGPU)


def _mpiexec(n, *args, timeout=900):
    exe = shutil.which("mpiexec") or shutil.which("mpirun")
    if exe is None:
        pytest.skip("no mpiexec on PATH")
    env = dict(os.environ, NCCL_NVLS_ENABLE="0", OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               PYTHONPATH=str(HERE.parent.parent) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [exe, "-n", str(n), sys.executable, str(HERE / "gpu_checks.py"), *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    return proc.returncode, proc.stdout + proc.stderr


@requires_gpus
def test_all_gpus_match_reference():
    n = min(NGPU, 8)
    rc, out = _mpiexec(n)
    assert rc == 0 and "OK:" in out, out[-4000:]


@requires_gpus
def test_two_ranks_match_reference():
    rc, out = _mpiexec(2, "--quick", "--large-mib", "64")
    assert rc == 0 and "OK:" in out, out[-4000:]
