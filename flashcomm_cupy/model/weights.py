"""Random weights, inputs and KV caches of the real shapes, sharded for tensor parallelism.

Every tensor is drawn as the *dense* tensor (seeded by what it is and which
layer it belongs to) and then cut to the rank's share, so rank ``r`` of ``N``
holds exactly the slices of the model that ``tp_size=1`` builds whole.  That
makes "the TP forward equals the dense forward" a meaningful test.  Draws use
the array module's own generator (cuRAND on the GPU: gigabytes per second, so
even 70B-sized layers initialise quickly).

Scales keep activations O(1) in fp16: projections are N(0, 1/fan_in), norm
gains 1 + N(0, 0.1**2), inputs and caches N(0, 1).
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np

from .config import TensorParallelSplit


def _seed(seed: int, *what) -> int:
    """A 63-bit seed that depends on ``seed`` and a description such as ("wq", layer)."""
    words = [int(seed) & 0xFFFFFFFF] + [zlib.crc32(str(w).encode()) for w in what]
    return int(np.random.SeedSequence(words).generate_state(2, np.uint64)[0] >> np.uint64(1))


def normal(xp, shape, seed: int, std: float, dtype, *what):
    """``N(0, std**2)`` of ``shape`` in ``dtype``, reproducible from ``(seed, *what)``."""
    rng = xp.random.default_rng(_seed(seed, *what))
    x = rng.standard_normal(shape, dtype=np.float32)
    if std != 1.0:
        x *= np.float32(std)
    return x.astype(dtype)


@dataclass
class LayerWeights:
    """One rank's share of one decoder layer (row-major ``x @ W`` layouts)."""

    attn_norm: object   # (hidden,)
    wqkv: object        # (hidden, (Hq + 2*Hkv) * hd): [q heads | k heads | v heads]
    wo: object          # (Hq * hd, hidden)
    mlp_norm: object    # (hidden,)
    wgu: object         # (hidden, 2 * ffn/N): [gate | up]
    wd: object          # (ffn/N, hidden)

    def nbytes(self) -> int:
        return sum(int(a.nbytes) for a in (self.attn_norm, self.wqkv, self.wo, self.mlp_norm,
                                          self.wgu, self.wd))


def _head_cols(w, heads, head_dim):
    """Columns of ``w`` belonging to the listed heads (contiguous or a single head)."""
    lo, hi = heads[0] * head_dim, (heads[-1] + 1) * head_dim
    return w[:, lo:hi]


def make_layer(xp, split: TensorParallelSplit, layer: int, dtype, seed: int = 0) -> LayerWeights:
    """Rank ``split.rank``'s share of layer ``layer`` of the dense model."""
    s = split.shape
    h, hd = s.hidden, s.head_dim
    w_std = 1.0 / np.sqrt(h)

    def dense(name, rows, cols, std):
        return normal(xp, (rows, cols), seed, std, dtype, name, layer)

    wq = _head_cols(dense("wq", h, s.heads * hd, w_std), split.q_head_ids(), hd)
    wk = _head_cols(dense("wk", h, s.kv_heads * hd, w_std), split.kv_head_ids(), hd)
    wv = _head_cols(dense("wv", h, s.kv_heads * hd, w_std), split.kv_head_ids(), hd)
    wqkv = xp.ascontiguousarray(xp.concatenate([wq, wk, wv], axis=1))
    del wq, wk, wv
    q_rows = slice(split.q_head_ids()[0] * hd, (split.q_head_ids()[-1] + 1) * hd)
    wo = xp.ascontiguousarray(dense("wo", s.heads * hd, h, 1.0 / np.sqrt(s.heads * hd))[q_rows])
    cols = split.ffn_slice()
    wgu = xp.ascontiguousarray(xp.concatenate(
        [dense("wgate", h, s.ffn, w_std)[:, cols], dense("wup", h, s.ffn, w_std)[:, cols]], axis=1))
    wd = xp.ascontiguousarray(dense("wdown", s.ffn, h, 1.0 / np.sqrt(s.ffn))[cols])
    return LayerWeights(attn_norm=norm_gain(xp, h, seed, dtype, "attn_norm", layer), wqkv=wqkv, wo=wo,
                        mlp_norm=norm_gain(xp, h, seed, dtype, "mlp_norm", layer), wgu=wgu, wd=wd)


def norm_gain(xp, hidden: int, seed: int, dtype, *what):
    """RMSNorm gain ``1 + N(0, 0.01)`` (not all ones, so a mis-applied gain shows in tests)."""
    g = normal(xp, (hidden,), seed, 0.1, np.float32, *what)
    return (g + np.float32(1.0)).astype(dtype)


def make_input(xp, rows: int, hidden: int, dtype, seed: int, *what):
    """The residual stream entering layer 0 (what the embedding would produce); same on every rank."""
    return normal(xp, (rows, hidden), seed, 1.0, dtype, "input", *what)


def make_kv_cache(xp, split: TensorParallelSplit, layer: int, batch: int, context: int, dtype,
                  seed: int = 0):
    """Rank's share of one layer's decode cache: ``(k_t (B, Hkv, hd, C), v (B, Hkv, C, hd))``.

    Drawn dense over all KV heads, then cut to the rank's heads.
    """
    s = split.shape
    ids = split.kv_head_ids()
    heads = slice(ids[0], ids[-1] + 1)
    k = normal(xp, (batch, s.kv_heads, context, s.head_dim), seed, 1.0, dtype, "kcache", layer, batch, context)
    v = normal(xp, (batch, s.kv_heads, context, s.head_dim), seed, 1.0, dtype, "vcache", layer, batch, context)
    k_t = xp.ascontiguousarray(k[:, heads].transpose(0, 1, 3, 2))
    return k_t, xp.ascontiguousarray(v[:, heads])
