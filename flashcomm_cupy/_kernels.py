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


# Mirror of `struct FcArgs` in fc_allreduce.cu (natural alignment, 144 bytes).
_ARG_FIELDS = [
    ("in_ptr", "<u8"), ("out_ptr", "<u8"), ("n", "<i8"), ("seg_elems", "<i8"), ("peers", "<u8"),
    ("err", "<u8"), ("slot_bytes", "<i8"), ("flags_off", "<i8"), ("rs_off", "<i8"), ("ag_off", "<i8"),
    ("os_off", "<i8"), ("timeout_ns", "<i8"), ("rank", "<i4"), ("world", "<i4"), ("group", "<i4"),
    ("flags", "<i4"), ("max_blocks", "<i4"), ("rot_norm", "<f4"), ("units", "<i4"), ("ll_tile", "<i4"),
    ("ll_off", "<i8"), ("ll_slot_bytes", "<i8"),
]
ARGS_DTYPE = np.dtype({
    "names": [f for f, _ in _ARG_FIELDS],
    "formats": [t for _, t in _ARG_FIELDS],
    "offsets": [0, 8, 16, 24, 32, 40, 48, 56, 64, 72, 80, 88, 96, 100, 104, 108, 112, 116, 120, 124, 128, 136],
    "itemsize": 144,
})

FLAG_ROTATE = 1
FLAG_SYM = 2


def source_digest(directory: Path) -> str:
    """Hash of every kernel source in ``directory``.

    CuPy's on-disk binary cache is keyed on the ``.cu`` text and the options,
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


@functools.lru_cache(maxsize=None)
def _compiled(directory: Path, dtype_code: int, rs_bits: int, ag_bits: int, defines: tuple):
    import cupy
    options = ("-std=c++17", f"-I{directory}", f"-DFC_DT={int(dtype_code)}",
               f"-DFC_RS_BITS={int(rs_bits)}", f"-DFC_AG_BITS={int(ag_bits)}",
               f"-DFC_SOURCE_DIGEST=0x{source_digest(directory)}ull") + defines
    if os.environ.get("FLASHCOMM_KERNEL_LINEINFO"):
        options += ("-lineinfo",)
    return cupy.RawModule(code=(directory / KERNEL_SOURCE).read_text(), options=options)


def module(dtype_code: int, rs_bits: int, ag_bits: int):
    """The compiled module for one specialisation (0 bits = lossless); cached per process.

    CuPy also caches the binary on disk, so later processes skip NVRTC.
    """
    return _compiled(kernel_dir(), int(dtype_code), int(rs_bits), int(ag_bits), profiling_defines())


def function(name: str, dtype_code: int, rs_bits, ag_bits):
    return module(dtype_code, rs_bits or 0, ag_bits or 0).get_function(name)
