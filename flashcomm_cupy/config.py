"""Configuration types shared by the reference, every backend, the harness and the CLI.

A :class:`Codec` describes one quantization step (bit width, group size,
symmetric or asymmetric).  A :class:`Mode` describes a whole all-reduce
setting: the codec of the reduce-scatter step, the codec of the all-gather
step (either may be ``None``, meaning lossless), rotation and algorithm.

This module imports only the standard library and NumPy.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional, Tuple, Union

import numpy as np

SUPPORTED_BITS = (4, 6, 8)
SUPPORTED_GROUP_SIZES = (32, 64, 128, 256, 512, 1024)
#: the flash algorithms a caller may request ("auto" lets the backend choose)
FLASH_ALGOS = ("auto", "oneshot", "twoshot", "hierarchical")
ALGOS = FLASH_ALGOS + ("nccl", "mpi")

BitsArg = Union[None, int, str, Tuple[Optional[int], Optional[int]]]

#: ``bits`` when a caller names none (``Communicator.all_reduce``, ``resolve_algo``, the torch ops,
#: the reference).  From the MiniLM study (docs/accuracy.md, "A real model"): INT8 with groups of
#: 128 keeps the sentence embeddings within mean cosine 0.999 and 99 % of nearest-neighbour
#: retrievals without rotation; INT6 needs rotation for the first and INT4 meets neither, rotated
#: or not.  INT4 stays one argument away (``bits=4``), and is what the speed headlines measure.
ALL_REDUCE_BITS = 8


@dataclass(frozen=True)
class Codec:
    """One group-wise integer quantization step.

    ``bits`` in {4, 6, 8}; ``group_size`` a power of two in [32, 1024];
    ``symmetric`` selects abs-max scaling (codes centred on ``2**(bits-1)``)
    instead of min/scale (asymmetric, the default and the paper's choice).
    """

    bits: int
    group_size: int = 128
    symmetric: bool = False

    def __post_init__(self):
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(f"bits must be one of {SUPPORTED_BITS} or None, got {self.bits!r}")
        if self.group_size not in SUPPORTED_GROUP_SIZES:
            raise ValueError(
                f"group_size must be one of {SUPPORTED_GROUP_SIZES}, got {self.group_size!r}")

    @property
    def qmax(self) -> int:
        """Largest code: 2**bits - 1 (asymmetric) or 2**(bits-1) - 1 (symmetric magnitude)."""
        return (1 << (self.bits - 1)) - 1 if self.symmetric else (1 << self.bits) - 1

    @property
    def meta_per_group(self) -> int:
        """fp32 metadata words per group: scale (+ min when asymmetric)."""
        return 1 if self.symmetric else 2

    def wire_bytes_per_element(self) -> float:
        """Average bytes on the wire per element, codes plus metadata."""
        return self.bits / 8 + 4 * self.meta_per_group / self.group_size


def parse_bits(bits: BitsArg) -> Tuple[Optional[int], Optional[int]]:
    """Normalise a ``bits`` argument to ``(reduce_scatter_bits, all_gather_bits)``.

    Accepts ``None``/``"none"`` (lossless), an int, ``"4"``, ``"4/8"`` or a pair.
    A pair may not mix lossless and quantized steps.
    """
    if bits is None:
        return (None, None)
    if isinstance(bits, str):
        text = bits.strip().lower()
        if text in ("none", "lossless", "fp", ""):
            return (None, None)
        parts = text.replace(",", "/").split("/")
        try:
            values = [int(p) for p in parts]
        except ValueError:
            raise ValueError(f"cannot parse bits {bits!r}: use none, 4, 6, 8 or RS/AG such as 4/8") from None
        return parse_bits(tuple(values) if len(values) > 1 else values[0])
    if isinstance(bits, (int, np.integer)) and not isinstance(bits, bool):
        b = int(bits)
        if b not in SUPPORTED_BITS:
            raise ValueError(f"bits must be one of {SUPPORTED_BITS} or None, got {b}")
        return (b, b)
    if isinstance(bits, (tuple, list)) and len(bits) == 2:
        rs, ag = bits
        if (rs is None) != (ag is None):
            raise ValueError("bits pair must be both None (lossless) or both quantized")
        if rs is None:
            return (None, None)
        for b in (rs, ag):
            if int(b) not in SUPPORTED_BITS:
                raise ValueError(f"bits must be one of {SUPPORTED_BITS} or None, got {b}")
        return (int(rs), int(ag))
    raise ValueError(f"cannot interpret bits={bits!r}")


def _is_integer(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _require_switch(name: str, value) -> bool:
    """``value`` as a bool, where it is one (or 0/1); anything else, such as the string "no" (which
    ``bool()`` would take as True), raises TypeError."""
    if isinstance(value, (bool, np.bool_)) or (_is_integer(value) and value in (0, 1)):
        return bool(value)
    raise TypeError(f"{name} must be True or False, got {value!r}")


@dataclass(frozen=True)
class Mode:
    """A complete all-reduce setting.

    ``rs_bits``/``ag_bits`` are both None for lossless.  ``algo`` is one of
    :data:`ALGOS`; "auto" lets the backend choose.  Rotation applies only to
    quantized modes.
    """

    rs_bits: Optional[int] = ALL_REDUCE_BITS
    ag_bits: Optional[int] = ALL_REDUCE_BITS
    group_size: int = 128
    symmetric: bool = False
    rotate: bool = False
    algo: str = "auto"

    def __post_init__(self):
        parse_bits((self.rs_bits, self.ag_bits))
        for name in ("symmetric", "rotate"):  # stored as bool: 1 and numpy.True_ are True
            object.__setattr__(self, name, _require_switch(name, getattr(self, name)))
        if not _is_integer(self.group_size):
            raise TypeError(f"group_size must be an integer, one of {SUPPORTED_GROUP_SIZES}, "
                            f"got {self.group_size!r}")
        object.__setattr__(self, "group_size", int(self.group_size))
        if self.group_size not in SUPPORTED_GROUP_SIZES:
            raise ValueError(
                f"group_size must be one of {SUPPORTED_GROUP_SIZES}, got {self.group_size!r}")
        if self.algo not in ALGOS:
            raise ValueError(f"algo must be one of {ALGOS}, got {self.algo!r}")
        if self.rotate and self.lossless:
            raise ValueError("rotate=True needs a quantized mode (bits=None is exact already)")
        if self.algo in ("nccl", "mpi") and not self.lossless:
            # the vendor collective only sums full-precision data: running it would silently
            # drop the requested quantization
            flash = [a for a in ALGOS if a not in ("auto", "nccl", "mpi")]
            names = ", ".join(flash[:-1]) + f" and {flash[-1]}" if len(flash) > 1 else flash[0]
            raise ValueError(f"algo={self.algo!r} is the vendor's lossless all-reduce and cannot run "
                             f"bits={self.bits_label}: quantized modes run {names} (or auto); "
                             "pass bits=None to run it")

    @classmethod
    def make(cls, bits: BitsArg = ALL_REDUCE_BITS, group_size: int = 128, symmetric: bool = False,
             rotate: bool = False, algo: str = "auto") -> "Mode":
        rs, ag = parse_bits(bits)
        if not _is_integer(group_size):  # 128.9 or "128" must not pass as 128
            raise TypeError(f"group_size must be an integer, one of {SUPPORTED_GROUP_SIZES}, got {group_size!r}")
        return cls(rs, ag, int(group_size), _require_switch("symmetric", symmetric),
                   _require_switch("rotate", rotate), str(algo))

    @property
    def lossless(self) -> bool:
        return self.rs_bits is None

    @property
    def is_baseline(self) -> bool:
        """True for the vendor collective (NCCL on GPUs, MPI_Allreduce on CPUs)."""
        return self.algo in ("nccl", "mpi")

    @property
    def rs_codec(self) -> Optional[Codec]:
        return None if self.lossless else Codec(self.rs_bits, self.group_size, self.symmetric)

    @property
    def ag_codec(self) -> Optional[Codec]:
        return None if self.lossless else Codec(self.ag_bits, self.group_size, self.symmetric)

    def with_algo(self, algo: str) -> "Mode":
        return replace(self, algo=algo)

    @property
    def bits_label(self) -> str:
        if self.lossless:
            return "none"
        if self.rs_bits == self.ag_bits:
            return str(self.rs_bits)
        return f"{self.rs_bits}/{self.ag_bits}"

    @property
    def label(self) -> str:
        """Short human label, e.g. ``int4/8 g128 rot`` or ``lossless``."""
        if self.is_baseline:
            return self.algo
        if self.lossless:
            text = "lossless"
        else:
            text = f"int{self.bits_label} g{self.group_size}"
            if self.symmetric:
                text += " sym"
            if self.rotate:
                text += " rot"
        if self.algo not in ("auto",):
            text += f" [{self.algo}]"
        return text


def wire_bytes_per_element(mode: Mode, itemsize: int) -> Tuple[float, float]:
    """Bytes per element sent in (reduce-scatter, all-gather); lossless sends raw items."""
    if mode.lossless or mode.is_baseline:
        return float(itemsize), float(itemsize)
    return mode.rs_codec.wire_bytes_per_element(), mode.ag_codec.wire_bytes_per_element()
