"""One spec per wire codec: the facts about a bit width that Python and CUDA must agree on.

A quantized unit (``FcUnit<BITS>`` in ``kernels_cu/fc_quant.cuh``) is one thread's
``elems`` consecutive elements: a low plane of 4-bit codes (8-bit for INT8), for INT6 a
2-bit high plane, and the group's fp32 scale (and min).  Everything derived from that
(plane sizes of a wire chunk, the LL form's unit size, the staged two-shot's per-warp
chunks) is computed here and nowhere else on the host: :mod:`.quant` lays out wire chunks
from it, :mod:`.backends.flash.plan` tiles LL slots and sizes shared memory with it, the
tests iterate :data:`CODECS`.  ``kernels_cu/fc_codec_spec.cuh`` (written by
:func:`cuda_header`, checked by ``tests/test_codecs.py``) pins the kernels' constants to
these numbers with ``static_assert``s.

Adding a codec: one :class:`CodecSpec` in :data:`CODECS` and its ``FcUnit`` specialisation.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

#: one 16-byte vector: the unit of every workspace access
VECTOR_BYTES = 16
#: the plane alignment of a wire chunk (:func:`flashcomm_cupy.quant.plane_layout`)
PLANE_ALIGN = 16
#: steps wider than this many bits are "wide": their LL units are 1.5-2x INT4's, so the tuning
#: table keeps their own entries (``wide`` class)
NARROW_MAX_BITS = 4

#: classes of modes the tuning table keeps apart
LOSSLESS, NARROW, WIDE = "lossless", "narrow", "wide"
CLASSES = (LOSSLESS, NARROW, WIDE)


def _padded(chunks: int) -> int:
    """Chunks of a warp's staged span with one pad vector every eight (``fc_stage_index``)."""
    return chunks + chunks // 8


@dataclass(frozen=True)
class CodecSpec:
    """The wire format of one integer step (``bits`` in 4, 6, 8)."""

    bits: int
    #: bits per element in the low plane (4-bit nibbles, or whole bytes for INT8)
    lo_bits: int
    #: bits per element in the high plane (INT6's top two bits; 0 elsewhere)
    hi_bits: int
    #: largest relative RMS error of an all-reduce whose narrowest step is this codec, on Gaussian
    #: data (the checks' bound).  A b-bit asymmetric group of Gaussian data has a step of
    #: ~5 sigma / (2**b - 1) and an RMS error of step/sqrt(12) per quantization; a two-shot
    #: all-reduce quantizes twice, so int4 lands near 13 %, int6 near 3 %, int8 near 0.8 %
    #: (symmetric codecs and large groups are somewhat worse).  The bounds leave ~2x headroom.
    rel_rms_bound: float

    @property
    def wide(self) -> bool:
        return self.bits > NARROW_MAX_BITS

    @property
    def tuning_class(self) -> str:
        return WIDE if self.wide else NARROW

    # ---------------------------------------------------------------- one unit (FcUnit<BITS>)
    def lo_words(self, elems: int) -> int:
        """32-bit code words of a unit's low plane (``FcUnit<BITS>::LO``)."""
        return elems * self.lo_bits // 32

    def hi_words(self, elems: int) -> int:
        """32-bit words of a unit's high plane (``FcUnit<BITS>::HI`` where used, else 0); an
        8-element INT6 unit's 16 high bits take one word."""
        return -(-elems * self.hi_bits // 32)

    def ll_unit_bytes(self, elems: int) -> int:
        """Bytes of one unit in the quantized LL form (``FcLLq<BITS>::BYTES`` in fc_ll.cuh): code words
        paired with metadata words, one metadata word at least, rounded up to whole 16-byte vectors."""
        words = (self.lo_words(elems) + self.hi_words(elems) + 1) & ~1
        return VECTOR_BYTES * (words // 2)

    def staged_chunks(self, elems: int) -> int:
        """16-byte vectors of a warp's staged unit (``FcStaged<BITS>::CHUNKS`` in fc_quant.cuh):
        the padded low and high planes of 32 lanes, then 32 groups' scales and mins."""
        return _padded(8 * self.lo_words(elems)) + _padded(8 * self.hi_words(elems)) + 2 * 8

    # ---------------------------------------------------------------- one wire chunk
    def plane_bytes(self, n: int) -> tuple:
        """(low plane, high plane) bytes of ``n`` codes (high 0 when the codec has none)."""
        return n * self.lo_bits // 8, n * self.hi_bits // 8

    def wire_bytes_per_element(self, group_size: int, symmetric: bool) -> float:
        """Average bytes on the wire per element: codes plus the group's fp32 scale (and min)."""
        return self.bits / 8 + 4 * (1 if symmetric else 2) / group_size


CODECS = {4: CodecSpec(4, 4, 0, 0.30), 6: CodecSpec(6, 4, 2, 0.06), 8: CodecSpec(8, 8, 0, 0.02)}


def spec(bits: int) -> CodecSpec:
    try:
        return CODECS[int(bits)]
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"bits must be one of {tuple(CODECS)}, got {bits!r}") from None


def tuning_class(rs_bits: Optional[int], ag_bits: Optional[int]) -> str:
    """"lossless", "narrow" or "wide" (a step wider than 4 bits in either phase): which of a
    tuning row's candidate lists serves a mode.  The one place that decides "wide"."""
    if rs_bits is None:
        return LOSSLESS
    return WIDE if spec(rs_bits).wide or spec(ag_bits).wide else NARROW


#: unit sizes (elements per thread and unit, FC_ELEMS) the kernels are built with
UNIT_ELEMS = (8, 16, 32)
#: unit sizes whose builds hold the staged two-shot (8-element builds hold the quantized LL one-shot
#: alone: kernels_cu/fc_allreduce.cu)
STAGED_UNIT_ELEMS = (16, 32)


def cuda_header() -> str:
    """The text of ``kernels_cu/fc_codec_spec.cuh``: static_asserts that pin the kernels' unit
    constants (for the unit size of the module being compiled) to :data:`CODECS`."""
    lines = ["// Generated by `python -m flashcomm_cupy.codecs > kernels_cu/fc_codec_spec.cuh`: do not edit.",
             "// The host's codec facts (flashcomm_cupy/codecs.py), pinned for the FC_ELEMS of this build;",
             "// include after fc_quant.cuh and fc_ll.cuh.  tests/test_codecs.py checks this file is current.",
             "#pragma once", ""]
    for elems in UNIT_ELEMS:
        lines.append(f"#if FC_ELEMS == {elems}")
        for bits, c in CODECS.items():
            lines.append(f'static_assert(FcUnit<{bits}>::LO == {c.lo_words(elems)}, "INT{bits} low words");')
            if c.hi_bits:
                lines.append(f'static_assert(FcUnit<{bits}>::HI == {c.hi_words(elems)}, "INT{bits} high words");')
            lines.append(f'static_assert(FcLLq<{bits}>::BYTES == {c.ll_unit_bytes(elems)}, "INT{bits} LL unit");')
            if elems in STAGED_UNIT_ELEMS:
                lines.append(f'static_assert(FcStaged<{bits}>::CHUNKS == {c.staged_chunks(elems)}, '
                             f'"INT{bits} staged unit");')
        lines.append("#endif")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(cuda_header(), end="")
