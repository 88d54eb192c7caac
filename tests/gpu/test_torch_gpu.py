"""GPU tests of the PyTorch integration: ``tests/gpu/torch_gpu_checks.py`` under torchrun (no MPI) on 2 GPUs.

Run on a GPU host with:  python -m pytest -m gpu tests/gpu/test_torch_gpu.py
Skipped without 2 CUDA GPUs or without torch.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.gpu

HERE = Path(__file__).resolve().parent
torch = pytest.importorskip("torch")


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs at least 2 CUDA GPUs")
def test_torch_checks_under_torchrun_on_two_gpus():
    env = dict(os.environ, NCCL_NVLS_ENABLE="0",
               PYTHONPATH=str(HERE.parent.parent) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(HERE / "torch_gpu_checks.py")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    assert out.count(", 0 failures") == 2, out[-6000:]
