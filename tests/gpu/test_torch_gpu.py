"""The PyTorch integration on GPUs: ``torch_gpu_checks.py``'s checks as tests.

    python -m pytest tests/gpu/test_torch_gpu.py --gpu-worlds 2,4

Each check runs at each ``--gpu-worlds`` size, its body on every rank of one ``mpiexec -n W``
launch (``tests/multi_gpu.py``; the communicator from MPI, torch.distributed initialised from it).
``test_under_torchrun`` runs the whole script under torchrun on 2 GPUs, the bootstrap without MPI.
Skipped without torch.
"""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

import multi_gpu

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="torch is not installed")]
multi = pytest.mark.multi_gpu
#: device_run.sh's torch stage gives the script 200 s under mpirun (torch.compile compiles on every rank)
MPI_TIMEOUT_S = 600
HERE = Path(__file__).resolve().parent


class TorchChecks:
    """torch_gpu_checks.py's checks by name, on one communicator and torch process group."""

    def __init__(self):
        import torch

        import torch_gpu_checks
        self.module = torch_gpu_checks
        self.comm = torch_gpu_checks.setup()
        self.dev = torch.device("cuda", torch.cuda.current_device())
        self.checks = torch_gpu_checks.Checks(self.comm)
        self.failures = self.checks.failures

    def run(self, name: str) -> None:
        self.module.run_check(self.checks, getattr(self.module, name), self.dev)

    def close(self) -> None:
        import torch.distributed as dist
        self.comm.close()
        dist.destroy_process_group()


def rank_context(config):
    return TorchChecks()


@multi
def test_tensors(ctx):
    """CUDA tensors of each dtype and codec: in place, out=, a new result; bit for bit."""
    ctx.run("check_tensors")


@multi
def test_cache_never_stale(ctx):
    """The eager cache: repeated calls, one address seen with two dtypes, non-contiguous views."""
    ctx.run("check_cache_never_stale")


@multi
def test_host_inputs(ctx):
    """CPU tensors and NumPy arrays on the GPU backend."""
    ctx.run("check_host_inputs")


@multi
def test_misaligned_and_errors(ctx):
    """A misaligned input on a side stream; partial overlap, out on another GPU, host arrays under capture refused."""
    ctx.run("check_misaligned_and_errors")


@multi
def test_graph(ctx):
    """Both custom ops inside torch.cuda.graph, replayed on new data."""
    ctx.run("check_graph")


@multi
def test_compile(ctx):
    """The custom ops under torch.compile (inductor, fullgraph) equal eager."""
    ctx.run("check_compile")


@multi
def test_cupy(ctx):
    """CuPy arrays in place beside the torch process group."""
    ctx.run("check_cupy")


def test_under_torchrun():
    """The whole script under torchrun on 2 GPUs (torch's bootstrap, no MPI): 0 failures on each rank."""
    count, how = multi_gpu.visible_gpus()
    if count < 2:
        pytest.skip(f"needs 2 GPUs, {count} visible ({how})")
    env = dict(os.environ, **multi_gpu.GPU_ENV,
               PYTHONPATH=str(HERE.parent.parent) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(HERE / "torch_gpu_checks.py")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    assert out.count(", 0 failures") == 2, out[-6000:]
