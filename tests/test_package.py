"""Packaging contract: the library imports light, the layout installs as documented."""
from __future__ import annotations

import ast
import importlib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import flashcomm_cupy

REPO_ROOT = Path(__file__).resolve().parent.parent
LIBRARY = REPO_ROOT / "flashcomm_cupy"


def _run_python(code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          cwd=str(REPO_ROOT), timeout=120)


def test_import_needs_neither_cupy_nor_mpi_nor_the_cli_stack():
    # sys.modules[name] = None makes "import name" fail, as on a host without CuPy.
    proc = _run_python(
        "import sys\n"
        "sys.modules['cupy'] = None\n"
        "import flashcomm_cupy as fc\n"
        "print('version', fc.__version__)\n"
        "print('gpu', fc.gpu_available())\n"
        "print('loaded', sorted(m for m in ('cupy', 'mpi4py', 'click', 'rich') if sys.modules.get(m)))\n")
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"^version \d+\.\d+\.\d+\S*$", proc.stdout, re.M), proc.stdout
    assert "gpu False" in proc.stdout
    assert "loaded []" in proc.stdout, proc.stdout


def test_version_matches_the_installed_distribution():
    assert re.fullmatch(r"\d+\.\d+\.\d+([.+-]\S+)?", flashcomm_cupy.__version__)
    from importlib import metadata
    try:
        installed = metadata.version("flashcomm-cupy")
    except metadata.PackageNotFoundError:
        pytest.skip("flashcomm-cupy is not installed (running from a checkout)")
    assert installed == flashcomm_cupy.__version__


def test_cli_is_a_subpackage_of_flashcomm_cupy():
    cli = importlib.import_module("flashcomm_cupy.cli")
    path = Path(cli.__file__).resolve().parent
    # a checkout maps cli/ into the package; an install puts it at flashcomm_cupy/cli
    assert path in (REPO_ROOT / "cli", Path(flashcomm_cupy.__file__).resolve().parent / "cli")


def test_the_package_path_is_its_own_directory_only():
    """No __path__ surgery: flashcomm_cupy.cli comes from the install's mapping, not from the checkout root."""
    assert [Path(p).resolve() for p in flashcomm_cupy.__path__] == [LIBRARY]


def test_an_uninstalled_checkout_runs_the_command_line_as_cli_main():
    proc = subprocess.run([sys.executable, "-m", "cli.main", "--version"], capture_output=True, text=True,
                          cwd=str(REPO_ROOT), timeout=120)
    assert proc.returncode == 0 and "flashcomm, version" in proc.stdout, proc.stderr
    from flashcomm_cupy.harness import launch
    assert launch.build_command("mpiexec", "mpich", 2, ["bench"], python="py", module="cli.main")[-3:] == \
        ["-m", "cli.main", "bench"]


def test_kernel_sources_are_found_inside_the_package():
    from flashcomm_cupy import _kernels
    kdir = _kernels.kernel_dir()
    package_dir = Path(flashcomm_cupy.__file__).resolve().parent
    assert kdir in (package_dir / "kernels_cu", package_dir.parent / "kernels_cu")
    names = {p.name for p in _kernels.kernel_sources()}
    assert _kernels.KERNEL_SOURCE in names
    assert names >= {p.name for p in (REPO_ROOT / "kernels_cu").glob("*.cu*")}
    assert all((kdir / n).stat().st_size > 0 for n in names)


def test_kernel_binaries_are_keyed_on_every_source(tmp_path, monkeypatch):
    """CuPy caches binaries by .cu text and options only; the options carry a digest of the headers too."""
    from flashcomm_cupy import _kernels
    for p in (REPO_ROOT / "kernels_cu").glob("*.cu*"):
        (tmp_path / p.name).write_bytes(p.read_bytes())
    before = _kernels.source_digest(tmp_path)
    assert before == _kernels.source_digest(REPO_ROOT / "kernels_cu")
    header = tmp_path / "fc_quant.cuh"
    header.write_text(header.read_text() + "\n// edited\n")
    assert _kernels.source_digest(tmp_path) != before
    # experiments name their sources and switches explicitly; the production build reads no environment
    monkeypatch.setenv("FLASHCOMM_KERNEL_DIR", str(tmp_path / "ignored"))
    monkeypatch.setenv("FLASHCOMM_KERNEL_DEFINES", "FC_PROFILE_NO_WAIT")
    assert _kernels.SHIPPED.source_dir() == _kernels.kernel_dir() == (REPO_ROOT / "kernels_cu").resolve()
    assert _kernels.SHIPPED.options() == ()
    assert _kernels.KernelBuild(str(tmp_path)).source_dir() == tmp_path.resolve()
    with pytest.raises(FileNotFoundError, match="missing"):
        _kernels.KernelBuild(str(tmp_path / "missing")).source_dir()
    build = _kernels.KernelBuild(defines=("FC_PROFILE_NO_WAIT", "FC_PROFILE_LOCAL_DATA"), lineinfo=True)
    assert build.options() == ("-DFC_PROFILE_NO_WAIT", "-DFC_PROFILE_LOCAL_DATA", "-lineinfo")
    assert not build.is_shipped and _kernels.KernelBuild().is_shipped


