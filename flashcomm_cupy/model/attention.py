"""Causal grouped-query attention, computed for real (no shortcuts), for prefill and decode.

Layouts (one rank's heads; ``g`` = query heads per KV head, ``hd`` = head dim):

* prefill input ``qkv``: ``(P*T, (Hq + 2*Hkv) * hd)`` -- the fused QKV
  projection of ``P`` sequences of ``T`` tokens; query head ``h`` reads KV head
  ``h // g``.
* decode cache: keys stored transposed, ``k_t: (B, Hkv, hd, C)``, values
  ``v: (B, Hkv, C, hd)``; the step's own key/value go to position ``C - 1``, so
  a step attends over exactly ``C`` positions and repeated steps are
  identical (what a benchmark needs).

Scores are formed by GEMMs and normalised by :func:`ops.masked_softmax_`.
Prefill works on blocks of KV heads whose score matrices fit in
``block_bytes``, which bounds memory at long prompts (8192 tokens x 8 query
heads of fp16 scores is 1 GiB).
"""
from __future__ import annotations

import math

from . import ops


def heads_per_block(kv_heads: int, group: int, batch: int, tokens: int, itemsize: int,
                    block_bytes: int) -> int:
    """How many KV heads' score matrices (``batch*group*tokens**2`` each) fit in ``block_bytes``."""
    per_head = batch * group * tokens * tokens * itemsize
    return max(1, min(kv_heads, block_bytes // max(1, per_head)))


def prefill_attention(xp, qkv, batch: int, tokens: int, q_heads: int, kv_heads: int,
                      head_dim: int, block_bytes: int = 1 << 30):
    """Causal attention of ``batch`` sequences of ``tokens`` tokens; returns ``(batch*tokens, q_heads*head_dim)``."""
    g = q_heads // kv_heads
    qw, kw = q_heads * head_dim, kv_heads * head_dim
    q = qkv[:, :qw].reshape(batch, tokens, kv_heads, g, head_dim)
    k = qkv[:, qw:qw + kw].reshape(batch, tokens, kv_heads, head_dim)
    v = qkv[:, qw + kw:qw + 2 * kw].reshape(batch, tokens, kv_heads, head_dim)
    out = xp.empty((batch, tokens, kv_heads, g, head_dim), dtype=qkv.dtype)
    step = heads_per_block(kv_heads, g, batch, tokens, qkv.dtype.itemsize, block_bytes)
    scale = 1.0 / math.sqrt(head_dim)
    for h0 in range(0, kv_heads, step):
        hb = min(step, kv_heads - h0)
        # (P, hb, g*T, hd): all query rows of a KV head stacked, T per query head
        qb = xp.ascontiguousarray(q[:, :, h0:h0 + hb].transpose(0, 2, 3, 1, 4)).reshape(
            batch, hb, g * tokens, head_dim)
        kb_t = xp.ascontiguousarray(k[:, :, h0:h0 + hb].transpose(0, 2, 3, 1))  # (P, hb, hd, T)
        vb = xp.ascontiguousarray(v[:, :, h0:h0 + hb].transpose(0, 2, 1, 3))    # (P, hb, T, hd)
        scores = ops.matmul(xp, qb, kb_t)                                       # (P, hb, g*T, T)
        ops.masked_softmax_(xp, scores, tokens, scale)
        ob = ops.matmul(xp, scores, vb).reshape(batch, hb, g, tokens, head_dim)
        out[:, :, h0:h0 + hb] = ob.transpose(0, 3, 1, 2, 4)
        del scores
    return out.reshape(batch * tokens, q_heads * head_dim)


def decode_attention(xp, qkv, k_t, v, q_heads: int, kv_heads: int, head_dim: int):
    """One decode step for ``B`` sequences over caches of ``C`` positions; returns ``(B, q_heads*head_dim)``.

    Writes the step's key and value into position ``C - 1`` of ``k_t``/``v``.
    """
    batch, g = qkv.shape[0], q_heads // kv_heads
    qw, kw = q_heads * head_dim, kv_heads * head_dim
    q = qkv[:, :qw].reshape(batch, kv_heads, g, head_dim)
    k_t[:, :, :, -1] = qkv[:, qw:qw + kw].reshape(batch, kv_heads, head_dim)
    v[:, :, -1, :] = qkv[:, qw + kw:qw + 2 * kw].reshape(batch, kv_heads, head_dim)
    scores = ops.matmul(xp, xp.ascontiguousarray(q), k_t)   # (B, Hkv, g, C)
    ops.masked_softmax_(xp, scores, 1, 1.0 / math.sqrt(head_dim))
    return ops.matmul(xp, scores, v).reshape(batch, q_heads * head_dim)


def naive_attention(q, k, v, causal_offset: int = 0):
    """Loop-by-loop float64 reference for tests: ``q (Tq, Hq, hd)``, ``k, v (Tk, Hkv, hd)``.

    Query ``i`` sees keys ``0 .. i + causal_offset``; head ``h`` reads KV head
    ``h // (Hq // Hkv)``.  Returns ``(Tq, Hq, hd)`` float64.
    """
    import numpy as np
    tq, hq, hd = q.shape
    g = hq // k.shape[1]
    out = np.zeros((tq, hq, hd))
    for h in range(hq):
        for i in range(tq):
            n = i + causal_offset + 1
            s = np.array([float(np.dot(q[i, h].astype(np.float64), k[j, h // g].astype(np.float64)))
                          for j in range(n)]) / math.sqrt(hd)
            p = np.exp(s - s.max())
            p /= p.sum()
            out[i, h] = p @ v[:n, h // g].astype(np.float64)
    return out
