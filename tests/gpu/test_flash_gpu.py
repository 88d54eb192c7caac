"""The flash backend on GPUs against the NumPy reference: each section of ``gpu_checks.py`` as a test.

    python -m pytest tests/gpu/test_flash_gpu.py --gpu-worlds 2,4,8 [--gpu-quick]

Every test runs at each ``--gpu-worlds`` size, its body on every rank of one ``mpiexec -n W``
launch per world (``tests/multi_gpu.py``), so the kernels load once per world.  ``--gpu-quick``
runs the quick sweep (``gpu_checks.py --quick --large-mib 64``).  The sections' code is
``gpu_checks.py``'s; ``mpiexec -n W python tests/gpu/gpu_checks.py`` runs the same as a script.
"""
import pytest

from gpu_checks import TIMEOUT_CASES

pytestmark = [pytest.mark.gpu, pytest.mark.multi_gpu]
#: device_run.sh's checks stage gives the full sweep 360 s, plus a cold compile of ~2 min on a fresh machine
MPI_TIMEOUT_S = 900


def rank_context(config):
    from gpu_checks import Sections
    quick = config.getoption("gpu_quick")
    sections = Sections(quick=quick, large_mib=64 if quick else 256)
    if sections.failures:  # the backend fell back: nothing below would test the flash kernels
        raise RuntimeError("; ".join(sections.failures))
    return sections


def test_codec_bytes(ctx):
    """The encode/decode kernels write and read quant.encode's wire bytes (rotation included)."""
    ctx.run("codec")


def test_exact(ctx):
    """Every dtype, codec, rotation, symmetry and algorithm, bit for bit against the reference."""
    ctx.run("exact")


def test_group_sizes(ctx):
    """Group sizes 32..1024 against the reference."""
    ctx.run("groups")


def test_api(ctx):
    """NumPy, CuPy and torch inputs, in place, a side stream, algo nccl, bad inputs refused."""
    ctx.run("api")


def test_many_calls(ctx):
    """Thousands of mixed eager calls stay exact."""
    ctx.run("many")


def test_graph_replays(ctx):
    """Captured calls replayed on fresh inputs stay exact."""
    ctx.run("graphs")


def test_large(ctx):
    """A large message (256 MiB, 64 MiB with --gpu-quick), quantized and lossless."""
    ctx.run("large")


def test_ll_protocol(ctx):
    """The data-as-signal (LL) kernels: exact, sentinel-valued inputs, any grid in any order, graphs."""
    ctx.run("ll")


def test_staged_twoshot(ctx):
    """The staged flag two-shot: every codec pair, launch shapes, non-finite inputs, mixed with the plain two-shot."""
    ctx.run("staged")


def timeout_id(case) -> str:
    """``flag-int8-twoshot``, ``flag-staged-int4-twoshot``, ``ll-lossless-oneshot``"""
    protocol, bits, algo, staged = case
    return "-".join([protocol] + ["staged"] * staged + [f"int{bits}" if bits else "lossless", algo])


@pytest.mark.parametrize("case", TIMEOUT_CASES, ids=timeout_id)
def test_timeout(ctx, case):
    """The last rank never calls: every other rank raises FlashTimeoutError naming it, within the bound."""
    ctx.timeout(case)
