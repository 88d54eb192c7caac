"""Element types flashcomm accepts, and exact conversions to and from float32.

fp16 and bf16 widen to float32 exactly; narrowing back rounds to nearest even,
which is also what the GPU kernels' ``cvt.rn`` instructions do.  bf16 on the
host is ``ml_dtypes.bfloat16``.
"""
from __future__ import annotations

import numpy as np

try:  # ml_dtypes is a hard dependency, but keep the import error readable.
    import ml_dtypes

    bfloat16 = np.dtype(ml_dtypes.bfloat16)
except ImportError:  # pragma: no cover - exercised only on broken installs
    ml_dtypes = None
    bfloat16 = None

#: name -> numpy dtype, in the order the CLI lists them
DTYPES = {"float16": np.dtype(np.float16), "float32": np.dtype(np.float32)}
if bfloat16 is not None:
    DTYPES["bfloat16"] = bfloat16

ALIASES = {"half": "float16", "fp16": "float16", "f16": "float16", "bf16": "bfloat16",
           "float": "float32", "fp32": "float32", "f32": "float32"}

#: dtype -> small integer used by the kernels (FC_DTYPE)
KERNEL_DTYPE_CODE = {"float16": 0, "bfloat16": 1, "float32": 2}


def resolve_dtype(name_or_dtype) -> np.dtype:
    """Map 'fp16', 'bf16', np.float16, ... to a supported numpy dtype or raise ValueError."""
    if isinstance(name_or_dtype, str):
        key = ALIASES.get(name_or_dtype.lower(), name_or_dtype.lower())
        if key not in DTYPES:
            raise ValueError(f"unsupported dtype {name_or_dtype!r}; use one of {', '.join(DTYPES)}")
        return DTYPES[key]
    dt = np.dtype(name_or_dtype)
    if dt not in DTYPES.values():
        raise ValueError(f"unsupported dtype {dt}; flashcomm reduces float16, bfloat16 and float32")
    return dt


def dtype_name(dt) -> str:
    dt = np.dtype(dt)
    for name, d in DTYPES.items():
        if d == dt:
            return name
    raise ValueError(f"unsupported dtype {dt}")


def to_f32(x: np.ndarray) -> np.ndarray:
    """Exact widening to a contiguous 1-D float32 array."""
    return np.ascontiguousarray(x, dtype=np.float32).reshape(-1)


def from_f32(x32: np.ndarray, dt) -> np.ndarray:
    """Round-to-nearest-even narrowing from float32 (overflow gives inf, as in IEEE)."""
    dt = np.dtype(dt)
    if dt == np.float32:
        return x32.astype(np.float32, copy=True)
    with np.errstate(over="ignore"):
        return x32.astype(dt)
