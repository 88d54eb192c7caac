"""Message sizes of a sweep, with nccl-tests semantics (``-b``, ``-e``, ``-f``).

Sizes are parsed with binary suffixes (``K`` = 1024, ``M`` = 1024**2,
``G`` = 1024**3), like nccl-tests, and rounded down to whole elements of the
data type (at least one element).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import List

_UNITS = {"": 1, "B": 1, "K": 1 << 10, "KB": 1 << 10, "KIB": 1 << 10,
          "M": 1 << 20, "MB": 1 << 20, "MIB": 1 << 20,
          "G": 1 << 30, "GB": 1 << 30, "GIB": 1 << 30}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*$")


def parse_size(text) -> int:
    """Bytes in ``text``: ``"4096"``, ``"4K"``, ``"256M"``, ``"1G"``, ``"1.5M"``.

    Raises ValueError for anything else, including sizes below one byte.
    """
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        m = _SIZE_RE.match(str(text))
        if not m or m.group(2).upper() not in _UNITS:
            raise ValueError(f"cannot parse size {text!r}: use bytes or a K/M/G suffix, e.g. 4K or 256M")
        value = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    if value < 1:
        raise ValueError(f"size must be at least 1 byte, got {text!r}")
    return value


def format_size(nbytes: int) -> str:
    """Shortest exact label: 1024 -> ``1K``, 3 * 2**20 -> ``3M``, 1000 -> ``1000``."""
    for suffix, unit in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if nbytes >= unit and nbytes % unit == 0:
            return f"{nbytes // unit}{suffix}"
    return str(nbytes)


@dataclass(frozen=True)
class MessageSize:
    """One point of a sweep: ``count`` elements of ``itemsize`` bytes."""

    count: int
    itemsize: int

    @property
    def nbytes(self) -> int:
        return self.count * self.itemsize


def sweep_sizes(minbytes: int, maxbytes: int, factor: float, itemsize: int) -> List[MessageSize]:
    """Sizes ``minbytes, minbytes*factor, ...`` up to and including ``maxbytes``.

    Each size is rounded down to whole elements (at least one); sizes that
    round to the same element count appear once.  ``factor`` must be > 1.
    """
    if minbytes < 1 or maxbytes < 1:
        raise ValueError("message sizes must be at least 1 byte")
    if maxbytes < minbytes:
        raise ValueError(f"max bytes ({maxbytes}) is below min bytes ({minbytes})")
    if not factor > 1:
        raise ValueError(f"step factor must be > 1, got {factor}")
    counts: List[int] = []
    size = float(minbytes)
    while size <= maxbytes * (1 + 1e-12):
        count = max(1, int(size) // itemsize)
        if count not in counts:
            counts.append(count)
        size *= factor
    return [MessageSize(c, itemsize) for c in counts]
