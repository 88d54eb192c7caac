"""Settings, the launcher table, the backend registry and the agreement helpers (no MPI, no GPU)."""
from __future__ import annotations

import ast
import re
import subprocess
from pathlib import Path

import pytest

from flashcomm_cupy import _mpi, launchers, settings
from flashcomm_cupy.backends import registry

REPO_ROOT = Path(__file__).resolve().parent.parent
#: the code whose FLASHCOMM_* reads must go through settings (tests and CI scripts keep their own knobs)
SETTINGS_READERS = ("flashcomm_cupy", "cli", "benchmarks")


# ----------------------------------------------------------------------------- settings
def test_every_flashcomm_variable_in_the_tree_has_a_settings_row():
    files = subprocess.run(["git", "ls-files"], cwd=REPO_ROOT, capture_output=True, text=True,
                           check=True).stdout.split()
    found = {}
    for name in files:
        path = REPO_ROOT / name
        if path.suffix in (".py", ".sh", ".md", ".toml", "") and path.is_file() and "results/" not in name \
                and path != Path(__file__).resolve():  # this file names made-up variables
            for var in re.findall(r"FLASHCOMM_[A-Z0-9_]+\*?", path.read_text(errors="replace")):
                found.setdefault(var, name)

    def declared(var: str) -> bool:  # FLASHCOMM_KERNEL_* names a family of rows
        return var in settings.BY_NAME or var in settings.RETIRED or \
            (var.endswith("_*") and any(n.startswith(var[:-1]) for n in settings.BY_NAME))
    missing = {v: f for v, f in found.items() if not declared(v)}
    assert not missing, f"FLASHCOMM_* names without a row in flashcomm_cupy/settings.py: {missing}"


def _is_environ(node) -> bool:
    return isinstance(node, ast.Attribute) and node.attr == "environ" and \
        isinstance(node.value, ast.Name) and node.value.id == "os"


def _flashcomm_reads(path: Path):
    """Line numbers where ``path`` reads a FLASHCOMM_* variable from the environment: ``os.getenv``,
    ``os.environ.get``/``[...]``/``in``.  (Benchmarks that set one for the library to read write it.)"""
    tree = ast.parse(path.read_text(), filename=str(path))

    def names_flashcomm(node) -> bool:
        return any(isinstance(n, ast.Constant) and isinstance(n.value, str) and n.value.startswith("FLASHCOMM_")
                   for n in ast.walk(node))

    for node in ast.walk(tree):
        read = None
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            f = node.func
            if (f.attr == "getenv" and isinstance(f.value, ast.Name) and f.value.id == "os") or \
                    (f.attr == "get" and _is_environ(f.value)):
                read = node
        elif isinstance(node, ast.Subscript) and isinstance(node.ctx, ast.Load) and _is_environ(node.value):
            read = node
        elif isinstance(node, ast.Compare) and any(_is_environ(c) for c in node.comparators):
            read = node
        if read is not None and names_flashcomm(read):
            yield node.lineno


def test_no_module_reads_a_flashcomm_variable_but_settings():
    offenders = []
    for top in SETTINGS_READERS:
        for path in sorted((REPO_ROOT / top).rglob("*.py")):
            if path.name == "settings.py":
                continue
            lines = path.read_text().splitlines()
            offenders += [f"{path.relative_to(REPO_ROOT)}:{n}: {lines[n - 1].strip()}" for n in _flashcomm_reads(path)]
    assert not offenders, "read these through flashcomm_cupy.settings:\n" + "\n".join(offenders)


def test_the_reader_check_finds_a_direct_read(tmp_path):
    sample = tmp_path / "m.py"
    sample.write_text('import os\na = os.environ.get("FLASHCOMM_X")\nb = os.getenv("FLASHCOMM_Y")\n'
                      'c = os.environ["FLASHCOMM_Z"]\nd = "FLASHCOMM_W" in os.environ\n'
                      'os.environ["FLASHCOMM_V"] = "1"\ne = os.environ.get("HOME")\n')
    assert list(sorted(_flashcomm_reads(sample))) == [2, 3, 4, 5]


