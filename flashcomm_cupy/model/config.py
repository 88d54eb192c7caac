"""Model shapes for the end-to-end benchmark, and how tensor parallelism splits them.

A :class:`ModelShape` is a LLaMA-style decoder without its vocabulary parts
(embedding and LM head are skipped: their cost depends on the vocabulary and
they involve no all-reduce).  A :class:`TensorParallelSplit` says which heads
and FFN columns one rank owns when the model is split over ``tp_size`` ranks
the Megatron way: QKV and gate/up projections column-parallel, O and down
projections row-parallel, one all-reduce after each row-parallel projection.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Dict, List


@dataclass(frozen=True)
class ModelShape:
    """The dimensions of a decoder-only transformer (no vocabulary).

    ``heads`` query heads and ``kv_heads`` key/value heads (grouped-query
    attention when fewer) of ``head_dim`` each; a gated MLP of width ``ffn``;
    ``layers`` identical layers; RMSNorm with ``norm_eps``.
    """

    name: str
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    layers: int
    norm_eps: float = 1e-5

    def __post_init__(self):
        for field in ("hidden", "heads", "kv_heads", "head_dim", "ffn", "layers"):
            if int(getattr(self, field)) < 1:
                raise ValueError(f"{field} must be positive, got {getattr(self, field)}")
        if self.heads % self.kv_heads:
            raise ValueError(f"heads ({self.heads}) must be a multiple of kv_heads ({self.kv_heads})")

    @property
    def group(self) -> int:
        """Query heads that share one key/value head."""
        return self.heads // self.kv_heads

    def params_per_layer(self) -> int:
        """Weights of one layer (projections and both norms)."""
        qkv = self.hidden * (self.heads + 2 * self.kv_heads) * self.head_dim
        o = self.heads * self.head_dim * self.hidden
        mlp = 3 * self.hidden * self.ffn
        return qkv + o + mlp + 2 * self.hidden

    def to_dict(self) -> dict:
        return asdict(self)


#: Published LLaMA-3 shapes (vocabulary omitted).
PRESETS: Dict[str, ModelShape] = {
    "llama3-70b": ModelShape("llama3-70b", hidden=8192, heads=64, kv_heads=8, head_dim=128,
                             ffn=28672, layers=80),
    "llama3-8b": ModelShape("llama3-8b", hidden=4096, heads=32, kv_heads=8, head_dim=128,
                            ffn=14336, layers=32),
    # The CPU backend's default (``flashcomm model`` without a GPU): a GPT-2-small-sized LLaMA
    # layout whose heads and FFN split over 1, 2, 3, 4, 6 or 12 ranks, so any relaunch default
    # (one rank per core, 2 to 4) runs it.
    "tiny": ModelShape("tiny", hidden=768, heads=12, kv_heads=12, head_dim=64, ffn=1536, layers=12),
}

#: the command-line flag of each custom field (``layers`` is ``--num-layers``: ``--layers`` is how
#: many of them are timed)
CUSTOM_FLAGS = {"hidden": "--hidden", "heads": "--heads", "kv_heads": "--kv-heads", "head_dim": "--head-dim",
                "ffn": "--ffn", "layers": "--num-layers"}


def get_shape(name: str, **custom) -> ModelShape:
    """A preset by name, or ``"custom"`` built from ``custom`` (hidden, heads, ...).

    For a preset, any non-None value in ``custom`` overrides that field.
    """
    overrides = {k: v for k, v in custom.items() if v is not None}
    if name == "custom":
        missing = [f for f in CUSTOM_FLAGS if f not in overrides]
        if missing:
            raise ValueError(f"--model custom needs {', '.join(CUSTOM_FLAGS[m] for m in missing)}")
        return ModelShape("custom", **overrides)
    if name not in PRESETS:
        raise ValueError(f"unknown model {name!r}; use one of {', '.join(list(PRESETS) + ['custom'])}")
    return replace(PRESETS[name], **overrides) if overrides else PRESETS[name]


@dataclass(frozen=True)
class TensorParallelSplit:
    """What rank ``rank`` of ``size`` owns of ``shape``.

    Query heads and FFN columns are split evenly.  Key/value heads are split
    evenly when there are at least as many as ranks; otherwise each is
    replicated on the ``size // kv_heads`` ranks whose query heads use it
    (the usual GQA rule: one KV head per rank).
    """

    shape: ModelShape
    rank: int
    size: int

    def __post_init__(self):
        s, n = self.shape, self.size
        if not 0 <= self.rank < n:
            raise ValueError(f"rank {self.rank} outside [0, {n})")
        if s.heads % n:
            raise ValueError(f"{s.heads} heads do not split over {n} ranks")
        if s.ffn % n:
            raise ValueError(f"ffn {s.ffn} does not split over {n} ranks")
        if s.kv_heads % n and n % s.kv_heads:
            raise ValueError(f"{s.kv_heads} KV heads neither split over nor replicate onto {n} ranks")

    @property
    def q_heads(self) -> int:
        return self.shape.heads // self.size

    @property
    def kv_heads(self) -> int:
        return max(1, self.shape.kv_heads // self.size)

    @property
    def group(self) -> int:
        """Query heads per KV head on this rank (equals the model's group)."""
        return self.q_heads // self.kv_heads

    @property
    def ffn(self) -> int:
        return self.shape.ffn // self.size

    def q_head_ids(self) -> List[int]:
        """Global indices of this rank's query heads."""
        return list(range(self.rank * self.q_heads, (self.rank + 1) * self.q_heads))

    def kv_head_ids(self) -> List[int]:
        """Global indices of the KV heads this rank's query heads read."""
        if self.shape.kv_heads >= self.size:
            return list(range(self.rank * self.kv_heads, (self.rank + 1) * self.kv_heads))
        return [self.q_head_ids()[0] // self.shape.group]

    def ffn_slice(self) -> slice:
        return slice(self.rank * self.ffn, (self.rank + 1) * self.ffn)

    @property
    def qkv_width(self) -> int:
        """Columns of this rank's fused QKV projection."""
        return (self.q_heads + 2 * self.kv_heads) * self.shape.head_dim
