"""Run a Python script under ``mpiexec -n K`` from pytest.

Tests call :func:`run_mpi` (or :func:`run_mpi_code` for a snippet) and
assert on the returned :class:`subprocess.CompletedProcess`.  The launch is
made safe for CI: Hydra forks instead of ssh-ing, Open MPI is allowed to run
as root and to oversubscribe the runner's two cores, the repository root is
on ``PYTHONPATH`` so an uninstalled checkout works, and the whole process
group is killed when the timeout expires (a hung collective must not hang
the suite).
"""
from __future__ import annotations

import functools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = Path(__file__).resolve().parent / "mpi_scripts"
DEFAULT_TIMEOUT_S = 120


def find_mpiexec() -> Optional[str]:
    """The launcher that belongs to this interpreter's MPI.

    A virtualenv with the ``mpi`` extra has ``mpiexec`` next to ``python``;
    prefer it over whatever ``PATH`` offers so the launcher matches the MPI
    library mpi4py loads.
    """
    beside = Path(sys.executable).parent / "mpiexec"
    if beside.exists():
        return str(beside)
    return shutil.which("mpiexec") or shutil.which("mpirun")


@functools.lru_cache(maxsize=None)
def _is_open_mpi(mpiexec: str) -> bool:
    try:
        text = subprocess.run([mpiexec, "--version"], capture_output=True, text=True,
                              timeout=30).stdout
    except Exception:
        return False
    return "Open MPI" in text or "OpenRTE" in text


def mpi_skip_reason() -> Optional[str]:
    """Why MPI tests cannot run here, or None when they can."""
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        return "mpi4py is not installed (pip install -e '.[mpi,test]')"
    if find_mpiexec() is None:
        return "no mpiexec/mpirun found (pip install -e '.[mpi,test]' brings MPICH)"
    return None


def require_mpi() -> str:
    """Skip the calling test when MPI is unavailable; return the launcher path."""
    reason = mpi_skip_reason()
    if reason is not None:
        pytest.skip(reason)
    return find_mpiexec()


def mpi_env(extra: Optional[dict] = None) -> dict:
    env = dict(os.environ)
    env.update({
        "HYDRA_LAUNCHER": "fork",
        "OMPI_ALLOW_RUN_AS_ROOT": "1",
        "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
        "OMPI_MCA_rmaps_base_oversubscribe": "1",
        "PRTE_MCA_rmaps_default_mapping_policy": ":oversubscribe",
        # Every rank runs NumPy; one thread each keeps K ranks on 2 cores sane.
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
    })
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    if extra:
        env.update(extra)
    return env


def mpiexec_command(mpiexec: str, nprocs: int, argv: Sequence[str]) -> list:
    """``mpiexec -n nprocs argv...``; Open MPI also gets ``--oversubscribe --bind-to none`` (more
    ranks than cores in CI; a rank's threads -- NCCL's, CUDA's -- not pinned to one core on a GPU host)."""
    extra = ["--oversubscribe", "--bind-to", "none"] if _is_open_mpi(mpiexec) else []
    return [mpiexec, *extra, "-n", str(nprocs), *map(str, argv)]


def run_mpi(script, nprocs: int, args: Sequence[str] = (), timeout: float = DEFAULT_TIMEOUT_S,
            env: Optional[dict] = None, mpi4py_run: bool = True) -> subprocess.CompletedProcess:
    """Run ``python -m mpi4py script args...`` on ``nprocs`` ranks; return the finished process.

    ``python -m mpi4py`` aborts all ranks when one raises (or exits non-zero),
    so a failure on one rank ends the job instead of leaving the others
    blocked in a collective.  ``mpi4py_run=False`` runs ``python script``
    instead, as the ``flashcomm`` console script runs: then only the code's
    own error handling can end a job that failed on one rank, which is what
    the tests of that handling need.  On timeout the whole process group is
    killed and the test fails with the output collected so far.
    """
    runner = ["-m", "mpi4py"] if mpi4py_run else []
    cmd = mpiexec_command(require_mpi(), nprocs, [sys.executable, *runner, str(script), *map(str, args)])
    return run_in_group(cmd, timeout, mpi_env(env), merge_stderr=True,
                        what=f"mpiexec -n {nprocs} {Path(script).name}")


SHM_DIR = "/dev/shm"


def _shm_names() -> set:
    try:
        return set(os.listdir(SHM_DIR))
    except OSError:
        return set()


def _open_or_mapped_paths() -> set:
    """Every file some process of this machine has open or mapped."""
    paths = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                try:
                    paths.add(os.readlink(f"/proc/{pid}/fd/{fd}"))
                except OSError:
                    pass
            with open(f"/proc/{pid}/maps") as f:
                paths.update(parts[5].strip() for parts in (line.split(None, 5) for line in f) if len(parts) == 6)
        except OSError:
            pass
    return paths