def test_every_row_has_a_reader():
    """A row nobody reads documents a variable that does nothing: delete it (and regenerate README's table)."""
    constants = {value: name for name, value in vars(settings).items() if isinstance(value, str) and name.isupper()}
    where = {"testing": ("tests", ".ci")}
    unread = []
    for var in settings.VARIABLES:
        spellings = [var.name] + ([f"settings.{constants[var.name]}"] if var.name in constants else [])
        texts = (p.read_text(errors="replace") for top in where.get(var.scope, SETTINGS_READERS)
                 for p in (REPO_ROOT / top).rglob("*") if p.is_file() and p.suffix in (".py", ".sh", "")
                 and p.name != "settings.py" and p.resolve() != Path(__file__).resolve())
        if not any(s in text for text in texts for s in spellings):
            unread.append(var.name)
    assert not unread, f"settings rows that nothing reads: {unread}"


def test_readme_table_is_the_generated_one():
    readme = (REPO_ROOT / "README.md").read_text()
    assert settings.README_BEGIN in readme and settings.README_END in readme
    shown = readme.split(settings.README_BEGIN, 1)[1].split(settings.README_END, 1)[0].strip("\n") + "\n"
    assert shown == settings.markdown_table(), (
        "README.md's environment table is stale: paste flashcomm_cupy.settings.markdown_table() between its markers")


def test_unset_or_blank_is_the_default_and_values_are_parsed():
    assert settings.value(settings.TIMEOUT_S, {}) == 30.0
    assert settings.value(settings.TIMEOUT_S, {settings.TIMEOUT_S: "  "}) == 30.0
    assert settings.value(settings.TIMEOUT_S, {settings.TIMEOUT_S: " 2.5 "}) == 2.5
    assert settings.value(settings.RANKS_PER_NODE, {settings.RANKS_PER_NODE: "2"}) == 2
    assert settings.value(settings.KERNEL_LINEINFO, {settings.KERNEL_LINEINFO: "1"}) is True
    assert settings.value(settings.KERNEL_LINEINFO, {settings.KERNEL_LINEINFO: "0"}) is False
    assert settings.raw(settings.RANKS_PER_NODE, {settings.RANKS_PER_NODE: " two "}) == "two"
    assert settings.raw(settings.RANKS_PER_NODE, {}) is None


@pytest.mark.parametrize("name,text,says", [
    (settings.TIMEOUT_S, "soon", "must be a number of seconds, got 'soon'"),
    (settings.TIMEOUT_S, "0", "must be a finite number of seconds in (0, 1e+06], got '0'"),
    (settings.PROTOCOL, "fast", "must be one of auto, flag, ll, got 'fast'"),
    (settings.TRANSPORT, "nvlink", "must be one of auto, ipc, host, got 'nvlink'"),
    (settings.RANKS_PER_NODE, "-2", "must be a positive integer, got '-2'"),
    (settings.RELAUNCHED, "yes", "must be 0 or 1, got 'yes'"),
])
def test_a_bad_value_is_one_line_naming_the_variable(name, text, says):
    with pytest.raises(ValueError) as err:
        settings.value(name, {name: text})
    assert str(err.value) == f"${name} {says}" and "\n" not in str(err.value)


def test_an_argument_beats_the_environment_and_errors_name_both(monkeypatch):
    monkeypatch.setenv(settings.PROTOCOL, "ll")
    assert settings.resolve(settings.PROTOCOL, None, "protocol") == "ll"
    assert settings.resolve(settings.PROTOCOL, "flag", "protocol") == "flag"
    with pytest.raises(ValueError, match=r"^protocol must be one of auto, flag, ll, got 'fast'$"):
        settings.resolve(settings.PROTOCOL, "fast", "protocol")
    monkeypatch.setenv(settings.PROTOCOL, "slow")
    with pytest.raises(ValueError, match=r"^protocol \(or \$FLASHCOMM_PROTOCOL\) must be one of auto, flag, ll, got 'slow'$"):
        settings.resolve(settings.PROTOCOL, None, "protocol")
    monkeypatch.delenv(settings.PROTOCOL)
    assert settings.resolve(settings.PROTOCOL, None, "protocol") == "auto"


