"""Tensor-parallel all-MiniLM-L6-v2 (BERT encoder + mean pooling + L2 norm) on NumPy or CuPy.

Megatron-style split over ``tp_size`` ranks: each rank holds ``heads /
tp_size`` attention heads (column-parallel Q/K/V, row-parallel output
projection) and ``intermediate / tp_size`` FFN columns (column-parallel up,
row-parallel down).  Each row-parallel projection yields a partial sum that
``reduce(partial, site)`` turns into the full sum -- ``comm.all_reduce`` in
the study; its bias is added once, after the reduction.  Everything else
(embeddings, LayerNorm, residuals, pooling) is replicated, so all ranks hold
the same hidden states after every reduction.

Tokens are packed, not padded: the all-reduce sees ``[tokens, hidden]`` of
real tokens only, as a serving engine packs them (padding would put zeros
into the quantization groups).  Attention alone pads each batch to its
longest sentence and masks the padded keys.

Numerics: float32 throughout (the checkpoint's dtype); the all-reduce
payload may be narrower (``reduce`` decides).  GELU is the exact erf form the
config names; NumPy has no ``erf``, so both array modules use the same
rational approximation (Abramowitz & Stegun 7.1.26, |error| <= 1.5e-7; in
float32 the cancellation near 0 adds up to 4 ulp of 1, the rounding of
GELU's ``1 + erf`` anyway), which keeps NumPy and CuPy runs comparable.
Against sentence-transformers (PyTorch) the embeddings differ by < 2e-7.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Sequence

import numpy as np

from .assets import BertConfig

F32 = np.float32
#: ``reduce(partial, site)`` -> the sum over ranks; ``site`` names the projection, e.g. "L3.attn"
Reduce = Callable[[object, str], object]


def sites(layers: int) -> List[str]:
    """The all-reduce sites in call order: ``L0.attn, L0.ffn, L1.attn, ...``."""
    return [f"L{i}.{part}" for i in range(layers) for part in ("attn", "ffn")]


@dataclass
class _LayerShard:
    wqkv: object      # [hidden, 3 * local_width]: this rank's Q | K | V columns
    bqkv: object
    wo: object        # [local_width, hidden]: rows of the output projection
    bo: object        # added after the all-reduce
    ln1: tuple        # (gain, bias) after attention
    wi: object        # [hidden, local_ffn]
    bi: object
    wd: object        # [local_ffn, hidden]
    bd: object
    ln2: tuple


class TensorParallelMiniLM:
    """Rank ``tp_rank`` of ``tp_size``'s share of the encoder, its arrays on ``xp`` (numpy or cupy).

    ``weights`` are the checkpoint's tensors by Hugging Face name (as
    :func:`.assets.load_weights` returns them).  Raises ValueError when
    ``tp_size`` does not divide the head count and the FFN width.
    """

    def __init__(self, config: BertConfig, weights: Dict[str, np.ndarray], tp_rank: int, tp_size: int, xp):
        if config.heads % tp_size or config.intermediate % tp_size:
            raise ValueError(f"tensor parallelism {tp_size} must divide the {config.heads} heads and the "
                             f"FFN width {config.intermediate}: use 1, 2, 3, 4, 6 or 12 ranks")
        if not 0 <= tp_rank < tp_size:
            raise ValueError(f"rank {tp_rank} out of range for {tp_size} ranks")
        self.config, self.xp, self.tp_rank, self.tp_size = config, xp, tp_rank, tp_size
        self.local_heads = config.heads // tp_size

        def dev(a):
            return xp.asarray(np.ascontiguousarray(a, dtype=F32))

        e = "embeddings."
        self.word_emb = dev(weights[e + "word_embeddings.weight"])
        self.pos_emb = dev(weights[e + "position_embeddings.weight"])
        self.type0_emb = dev(weights[e + "token_type_embeddings.weight"][0])
        self.emb_ln = (dev(weights[e + "LayerNorm.weight"]), dev(weights[e + "LayerNorm.bias"]))
        self.layers = [self._shard_layer(weights, i, dev) for i in range(config.layers)]

    def _shard_layer(self, w, i: int, dev) -> _LayerShard:
        c, p = self.config, f"encoder.layer.{i}."
        width = self.local_heads * c.head_dim
        heads = slice(self.tp_rank * width, (self.tp_rank + 1) * width)
        ffn_width = c.intermediate // self.tp_size
        ffn = slice(self.tp_rank * ffn_width, (self.tp_rank + 1) * ffn_width)
        qkv = [p + f"attention.self.{n}" for n in ("query", "key", "value")]
        # Hugging Face Linear weights are [out, in]; the shards are stored transposed for x @ W.
        return _LayerShard(
            wqkv=dev(np.concatenate([w[n + ".weight"][heads] for n in qkv]).T),
            bqkv=dev(np.concatenate([w[n + ".bias"][heads] for n in qkv])),
            wo=dev(w[p + "attention.output.dense.weight"][:, heads].T),
            bo=dev(w[p + "attention.output.dense.bias"]),
            ln1=(dev(w[p + "attention.output.LayerNorm.weight"]), dev(w[p + "attention.output.LayerNorm.bias"])),
            wi=dev(w[p + "intermediate.dense.weight"][ffn].T),
            bi=dev(w[p + "intermediate.dense.bias"][ffn]),
            wd=dev(w[p + "output.dense.weight"][:, ffn].T),
            bd=dev(w[p + "output.dense.bias"]),
            ln2=(dev(w[p + "output.LayerNorm.weight"]), dev(w[p + "output.LayerNorm.bias"])),
        )

    # ------------------------------------------------------------------ forward
    def encode(self, token_ids: Sequence[np.ndarray], reduce: Reduce):
        """Sentence embeddings ``[len(token_ids), hidden]`` (float32, on ``xp``) of one batch.

        ``token_ids`` holds each sentence's ids (``[CLS] ... [SEP]``, as
        :class:`.assets.Tokenizer` makes them).  Collective: every rank must
        pass the same batch, and ``reduce`` is called once per site in
        :func:`sites` order.
        """
        xp, c = self.xp, self.config
        lengths = np.array([len(t) for t in token_ids])
        if lengths.min() < 1 or lengths.max() > min(c.max_positions, c.max_seq_length):
            raise ValueError(f"sentence lengths must be 1..{min(c.max_positions, c.max_seq_length)} tokens")
        packing = _Packing(xp, lengths)
        ids = xp.asarray(np.concatenate(token_ids))
        x = self.word_emb[ids] + self.pos_emb[packing.positions] + self.type0_emb
        x = layer_norm(xp, x, *self.emb_ln, c.layer_norm_eps)
        for i, layer in enumerate(self.layers):
            x = self._layer(x, layer, packing, reduce, i)
        return packing.mean_pool(x, normalize=c.normalize)

    def _layer(self, x, w: _LayerShard, packing: "_Packing", reduce: Reduce, index: int):
        xp, c = self.xp, self.config
        context = self._attention(x @ w.wqkv + w.bqkv, packing)
        attn = reduce(context @ w.wo, f"L{index}.attn") + w.bo
        h = layer_norm(xp, attn + x, *w.ln1, c.layer_norm_eps)
        ffn = reduce(gelu(xp, h @ w.wi + w.bi) @ w.wd, f"L{index}.ffn") + w.bd
        return layer_norm(xp, ffn + h, *w.ln2, c.layer_norm_eps)

    def _attention(self, qkv, packing: "_Packing"):
        """This rank's heads: softmax(q k^T / sqrt(d)) v per sentence; packed ``[tokens, local_width]``."""
        xp, heads, d = self.xp, self.local_heads, self.config.head_dim
        q, k, v = (packing.pad(part).reshape(packing.batch, packing.longest, heads, d).transpose(0, 2, 1, 3)
                   for part in xp.split(qkv, 3, axis=1))
        scores = (q @ k.transpose(0, 1, 3, 2)) * F32(1.0 / np.sqrt(d)) + packing.key_mask
        scores = xp.exp(scores - scores.max(axis=-1, keepdims=True))
        probs = scores / scores.sum(axis=-1, keepdims=True)
        context = (probs @ v).transpose(0, 2, 1, 3).reshape(packing.batch, packing.longest, heads * d)
        return packing.unpad(context)


