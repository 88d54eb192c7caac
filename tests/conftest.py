"""Shared pytest set-up.

* ``gpu`` tests are skipped, with the reason, where no CUDA GPU is visible.
* ``multi_gpu`` tests run their bodies under ``mpiexec -n W``, one rank per GPU (``tests/multi_gpu.py``
  has the contract): options ``--gpu-worlds``, ``--gpu-quick``, ``--gpu-timeout``, ``--gpu-budget``,
  ``--gpu-results``; the fixtures ``world`` and ``ctx``.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import time
from pathlib import Path

import pytest

import multi_gpu
from mpi_util import MPI_SHM_PREFIXES, _shm_names, mpi_skip_reason, remove_mpi_leftovers

LAUNCHES = pytest.StashKey[dict]()
SESSION_START = pytest.StashKey[float]()
OUTCOME = pytest.StashKey[multi_gpu.Outcome]()


@pytest.fixture(scope="session", autouse=True)
def no_mpi_segments_left_behind():
    """Whatever MPI segments the session's jobs left in /dev/shm (aborted on purpose, killed on a
    timeout) and no process still holds are removed at its end; the per-test clean-ups
    (mpi_util.run_in_group, aborted_job_shm) run while a killed rank may still map them."""
    before = _shm_names()
    yield
    # a launcher's daemon may hold its job's segment for a moment after the job returned
    for _ in range(12):
        remove_mpi_leftovers(before)
        if not any(n.startswith(MPI_SHM_PREFIXES) for n in _shm_names() - before):
            break
        time.sleep(0.25)


def pytest_addoption(parser):
    group = parser.getgroup("multi_gpu", "multi-GPU tests (tests/multi_gpu.py)")
    group.addoption("--gpu-worlds", default=",".join(map(str, multi_gpu.DEFAULT_WORLDS)),
                    help="world sizes (ranks, one GPU each) of the multi_gpu tests, e.g. 2,3,4 (default %(default)s)")
    group.addoption("--gpu-quick", action="store_true",
                    help="the quick sweeps of the GPU checks (their scripts' --quick)")
    group.addoption("--gpu-timeout", type=float, default=None,
                    help="seconds one mpiexec launch may take (default: the test module's MPI_TIMEOUT_S)")
    group.addoption("--gpu-budget", type=float, default=None,
                    help="seconds all launches of the session may take together; later launches get what is "
                         "left, and none starts once it is spent (so a bounded caller still gets its JUnit XML)")
    group.addoption("--gpu-results", default=None,
                    help="directory for each launch's launch.log and rank-R.jsonl and summary.json "
                         "(default: under pytest's temporary directory)")
    parser.addoption("--kernel-dir", default=None,
                     help="kernel sources the one-GPU loopback tests build (tests/gpu/test_loopback_gpu.py) "
                          "instead of the shipped ones: a kernel change checked before it lands")
    # internal: set on the ranks of a launch, which run the bodies and record into this directory
    group.addoption("--gpu-rank-results", default=None, help=argparse.SUPPRESS)


def pytest_configure(config):
    config.stash[LAUNCHES] = {}
    config.stash[SESSION_START] = time.monotonic()
    rank_results = config.getoption("gpu_rank_results")
    if rank_results:
        config.pluginmanager.register(RankPlugin(multi_gpu.RankRecorder(rank_results)), "multi_gpu_rank")


def in_ranks(config) -> bool:
    return bool(config.getoption("gpu_rank_results"))


def pytest_generate_tests(metafunc):
    marker = metafunc.definition.get_closest_marker("multi_gpu")
    if marker is not None and "world" in metafunc.fixturenames:
        worlds = multi_gpu.parse_worlds(metafunc.config.getoption("gpu_worlds"))
        metafunc.parametrize("world", multi_gpu.world_params(marker, worlds), scope="module")


def pytest_collection_modifyitems(config, items):
    multi = [item for item in items if item.get_closest_marker("multi_gpu") is not None]
    for item in multi:
        if "ctx" not in item.fixturenames:
            raise pytest.UsageError(f"{item.nodeid}: a multi_gpu test takes the ctx fixture (tests/multi_gpu.py)")
    if multi and not in_ranks(config):
        worlds = multi_gpu.parse_worlds(config.getoption("gpu_worlds"))
        gpus, mpi_reason = multi_gpu.visible_gpus(), mpi_skip_reason()
        for item in multi:
            reason = multi_gpu.skip_reason(multi_gpu.world_of(item), worlds, gpus, mpi_reason)
            if reason is not None:
                item.add_marker(pytest.mark.skip(reason=reason))
    gpu_items = [item for item in items if "gpu" in item.keywords and item not in multi]
    reason = gpu_items and not in_ranks(config) and single_gpu_skip_reason()
    for item in gpu_items if reason else ():
        item.add_marker(pytest.mark.skip(reason=reason))


def single_gpu_skip_reason():
    """Why a plain ``gpu`` test cannot run here (no CuPy, no GPU), or None; CuPy is not imported."""
    if importlib.util.find_spec("cupy") is None:
        return "needs CUDA GPUs and CuPy; CuPy is not installed"
    count, how = multi_gpu.visible_gpus()
    return f"needs CUDA GPUs; none visible ({how})" if count == 0 else None


@pytest.fixture(scope="module")
def world():
    """The ranks of a multi_gpu test (parametrized by pytest_generate_tests)."""
    raise pytest.UsageError("the world fixture belongs to multi_gpu tests")


@pytest.fixture(scope="module")
def ctx(request, world):
    """In the ranks: the module's ``rank_context(config)``, closed after its last test.
    In the parent: the module's :class:`multi_gpu.Launch` at this world (started by the first test)."""
    if in_ranks(request.config):
        context = request.module.rank_context(request.config)
        yield context
        close = getattr(context, "close", None)
        if close is not None:
            close()
        return
    yield parent_launch(request, world)


