"""flashcomm: fused, low-bit quantized all-reduce over CUDA IPC (Flash Communication, arXiv 2412.04964).

``import flashcomm_cupy`` works without a GPU and without CuPy; the GPU
backend imports CuPy only when it is created.
"""
from __future__ import annotations

import os as _os

__version__ = "0.1.0"

# In a source checkout (PYTHONPATH=.), cli/ and kernels_cu/ sit beside this
# package; an install maps them into it (pyproject's package-dir).  Let the
# checkout resolve flashcomm_cupy.cli the same way.
_checkout = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if _os.path.isdir(_os.path.join(_checkout, "cli")) and not _os.path.isdir(
        _os.path.join(_os.path.dirname(_os.path.abspath(__file__)), "cli")):
    __path__.append(_checkout)  # type: ignore[name-defined]  # noqa: F821

from .config import ALGOS, Codec, Mode, parse_bits  # noqa: E402
from .communicator import Communicator, as_numpy, gpu_available  # noqa: E402
from .errors import FlashTimeoutError  # noqa: E402
from .reference import error_stats, exact_sum, flash_all_reduce_reference  # noqa: E402

__all__ = ["ALGOS", "Codec", "Communicator", "FlashTimeoutError", "Mode", "__version__", "as_numpy", "error_stats",
           "exact_sum", "flash_all_reduce_reference", "gpu_available", "parse_bits"]
