"""The only module that reads ``kernels_cu``: finds the CUDA sources and compiles one CuPy
``RawModule`` per build (dtype, reduce-scatter bits, all-gather bits, unit size) on first use.

What gets compiled is explicit: a :class:`KernelBuild` (source directory, extra ``-D``
switches, line info).  Production runs :data:`SHIPPED`, the sources installed with the package
and no switches; experiments (``benchmarks/kernel_variants.py``, ``kernel_solo.py``) pass their
own, e.g. ``KernelBuild(defines=("FC_PROFILE_NO_WAIT",))`` or another checkout's directory.  No
environment variable is read here.
"""
from __future__ import annotations

import functools
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple

from ... import codecs

KERNEL_SOURCE = "fc_allreduce.cu"


def shipped_kernel_dir() -> Path:
    """Directory holding the shipped ``.cu``/``.cuh`` sources (installed or checkout)."""
    here = Path(__file__).resolve().parents[2]  # the flashcomm_cupy package
    for cand in (here / "kernels_cu", here.parent / "kernels_cu"):
        if (cand / KERNEL_SOURCE).is_file():
            return cand
    raise FileNotFoundError(f"flashcomm kernel sources ({KERNEL_SOURCE}) not found next to {here}")


@dataclass(frozen=True)
class KernelBuild:
    """Which kernel sources and compile-time switches a backend runs.

    ``directory``: a kernel source directory (None: the shipped one), for an A/B of two kernel
    versions in one run.  ``defines``: extra ``-D`` switches (``"FC_PROFILE_NO_WAIT"``,
    ``"FC_BATCH=2"``), for leave-one-stage-out timing; such kernels may compute wrong results.
    ``lineinfo``: compile with ``-lineinfo`` (Nsight Compute's source view; same code).
    """

    directory: Optional[str] = None
    defines: Tuple[str, ...] = ()
    lineinfo: bool = False

    def source_dir(self) -> Path:
        if self.directory is None:
            return shipped_kernel_dir()
        cand = Path(self.directory).resolve()
        if not (cand / KERNEL_SOURCE).is_file():
            raise FileNotFoundError(f"kernel directory {self.directory} has no {KERNEL_SOURCE}")
        return cand

    def options(self) -> tuple:
        return tuple(f"-D{d}" for d in self.defines) + (("-lineinfo",) if self.lineinfo else ())

    @property
    def is_shipped(self) -> bool:
        return self == SHIPPED


#: what production runs: the shipped sources, no switches
SHIPPED = KernelBuild()


def kernel_dir() -> Path:
    """The shipped kernel source directory."""
    return shipped_kernel_dir()


def kernel_sources(build: KernelBuild = SHIPPED) -> list:
    d = build.source_dir()
    return sorted(p for p in d.iterdir() if p.suffix in (".cu", ".cuh"))


def source_digest(directory: Path) -> str:
    """Hash of every kernel source in ``directory``.

    The on-disk binary cache is keyed on the ``.cu`` text and the options,
    not on the headers it includes, so the digest goes into the options: an
    edited header can never load a stale binary.
    """
    h = hashlib.sha256()
    for p in sorted(q for q in directory.iterdir() if q.suffix in (".cu", ".cuh")):
        h.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()[:16]


#: elements per thread and unit (FC_ELEMS in fc_common.cuh) unless a module asks for fewer
DEFAULT_UNIT_ELEMS = 32
#: unit sizes a module can be built with; a group of g elements needs g <= 32 * unit elements
UNIT_ELEMS = codecs.UNIT_ELEMS


#: NVRTC options every module is built with.  IEEE subnormals (-ftz=false):
#: the NumPy reference keeps them, and bf16 / float32 inputs can be subnormal.
BASE_OPTIONS = ("-std=c++17", "-ftz=false")


