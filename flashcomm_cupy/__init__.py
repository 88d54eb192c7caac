"""flashcomm: fused, low-bit quantized all-reduce over CUDA IPC (Flash Communication, arXiv 2412.04964).

``import flashcomm_cupy`` works without a GPU and without CuPy; the GPU
backend imports CuPy only when it is created.  The command line
(``flashcomm_cupy.cli``) and the kernel sources sit at the top of a checkout
(``cli/``, ``kernels_cu/``) and are mapped into this package by the install
(``pip install -e .`` or a wheel; pyproject's ``package-dir``); an uninstalled
checkout runs the command line as ``python -m cli.main``.
"""
from __future__ import annotations

__version__ = "0.1.0"

from .config import ALGOS, Codec, Mode, parse_bits  # noqa: E402  (after __version__, which harness.machine imports)
from .communicator import Communicator, as_numpy, gpu_available  # noqa: E402
from .errors import FlashTimeoutError  # noqa: E402
from .reference import error_stats, exact_sum, flash_all_reduce_reference  # noqa: E402

__all__ = ["ALGOS", "Codec", "Communicator", "FlashTimeoutError", "Mode", "__version__", "as_numpy", "error_stats",
           "exact_sum", "flash_all_reduce_reference", "gpu_available", "parse_bits"]
