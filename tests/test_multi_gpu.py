"""The multi_gpu marker and runner (tests/multi_gpu.py) on CPU: GPU counting, world sizes, skip
reasons, how the ranks' records become one outcome per test, and whole launches of a fake
multi-GPU module (tests/mpi_scripts/multi_gpu_fake.py) whose bodies run on CPU ranks."""
from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

import multi_gpu
from mpi_util import REPO_ROOT, require_mpi

FAKE = REPO_ROOT / "tests" / "mpi_scripts" / "multi_gpu_fake.py"
FAKE_ID = "tests/mpi_scripts/multi_gpu_fake.py"
GPU_DIR = REPO_ROOT / "tests" / "gpu"


@pytest.fixture
def fake_gpus(tmp_path, monkeypatch):
    """Put an ``nvidia-smi`` that lists ``n`` GPUs (and a MIG device) first on PATH; returns a setter."""
    def install(n: int, status: int = 0) -> None:
        lines = "".join(f'echo "GPU {i}: NVIDIA H200 (UUID: GPU-{i})"\n' for i in range(n))
        lines += 'echo "  MIG 1g.18gb Device 0: (UUID: MIG-0)"\n' if n else ""
        smi = tmp_path / "bin" / "nvidia-smi"
        smi.parent.mkdir(exist_ok=True)
        smi.write_text(f"#!/bin/sh\n{lines}exit {status}\n")
        smi.chmod(0o755)
        monkeypatch.setenv("PATH", f"{smi.parent}{os.pathsep}{os.environ['PATH']}")
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    return install


# ---------------------------------------------------------------------------- options, counting, skips
def test_worlds_parse_in_order_without_duplicates():
    assert multi_gpu.parse_worlds("2,4,8") == (2, 4, 8)
    assert multi_gpu.parse_worlds(" 3, 3,2,") == (3, 2)


@pytest.mark.parametrize("text", ["", "0", "two", "2,-1", "2.5"])
def test_bad_worlds_are_a_usage_error(text):
    with pytest.raises(pytest.UsageError, match="--gpu-worlds"):
        multi_gpu.parse_worlds(text)


def test_gpus_are_counted_from_nvidia_smi_without_mig_devices(fake_gpus):
    fake_gpus(4)
    assert multi_gpu.visible_gpus() == (4, "nvidia-smi -L")


@pytest.mark.parametrize("cvd, count", [("1,3", 2), ("1,7,2", 1), ("", 0), ("0,0,1", 1), ("GPU-a,MIG-b", 2),
                                        ("3,2,1,0", 4), ("-1,0", 0)])
def test_cuda_visible_devices_restricts_the_count_as_cuda_does(fake_gpus, cvd, count):
    fake_gpus(4)
    got, how = multi_gpu.visible_gpus(cvd)
    assert got == count and f"CUDA_VISIBLE_DEVICES={cvd!r}" in how


def test_a_failing_nvidia_smi_counts_no_gpu_and_says_so(fake_gpus):
    fake_gpus(2, status=9)
    assert multi_gpu.visible_gpus() == (0, "nvidia-smi -L exited with status 9")


def test_skip_reasons_name_what_is_missing():
    two = (2, "nvidia-smi -L")
    assert multi_gpu.skip_reason(2, (2, 4), two, None) is None
    assert multi_gpu.skip_reason(4, (2, 4), two, None) == "needs 4 GPUs, 2 visible (nvidia-smi -L)"
    assert multi_gpu.skip_reason(2, (4,), two, None) == "runs at 2 ranks; --gpu-worlds 4 leaves 2 out"
    assert multi_gpu.skip_reason(2, (2,), two, "no mpiexec/mpirun found") == "no mpiexec/mpirun found"


# ---------------------------------------------------------------------------- records -> outcomes
def phases(nodeid, call="passed", **call_fields):
    recs = [{"nodeid": nodeid, "event": "start"}, {"nodeid": nodeid, "when": "setup", "outcome": "passed"},
            {"nodeid": nodeid, "when": "call", "outcome": call, "seconds": 1.5, **call_fields}]
    return recs + [{"nodeid": nodeid, "when": "teardown", "outcome": "passed"}]


class _Item:
    """A collected test item's markers, nearest first (what pytest's ``iter_markers`` yields)."""

    def __init__(self, *markers):
        self.markers = markers

    def iter_markers(self, name):
        return (m for m in self.markers if m.name == name)


def test_the_world_comes_from_the_parameter_even_under_a_bare_function_marker():
    # @pytest.mark.multi_gpu on the function itself is nearer than the multi_gpu(w) of its world
    # parameter; the world must still be w (it was None: every such test skipped everywhere).
    bare, param = pytest.mark.multi_gpu.mark, pytest.mark.multi_gpu(4).mark
    assert multi_gpu.world_of(_Item(bare, param)) == 4
    assert multi_gpu.world_of(_Item(param, bare)) == 4
    assert multi_gpu.world_of(_Item(bare)) is None