#: what MPI implementations put in /dev/shm (MPICH; Open MPI's sm and vader transports)
MPI_SHM_PREFIXES = ("mpich_shm_", "sm_segment.", "vader_segment.")


def remove_mpi_leftovers(before: set) -> None:
    """A job that aborts (MPI_Abort, a killed rank) leaves its MPI's ``/dev/shm`` segments
    behind: remove those that appeared since ``before`` and that no process has open or mapped."""
    new = [n for n in _shm_names() - before if n.startswith(MPI_SHM_PREFIXES)]
    if not new:
        return
    used = _open_or_mapped_paths()
    for name in new:
        path = os.path.join(SHM_DIR, name)
        if path not in used:
            try:
                os.unlink(path)
            except OSError:
                pass


def run_in_group(cmd, timeout: float, env: dict, merge_stderr: bool = False,
                 what: Optional[str] = None) -> subprocess.CompletedProcess:
    """Run ``cmd`` from the repo root in its own process group.

    On timeout the whole group (mpiexec and every rank) is killed and the
    test fails with the output so far, so a hang can never stall the suite.
    What an aborted MPICH job leaves in ``/dev/shm`` is removed afterwards.
    """
    before = _shm_names()
    try:
        return _run_in_group(cmd, timeout, env, merge_stderr, what)
    finally:
        remove_mpi_leftovers(before)


def _run_in_group(cmd, timeout, env, merge_stderr, what):
    proc, timed_out = _communicate_in_group(cmd, timeout, env, merge_stderr)
    if timed_out:
        pytest.fail(f"{what or ' '.join(map(str, cmd))} timed out after {timeout} s:\n{proc.stdout}\n{proc.stderr}")
    return proc


def _descendants(pid: int) -> list:
    """Every process below ``pid`` (children first found through /proc's parent links)."""
    children = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def kill_tree(pid: int) -> None:
    """SIGKILL ``pid``'s process group and every process below it: Open MPI starts its ranks in
    process groups of their own, which a kill of the launcher's group alone would leave running.
    Returns once they are gone (or after 10 s)."""
    below = _descendants(pid)
    try:
        os.killpg(pid, signal.SIGKILL)
    except OSError:
        pass
    for child in below:
        try:
            os.kill(child, signal.SIGKILL)
        except OSError:
            pass
    _wait_gone(below, 10.0)


def _wait_gone(pids, timeout_s: float) -> None:
    """Until each of ``pids`` has exited (a zombie has) or ``timeout_s`` passed: a killed process
    takes a moment to go, and a check for leftovers right after the kill found one still exiting
    (test_a_hung_launch_is_killed_at_its_timeout, about one run in ten on 2 cores)."""
    deadline = time.monotonic() + timeout_s
    for pid in pids:
        while time.monotonic() < deadline:
            try:
                with open(f"/proc/{pid}/stat") as f:
                    state = f.read().rsplit(")", 1)[1].split()[0]
            except (OSError, IndexError):
                break
            if state in ("Z", "X"):
                break
            time.sleep(0.01)


def _communicate_in_group(cmd, timeout, env, merge_stderr):
    """(the finished process, whether it ran past ``timeout`` and its whole group was killed)."""
    proc = subprocess.Popen(cmd, cwd=str(REPO_ROOT), env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT if merge_stderr else subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
        timed_out = False
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)
        out, err = proc.communicate()
        timed_out = True
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err or ""), timed_out


@dataclass
class BoundedRun:
    """How a :func:`run_bounded` command ended: exit status, stdout and stderr merged, timed out or not."""
    returncode: int
    output: str
    timed_out: bool


def run_bounded(cmd, timeout: float, env: dict) -> BoundedRun:
    """Like :func:`run_in_group`, but a timeout is an outcome, not a test failure: the caller
    reports what the command got done before its group was killed."""
    before = _shm_names()
    try:
        proc, timed_out = _communicate_in_group(cmd, timeout, env, merge_stderr=True)
    finally:
        remove_mpi_leftovers(before)
    return BoundedRun(proc.returncode, proc.stdout, timed_out)


def run_mpi_code(code: str, nprocs: int, timeout: float = DEFAULT_TIMEOUT_S,
                 env: Optional[dict] = None, mpi4py_run: bool = True) -> subprocess.CompletedProcess:
    """Like :func:`run_mpi` for a source snippet (written to a temporary file)."""
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(code)
        path = f.name
    try:
        return run_mpi(path, nprocs, timeout=timeout, env=env, mpi4py_run=mpi4py_run)
    finally:
        os.unlink(path)


# ----------------------------------------------------------------------------- shared memory
@pytest.fixture
def aborted_job_shm():
    """Removes the shared-memory segments an MPI job aborted by the test leaves behind.

    MPI_Abort (how a failed or interrupted job ends without risking a hang) does not let
    MPICH or Open MPI unlink their segments.  Only segments that appeared during the test
    and that no live process holds are removed.
    """
    before = _shm_names()
    yield
    remove_mpi_leftovers(before)