"""Multi-GPU tests in pytest: a test marked ``multi_gpu`` runs its body on every rank of ``mpiexec -n W``.

The contract (``tests/conftest.py`` wires it in; ``tests/gpu/test_*_gpu.py`` use it):

* ``@pytest.mark.multi_gpu`` runs a test at each world size of ``--gpu-worlds`` (default 2,4,8);
  ``@pytest.mark.multi_gpu(n)`` at n ranks only.  Either way the test's id ends in ``world=W``,
  and it is skipped, with the reason, where fewer than W GPUs are visible (counted with
  ``nvidia-smi -L`` and ``CUDA_VISIBLE_DEVICES``, without importing CuPy), where mpi4py or
  ``mpiexec`` is missing, or where ``--gpu-worlds`` leaves W out.
* A multi_gpu test takes the fixture ``ctx``.  In the pytest process that collected it (the
  *parent*), ``ctx`` is a :class:`Launch`: the first test of a module and world starts one
  ``mpiexec -n W python -m pytest NODE_IDS...`` for every selected test of that module and world
  (one launch, so the kernels load once), and each test then reports what its own node id did on
  every rank.  The body is not called in the parent.
* In the launched ranks pytest runs the bodies, and ``ctx`` is the test module's
  ``rank_context(config)``: built once per launch on every rank (collective), closed after the
  module's last test (``ctx.close()`` when it has one).  A rank context has a ``failures`` list:
  what a body appends there fails the test on that rank and the launch goes on (a check that
  records instead of raising leaves every rank in step).  An exception is a crash: the rank
  records it and aborts the job (``MPI_Abort``), since its peers may wait in a collective that
  never completes; the tests after it report that they did not run, and why.
* Each rank appends one JSON line per test phase to ``rank-R.jsonl`` in the launch's directory
  (under ``--gpu-results``, with the launch's whole output in ``launch.log``), flushed at once,
  so a launch that times out or aborts still tells which test each rank was in.

A failure then reads as a named test, one line per failing rank::

    FAILED tests/gpu/test_flash_gpu.py::test_staged_twoshot[world=4] - rank 0: staged ... 3 of 1048576 elements differ ...
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import pytest

from mpi_util import find_mpiexec, mpi_env, mpiexec_command, run_bounded

DEFAULT_WORLDS = (2, 4, 8)
#: a launch's bound when neither the test module (``MPI_TIMEOUT_S``) nor ``--gpu-timeout`` sets one
DEFAULT_TIMEOUT_S = 600.0
#: failure lines shown per rank (the rest are counted; launch.log and rank-R.jsonl keep them all)
FAILURES_SHOWN = 5
#: output lines quoted when a launch ends without saying why (a crash before pytest could record, a timeout)
OUTPUT_TAIL_LINES = 25
#: every launch runs with these unless the environment sets them (besides mpi_util.mpi_env's):
#: NVLink multicast off, as benchmarks/device_run.sh has it
GPU_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


# ---------------------------------------------------------------------------- options and counting
def parse_worlds(text: str) -> Tuple[int, ...]:
    """``"2,4,8"`` -> ``(2, 4, 8)``: positive rank counts, duplicates dropped, order kept."""
    worlds = []
    for part in filter(None, (p.strip() for p in str(text).split(","))):
        if not part.isdigit() or int(part) < 1:
            raise pytest.UsageError(f"--gpu-worlds: {part!r} is not a positive rank count (e.g. --gpu-worlds 2,4,8)")
        if int(part) not in worlds:
            worlds.append(int(part))
    if not worlds:
        raise pytest.UsageError(f"--gpu-worlds {text!r} names no world size (e.g. --gpu-worlds 2,4,8)")
    return tuple(worlds)


def physical_gpus() -> Tuple[int, str]:
    """(NVIDIA GPUs on this machine, how they were counted): ``nvidia-smi -L``'s ``GPU n:`` lines
    (MIG lines are not GPUs), else the ``/dev/nvidiaN`` device nodes."""
    smi = shutil.which("nvidia-smi")
    if smi is not None:
        try:
            out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return 0, f"nvidia-smi -L failed: {exc}"
        if out.returncode == 0:
            return sum(line.startswith("GPU ") for line in out.stdout.splitlines()), "nvidia-smi -L"
        return 0, f"nvidia-smi -L exited with status {out.returncode}"
    nodes = [n for n in os.listdir("/dev") if re.fullmatch(r"nvidia\d+", n)] if os.path.isdir("/dev") else []
    return len(nodes), "no nvidia-smi; counted /dev/nvidiaN"


def visible_gpus(cuda_visible_devices: Optional[str] = None) -> Tuple[int, str]:
    """(GPUs a rank of this machine can see, how they were counted), without importing CuPy.

    ``CUDA_VISIBLE_DEVICES`` (the argument, else the environment) restricts the machine's GPUs as
    CUDA does: entries up to the first invalid one count (an index past the GPUs or repeated, or
    a word that is no ``GPU-``/``MIG-`` identifier)."""
    physical, how = physical_gpus()
    if cuda_visible_devices is None:
        cuda_visible_devices = os.environ.get("CUDA_VISIBLE_DEVICES")
    if cuda_visible_devices is None:
        return physical, how
    seen = []
    for entry in (e.strip() for e in cuda_visible_devices.split(",")):
        valid = (entry.isdigit() and int(entry) < physical) or entry.startswith(("GPU-", "MIG-"))
        if not valid or entry in seen:
            break
        seen.append(entry)
    return min(len(seen), physical), f"{how}, CUDA_VISIBLE_DEVICES={cuda_visible_devices!r}"


def skip_reason(world: int, worlds: Sequence[int], gpus: Tuple[int, str], mpi_reason: Optional[str]) -> Optional[str]:
    """Why a test at ``world`` ranks cannot run here, or None: the first of --gpu-worlds, GPUs, MPI."""
    if world not in worlds:
        return f"runs at {world} ranks; --gpu-worlds {','.join(map(str, worlds))} leaves {world} out"
    count, how = gpus
    if count < world:
        return f"needs {world} GPUs, {count} visible ({how})"
    return mpi_reason


def world_of(item) -> Optional[int]:
    """The world size of a multi_gpu test item (its nearest ``multi_gpu(n)`` marker with an n), else None."""
    # Every marker, not only the closest: a bare @multi_gpu on the function itself is closer than the
    # multi_gpu(w) its world parameter carries, and would hide the world.
    for marker in item.iter_markers("multi_gpu"):
        if marker.args:
            return int(marker.args[0])
    return None


def world_params(marker, worlds: Sequence[int]) -> list:
    """The ``world`` parameters of a test with this multi_gpu marker: every --gpu-worlds size,
    or just ``n`` for ``multi_gpu(n)`` (then kept even when --gpu-worlds leaves it out, to skip with the reason)."""
    chosen = [int(marker.args[0])] if marker.args else list(worlds)
    return [pytest.param(w, id=f"world={w}", marks=pytest.mark.multi_gpu(w)) for w in chosen]


# ---------------------------------------------------------------------------- outcomes
@dataclass
class Outcome:
    """What one test did over every rank of a launch: ``passed``, ``failed`` or ``skipped``, with the text."""
    status: str
    text: str = ""
    seconds: float = 0.0  # the slowest rank's time in the test's phases


def _phase_text(rec: dict) -> str:
    """One rank's failure text for a failed phase: the recorded check failures, or the error's text."""
    if rec.get("failures"):
        shown = rec["failures"][:FAILURES_SHOWN]
        more = len(rec["failures"]) - len(shown)
        return "\n  ".join(shown) + (f"\n  ... and {more} more failures" if more > 0 else "")
    where = "" if rec.get("when") == "call" else f" (in {rec.get('when')})"
    return f"{rec.get('summary') or 'raised'}{where}\n{rec.get('error', '').rstrip()}"


@dataclass
class LaunchRecords:
    """What the ranks of one launch recorded (``rank-R.jsonl``) and how the launch ended."""
    world: int
    ranks: Dict[int, List[dict]] = field(default_factory=dict)
    returncode: Optional[int] = 0
    timed_out: bool = False
    timeout_s: float = 0.0
    seconds: float = 0.0
    output: str = ""

    @classmethod
    def read(cls, directory: Path, world: int, **how_it_ended) -> "LaunchRecords":
        ranks = {}
        for rank in range(world):
            path = directory / f"rank-{rank}.jsonl"
            lines = path.read_text().splitlines() if path.exists() else []
            ranks[rank] = [json.loads(line) for line in lines if line.strip().endswith("}")]
        return cls(world, ranks, **how_it_ended)

    def _phases(self, rank: int, nodeid: str) -> Dict[str, dict]:
        return {r["when"]: r for r in self.ranks.get(rank, []) if r.get("nodeid") == nodeid and "when" in r}

    def _started(self, rank: int, nodeid: str) -> bool:
        return any(r.get("nodeid") == nodeid for r in self.ranks.get(rank, []))

    def outcome(self, nodeid: str) -> Outcome:
        failed, skipped, unfinished, seconds = [], [], [], 0.0
        for rank in range(self.world):
            phases = self._phases(rank, nodeid)
            seconds = max(seconds, sum(p.get("seconds", 0.0) for p in phases.values()))
            bad = next((phases[w] for w in ("setup", "call", "teardown")
                        if w in phases and phases[w]["outcome"] == "failed"), None)
            if bad is not None:
                failed.append(f"rank {rank}: {_phase_text(bad)}")
            elif any(p["outcome"] == "skipped" for p in phases.values()):
                skipped.append(next(p.get("reason", "") for p in phases.values() if p["outcome"] == "skipped"))
            elif "teardown" not in phases:
                unfinished.append(rank)
        if unfinished:
            failed.append(self._why_unfinished(nodeid, unfinished))
        if failed:
            return Outcome("failed", "\n".join(failed), seconds)
        if skipped and len(skipped) == self.world:
            return Outcome("skipped", skipped[0], seconds)
        if skipped:
            return Outcome("failed", f"skipped on {len(skipped)} of {self.world} ranks only: {skipped[0]}", seconds)
        return Outcome("passed", "", seconds)

    def _why_unfinished(self, nodeid: str, ranks: List[int]) -> str:
        where = ", ".join(f"rank {r}" for r in ranks)
        started = [r for r in ranks if self._started(r, nodeid)]
        if self.timed_out:
            head = f"{where}: the launch timed out after {self.timeout_s:.0f} s"
            head += " in this test" if started else ""
        else:
            head = f"{where}: the launch ended (mpiexec exit status {self.returncode})"
            head += " in this test" if started else " before this test"
        crash = self.first_crash()
        if crash and crash[0] != nodeid:
            head += f"; first crash: {crash[0].rsplit('::', 1)[-1]} on rank {crash[1]}: {crash[2]}"
        elif not crash and (started or not self.timed_out):  # the output may say what it was doing
            tail = self.output.rstrip().splitlines()[-OUTPUT_TAIL_LINES:]
            head += "; last output lines:\n  " + "\n  ".join(tail)
        if not started and self.timed_out:
            head += "; " + self.where_ranks_were()
        return head

    def first_crash(self) -> Optional[Tuple[str, int, str]]:
        """(node id, rank, last line of the error) of the first phase that raised, if any."""
        for rank in range(self.world):
            for rec in self.ranks.get(rank, []):
                if rec.get("outcome") == "failed" and rec.get("error"):
                    return rec["nodeid"], rank, rec.get("summary") or rec["error"].strip().splitlines()[-1]
        return None

    def where_ranks_were(self) -> str:
        """Which test each rank had started last (``rank 0 in test_x[world=2]``)."""
        last = []
        for rank in range(self.world):
            starts = [r["nodeid"] for r in self.ranks.get(rank, []) if r.get("event") == "start"]
            last.append(f"rank {rank} in {starts[-1].rsplit('::', 1)[-1]}" if starts else f"rank {rank} before any test")
        return ", ".join(last)


# ---------------------------------------------------------------------------- the parent's launch
@dataclass
class Launch:
    """One ``mpiexec -n world python -m pytest`` of a test module's selected tests (the parent's ``ctx``)."""
    module: Path
    world: int
    nodeids: List[str]
    directory: Path
    timeout_s: float
    env: Dict[str, str] = field(default_factory=dict)
    rank_options: List[str] = field(default_factory=list)
    records: Optional[LaunchRecords] = None

    def command(self) -> List[str]:
        argv = [sys.executable, "-m", "pytest", *self.nodeids, "-p", "no:cacheprovider", "-s", "-q", "--no-header",
                "-o", "addopts=", "--gpu-worlds", str(self.world), "--gpu-rank-results", str(self.directory),
                *self.rank_options]
        return mpiexec_command(find_mpiexec(), self.world, argv)

    def environment(self) -> Dict[str, str]:
        """The ranks' environment: this one, mpi_util's launch settings, GPU_ENV's defaults, the module's
        ``MPI_ENV``; without ``PYTEST_ADDOPTS`` (a --junitxml there would have every rank write one file)
        and without mpi_env's one-thread limits (meant for CPU ranks on 2 cores: the GPU checks' NumPy
        reference runs as it does under the scripts)."""
        defaults = {k: v for k, v in GPU_ENV.items() if k not in os.environ}
        env = mpi_env({**defaults, **self.env})
        for name in ("PYTEST_ADDOPTS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            if name not in os.environ or name == "PYTEST_ADDOPTS":
                env.pop(name, None)
        return env

    def run(self) -> LaunchRecords:
        """Launch (once) and read what every rank recorded; bounded by ``timeout_s``."""
        if self.records is None:
            self.directory.mkdir(parents=True, exist_ok=True)
            for old in self.directory.glob("rank-*.jsonl"):
                old.unlink()
            t0 = time.monotonic()
            done = run_bounded(self.command(), self.timeout_s, self.environment())
            (self.directory / "launch.log").write_text(done.output)
            self.records = LaunchRecords.read(self.directory, self.world, returncode=done.returncode,
                                              timed_out=done.timed_out, timeout_s=self.timeout_s,
                                              seconds=time.monotonic() - t0, output=done.output)
        return self.records

    def outcome(self, nodeid: str) -> Outcome:
        return self.run().outcome(nodeid)


def report(outcome: Outcome) -> None:
    """End the calling (parent) test as the ranks' outcome says."""
    if outcome.status == "skipped":  # reported at the test, not at this line
        raise pytest.skip.Exception(outcome.text, _use_item_location=True)
    if outcome.status == "failed":
        pytest.fail(outcome.text, pytrace=False)