def test_every_rank_passing_is_a_pass():
    rec = multi_gpu.LaunchRecords(2, {0: phases("t"), 1: phases("t")})
    assert rec.outcome("t") == multi_gpu.Outcome("passed", "", 1.5)


def test_a_failure_names_its_rank_and_the_count_beyond_the_first_few():
    many = ["3 of 1048576 elements differ (fp16, INT4, g128)"] + [f"case {k}" for k in range(9)]
    rec = multi_gpu.LaunchRecords(4, {0: phases("t"), 1: phases("t", "failed", failures=many),
                                      2: phases("t"), 3: phases("t", "failed", failures=["x"])})
    out = rec.outcome("t")
    assert out.status == "failed"
    lines = out.text.splitlines()
    assert lines[0] == "rank 1: 3 of 1048576 elements differ (fp16, INT4, g128)"
    assert f"... and {len(many) - multi_gpu.FAILURES_SHOWN} more failures" in out.text
    assert lines[-1] == "rank 3: x"


def test_a_skip_on_every_rank_is_a_skip_and_on_some_a_failure():
    skip = [{"nodeid": "t", "when": "setup", "outcome": "skipped", "reason": "no torch"},
            {"nodeid": "t", "when": "teardown", "outcome": "passed"}]
    assert multi_gpu.LaunchRecords(2, {0: skip, 1: skip}).outcome("t") == multi_gpu.Outcome("skipped", "no torch")
    out = multi_gpu.LaunchRecords(2, {0: skip, 1: phases("t")}).outcome("t")
    assert out.status == "failed" and out.text.startswith("skipped on 1 of 2 ranks only: no torch")


def test_a_timeout_says_where_each_rank_was():
    hung = phases("a") + [{"nodeid": "b", "event": "start"}]
    rec = multi_gpu.LaunchRecords(2, {0: hung, 1: phases("a")}, returncode=-9, timed_out=True, timeout_s=30,
                                  output="  [staged] 12.0 s\n")
    assert rec.outcome("b").text == ("rank 0, rank 1: the launch timed out after 30 s in this test; "
                                     "last output lines:\n    [staged] 12.0 s")
    assert rec.outcome("c").text == ("rank 0, rank 1: the launch timed out after 30 s; "
                                     "rank 0 in b, rank 1 in a")


def test_a_launch_that_dies_without_records_quotes_its_output():
    rec = multi_gpu.LaunchRecords(2, {0: [], 1: []}, returncode=1, output="ImportError: no module x\n")
    text = rec.outcome("t").text
    assert text.startswith("rank 0, rank 1: the launch ended (mpiexec exit status 1) before this test")
    assert text.endswith("ImportError: no module x")


# ---------------------------------------------------------------------------- whole launches on CPU ranks
def junit_outcomes(path: Path) -> dict:
    """{test name: (outcome, message)} from a JUnit XML file."""
    got = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        kids = [k for k in case if k.tag in ("failure", "error", "skipped")]
        got[case.get("name")] = (kids[0].tag, kids[0].get("message", "")) if kids else ("passed", "")
    return got


@pytest.mark.mpi
def test_a_fake_module_runs_once_per_world_with_outcomes_per_test(tmp_path, fake_gpus):
    require_mpi()
    fake_gpus(2)
    closed = tmp_path / "closed"
    xml, results = tmp_path / "junit.xml", tmp_path / "results"
    cmd = [sys.executable, "-m", "pytest", str(FAKE), "-k", "not crash and not hang", "--gpu-worlds", "2,3",
           "-p", "no:cacheprovider", "-q", "-o", "addopts=", "--junitxml", str(xml), "--gpu-results", str(results)]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=dict(os.environ, FAKE_CLOSED_FILE=str(closed)),
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 1, proc.stdout + proc.stderr  # one test fails, on purpose
    got = junit_outcomes(xml)
    assert got["test_ranks_sum[world=2]"] == ("passed", "")
    status, message = got["test_rank1_finds_wrong_elements[world=2]"]
    assert status == "failure" and message.startswith("rank 1: 3 of 1048576 elements differ (fp16, INT4, g128)")
    assert "rank 0" not in message
    assert got["test_skipped_on_every_rank[world=2]"] == ("skipped", "nothing to check here")
    for name in ("test_ranks_sum[world=3]", "test_at_three_ranks[world=3]"):
        assert got[name] == ("skipped", "needs 3 GPUs, 2 visible (nvidia-smi -L)")
    summary = json.loads((results / "summary.json").read_text())
    assert [(s["module"], s["world"], len(s["tests"])) for s in summary] == [("multi_gpu_fake.py", 2, 3)]
    assert sorted(p.name for p in tmp_path.glob("closed.*")) == ["closed.0", "closed.1"]  # ctx.close() on each rank


