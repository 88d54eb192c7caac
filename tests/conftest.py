"""Shared pytest set-up: GPU tests are skipped, with the reason, where no CUDA GPU is visible."""
from __future__ import annotations

import pytest

from flashcomm_cupy.communicator import gpu_available


def pytest_collection_modifyitems(config, items):
    gpu_items = [item for item in items if "gpu" in item.keywords]
    if not gpu_items or gpu_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA GPUs (CuPy with a visible device); none here")
    for item in gpu_items:
        item.add_marker(skip)
