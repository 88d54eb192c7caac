"""NumPy reference of Flash All-Reduce on N simulated ranks.

This is the executable specification every backend is tested against.

Two-shot (the paper's algorithm), for a message of ``L`` elements on ``N``
ranks with group size ``g``:

1. ``G = ceil(L/g)`` groups; ``Gs = ceil(G/N)`` groups per segment; the
   message is zero-padded to ``N*Gs*g`` elements.  Rank ``o`` owns segment
   ``o`` (groups ``[o*Gs, (o+1)*Gs)``).  Groups are aligned to the global
   element index, so chunking a segment further (as the GPU kernels do)
   changes nothing.
2. Optional rotation of every group (:mod:`flashcomm_cupy.hadamard`).
3. Reduce-scatter: every rank quantizes each segment it does not own with the
   reduce-scatter codec and sends it to the owner.  The owner sums, in rank
   order and in float32, the dequantized contributions and its *own exact*
   values.
4. The owner quantizes the sum with the all-gather codec and sends it to
   every rank; every rank -- the owner too -- dequantizes the same bytes, so
   all ranks end bit-identical.
5. Inverse rotation, trim to ``L``, round to the input dtype.

One-shot: every rank quantizes its whole message with the reduce-scatter
codec and sends it to everybody; every rank sums all ``N`` dequantized
contributions (its own included, quantized, so ranks agree) in rank order.

Lossless (``bits=None``), either algorithm: float32 sum in rank order, then
one rounding to the input dtype.

Hierarchical, for ranks on ``M`` nodes of ``P`` ranks each (a
:class:`~flashcomm_cupy.topology.NodeLayout`: nodes in order of their lowest
rank, *local rank* = position in the node):

1. The segment layout is the two-shot's with ``P`` owners,
   ``SegmentLayout(L, P, g)``: local rank ``p`` of every node owns segment
   ``p``.  Rotation as in two-shot.
2. Intra-node reduce-scatter = the first half of two-shot on the node's ``P``
   ranks: local owner ``p`` sums, in local rank order and in float32, its own
   exact segment and the others' segments through the reduce-scatter codec.
3. Inter-node exchange among the ``M`` ranks of local rank ``p``: each
   encodes its float32 partial with the *reduce-scatter* codec and the codes
   and metadata are all-gathered; each of them decodes all ``M`` partials --
   its own too, so all nodes agree -- and sums them in node order in float32.
   Lossless: the exact float32 partials are exchanged and summed in node order.
4. Intra-node all-gather = the second half of two-shot: the owner encodes the
   total with the all-gather codec and every rank of the node, the owner too,
   keeps the decoded values (lossless: the total rounded to the input dtype).
5. Finish as two-shot.

A step with no peer moves no data and is skipped, so it adds no quantization:
with ``P = 1`` steps 2 and 4 vanish (each rank's partial is its own exact
input), with ``M = 1`` step 3 vanishes.  Hence, on two or more ranks,
hierarchical on one node is two-shot bit for bit and with one rank per node
it is one-shot bit for bit; on a single rank it returns the input exactly.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence

import numpy as np

from . import hadamard, quant
from .config import ALL_REDUCE_BITS, Codec, Mode
from .dtypes import from_f32, resolve_dtype, to_f32
from .topology import NodeLayout

F32 = np.float32


@dataclass(frozen=True)
class SegmentLayout:
    """How a message of ``length`` elements is split among ``world_size`` owners."""

    length: int
    world_size: int
    group_size: int

    @property
    def groups(self) -> int:
        return max(1, -(-self.length // self.group_size))

    @property
    def groups_per_segment(self) -> int:
        return -(-self.groups // self.world_size)

    @property
    def segment_elems(self) -> int:
        return self.groups_per_segment * self.group_size

    @property
    def padded_length(self) -> int:
        return self.segment_elems * self.world_size

    def segment(self, owner: int) -> slice:
        return slice(owner * self.segment_elems, (owner + 1) * self.segment_elems)


def prepare(x, layout: SegmentLayout, mode: Mode) -> np.ndarray:
    """A rank's input as padded float32, rotated when the mode asks for it."""
    x32 = to_f32(x)
    if x32.size != layout.length:
        raise ValueError(f"rank input has {x32.size} elements, {layout.length} expected")
    padded = np.zeros(layout.padded_length, dtype=F32)
    padded[:layout.length] = x32
    if mode.rotate:
        padded = hadamard.rotate(padded, layout.group_size)
    return padded


