"""An error on one rank must end the whole MPI job, never leave the other ranks hanging.

Each snippet runs the real ``flashcomm`` entry point (:func:`flashcomm_cupy.cli.main.main`)
on two CPU ranks with a failure planted on one of them, as a plain ``python script``
(the way the console script runs, not under ``python -m mpi4py``, which would abort
the job by itself).  A hang shows up as a timeout failure.
"""
from __future__ import annotations

import textwrap

import pytest

from mpi_util import aborted_job_shm, run_mpi_code  # noqa: F401  (the fixture below)

# every test here ends a job with MPI_Abort, which leaves MPI's shared-memory segments behind
pytestmark = [pytest.mark.mpi, pytest.mark.usefixtures("aborted_job_shm")]

TIMEOUT_S = 20


def _run(code: str):
    return run_mpi_code(textwrap.dedent(code), 2, timeout=TIMEOUT_S, mpi4py_run=False)


def test_tune_does_not_run_the_collective_close_when_one_rank_fails():
    """``flashcomm tune`` closed the communicator in ``finally``: the failing rank then waited
    in the (collective) teardown while the others sat in the next measurement."""
    proc = _run("""
        import importlib
        from flashcomm_cupy import Communicator
        from flashcomm_cupy.cli import main as m
        from flashcomm_cupy.harness import tune as harness_tune

        class CollectiveClose(Communicator):
            # like the GPU backend, whose workspace teardown waits for every rank
            def close(self):
                if not self._closed:
                    self.mpi_comm.Barrier()
                super().close()

        def fake_tune(comm, sizes, **kwargs):
            if comm.rank == 1:
                raise RuntimeError("planted failure")
            comm.backend._comm.allgather(0)  # rank 0 is in the next collective
            return {"worlds": {}}

        importlib.import_module("flashcomm_cupy.cli.tune").open_communicator = \\
            lambda backend, **kwargs: CollectiveClose(backend="cpu")
        harness_tune.tune = fake_tune
        m.main(["tune", "-b", "4K", "-e", "4K", "-o", "/dev/null"])
    """)
    assert proc.returncode != 0
    assert "[rank 1] flashcomm: error: RuntimeError: planted failure" in proc.stdout, proc.stdout


def test_model_communicator_failing_on_one_rank_aborts():
    """``flashcomm model`` turned any error of the communicator's construction into a
    ClickException: no abort, while the other ranks waited in the construction's collectives."""
    proc = _run("""
        import flashcomm_cupy.communicator as c
        from flashcomm_cupy.cli import main as m

        make = c._make_backend

        def failing_on_rank_1(name, comm, options):
            if comm.Get_rank() == 1:
                raise RuntimeError("planted: cannot map the workspace")
            return make(name, comm, options)

        c._make_backend = failing_on_rank_1
        m.main(["model", "--model", "custom", "--hidden", "64", "--heads", "8", "--kv-heads", "2",
                "--head-dim", "16", "--ffn", "128", "--num-layers", "1", "--tokens", "8", "--batch", "1",
                "--context", "4", "--bits", "8", "--repeats", "1", "--warmup", "0", "--backend", "cpu"])
    """)
    assert proc.returncode != 0
    assert "[rank 1] flashcomm: error: RuntimeError: planted: cannot map the workspace" in proc.stdout, \
        proc.stdout


def test_model_describe_failing_on_one_rank_is_not_swallowed():
    """The model report's ``describe()`` (collective on the GPU backend) swallowed an error:
    the failing rank went on and exited while the others waited in describe's all-gather."""
    proc = _run("""
        from flashcomm_cupy import Communicator
        from flashcomm_cupy.cli import main as m

        def describe(self):
            # like the GPU backend's: this rank's device facts, then an all-gather
            if self.rank == 1:
                raise RuntimeError("planted: device query failed")
            self.mpi_comm.allgather(None)
            return {}

        Communicator.describe = describe
        m.main(["model", "--model", "custom", "--hidden", "64", "--heads", "8", "--kv-heads", "2",
                "--head-dim", "16", "--ffn", "128", "--num-layers", "1", "--tokens", "8", "--batch", "1",
                "--context", "4", "--bits", "8", "--repeats", "1", "--warmup", "0", "--backend", "cpu"])
    """)
    assert proc.returncode != 0
    assert "[rank 1] flashcomm: error: RuntimeError: planted: device query failed" in proc.stdout, proc.stdout


def test_gpu_checks_that_fail_on_one_rank_fail_on_every_rank():
    """``--backend gpu`` checks CuPy and the GPUs per rank; a rank that saw no GPU raised a
    ClickException alone (no abort, and not printed: only rank 0 prints those) while the
    others went on into the collectives of the communicator's construction."""
    proc = _run("""
        import importlib.machinery
        import importlib.util
        import flashcomm_cupy
        from mpi4py import MPI
        from flashcomm_cupy.cli import main as m
        from flashcomm_cupy.harness import launch

        real_find_spec = importlib.util.find_spec
        importlib.util.find_spec = lambda name, *a: (importlib.machinery.ModuleSpec("cupy", None)
                                                     if name == "cupy" else real_find_spec(name, *a))
        # rank 1's process sees no GPU (say, a bad CUDA_VISIBLE_DEVICES); rank 0 sees two
        flashcomm_cupy.gpu_available = lambda: MPI.COMM_WORLD.Get_rank() == 0
        launch.cuda_device_count = lambda: 2 if MPI.COMM_WORLD.Get_rank() == 0 else 0
        m.main(["info", "--backend", "gpu"])
    """)
    assert proc.returncode == 1, proc.stdout
    assert ("flashcomm: error: rank 1: --backend gpu: CuPy sees no CUDA device (try --backend cpu)"
            in proc.stdout), proc.stdout


def test_a_rank_failing_before_it_initialized_mpi_still_aborts_the_job():
    """main() aborted only when this rank had initialized MPI: a rank that failed earlier
    exited without MPI_Abort while the others waited in a collective (or in MPI_Init)."""
    proc = _run("""
        import os
        from flashcomm_cupy.cli import main as m

        @m.cli.command("boom")
        def boom():
            if os.environ.get("PMI_RANK", os.environ.get("OMPI_COMM_WORLD_RANK")) == "1":
                raise RuntimeError("planted failure before MPI_Init")
            from mpi4py import MPI
            MPI.COMM_WORLD.Barrier()  # rank 0 waits here forever unless the job is aborted

        m.main(["boom"])
    """)
    assert proc.returncode != 0
    assert "[rank 1] flashcomm: error: RuntimeError: planted failure before MPI_Init" in proc.stdout, \
        proc.stdout