def parent_launch(request, world: int) -> multi_gpu.Launch:
    config = request.config
    module = Path(request.module.__file__)
    key = (str(module), world)
    launches = config.stash[LAUNCHES]
    if key not in launches:
        nodeids = [item.nodeid for item in request.session.items
                   if Path(item.path) == module and multi_gpu.world_of(item) == world]
        results = config.getoption("gpu_results")
        base = Path(results) if results else request.getfixturevalue("tmp_path_factory").getbasetemp() / "multi_gpu"
        timeout = config.getoption("gpu_timeout") or getattr(request.module, "MPI_TIMEOUT_S", multi_gpu.DEFAULT_TIMEOUT_S)
        budget = config.getoption("gpu_budget")
        if budget is not None:
            left = budget - (time.monotonic() - config.stash[SESSION_START])
            if left <= 0:
                pytest.skip(f"the session's --gpu-budget of {budget:g} s is spent")
            timeout = min(timeout, left)
        launches[key] = multi_gpu.Launch(
            module=module, world=world, nodeids=nodeids, directory=base / f"{module.stem}-world{world}",
            timeout_s=timeout, env=dict(getattr(request.module, "MPI_ENV", {})),
            rank_options=["--gpu-quick"] if config.getoption("gpu_quick") else [])
    return launches[key]


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem):
    """In the parent a multi_gpu test reports its ranks' outcome instead of running its body."""
    if pyfuncitem.get_closest_marker("multi_gpu") is None or in_ranks(pyfuncitem.config):
        return None
    outcome = pyfuncitem.funcargs["ctx"].outcome(pyfuncitem.nodeid)
    pyfuncitem.user_properties.append(("seconds_on_ranks", round(outcome.seconds, 2)))
    pyfuncitem.stash[OUTCOME] = outcome
    multi_gpu.report(outcome)
    return True


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """A parent test that failed on its ranks reports their text alone (no ``Failed:``, no traceback
    of this conftest), in the terminal's summary line and in the JUnit message alike."""
    rep = yield
    outcome = item.stash.get(OUTCOME, None)
    if call.when == "call" and rep.failed and outcome is not None and outcome.status == "failed":
        rep.longrepr = outcome.text
    return rep


def pytest_terminal_summary(terminalreporter, config):
    """Where each launch's log lies, and summary.json beside them (one entry per launch and test)."""
    launches = [launch for launch in config.stash.get(LAUNCHES, {}).values() if launch.records is not None]
    if not launches or in_ranks(config):
        return
    terminalreporter.section("multi-GPU launches")
    summary = []
    for launch in launches:
        rec = launch.records
        end = "timed out" if rec.timed_out else f"exit status {rec.returncode}"
        terminalreporter.write_line(f"{launch.module.name} at {launch.world} ranks: {len(launch.nodeids)} tests, "
                                    f"{rec.seconds:.0f} s, {end}; {launch.directory / 'launch.log'}")
        tests = {nodeid: vars(launch.outcome(nodeid)) for nodeid in launch.nodeids}
        summary.append({"module": launch.module.name, "world": launch.world, "seconds": round(rec.seconds, 1),
                        "returncode": rec.returncode, "timed_out": rec.timed_out,
                        "log": str(launch.directory / "launch.log"), "tests": tests})
    path = launches[0].directory.parent / "summary.json"
    path.write_text(json.dumps(summary, indent=1) + "\n")
    terminalreporter.write_line(f"summary: {path}")


class RankPlugin:
    """The hooks of a launched rank: bodies run; ctx.failures and crashes are recorded per phase."""

    def __init__(self, recorder: multi_gpu.RankRecorder):
        self.recorder = recorder

    def pytest_runtest_logstart(self, nodeid, location):
        self.recorder.started(nodeid)

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_call(self, item):
        context = item.funcargs.get("ctx")
        before = multi_gpu.failures_held(context)
        result = yield
        failures = multi_gpu.new_failures(context, before)
        if failures:
            raise multi_gpu.ChecksFailed(failures)
        return result

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(self, item, call):
        rep = yield
        if item.get_closest_marker("multi_gpu") is not None:
            self.recorder.phase(item, call, rep)
        return rep