def roundtrip(x32: np.ndarray, codec: Codec) -> np.ndarray:
    """What the receiver of ``x32`` sees after encode -> wire -> decode."""
    return quant.decode(quant.encode(x32, codec), x32.size, codec)


def sum_decoded(parts: Sequence[np.ndarray], mode: Mode) -> np.ndarray:
    """float32 sum, in order, of ``parts`` as their receivers see them.

    Every part goes through the reduce-scatter codec (lossless: exact).  This
    is one-shot's sum over ranks and the hierarchical inter-node sum over nodes.
    """
    acc = np.zeros_like(parts[0], dtype=F32)
    for part in parts:
        if not mode.lossless:
            part = roundtrip(part, mode.rs_codec)
        acc = (acc + part).astype(F32)
    return acc


def reduce_owner_segment(owner: int, contributions: Sequence[np.ndarray], mode: Mode) -> np.ndarray:
    """Owner-side sum of one segment, in rank order, in float32.

    ``contributions[s]`` is rank ``s``'s prepared float32 segment.  Every rank
    but the owner reaches the owner through the reduce-scatter codec.
    """
    acc = np.zeros_like(contributions[0], dtype=F32)
    for s, part in enumerate(contributions):
        if s != owner and not mode.lossless:
            part = roundtrip(part, mode.rs_codec)
        acc = (acc + part).astype(F32)
    return acc


def gather_segment(reduced: np.ndarray, mode: Mode, dtype) -> np.ndarray:
    """What every rank receives of an owner's reduced segment (float32)."""
    if mode.lossless:
        return to_f32(from_f32(reduced, dtype))
    return roundtrip(reduced, mode.ag_codec)


def finish(full32: np.ndarray, layout: SegmentLayout, mode: Mode, dtype) -> np.ndarray:
    """Inverse rotation, trim and rounding to the output dtype."""
    if mode.rotate:
        full32 = hadamard.unrotate(full32, layout.group_size)
    return from_f32(full32[:layout.length], dtype)


def _check_inputs(inputs) -> tuple:
    if len(inputs) < 1:
        raise ValueError("need at least one rank")
    arrays = [np.asarray(x) for x in inputs]
    dt = resolve_dtype(arrays[0].dtype)
    for r, a in enumerate(arrays):
        if a.dtype != dt:
            raise ValueError(f"rank {r} has dtype {a.dtype}, rank 0 has {dt}")
        if a.size != arrays[0].size:
            raise ValueError(f"rank {r} has {a.size} elements, rank 0 has {arrays[0].size}")
    return arrays, dt


def as_node_layout(nodes, world_size: int) -> NodeLayout:
    """``nodes`` as a :class:`NodeLayout`: None (one node), ranks per node (an int), or a layout."""
    if nodes is None:
        return NodeLayout.single(world_size)
    if isinstance(nodes, NodeLayout):
        if nodes.world_size != world_size:
            raise ValueError(f"node layout has {nodes.world_size} ranks, {world_size} inputs given")
        return nodes
    return NodeLayout.blocks(world_size, nodes)


def hierarchical_sum(prepared: Sequence[np.ndarray], nodes: NodeLayout, layout: SegmentLayout,
                     mode: Mode, dt) -> np.ndarray:
    """The hierarchical all-reduce's float32 result (steps 2-4 of the module docstring).

    ``prepared[r]`` is global rank ``r``'s prepared input for ``layout``, the
    two-shot layout with ``nodes.ranks_per_node`` owners.
    """
    p_count = nodes.ranks_per_node
    full = np.empty(layout.padded_length, dtype=F32)
    for p in range(p_count):
        seg = layout.segment(p)
        partials = [reduce_owner_segment(p, [prepared[r][seg] for r in node], mode) for node in nodes.nodes]
        total = sum_decoded(partials, mode) if nodes.num_nodes > 1 else partials[0]
        full[seg] = gather_segment(total, mode, dt) if p_count > 1 else total
    return full