def launch(tmp_path, names, timeout_s=120.0) -> multi_gpu.Launch:
    return multi_gpu.Launch(module=FAKE, world=2, nodeids=[f"{FAKE_ID}::{n}[world=2]" for n in names],
                            directory=tmp_path / "launch", timeout_s=timeout_s)


@pytest.mark.mpi
def test_a_crash_aborts_the_launch_and_the_rest_say_why(tmp_path):
    require_mpi()
    run = launch(tmp_path, ["test_last_rank_crashes", "test_after_the_crash"])
    crash = run.outcome(run.nodeids[0])
    assert crash.status == "failed"
    assert crash.text.startswith("rank 1: ZeroDivisionError: the last rank divided by zero")
    after = run.outcome(run.nodeids[1])
    assert after.status == "failed" and "the launch ended (mpiexec exit status" in after.text
    assert after.text.endswith("first crash: test_last_rank_crashes[world=2] on rank 1: "
                               "ZeroDivisionError: the last rank divided by zero")
    assert (tmp_path / "launch" / "launch.log").exists()


@pytest.mark.mpi
def test_a_hung_launch_is_killed_at_its_timeout(tmp_path):
    require_mpi()
    # 20 s: both ranks must start pytest and pass the first test before the hang (seconds on a loaded 2-core runner)
    run = launch(tmp_path, ["test_ranks_sum", "test_rank0_hangs"], timeout_s=20)
    assert run.outcome(run.nodeids[0]).status == "passed"
    hung = run.outcome(run.nodeids[1])
    assert hung.status == "failed" and "the launch timed out after 20 s in this test" in hung.text
    assert not processes_mentioning(str(run.directory)), "a rank outlived its launch's timeout"


def processes_mentioning(text: str) -> list:
    """PIDs whose command line contains ``text``."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if text.encode() in f.read():
                    found.append(int(pid))
        except OSError:
            pass
    return found


# ---------------------------------------------------------------------------- the GPU modules cover their scripts
def called_names(path: Path, method: str) -> set:
    """String arguments of ``ctx.<method>("...")`` calls, and names of ``ctx.<method>`` calls."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == method:
            names.update(a.value for a in node.args if isinstance(a, ast.Constant))
    return names


def assigned_tuple(path: Path, name: str) -> list:
    """The element names (or string values) of a module-level ``NAME = (...)`` in a script, read without importing it."""
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == name for t in node.targets):
            return [getattr(e, "id", None) or e.value for e in node.value.elts]
    raise AssertionError(f"{path.name} has no {name}")


def test_every_gpu_checks_section_has_a_test():
    sections = assigned_tuple(GPU_DIR / "gpu_checks.py", "SECTIONS")
    assert sorted(called_names(GPU_DIR / "test_flash_gpu.py", "run")) == sorted(sections)


def test_every_torch_check_has_a_test():
    checks = assigned_tuple(GPU_DIR / "torch_gpu_checks.py", "CHECKS")
    assert sorted(called_names(GPU_DIR / "test_torch_gpu.py", "run")) == sorted(checks)


def test_every_fault_case_has_a_test():
    tree = ast.parse((GPU_DIR / "fault_checks.py").read_text())
    cases = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Cases")
    public = {f.name for f in cases.body if isinstance(f, ast.FunctionDef) and f.body
              and ast.get_docstring(f) and f.name not in ("verdict", "expected")}
    called = {n.func.attr for n in ast.walk(ast.parse((GPU_DIR / "test_faults_gpu.py").read_text()))
              if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
              and isinstance(n.func.value, ast.Name) and n.func.value.id == "ctx"}
    assert public == called


def test_a_launch_environment_has_the_module_settings_and_no_pytest_addopts(monkeypatch, tmp_path):
    monkeypatch.setenv("PYTEST_ADDOPTS", "--junitxml=every-rank.xml")
    monkeypatch.setenv("NCCL_NVLS_ENABLE", "1")  # the caller's choice wins over the default
    monkeypatch.delenv("TORCH_SYMM_MEM_DISABLE_MULTICAST", raising=False)
    env = multi_gpu.Launch(module=FAKE, world=2, nodeids=[], directory=tmp_path, timeout_s=1,
                           env={"FLASHCOMM_RANKS_PER_NODE": "1"}).environment()
    assert "PYTEST_ADDOPTS" not in env
    assert env["NCCL_NVLS_ENABLE"] == "1" and env["TORCH_SYMM_MEM_DISABLE_MULTICAST"] == "1"
    assert env["FLASHCOMM_RANKS_PER_NODE"] == "1" and env["HYDRA_LAUNCHER"] == "fork"