class _Packing:
    """Where each packed token sits in the padded ``[batch, longest]`` layout, and the masks."""

    def __init__(self, xp, lengths: np.ndarray):
        self.xp, self.batch, self.longest = xp, len(lengths), int(lengths.max())
        rows = np.repeat(np.arange(self.batch), lengths)
        cols = np.concatenate([np.arange(n) for n in lengths])
        self.rows, self.cols = xp.asarray(rows), xp.asarray(cols)
        self.positions = self.cols
        valid = np.arange(self.longest)[None, :] < lengths[:, None]
        # additive key mask [batch, 1, 1, longest]: padded keys get -inf (every row has its [CLS])
        self.key_mask = xp.asarray(np.where(valid, F32(0), F32(-np.inf))[:, None, None, :])
        # mean pooling as a [batch, tokens] matrix with 1/length in each sentence's tokens
        pool = np.zeros((self.batch, lengths.sum()), dtype=F32)
        pool[rows, np.arange(lengths.sum())] = 1.0 / lengths[rows]
        self.pool = xp.asarray(pool)

    def pad(self, packed):
        out = self.xp.zeros((self.batch, self.longest, packed.shape[1]), dtype=packed.dtype)
        out[self.rows, self.cols] = packed
        return out

    def unpad(self, padded):
        return padded[self.rows, self.cols]

    def mean_pool(self, x, normalize: bool):
        pooled = self.pool @ x
        if normalize:
            norm = self.xp.sqrt((pooled * pooled).sum(axis=1, keepdims=True))
            pooled = pooled / self.xp.maximum(norm, F32(1e-12))  # sentence-transformers' epsilon
        return pooled


def layer_norm(xp, x, gain, bias, eps: float):
    mean = x.mean(axis=-1, keepdims=True)
    centred = x - mean
    var = (centred * centred).mean(axis=-1, keepdims=True)
    return centred / xp.sqrt(var + F32(eps)) * gain + bias


def gelu(xp, x):
    """Exact GELU ``x/2 (1 + erf(x / sqrt 2))`` with :func:`erf` (see the module docstring)."""
    return F32(0.5) * x * (F32(1.0) + erf(xp, x * F32(1.0 / np.sqrt(2.0))))


_AS_P = 0.3275911
_AS_A = (0.254829592, -0.284496736, 1.421413741, -1.453152027, 1.061405429)


def erf(xp, x):
    """Abramowitz & Stegun 7.1.26: ``|erf(x) - this| <= 1.5e-7`` for all x (plus float32 rounding, see above)."""
    a = xp.abs(x)
    t = F32(1.0) / (F32(1.0) + F32(_AS_P) * a)
    poly = t * (F32(_AS_A[0]) + t * (F32(_AS_A[1]) + t * (F32(_AS_A[2]) + t * (F32(_AS_A[3]) + t * F32(_AS_A[4])))))
    return xp.sign(x) * (F32(1.0) - poly * xp.exp(-a * a))