def cache_dir() -> Path:
    """Where compiled kernel binaries are kept between processes."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "flashcomm" / "kernels"


def _nvrtc_binary(code: str, options: tuple):
    """NVRTC output (cubin bytes or PTX) for ``code``, compiled with exactly ``options``.

    Not through ``cupy.RawModule(code=...)``: CuPy appends ``-ftz=true`` to
    every compile it caches, after the caller's options, and NVRTC honours the
    last one, so bf16/float32 subnormals would be flushed on the GPU but not
    in the reference (docs/reliability.md).
    """
    from cupy.cuda import compiler
    out = compiler.compile_using_nvrtc(code, options)
    if isinstance(out, tuple):  # (binary, name mapping) since CuPy 9
        out = out[0]
    return out.encode() if isinstance(out, str) else bytes(out)


def load_module(code: str, options: tuple):
    """A ``cupy.RawModule`` of ``code`` built with ``options`` (and nothing else).

    Binaries are cached on disk under :func:`cache_dir`, keyed on the source,
    the options, the NVRTC version and the device's compute capability, and
    written atomically (ranks of one host compile concurrently).
    """
    import cupy
    from cupy.cuda import nvrtc
    cc = cupy.cuda.Device().compute_capability
    key = hashlib.sha256(repr((code, options, nvrtc.getVersion(), cc)).encode()).hexdigest()[:32]
    d = cache_dir()
    for suffix in (".cubin", ".ptx"):
        path = d / (key + suffix)
        if path.is_file():
            return cupy.RawModule(path=str(path))
    binary = _nvrtc_binary(code, options)
    path = d / (key + (".cubin" if binary[:4] == b"\x7fELF" else ".ptx"))
    d.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(binary)
    os.replace(tmp, path)
    return cupy.RawModule(path=str(path))


def build_options(directory: Path, dtype_code: int, rs_bits: int, ag_bits: int, elems: int,
                  build: KernelBuild = SHIPPED) -> tuple:
    """NVRTC options of one module of ``fc_allreduce.cu`` (also what the compile tests pass nvcc)."""
    options = BASE_OPTIONS + (f"-I{directory}", f"-DFC_DT={int(dtype_code)}",
                              f"-DFC_RS_BITS={int(rs_bits)}", f"-DFC_AG_BITS={int(ag_bits)}",
                              f"-DFC_SOURCE_DIGEST=0x{source_digest(directory)}ull")
    if elems != DEFAULT_UNIT_ELEMS:
        options += (f"-DFC_ELEMS={int(elems)}",)
    return options + build.options()


@functools.lru_cache(maxsize=None)
def _compiled(build: KernelBuild, dtype_code: int, rs_bits: int, ag_bits: int, elems: int):
    directory = build.source_dir()
    options = build_options(directory, dtype_code, rs_bits, ag_bits, elems, build)
    return load_module((directory / KERNEL_SOURCE).read_text(), options)


def module(dtype_code: int, rs_bits: int, ag_bits: int, elems: int = DEFAULT_UNIT_ELEMS,
           build: KernelBuild = SHIPPED):
    """The compiled module for one specialisation (0 bits = lossless); cached per process.

    ``elems`` is the unit size (elements per thread and unit, FC_ELEMS); the
    kernels of one module all use it.  Binaries are also cached on disk
    (:func:`load_module`), so later processes skip NVRTC.
    """
    if elems not in UNIT_ELEMS:
        raise ValueError(f"unit size {elems} is not one of {UNIT_ELEMS}")
    return _compiled(build, int(dtype_code), int(rs_bits or 0), int(ag_bits or 0), int(elems))


#: Kernels that kernel trees from before them lack, each with the kernel there that computes the
#: same results (A/B runs against an older tree: ``kernel_variants.py --base-dir``, ``loopback_time.py
#: --variants``, the loopback tests' ``--kernel-dir``).  The shipped tree has them all.
STAND_INS = {"fc_llq_oneshot_rot": "fc_llq_oneshot"}


def function(name: str, dtype_code: int, rs_bits, ag_bits, elems: int = DEFAULT_UNIT_ELEMS,
             build: KernelBuild = SHIPPED):
    """Kernel ``name`` of the module for (dtype code, bits, unit size); in another kernel tree
    that lacks it, its stand-in (:data:`STAND_INS`)."""
    mod = module(dtype_code, rs_bits or 0, ag_bits or 0, elems, build)
    try:
        return mod.get_function(name)
    except Exception:  # CUDA_ERROR_NOT_FOUND from the driver
        if build.is_shipped or name not in STAND_INS:
            raise
        return mod.get_function(STAND_INS[name])


def kernel(name: str, key, build: KernelBuild = SHIPPED):
    """Kernel ``name`` of the module a :class:`~flashcomm_cupy.backends.flash.plan.KernelKey` names."""
    return function(name, key.dtype_code, key.rs_bits, key.ag_bits, key.unit_elems, build)


_COMPILE_ONE = ("import sys; from flashcomm_cupy.backends.flash import kernels as k; "
                "d, defs, dt, rs, ag, e = sys.argv[1:7]; "
                "k.module(int(dt), int(rs), int(ag), int(e), k.KernelBuild(d or None, tuple(defs.split())))")


def compile_in_parallel(specs, timeout_s: float = 300.0, workers: Optional[int] = None) -> list:
    """Compile every module of ``specs`` -- (:class:`KernelBuild`, dtype code, rs bits, ag bits,
    unit elems) -- into the on-disk cache (:func:`load_module`), one process per module, up to
    ``workers`` (default: half the cores) at a time: NVRTC holds one core per module, and one
    after another they take minutes.  Returns one line per module that did not compile (whoever
    loads it then compiles it again and raises the error there)."""
    import subprocess
    import sys
    from concurrent.futures import ThreadPoolExecutor

    def one(spec):
        build, dt, rs, ag, elems = spec
        argv = [sys.executable, "-c", _COMPILE_ONE, build.directory or "", " ".join(build.defines),
                str(int(dt)), str(int(rs or 0)), str(int(ag or 0)), str(int(elems))]
        try:
            r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return f"compile {spec[1:]}: no module after {timeout_s:.0f} s"
        if r.returncode:
            return f"compile {spec[1:]} failed: {(r.stderr or r.stdout).strip().splitlines()[-1:]}"
        return None

    specs = list(dict.fromkeys(specs))
    workers = workers or max(1, (os.cpu_count() or 2) // 2)
    with ThreadPoolExecutor(max_workers=max(1, min(len(specs), workers))) as pool:
        return [line for line in pool.map(one, specs) if line]


def read_source(filename: str, build: KernelBuild = SHIPPED) -> str:
    """The text of one ``.cu`` file of the kernel directory, for the kernels outside the
    all-reduce that CuPy compiles as it compiles any source (the IPC canary, the benchmark
    model's kernels: CuPy's own options, ``-ftz=true`` among them, as when they were Python
    strings)."""
    return (build.source_dir() / filename).read_text()
