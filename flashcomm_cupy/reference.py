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
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence

import numpy as np

from . import hadamard, quant
from .config import Codec, Mode
from .dtypes import from_f32, resolve_dtype, to_f32

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


def flash_all_reduce_reference(inputs: Sequence, bits=4, group_size: int = 128,
                               symmetric: bool = False, rotate: bool = False,
                               algo: str = "twoshot", mode: Mode = None) -> List[np.ndarray]:
    """Flash All-Reduce of ``inputs`` (one array per simulated rank).

    Returns one output per rank, in the input dtype and shape; the outputs are
    bit-identical.  ``algo`` is "twoshot" (also used for "auto") or "oneshot".
    """
    arrays, dt = _check_inputs(inputs)
    if mode is None:
        mode = Mode.make(bits, group_size, symmetric, rotate, algo)
    algo = "twoshot" if mode.algo in ("auto", "twoshot") else mode.algo
    if algo not in ("twoshot", "oneshot"):
        raise ValueError(f"the reference implements oneshot and twoshot, not {algo!r}")
    n = len(arrays)
    layout = SegmentLayout(arrays[0].size, n, mode.group_size)
    prepared = [prepare(a, layout, mode) for a in arrays]

    if mode.lossless or algo == "oneshot":
        acc = np.zeros(layout.padded_length, dtype=F32)
        for part in prepared:
            if not mode.lossless:
                part = roundtrip(part, mode.rs_codec)
            acc = (acc + part).astype(F32)
        full = acc
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