def flash_all_reduce_reference(inputs: Sequence, bits=ALL_REDUCE_BITS, group_size: int = 128,
                               symmetric: bool = False, rotate: bool = False,
                               algo: str = "twoshot", mode: Mode = None, nodes=None) -> List[np.ndarray]:
    """Flash All-Reduce of ``inputs`` (one array per simulated rank).

    Returns one output per rank, in the input dtype and shape; the outputs are
    bit-identical.  ``algo`` is "twoshot" (also used for "auto"), "oneshot"
    or "hierarchical".  ``nodes`` places the ranks on nodes for
    "hierarchical" (other algorithms ignore it): None (one node), the number
    of ranks per node (node ``k`` holds ranks ``[kP, (k+1)P)``) or a
    :class:`NodeLayout`.
    """
    arrays, dt = _check_inputs(inputs)
    if mode is None:
        mode = Mode.make(bits, group_size, symmetric, rotate, algo)
    algo = "twoshot" if mode.algo in ("auto", "twoshot") else mode.algo
    if algo not in ("twoshot", "oneshot", "hierarchical"):
        raise ValueError(f"the reference implements oneshot, twoshot and hierarchical, not {algo!r}")
    n = len(arrays)
    node_layout = as_node_layout(nodes, n) if algo == "hierarchical" else None
    owners = node_layout.ranks_per_node if node_layout is not None else n
    layout = SegmentLayout(arrays[0].size, owners, mode.group_size)
    prepared = [prepare(a, layout, mode) for a in arrays]

    if algo == "hierarchical":
        full = hierarchical_sum(prepared, node_layout, layout, mode, dt)
    elif mode.lossless or algo == "oneshot":
        full = sum_decoded(prepared, mode)
    else:
        full = np.empty(layout.padded_length, dtype=F32)
        for owner in range(n):
            seg = layout.segment(owner)
            reduced = reduce_owner_segment(owner, [p[seg] for p in prepared], mode)
            full[seg] = gather_segment(reduced, mode, dt)
    out = finish(full, layout, mode, dt).reshape(arrays[0].shape)
    return [out.copy() for _ in range(n)]


def exact_sum(inputs: Sequence) -> np.ndarray:
    """float64 sum of the ranks' inputs: the truth errors are measured against."""
    acc = np.zeros(np.asarray(inputs[0]).size, dtype=np.float64)
    for x in inputs:
        acc += np.asarray(x, dtype=np.float64).reshape(-1)
    return acc.reshape(np.asarray(inputs[0]).shape)


def error_stats(result, truth) -> dict:
    """Relative RMS error, max abs error and SNR (dB) of ``result`` against ``truth``."""
    r = np.asarray(result, dtype=np.float64).reshape(-1)
    t = np.asarray(truth, dtype=np.float64).reshape(-1)
    diff = r - t
    finite = np.isfinite(diff)
    if not finite.all():
        return {"rel_rms": float("nan"), "max_abs": float("nan"), "snr_db": float("nan"),
                "nonfinite": int((~finite).sum())}
    denom = float(np.sqrt(np.mean(t * t))) if t.size else 0.0
    rms = float(np.sqrt(np.mean(diff * diff))) if t.size else 0.0
    rel = rms / denom if denom > 0 else (0.0 if rms == 0 else float("inf"))
    snr = float("inf") if rms == 0 else (20 * np.log10(denom / rms) if denom > 0 else float("-inf"))
    return {"rel_rms": rel, "max_abs": float(np.max(np.abs(diff))) if t.size else 0.0,
            "snr_db": snr, "nonfinite": 0}
