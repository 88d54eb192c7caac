"""Relaunching a command under ``mpiexec`` when it was started without an MPI launcher.

``flashcomm bench`` typed on its own should do the right thing: on a host
with several GPUs run one rank per GPU, on a host without GPUs run the CPU
backend over :func:`default_cpu_ranks` ranks.  This module decides whether
and how to relaunch; it never imports mpi4py (initializing MPI in the parent
would make it an MPI singleton that then spawns a second job).
"""
from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from typing import List, Mapping, Optional, Sequence

from .. import launchers, settings
from ..backends import registry

#: set in the child's environment so a relaunched process never relaunches again
RELAUNCH_ENV = settings.RELAUNCHED
#: the CPU backend's relaunch runs this many ranks at most, fewer on a host with fewer cores (at least 2)
DEFAULT_CPU_RANKS = 4
MPI_INSTALL_HINT = 'pip install "flashcomm-cupy[mpi]" (brings MPICH) or install Open MPI'
#: the module a relaunch runs when its caller names none (the installed ``flashcomm`` command)
CLI_MODULE = "flashcomm_cupy.cli.main"


class LaunchError(RuntimeError):
    """The command cannot be (re)launched as asked; the message says what to do."""


def under_launcher(env: Mapping[str, str] = os.environ) -> bool:
    """True when this process was started by mpiexec/mpirun/srun (or by our relaunch)."""
    return settings.raw(RELAUNCH_ENV, env) == "1" or launchers.under_mpi_launcher(env)


def cuda_device_count() -> int:
    """CUDA devices CuPy sees (0 without CuPy or a GPU; never raises)."""
    if not registry.gpu_available():
        return 0
    try:
        import cupy
        return int(cupy.cuda.runtime.getDeviceCount())
    except Exception:
        return 0


@dataclass(frozen=True)
class LaunchPlan:
    """Run ``nranks`` ranks; ``reason`` is the sentence told to the user."""

    nranks: int
    reason: str


def available_cores() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def default_cpu_ranks(cores: int) -> int:
    """Ranks of the CPU backend's relaunch: one per core up to :data:`DEFAULT_CPU_RANKS`, at least 2.

    More ranks than cores make every collective wait for time slices (the MPI baseline at 1 KB
    measured 131 us and then 4,887 us on 4 ranks over 2 cores); 2 ranks are the least that
    exercise an all-reduce, even on one core.
    """
    return max(2, min(DEFAULT_CPU_RANKS, cores))


def plan_relaunch(backend: str, np_ranks: Optional[int], no_relaunch: bool, gpus: int,
                  env: Mapping[str, str] = os.environ, cores: Optional[int] = None) -> Optional[LaunchPlan]:
    """Whether to relaunch, with how many ranks and why; None to run in this process.

    * already under a launcher, or ``no_relaunch``: never.
    * ``np_ranks`` given: that many ranks (1 runs here); more ranks than
      GPUs with a GPU backend is a :class:`LaunchError`.
    * a GPU backend (:func:`registry.needs_gpu`: "gpu", "nccl"): one rank per GPU (none: LaunchError).
    * ``backend`` "auto": one rank per GPU with >= 2 GPUs; a single GPU runs
      here; no GPU: the CPU backend on :func:`default_cpu_ranks` ranks.
    * ``backend`` "cpu": :func:`default_cpu_ranks` ranks.

    ``cores``: CPU cores available (default: this process's affinity).
    """
    if no_relaunch or under_launcher(env):
        return None
    wants_gpu = registry.needs_gpu(backend) or (backend == registry.AUTO and gpus > 0)
    if registry.needs_gpu(backend) and gpus == 0:
        raise LaunchError(f"--backend {backend} needs a CUDA GPU, and CuPy sees none")
    if np_ranks is not None:
        if np_ranks < 1:
            raise LaunchError(f"--np must be >= 1, got {np_ranks}")
        if wants_gpu and np_ranks > gpus:
            raise LaunchError(f"--np {np_ranks} asks for more ranks than the {gpus} GPU(s) on this "
                              "host; use --np <= the GPU count or --backend cpu")
        if np_ranks == 1:
            return None
        where = f"{gpus} GPU(s) found" if wants_gpu else "CPU backend"
        return LaunchPlan(np_ranks, f"relaunching with {np_ranks} ranks (--np; {where})")
    if wants_gpu:
        if gpus < 2:
            return None
        return LaunchPlan(gpus, f"{gpus} GPUs found, no MPI launcher: relaunching with one rank per GPU")
    if backend == "auto":
        why = "no GPU found (CuPy missing or no CUDA device)"
    else:
        why = "--backend cpu"
    cores = available_cores() if cores is None else cores
    nranks = default_cpu_ranks(cores)
    note = "" if nranks <= cores else f", more than the {cores} core(s) here: expect noisy times"
    return LaunchPlan(nranks,
                      f"{why}, no MPI launcher: relaunching on the CPU backend with {nranks} ranks "
                      f"(one per core, at most {DEFAULT_CPU_RANKS}{note}; --np N to change, "
                      "--no-relaunch to stay single-rank)")


