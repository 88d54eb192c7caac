"""The tensor-parallel decoder forward pass: prefill over a prompt, and one decode step.

Per layer, on each rank (Megatron-style tensor parallelism):

    h   = RMSNorm(x)                            replicated
    qkv = h @ Wqkv                              column-parallel: this rank's heads
    a   = causal GQA attention(qkv)             this rank's heads only
    x  += all_reduce(a @ Wo)                    row-parallel partial sums, summed
    h   = RMSNorm(x)
    x  += all_reduce(silu(h @ Wg) * (h @ Wu) @ Wd)   column- then row-parallel

and a final RMSNorm.  Each layer therefore makes two all-reduces of the
full activation ``(tokens, hidden)``, which is what Flash Communication
speeds up.  Embedding and LM head are not modelled (vocabulary-dependent,
no all-reduce); positions enter only through the causal mask (rotary
embeddings are an elementwise op on Q/K that does not touch communication).

``reduce`` is the all-reduce: a callable that sums its argument over the
ranks in place, or None to skip communication (a compute-only run, used to
measure the communication share; with ``tp_size == 1`` it is not needed).
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple

from . import attention, ops, weights
from .config import ModelShape, TensorParallelSplit

Reduce = Optional[Callable[[object], None]]


class TensorParallelModel:
    """``num_layers`` layers of ``shape``, rank ``tp_rank`` of ``tp_size``'s share, on ``xp``.

    ``num_layers`` may be fewer than ``shape.layers`` (a benchmark times a
    subset and scales); layer ``i`` always gets the same weights, whatever
    the split.
    """

    def __init__(self, shape: ModelShape, tp_rank: int, tp_size: int, xp, dtype,
                 num_layers: Optional[int] = None, seed: int = 0,
                 attn_block_bytes: int = 1 << 30):
        self.shape = shape
        self.split = TensorParallelSplit(shape, tp_rank, tp_size)
        self.xp = xp
        self.dtype = dtype
        self.seed = seed
        self.num_layers = shape.layers if num_layers is None else int(num_layers)
        if not 1 <= self.num_layers <= shape.layers:
            raise ValueError(f"num_layers must be in [1, {shape.layers}], got {num_layers}")
        self.attn_block_bytes = int(attn_block_bytes)
        self.layers: List[weights.LayerWeights] = [
            weights.make_layer(xp, self.split, i, dtype, seed) for i in range(self.num_layers)]
        self.final_norm = weights.norm_gain(xp, shape.hidden, seed, dtype, "final_norm")

    def weight_bytes(self) -> int:
        return sum(w.nbytes() for w in self.layers) + int(self.final_norm.nbytes)

    # ------------------------------------------------------------------ inputs
    def prefill_input(self, batch: int, tokens: int):
        """The layer-0 residual stream for ``batch`` prompts of ``tokens`` tokens: ``(batch*tokens, hidden)``."""
        return weights.make_input(self.xp, batch * tokens, self.shape.hidden, self.dtype, self.seed,
                                  "prefill", batch, tokens)

    def decode_input(self, batch: int):
        """The layer-0 residual stream of one new token per sequence: ``(batch, hidden)``."""
        return weights.make_input(self.xp, batch, self.shape.hidden, self.dtype, self.seed, "decode", batch)

    def decode_caches(self, batch: int, context: int) -> List[Tuple[object, object]]:
        """Per layer, this rank's KV cache of ``context`` positions (the last is the step's own)."""
        return [weights.make_kv_cache(self.xp, self.split, i, batch, context, self.dtype, self.seed)
                for i in range(self.num_layers)]

    # ------------------------------------------------------------------ forward
    def prefill(self, x0, batch: int, reduce: Reduce = None):
        """Final hidden state ``(batch*tokens, hidden)`` after all layers; ``x0`` is not modified."""
        tokens = x0.shape[0] // batch
        x = x0.copy()
        sp = self.split

        def attend(qkv):
            return attention.prefill_attention(self.xp, qkv, batch, tokens, sp.q_heads, sp.kv_heads,
                                               self.shape.head_dim, self.attn_block_bytes)

        for w in self.layers:
            x = self._layer(x, w, attend, reduce)
        return ops.rms_norm(self.xp, x, self.final_norm, self.shape.norm_eps)

    def decode(self, x0, caches: Sequence[Tuple[object, object]], reduce: Reduce = None):
        """Final hidden state ``(batch, hidden)`` of one decode step over ``caches``."""
        x = x0.copy()
        sp = self.split
        for w, (k_t, v) in zip(self.layers, caches):
            def attend(qkv, k_t=k_t, v=v):
                return attention.decode_attention(self.xp, qkv, k_t, v, sp.q_heads, sp.kv_heads,
                                                  self.shape.head_dim)
            x = self._layer(x, w, attend, reduce)
        return ops.rms_norm(self.xp, x, self.final_norm, self.shape.norm_eps)

    def _layer(self, x, w: weights.LayerWeights, attend, reduce: Reduce):
        xp, eps = self.xp, self.shape.norm_eps
        h = ops.rms_norm(xp, x, w.attn_norm, eps)
        o = ops.matmul(xp, attend(ops.matmul(xp, h, w.wqkv)), w.wo)
        if reduce is not None:
            reduce(o)
        xp.add(x, o, out=x)
        h = ops.rms_norm(xp, x, w.mlp_norm, eps)
        d = ops.matmul(xp, ops.silu_mul(xp, ops.matmul(xp, h, w.wgu)), w.wd)
        if reduce is not None:
            reduce(d)
        xp.add(x, d, out=x)
        return x
