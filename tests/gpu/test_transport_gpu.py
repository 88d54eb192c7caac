"""The transports on GPUs: ``transport_checks.py``'s checks as tests, at each ``--gpu-worlds`` size.

    python -m pytest tests/gpu/test_transport_gpu.py --gpu-worlds 2,4
    FLASHCOMM_TRANSPORT=host python -m pytest tests/gpu/test_transport_gpu.py   # the host-memory transport

The transport is whichever the environment selects (the variables reach every rank).  The
killed-rank check (``--kill``) and the one-GPU-per-rank runs stay in device_run.sh's
host-transport and isolated-* stages: a rank that kills itself ends its launch.
"""
import pytest

pytestmark = [pytest.mark.gpu, pytest.mark.multi_gpu]
#: device_run.sh's host-transport stage gives the script 300 s
MPI_TIMEOUT_S = 420
#: calls per stale-read case (the script's default)
STALE_READ_CALLS = 2000


def rank_context(config):
    from transport_checks import TransportChecks
    checks = TransportChecks()
    if checks.comm.backend_name != "gpu":
        raise RuntimeError(f"flash GPU backend unavailable (fell back to {checks.comm.backend_name})")
    return checks


def test_one_transport_on_every_rank(ctx):
    """Every rank reports the same transport."""
    ctx.check_transport()


def test_virtual_memory_handles(ctx):
    """A workspace shared through virtual-memory handles, built beside the backend's, passes the canary."""
    ctx.check_vmm()


def test_stale_reads(ctx):
    """Thousands of calls of each protocol cycling through four input sets: never a stale slot, bit for bit."""
    ctx.check_stale_reads(STALE_READ_CALLS)