def find_mpiexec(env: Mapping[str, str] = os.environ) -> str:
    """Path of ``mpiexec`` (or ``mpirun``); LaunchError with the install hint when absent.

    ``FLASHCOMM_MPIEXEC`` overrides the search.
    """
    override = settings.value(settings.MPIEXEC, env)
    if override:
        return override
    for name in ("mpiexec", "mpirun"):
        path = shutil.which(name, path=env.get("PATH"))
        if path:
            return path
    raise LaunchError(f"mpiexec not found: {MPI_INSTALL_HINT}")


def mpiexec_flavor(mpiexec: str) -> str:
    """"openmpi", "mpich" (Hydra, also Intel MPI) or "unknown", from ``mpiexec --version``."""
    try:
        proc = subprocess.run([mpiexec, "--version"], capture_output=True, text=True, timeout=20)
        text = (proc.stdout + proc.stderr).lower()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if "open mpi" in text or "open-mpi" in text or "openrte" in text or "prte" in text:
        return "openmpi"
    if "hydra" in text or "mpich" in text or "intel" in text:
        return "mpich"
    return "unknown"


def is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


def build_command(mpiexec: str, flavor: str, nranks: int, args: Sequence[str],
                  python: str = sys.executable, root: Optional[bool] = None,
                  module: str = CLI_MODULE) -> List[str]:
    """The argv that reruns ``python -m <module> *args`` on ``nranks`` ranks.

    Open MPI refuses root without ``--allow-run-as-root`` and more ranks than
    cores without ``--oversubscribe``; MPICH needs neither.
    """
    root = is_root() if root is None else root
    cmd = [mpiexec]
    if flavor == "openmpi":
        if root:
            cmd.append("--allow-run-as-root")
        cmd.append("--oversubscribe")
    cmd += ["-n", str(nranks), python, "-m", module, *args]
    return cmd


def child_env(env: Mapping[str, str] = os.environ, terminal_columns: Optional[int] = None) -> dict:
    """The parent's environment plus :data:`RELAUNCH_ENV`, and $COLUMNS = ``terminal_columns`` if given
    and unset (the ranks write to a pipe or a pseudo-terminal; tables fit the user's terminal)."""
    child = dict(env)
    child[RELAUNCH_ENV] = "1"
    if terminal_columns and not child.get("COLUMNS"):
        child["COLUMNS"] = str(terminal_columns)
    return child


def terminal_columns(stream=None) -> Optional[int]:
    """Width of the terminal ``stream`` (stdout) is, or None when it is not one."""
    stream = sys.stdout if stream is None else stream
    try:
        return os.get_terminal_size(stream.fileno()).columns if stream.isatty() else None
    except (AttributeError, ValueError, OSError):
        return None


def relaunch(plan: LaunchPlan, args: Sequence[str], announce=None,
             env: Mapping[str, str] = os.environ, module: str = CLI_MODULE) -> int:
    """Run ``python -m <module> *args`` again under mpiexec as ``plan`` says; return its exit status.

    ``announce(text)`` is told what happens (the CLI prints it).  Ctrl-C is
    forwarded to mpiexec, which forwards it to the ranks.
    """
    mpiexec = find_mpiexec(env)
    cmd = build_command(mpiexec, mpiexec_flavor(mpiexec), plan.nranks, args, module=module)
    if announce is not None:
        announce(f"{plan.reason}\n  $ {' '.join(shlex.quote(c) for c in cmd)}")
    proc = subprocess.Popen(cmd, env=child_env(env, terminal_columns()))
    try:
        return proc.wait()
    except KeyboardInterrupt:
        return _stop_after_interrupt(proc, announce)


#: seconds the job gets after a Ctrl-C to wind down by itself: a bench's ranks finish the row in
#: flight (harness.interrupts), which may take a while (a large message on the CPU backend, or a
#: first call that compiles kernels), and rank 0 then writes the finished rows
INTERRUPT_GRACE_S = 60.0


def _stop_after_interrupt(proc: subprocess.Popen, announce=None) -> int:
    """End the relaunched job after this process got SIGINT; return its status (130 if killed).

    A Ctrl-C typed in a terminal reaches the whole foreground group: mpiexec and its ranks got it
    too, and a second SIGINT would make mpiexec abort the ranks before rank 0 has written the
    finished rows.  So the job gets :data:`INTERRUPT_GRACE_S` to end by itself (the SIGINT may also
    have reached this process alone); then, or at once at a second Ctrl-C, it is sent SIGINT, and
    killed 10 s later.
    """
    if announce is not None:
        announce("waiting for the job to stop; Ctrl-C again stops it now")
    try:
        return proc.wait(timeout=INTERRUPT_GRACE_S)
    except (subprocess.TimeoutExpired, KeyboardInterrupt):
        pass
    proc.send_signal(signal.SIGINT)
    try:
        return proc.wait(timeout=10)
    except (subprocess.TimeoutExpired, KeyboardInterrupt):
        proc.kill()
        proc.wait()
        return 130