def _imports(path: Path):
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module.split(".")[0]


def test_library_layering():
    """The library never imports the CLI stack; only _mpi.py imports mpi4py."""
    offenders = []
    for path in sorted(LIBRARY.rglob("*.py")):
        rel = path.relative_to(REPO_ROOT).as_posix()
        mods = set(_imports(path))
        for bad in sorted(mods & {"click", "rich", "cli"}):
            offenders.append(f"{rel} imports {bad}")
        if "mpi4py" in mods and rel != "flashcomm_cupy/_mpi.py":
            offenders.append(f"{rel} imports mpi4py (only flashcomm_cupy/_mpi.py may)")
    assert not offenders, "\n".join(offenders)


def _pyproject():
    tomllib = pytest.importorskip("tomllib")
    return tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())


def _package_dirs():
    """Dotted name -> directory of every package in the checkout, named as installed."""
    found = {}
    for init in LIBRARY.rglob("__init__.py"):
        rel = init.parent.relative_to(REPO_ROOT)
        found[".".join(rel.parts)] = init.parent
    for init in (REPO_ROOT / "cli").rglob("__init__.py"):
        rel = init.parent.relative_to(REPO_ROOT / "cli")
        found[".".join(("flashcomm_cupy", "cli") + rel.parts)] = init.parent
    found["flashcomm_cupy.kernels_cu"] = REPO_ROOT / "kernels_cu"
    return found


def test_pyproject_lists_every_package_and_the_console_script():
    project = _pyproject()
    listed = set(project["tool"]["setuptools"]["packages"])
    found = {name for name in _package_dirs() if "__pycache__" not in name}
    assert listed == found, f"missing from pyproject: {sorted(found - listed)}; listed but absent: {sorted(listed - found)}"
    assert project["project"]["scripts"]["flashcomm"] == "flashcomm_cupy.cli.main:main"
    extras = project["project"]["optional-dependencies"]
    assert extras["cuda12"] == ["cupy-cuda12x"] and extras["cuda13"] == ["cupy-cuda13x"]
    assert extras["mpi"] == ["mpich"]


def _local_setuptools_builds_wheels() -> bool:
    try:
        import setuptools
    except ImportError:
        return False
    version = tuple(int(p) for p in re.findall(r"\d+", setuptools.__version__)[:2])
    if version < (64, 0):
        return False
    if version >= (70, 1):  # bdist_wheel moved into setuptools
        return True
    return importlib.util.find_spec("wheel") is not None


def test_wheel_installs_cli_and_kernels_inside_the_package(tmp_path):
    # Build with the local setuptools when it can make wheels; otherwise let pip
    # fetch the build requirements, as "pip install -e ." just did.
    build_flags = ["--no-build-isolation"] if _local_setuptools_builds_wheels() else []
    src = tmp_path / "src"
    # build from a copy so the checkout gets no build/ or *.egg-info
    shutil.copytree(REPO_ROOT, src, ignore=shutil.ignore_patterns(
        ".git", ".venv*", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", ".hypothesis"))
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", *build_flags,
                           "-q", str(src), "-w", str(tmp_path / "whl")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    wheels = list((tmp_path / "whl").glob("flashcomm_cupy-*.whl"))
    assert len(wheels) == 1
    names = zipfile.ZipFile(wheels[0]).namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops == {"flashcomm_cupy", f"flashcomm_cupy-{flashcomm_cupy.__version__}.dist-info"}, tops
    for kernel in (REPO_ROOT / "kernels_cu").glob("*.cu*"):
        assert f"flashcomm_cupy/kernels_cu/{kernel.name}" in names
    for py in (REPO_ROOT / "cli").rglob("*.py"):
        assert "flashcomm_cupy/cli/" + py.relative_to(REPO_ROOT / "cli").as_posix() in names
    for table in (LIBRARY / "tuning").glob("*.json"):
        assert f"flashcomm_cupy/tuning/{table.name}" in names
    entry_points = zipfile.ZipFile(wheels[0]).read(
        f"flashcomm_cupy-{flashcomm_cupy.__version__}.dist-info/entry_points.txt").decode()
    assert re.search(r"^flashcomm = flashcomm_cupy\.cli\.main:main$", entry_points, re.M), entry_points
