"""End-to-end benchmark: a tensor-parallel LLaMA-style decoder forward over flashcomm all-reduces.

* :mod:`.config` -- model shapes (LLaMA-3 70B/8B presets, custom) and the TP split.
* :mod:`.weights` -- random weights/inputs/KV caches of the real shapes, sharded from the dense model.
* :mod:`.ops`, :mod:`.attention` -- RMSNorm, SiLU gating, causal GQA attention (NumPy or CuPy).
* :mod:`.forward` -- :class:`TensorParallelModel`: prefill and decode steps.
* :mod:`.timing`, :mod:`.benchmark` -- timing across ranks and the sweep behind ``flashcomm model``.

The same code runs on NumPy (CPU backend, tests) and CuPy (GPU backends).
"""
from .benchmark import ModelBenchConfig, run_model_benchmark
from .config import PRESETS, ModelShape, TensorParallelSplit, get_shape
from .forward import TensorParallelModel

__all__ = ["PRESETS", "ModelBenchConfig", "ModelShape", "TensorParallelModel", "TensorParallelSplit",
           "get_shape", "run_model_benchmark"]
