"""NumPy reference of flashcomm's group-wise quantization and wire format.

This module is the specification the GPU kernels are tested against; every
arithmetic step is written as the single-rounding float32 operation the
kernels perform (``__fsub_rn``, ``__fmul_rn``, ``__fdiv_rn``, ``__frcp_rn``,
``rintf``), so codes and metadata match bit for bit.  The byte layout is
documented in ``docs/wire-format.md``.

Per group of ``g`` float32 values ``x``:

* asymmetric: ``mn = min(x)``, ``scale = (max(x) - mn) / (2**b - 1)``,
  ``code = clamp(rint((x - mn) * (1/scale)), 0, 2**b - 1)``,
  ``x' = code * scale + mn``.
* symmetric: ``scale = max|x| / (2**(b-1) - 1)``,
  ``code = clamp(rint(x * (1/scale)), -qmax, qmax) + 2**(b-1)``,
  ``x' = (code - 2**(b-1)) * scale``.

Special cases (identical on the GPU):

* ``scale < FLT_MIN`` (constant or nearly constant group): scale is stored as
  0, every code is 0 (asymmetric) or ``2**(b-1)`` (symmetric), so ``x' = mn``
  or 0.
* a group holding NaN or +-Inf, or whose range overflows float32: scale and
  min are stored as NaN and the codes as 0, so the whole group -- and only
  that group -- dequantizes to NaN.  Other groups are untouched.
"""
from __future__ import annotations

import numpy as np

from . import codecs
from .config import Codec

F32 = np.float32
FLT_MIN = np.finfo(np.float32).tiny
ALIGN = 16  # every region of a wire chunk starts on a 16-byte boundary


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


# --------------------------------------------------------------------------- quantize
def quantize(x32: np.ndarray, codec: Codec):
    """Quantize a float32 vector (length a multiple of the group size).

    Returns ``(codes uint8[n], scales float32[G], mins float32[G] or None)``.
    """
    x32 = np.asarray(x32, dtype=F32).reshape(-1)
    g = codec.group_size
    if x32.size % g:
        raise ValueError(f"length {x32.size} is not a multiple of group size {g}")
    xg = x32.reshape(-1, g)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        bad = ~np.isfinite(xg).all(axis=1)
        safe = np.where(bad[:, None], F32(0), xg)
        if codec.symmetric:
            amax = np.abs(safe).max(axis=1)
            scale = (amax / F32(codec.qmax)).astype(F32)
            mn = None
        else:
            mn = safe.min(axis=1)
            mx = safe.max(axis=1)
            rng = (mx - mn).astype(F32)
            bad |= ~np.isfinite(rng)
            scale = (rng / F32(codec.qmax)).astype(F32)
        tiny = scale < FLT_MIN
        scale = np.where(tiny, F32(0), scale).astype(F32)
        inv = np.where(tiny, F32(0), F32(1) / np.where(tiny, F32(1), scale)).astype(F32)
        if codec.symmetric:
            q = np.rint((safe * inv[:, None]).astype(F32))
            q = np.clip(q, -codec.qmax, codec.qmax) + (1 << (codec.bits - 1))
        else:
            q = np.rint(((safe - mn[:, None]).astype(F32) * inv[:, None]).astype(F32))
            q = np.clip(q, 0, codec.qmax)
        q = np.where(bad[:, None], 0, q)
        scale = np.where(bad, F32(np.nan), scale).astype(F32)
        if mn is not None:
            mn = np.where(bad, F32(np.nan), mn).astype(F32)
    return q.astype(np.uint8).reshape(-1), scale, mn


def dequantize(codes: np.ndarray, scales: np.ndarray, mins, codec: Codec) -> np.ndarray:
    """Inverse of :func:`quantize` (two float32 roundings: multiply, then add)."""
    g = codec.group_size
    c = codes.reshape(-1, g).astype(F32)
    if codec.symmetric:
        c = c - F32(1 << (codec.bits - 1))
        out = (c * scales[:, None]).astype(F32)
    else:
        out = ((c * scales[:, None]).astype(F32) + mins[:, None]).astype(F32)
    return out.reshape(-1)


def fake_quantize(x32: np.ndarray, codec: Codec) -> np.ndarray:
    """``dequantize(quantize(x))``: what a receiver sees of ``x``."""
    return dequantize(*quantize(x32, codec), codec)