def test_a_command_line_override_beats_the_environment_until_removed(monkeypatch):
    monkeypatch.setattr(settings, "_overrides", {})
    monkeypatch.setenv(settings.TRANSPORT, "ipc")
    settings.override(settings.TRANSPORT, "host")
    assert settings.value(settings.TRANSPORT) == "host"
    assert settings.value(settings.TRANSPORT, {settings.TRANSPORT: "ipc"}) == "ipc"  # an explicit env is read as is
    with pytest.raises(ValueError, match="TRANSPORT must be one of"):
        settings.override(settings.TRANSPORT, "pcie")
    settings.override(settings.TRANSPORT, None)
    assert settings.value(settings.TRANSPORT) == "ipc"


def test_values_are_read_when_asked_not_at_import(monkeypatch):
    monkeypatch.setenv(settings.TIMEOUT_S, "4")
    assert settings.value(settings.TIMEOUT_S) == 4.0
    monkeypatch.setenv(settings.TIMEOUT_S, "5")
    assert settings.value(settings.TIMEOUT_S) == 5.0


def test_an_unknown_name_is_refused():
    with pytest.raises(KeyError, match="not a flashcomm setting"):
        settings.value("FLASHCOMM_NOPE")


def test_every_row_is_documented_and_its_default_passes_its_own_check():
    for var in settings.VARIABLES:
        assert var.doc and var.kind and var.scope in settings.SCOPES, var.name
        if isinstance(var.default, (str, float, int)) and not isinstance(var.default, bool):
            assert var.check(str(var.default)) == var.default, var.name


# ----------------------------------------------------------------------------- launcher table
@pytest.mark.parametrize("env,rank,size,local,mpi", [
    ({}, 0, 1, None, False),
    ({"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "1"}, 3, 4, 1, True),
    ({"PMI_RANK": "2", "PMI_SIZE": "8", "MPI_LOCALRANKID": "0", "MPI_LOCALNRANKS": "4"}, 2, 8, 0, True),
    ({"PMI_RANK": "5", "PMI_SIZE": "6", "PMI_LOCAL_RANK": "1"}, 5, 6, 1, True),
    ({"PMIX_RANK": "1"}, 1, 1, None, True),
    ({"SLURM_PROCID": "7", "SLURM_NTASKS": "8", "SLURM_LOCALID": "3"}, 7, 1, 3, False),
    ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "h"}, 1, 1, 1, False),
    ({"RANK": "5", "LOCAL_RANK": "2"}, 0, 1, 2, False),  # RANK alone is some shell's variable, not torchrun's
    # an MPI job started by srun: the MPI variables win
    ({"SLURM_PROCID": "0", "PMIX_RANK": "3", "SLURM_LOCALID": "1", "OMPI_COMM_WORLD_LOCAL_RANK": "0"}, 3, 1, 0, True),
    ({"OMPI_COMM_WORLD_RANK": " x "}, 0, 1, None, True),  # present but not a number: launched, rank unknown
])
def test_the_launcher_table(env, rank, size, local, mpi):
    assert launchers.launched_rank(env) == rank
    assert launchers.launched_size(env) == size
    assert launchers.launched_local_rank(env) == local
    assert launchers.under_mpi_launcher(env) is mpi


def test_the_architecture_notes_show_the_launcher_table():
    notes = (REPO_ROOT / "docs/architecture.md").read_text()
    assert "## The launcher table" in notes
    assert launchers.markdown_table() in notes


def test_torchrun_is_recognised_by_its_rendezvous_variables():
    assert launchers.launched_by_torchrun({"TORCHELASTIC_RUN_ID": "x"})
    assert launchers.launched_by_torchrun({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "h"})
    assert not launchers.launched_by_torchrun({"RANK": "0"})


