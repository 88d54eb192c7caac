"""Benchmark and verification harness (library level: no click, no rich).

* :mod:`.sizes` -- message sizes with nccl-tests ``-b/-e/-f`` semantics
* :mod:`.inputs` -- deterministic per-rank inputs on NumPy or CuPy
* :mod:`.timing` -- eager and CUDA-graph timing, median per rank, max over ranks
* :mod:`.metrics` -- algbw, busbw, wire floor
* :mod:`.checks` / :mod:`.correctness` -- #wrong vs the reference, error vs exact, bounds
* :mod:`.sweep` -- the benchmark sweep; :mod:`.verify` -- the correctness sweep
* :mod:`.results` -- result rows and their JSON/CSV form
* :mod:`.machine` -- versions and per-rank device facts
* :mod:`.launch` -- relaunching under mpiexec

The names below load their module on first use, so importing one small
module (the CLI's start-up imports :mod:`.launch`) does not pull in the rest.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "BenchResult": "results", "Row": "results", "read_csv": "results", "read_json": "results",
    "write_csv": "results", "write_json": "results",
    "MessageSize": "sizes", "format_size": "sizes", "parse_size": "sizes", "sweep_sizes": "sizes",
    "SweepConfig": "sweep", "build_modes": "sweep", "run_sweep": "sweep",
    "run_verify": "verify",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