# --------------------------------------------------------------------------- packing
def plane_layout(n: int, codec: Codec):
    """Byte offsets of a chunk of ``n`` elements: dict of region -> (offset, size).

    Regions, each 16-byte aligned, in order: ``lo`` (4-bit codes, or 8-bit for
    INT8), ``hi`` (2-bit high plane, INT6 only), ``scales``, ``mins``
    (asymmetric only).  ``total`` is the chunk size in bytes.
    """
    g = codec.group_size
    if n % g:
        raise ValueError(f"chunk of {n} elements is not a multiple of group size {g}")
    groups = n // g
    regions = {}
    off = 0
    lo_bytes, hi_bytes = codecs.spec(codec.bits).plane_bytes(n)
    regions["lo"] = (off, lo_bytes)
    off = _align(off + lo_bytes)
    if hi_bytes:
        regions["hi"] = (off, hi_bytes)
        off = _align(off + hi_bytes)
    regions["scales"] = (off, 4 * groups)
    off = _align(off + 4 * groups)
    if not codec.symmetric:
        regions["mins"] = (off, 4 * groups)
        off = _align(off + 4 * groups)
    regions["total"] = (0, off)
    return regions


def wire_nbytes(n: int, codec: Codec) -> int:
    """Size in bytes of the wire chunk holding ``n`` elements."""
    return plane_layout(n, codec)["total"][1]


def pack(codes: np.ndarray, scales: np.ndarray, mins, codec: Codec) -> np.ndarray:
    """Pack codes and metadata into one contiguous little-endian uint8 chunk."""
    n = codes.size
    lay = plane_layout(n, codec)
    buf = np.zeros(lay["total"][1], dtype=np.uint8)
    c = codes.astype(np.uint8)
    if codec.bits == 8:
        lo = c
    else:
        nib = c & 0x0F
        lo = (nib[0::2] | (nib[1::2] << 4)).astype(np.uint8)
    o, s = lay["lo"]
    buf[o:o + s] = lo
    if codec.bits == 6:
        h = (c >> 4) & 0x3
        hi = (h[0::4] | (h[1::4] << 2) | (h[2::4] << 4) | (h[3::4] << 6)).astype(np.uint8)
        o, s = lay["hi"]
        buf[o:o + s] = hi
    o, s = lay["scales"]
    buf[o:o + s] = np.asarray(scales, dtype="<f4").view(np.uint8)
    if not codec.symmetric:
        o, s = lay["mins"]
        buf[o:o + s] = np.asarray(mins, dtype="<f4").view(np.uint8)
    return buf


def unpack(buf: np.ndarray, n: int, codec: Codec):
    """Inverse of :func:`pack`: ``(codes, scales, mins or None)``."""
    buf = np.asarray(buf, dtype=np.uint8).reshape(-1)
    lay = plane_layout(n, codec)
    if buf.size < lay["total"][1]:
        raise ValueError(f"wire chunk has {buf.size} bytes, {lay['total'][1]} expected")
    o, s = lay["lo"]
    lo = buf[o:o + s]
    if codec.bits == 8:
        codes = lo.copy()
    else:
        codes = np.empty(n, dtype=np.uint8)
        codes[0::2] = lo & 0x0F
        codes[1::2] = lo >> 4
    if codec.bits == 6:
        o, s = lay["hi"]
        hi = buf[o:o + s]
        for k in range(4):
            codes[k::4] |= ((hi >> (2 * k)) & 0x3) << 4
    o, s = lay["scales"]
    scales = buf[o:o + s].view("<f4").astype(F32)
    mins = None
    if not codec.symmetric:
        o, s = lay["mins"]
        mins = buf[o:o + s].view("<f4").astype(F32)
    return codes, scales, mins


def encode(x32: np.ndarray, codec: Codec) -> np.ndarray:
    """Quantize and pack a float32 chunk into its wire bytes."""
    return pack(*quantize(x32, codec), codec)


def decode(buf: np.ndarray, n: int, codec: Codec) -> np.ndarray:
    """Unpack and dequantize ``n`` elements from a wire chunk."""
    return dequantize(*unpack(buf, n, codec), codec)
