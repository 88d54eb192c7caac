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


# Mirror of `struct FcArgs` in fc_allreduce.cu (natural alignment, 200 bytes).
_ARG_FIELDS = [
    ("in_ptr", "<u8", 0), ("out_ptr", "<u8", 8), ("n", "<i8", 16), ("seg_elems", "<i8", 24), ("err", "<u8", 32),
    ("slot_bytes", "<i8", 40), ("flags_off", "<i8", 48), ("rs_off", "<i8", 56), ("ag_off", "<i8", 64),
    ("os_off", "<i8", 72), ("timeout_ns", "<i8", 80), ("rank", "<i4", 88), ("world", "<i4", 92),
    ("group", "<i4", 96), ("flags", "<i4", 100), ("max_blocks", "<i4", 104), ("rot_norm", "<f4", 108),
    ("units", "<i4", 112), ("ll_tile", "<i4", 116), ("ll_off", "<i8", 120), ("ll_slot_bytes", "<i8", 128),
    ("peers", ("<u8", (8,)), 136),
]
ARGS_DTYPE = np.dtype({
    "names": [f for f, _, _ in _ARG_FIELDS],
    "formats": [t for _, t, _ in _ARG_FIELDS],
    "offsets": [o for _, _, o in _ARG_FIELDS],
    "itemsize": 200,
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


#: elements per thread and unit (FC_ELEMS in fc_common.cuh) unless a module asks for fewer
DEFAULT_UNIT_ELEMS = 32
#: unit sizes a module can be built with; a group of g elements needs g <= 32 * unit elements
UNIT_ELEMS = (16, 32)


@functools.lru_cache(maxsize=None)
def _compiled(directory: Path, dtype_code: int, rs_bits: int, ag_bits: int, elems: int, defines: tuple):
    import cupy
    options = ("-std=c++17", f"-I{directory}", f"-DFC_DT={int(dtype_code)}",
               f"-DFC_RS_BITS={int(rs_bits)}", f"-DFC_AG_BITS={int(ag_bits)}",
               f"-DFC_SOURCE_DIGEST=0x{source_digest(directory)}ull") + defines
    if elems != DEFAULT_UNIT_ELEMS:
        options += (f"-DFC_ELEMS={int(elems)}",)
    if os.environ.get("FLASHCOMM_KERNEL_LINEINFO"):
        options += ("-lineinfo",)
    return cupy.RawModule(code=(directory / KERNEL_SOURCE).read_text(), options=options)


def module(dtype_code: int, rs_bits: int, ag_bits: int, elems: int = DEFAULT_UNIT_ELEMS):
    """The compiled module for one specialisation (0 bits = lossless); cached per process.

    ``elems`` is the unit size (elements per thread and unit, FC_ELEMS); the
    kernels of one module all use it.  CuPy also caches the binary on disk, so
    later processes skip NVRTC.
    """
    if elems not in UNIT_ELEMS:
        raise ValueError(f"unit size {elems} is not one of {UNIT_ELEMS}")
    return _compiled(kernel_dir(), int(dtype_code), int(rs_bits), int(ag_bits), int(elems), profiling_defines())


def function(name: str, dtype_code: int, rs_bits, ag_bits, elems: int = DEFAULT_UNIT_ELEMS):
    return module(dtype_code, rs_bits or 0, ag_bits or 0, elems).get_function(name)