def test_the_relaunch_marker_counts_as_a_launcher():
    from flashcomm_cupy.harness import launch
    assert launch.under_launcher({settings.RELAUNCHED: "1"})
    assert not launch.under_launcher({settings.RELAUNCHED: "0"})
    assert launch.under_launcher({"MPI_LOCALRANKID": "0"})
    assert not launch.under_launcher({"SLURM_PROCID": "0"})  # an sbatch script's shell: still relaunch


# ----------------------------------------------------------------------------- backend registry
def test_the_registry_names_every_backend_once():
    from flashcomm_cupy.communicator import BACKENDS
    assert BACKENDS == registry.NAMES == ("auto", "gpu", "cpu", "nccl")
    assert [n for n in registry.BACKENDS if registry.needs_gpu(n)] == ["gpu", "nccl"]
    assert not registry.needs_gpu("auto") and not registry.needs_gpu("reference")
    with pytest.raises(ValueError, match=r"backend must be one of auto, gpu, cpu, nccl, got 'tpu'"):
        registry.spec("tpu")


def test_auto_is_the_gpu_backend_where_cupy_sees_a_gpu(monkeypatch):
    monkeypatch.setattr(registry, "gpu_available", lambda: True)
    assert registry.spec("auto").name == "gpu"
    monkeypatch.setattr(registry, "gpu_available", lambda: False)
    assert registry.spec("auto").name == "cpu"


def test_every_factory_resolves_to_a_callable():
    import importlib
    for spec in registry.BACKENDS.values():
        module, attr = spec.factory.split(":")
        assert callable(getattr(importlib.import_module(module, registry.__package__), attr)), spec.name


def test_the_cli_offers_the_registry_names():
    from flashcomm_cupy.cli import options
    assert options.BACKEND_CHOICES == registry.NAMES


# ----------------------------------------------------------------------------- agreement
class _Ranks:
    """allgather over simulated ranks: every rank's contribution is given up front."""

    def __init__(self, values):
        self.values = values

    def allgather(self, mine):
        return list(self.values)


def test_agree_names_each_differing_value_and_every_rank():
    _mpi.agree(_Ranks([{"a": 1, "b": 2}] * 3), {"a": 1, "b": 2}, "settings")
    with pytest.raises(ValueError) as err:
        _mpi.agree(_Ranks([{"a": 1, "b": 2}, {"a": 1, "b": 3}]), {"a": 1, "b": 2}, "flash backend settings")
    assert str(err.value) == "flashcomm: flash backend settings differ between ranks (b: rank 0=2, rank 1=3)"


def test_first_failure_is_every_ranks_answer():
    assert _mpi.first_failure(_Ranks([None, None]), None) is None
    assert _mpi.first_failure(_Ranks([None, "no GPU", "no CuPy"]), None) == "no GPU"
    assert _mpi.first_failure(_Ranks([None, "no GPU", "no CuPy"]), None, name_rank=True) == "rank 1: no GPU"
    assert _mpi.first_failure(_Ranks(["no GPU", "no GPU"]), "no GPU", name_rank=True) == "no GPU"


def test_a_call_description_holds_everything_a_call_must_agree_on():
    from flashcomm_cupy.config import Mode
    a = _mpi.call_description(10, "float16", Mode.make(None, group_size=64))
    b = _mpi.call_description(10, "float16", Mode.make(None, group_size=128))
    assert _mpi.disagreement([a, b], "all_reduce arguments") == (
        "flashcomm: all_reduce arguments differ between ranks (group_size: rank 0=64, rank 1=128)")


def test_backend_auto_must_resolve_the_same_on_every_rank(monkeypatch):
    # a rank whose CUDA fails would pick "cpu" while its peers pick "gpu" and wait in other collectives
    from flashcomm_cupy.backends import registry

    class Split:
        def allgather(self, value):
            return [value, {"backend": "gpu" if value["backend"] == "cpu" else "cpu"}]

    monkeypatch.setattr(registry, "gpu_available", lambda: False)
    with pytest.raises(ValueError, match="backends picked for backend='auto'.*differ between ranks.*rank 0='cpu', rank 1='gpu'"):
        registry.make("auto", Split())