# ---------------------------------------------------------------------------- the ranks' side
class ChecksFailed(Exception):
    """A body appended to ``ctx.failures`` on this rank (not a crash: the launch goes on)."""

    def __init__(self, failures: List[str]):
        super().__init__("\n".join(failures))
        self.failures = failures


class RankRecorder:
    """Writes this rank's JSON lines (``rank-R.jsonl``) and aborts the job after a crash."""

    def __init__(self, directory: str):
        from mpi4py import MPI
        self.comm = MPI.COMM_WORLD
        self.file = open(Path(directory) / f"rank-{self.comm.Get_rank()}.jsonl", "a")

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def started(self, nodeid: str) -> None:
        self.write({"nodeid": nodeid, "event": "start", "time": time.time()})

    def phase(self, item, call, rep) -> None:
        rec = {"nodeid": item.nodeid, "when": call.when, "outcome": rep.outcome, "seconds": call.duration}
        crash = False
        if rep.skipped:
            longrepr = rep.longrepr
            rec["reason"] = str(longrepr[2] if isinstance(longrepr, tuple) else longrepr).removeprefix("Skipped: ")
        elif rep.failed and call.excinfo is not None and call.excinfo.errisinstance(ChecksFailed):
            rec["failures"] = call.excinfo.value.failures
        elif rep.failed:
            rec["error"] = rep.longreprtext[-6000:]
            rec["summary"] = getattr(getattr(rep.longrepr, "reprcrash", None), "message", "")
            crash = True
        self.write(rec)
        if crash:
            print(f"rank {self.comm.Get_rank()}: {item.nodeid} {call.when} raised; aborting the job:\n"
                  f"{rep.longreprtext}", file=sys.stderr, flush=True)
            self.comm.Abort(3)
            os._exit(3)  # MPICH's MPI_Abort was seen to return and let pytest run on for a few ms


def new_failures(ctx, before: Optional[int]) -> List[str]:
    """What the body appended to ``ctx.failures`` since it held ``before`` entries."""
    failures = getattr(ctx, "failures", None)
    return [str(f) for f in failures[before:]] if isinstance(failures, list) and before is not None else []


def failures_held(ctx) -> Optional[int]:
    failures = getattr(ctx, "failures", None)
    return len(failures) if isinstance(failures, list) else None
