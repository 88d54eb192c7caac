"""flashcomm from PyTorch without MPI: the torch.distributed bootstrap, CPU tensors, the custom ops.

The multi-rank checks run for real under ``torchrun --nproc-per-node 2`` with
the gloo backend and the CPU backend (``tests/torch_scripts/torch_bootstrap.py``);
the op registration and fake implementations are checked in this process.
Skipped where torch is not installed (``pip install -e ".[torch]"``).
"""
from __future__ import annotations

import subprocess
import sys

import pytest

from mpi_util import REPO_ROOT, mpi_env, run_in_group

torch = pytest.importorskip("torch")

TORCH_SCRIPTS = REPO_ROOT / "tests" / "torch_scripts"


def torchrun(script, nprocs: int, timeout: float = 180, extra=()) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nprocs),
           "--standalone", str(script), *extra]
    env = mpi_env()
    env["PYTHONWARNINGS"] = "ignore::FutureWarning"
    return run_in_group(cmd, timeout, env, merge_stderr=True, what=f"torchrun -n {nprocs} {script.name}")


def test_torchrun_bootstrap_cpu_backend_tensors_and_ops():
    proc = torchrun(TORCH_SCRIPTS / "torch_bootstrap.py", 2)
    assert proc.returncode == 0, proc.stdout
    assert "FAIL" not in proc.stdout, proc.stdout
    for rank in (0, 1):
        assert f"torch_bootstrap rank {rank}/2: " in proc.stdout, proc.stdout
    assert proc.stdout.count(", 0 failures") == 2, proc.stdout


def test_tp_mlp_example_runs_under_torchrun_on_the_cpu_backend():
    proc = torchrun(REPO_ROOT / "examples" / "tp_mlp.py", 2, extra=["--cpu", "--tokens", "4", "--hidden", "128",
                                                                    "--ffn", "256", "--iters", "1", "--warmup", "0"])
    assert proc.returncode == 0, proc.stdout
    lines = proc.stdout.splitlines()
    assert any(line.startswith("torch.distributed") for line in lines), proc.stdout
    lossless = next(line for line in lines if line.startswith("flashcomm lossless"))
    assert float(lossless.split()[-1]) == 0.0, lossless  # lossless: the same sum as gloo's for two ranks
    assert any(line.startswith("flashcomm int4 rot") for line in lines), proc.stdout


def test_a_call_whose_peer_gave_up_and_left_raises_and_returns_no_sum():
    """Gloo marks a failed transfer completed; its receive buffers must not pass for the peer's data."""
    proc = torchrun(TORCH_SCRIPTS / "torch_failures.py", 2, extra=["late"])
    out = proc.stdout
    assert "torch_failures rank 0: raised FlashTimeoutError: flashcomm: rank 0 timed out" in out, out
    assert "torch_failures rank 1: raised FlashTimeoutError: flashcomm: rank 1 lost a peer" in out, out
    assert "returned" not in out, out


def test_a_call_whose_peer_exited_raises_a_flashcomm_error():
    proc = torchrun(TORCH_SCRIPTS / "torch_failures.py", 2, extra=["exited"])
    assert "torch_failures rank 0: raised FlashTimeoutError: flashcomm: rank 0 " in proc.stdout, proc.stdout


def test_a_plain_communicator_under_torchrun_spans_torchruns_ranks():
    proc = torchrun(TORCH_SCRIPTS / "torch_failures.py", 2, extra=["plain"])
    for rank in (0, 1):
        assert f"torch_failures rank {rank}: world 2, returned 3.0 .. 3.0" in proc.stdout, proc.stdout


def test_a_plain_communicator_under_torchrun_before_init_process_group_says_what_to_do():
    proc = torchrun(TORCH_SCRIPTS / "torch_failures.py", 2, extra=["uninitialized"])
    for rank in (0, 1):
        assert (f"torch_failures rank {rank}: raised flashcomm: started by torchrun (WORLD_SIZE=2) but "
                "torch.distributed is not initialized: call torch.distributed.init_process_group()") in proc.stdout, \
            proc.stdout


def test_ops_are_registered_with_fake_implementations():
    from torch._subclasses.fake_tensor import FakeTensorMode

    from flashcomm_cupy import torch_ops  # noqa: F401  (registers the ops)
    for name in ("all_reduce", "all_reduce_"):
        op = getattr(torch.ops.flashcomm, name).default
        assert op.name() == f"flashcomm::{name}"
    assert torch.ops.flashcomm.all_reduce_.default._schema.arguments[0].alias_info.is_write
    with FakeTensorMode():
        x = torch.empty(4, 256, dtype=torch.bfloat16)
        y = torch.ops.flashcomm.all_reduce(x, 12345, 4, 4, 128, "auto", False, False)
        assert y.shape == x.shape and y.dtype == x.dtype
        assert torch.ops.flashcomm.all_reduce_(x, 12345, 4, 4, 128, "auto", False, False) is None


@pytest.fixture
def one_rank_comm(tmp_path):
    """A one-rank communicator over a gloo group in this process (CPU backend, no MPI)."""
    import torch.distributed as dist

    import flashcomm_cupy as fc
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    comm = fc.Communicator.from_torch(backend="cpu")
    yield comm
    comm.close()
    dist.destroy_process_group()


@pytest.mark.parametrize("op_name", ["all_reduce", "all_reduce_"])
def test_opcheck_schema_fake_autograd_and_aot_dispatch(one_rank_comm, op_name):
    from flashcomm_cupy import torch_ops  # noqa: F401
    op = getattr(torch.ops.flashcomm, op_name).default
    for bits in ((0, 0), (4, 4), (4, 8)):
        args = (torch.randn(300), one_rank_comm.torch_handle, *bits, 128, "auto", False, False)
        torch.library.opcheck(op, args)  # raises on the first failing test
    x = torch.randn(256, dtype=torch.bfloat16)
    want = x.clone()
    got = torch.ops.flashcomm.all_reduce(x, one_rank_comm.torch_handle, 0, 0, 128, "auto", False, False)
    assert torch.equal(got, want) and got.data_ptr() != x.data_ptr()  # one rank: the sum is x itself


def test_an_unknown_handle_raises_a_clear_error():
    from flashcomm_cupy import torch_ops  # noqa: F401  (registers the ops)
    with pytest.raises(ValueError, match="no open communicator has handle 987654"):
        torch.ops.flashcomm.all_reduce(torch.ones(4), 987654, 0, 0, 128, "auto", False, False)


def test_importing_flashcomm_imports_neither_torch_nor_mpi4py():
    code = ("import sys, flashcomm_cupy, flashcomm_cupy.communicator, flashcomm_cupy.torch_group\n"
            "bad = [m for m in ('torch', 'mpi4py', 'cupy') if m in sys.modules]\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=str(REPO_ROOT), timeout=60)
