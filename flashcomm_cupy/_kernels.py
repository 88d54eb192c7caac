"""The only module that reads ``kernels_cu``: finds the CUDA sources, compiles
one CuPy ``RawModule`` per (dtype, reduce-scatter bits, all-gather bits) on
first use, and describes the kernels' argument struct.
"""
from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path

import numpy as np

KERNEL_SOURCE = "fc_allreduce.cu"


def kernel_dir() -> Path:
    """Directory holding the ``.cu``/``.cuh`` sources (installed or checkout).

    ``$FLASHCOMM_KERNEL_DIR`` overrides it, for A/B timing of two kernel
    versions in one run (``benchmarks/kernel_variants.py``).
    """
    override = os.environ.get("FLASHCOMM_KERNEL_DIR")
    if override:
        cand = Path(override).resolve()
        if not (cand / KERNEL_SOURCE).is_file():
            raise FileNotFoundError(f"FLASHCOMM_KERNEL_DIR={override} has no {KERNEL_SOURCE}")
        return cand
    here = Path(__file__).resolve().parent
    for cand in (here / "kernels_cu", here.parent / "kernels_cu"):
        if (cand / KERNEL_SOURCE).is_file():
            return cand
    raise FileNotFoundError(f"flashcomm kernel sources ({KERNEL_SOURCE}) not found next to {here}")


def kernel_sources() -> list:
    d = kernel_dir()
    return sorted(p for p in d.iterdir() if p.suffix in (".cu", ".cuh"))


# Mirror of `struct FcArgs` in fc_args.cuh (natural alignment, 248 bytes;
# tests/test_kernels_compile.py pins every offset with static_asserts).
_ARG_FIELDS = [
    ("in_ptr", "<u8", 0), ("out_ptr", "<u8", 8), ("n", "<i8", 16), ("seg_elems", "<i8", 24), ("err", "<u8", 32),
    ("slot_bytes", "<i8", 40), ("flags_off", "<i8", 48), ("rs_off", "<i8", 56), ("ag_off", "<i8", 64),
    ("os_off", "<i8", 72), ("timeout_ns", "<i8", 80), ("rank", "<i4", 88), ("world", "<i4", 92),
    ("group", "<i4", 96), ("flags", "<i4", 100), ("max_blocks", "<i4", 104), ("rot_norm", "<f4", 108),
    ("units", "<i4", 112), ("ll_tile", "<i4", 116), ("ll_off", "<i8", 120), ("ll_slot_bytes", "<i8", 128),
    ("peers", ("<u8", (8,)), 136), ("ts_epoch_off", "<i8", 200), ("os_epoch_off", "<i8", 208),
    ("ll_epoch_off", "<i8", 216), ("poison_off", "<i8", 224), ("ag_flags_off", "<i8", 232),
    ("os_flags_off", "<i8", 240),
]
ARGS_DTYPE = np.dtype({
    "names": [f for f, _, _ in _ARG_FIELDS],
    "formats": [t for _, t, _ in _ARG_FIELDS],
    "offsets": [o for _, _, o in _ARG_FIELDS],
    "itemsize": 248,
})

# Mirror of `struct FcError` in fc_args.cuh (eight uint32 words in host-mapped
# memory; pinned by tests/test_kernels_compile.py) and its codes.
ERROR_FIELDS = ("code", "rank", "peer", "block", "epoch", "abort", "late", "pad")
ERR_TIMEOUT = 1  # FC_ERR_TIMEOUT: this rank waited past the bound for `peer`
ERR_POISON = 2   # FC_ERR_POISON: rank `peer` gave up and poisoned this rank

FLAG_ROTATE = 1
FLAG_SYM = 2


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


def profiling_defines() -> tuple:
    """Extra ``-D`` options from ``$FLASHCOMM_KERNEL_DEFINES`` (space separated).

    Only for the leave-one-stage-out timing variants in
    ``benchmarks/kernel_variants.py`` (``FC_PROFILE_NO_WAIT``,
    ``FC_PROFILE_LOCAL_DATA``): those kernels compute wrong results.
    """
    return tuple(f"-D{d}" for d in os.environ.get("FLASHCOMM_KERNEL_DEFINES", "").split())


#: elements per thread and unit (FC_ELEMS in fc_common.cuh) unless a module asks for fewer
DEFAULT_UNIT_ELEMS = 32
#: unit sizes a module can be built with; a group of g elements needs g <= 32 * unit elements
UNIT_ELEMS = (16, 32)


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


@functools.lru_cache(maxsize=None)
def _compiled(directory: Path, dtype_code: int, rs_bits: int, ag_bits: int, elems: int, defines: tuple):
    options = BASE_OPTIONS + (f"-I{directory}", f"-DFC_DT={int(dtype_code)}",
                              f"-DFC_RS_BITS={int(rs_bits)}", f"-DFC_AG_BITS={int(ag_bits)}",
                              f"-DFC_SOURCE_DIGEST=0x{source_digest(directory)}ull") + defines
    if elems != DEFAULT_UNIT_ELEMS:
        options += (f"-DFC_ELEMS={int(elems)}",)
    if os.environ.get("FLASHCOMM_KERNEL_LINEINFO"):
        options += ("-lineinfo",)
    return load_module((directory / KERNEL_SOURCE).read_text(), options)


def module(dtype_code: int, rs_bits: int, ag_bits: int, elems: int = DEFAULT_UNIT_ELEMS):
    """The compiled module for one specialisation (0 bits = lossless); cached per process.

    ``elems`` is the unit size (elements per thread and unit, FC_ELEMS); the
    kernels of one module all use it.  Binaries are also cached on disk
    (:func:`load_module`), so later processes skip NVRTC.
    """
    if elems not in UNIT_ELEMS:
        raise ValueError(f"unit size {elems} is not one of {UNIT_ELEMS}")
    return _compiled(kernel_dir(), int(dtype_code), int(rs_bits), int(ag_bits), int(elems), profiling_defines())


def function(name: str, dtype_code: int, rs_bits, ag_bits, elems: int = DEFAULT_UNIT_ELEMS):
    return module(dtype_code, rs_bits or 0, ag_bits or 0, elems).get_function(name)
