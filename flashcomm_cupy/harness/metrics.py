"""Bandwidth and wire-floor arithmetic (nccl-tests conventions, GB = 1e9 bytes)."""
from __future__ import annotations

from typing import Optional

from ..config import Mode, wire_bytes_per_element


def algbw_gbps(nbytes: int, seconds: float) -> float:
    """Algorithm bandwidth: message bytes / time, in GB/s."""
    return nbytes / seconds / 1e9


def busbw_gbps(algbw: float, world_size: int) -> float:
    """Bus bandwidth of an all-reduce: ``algbw * 2 (n-1) / n`` (nccl-tests)."""
    return algbw * 2 * (world_size - 1) / world_size


def wire_bytes_per_rank(mode: Mode, count: int, itemsize: int, world_size: int) -> float:
    """Bytes each rank must send for ``count`` elements under ``mode``.

    Reduce-scatter then all-gather, each moving ``(n-1)/n`` of the message at
    the step's bytes per element (codes plus scale/min metadata for quantized
    steps, raw items for lossless ones and the baseline).  This is the least
    any algorithm with these codecs sends; one-shot sends more.
    """
    rs, ag = wire_bytes_per_element(mode, itemsize)
    return count * (rs + ag) * (world_size - 1) / world_size


def floor_seconds(mode: Mode, count: int, itemsize: int, world_size: int,
                  peer_bw_gbps: Optional[float]) -> Optional[float]:
    """Wire floor: :func:`wire_bytes_per_rank` / ``peer_bw_gbps``; None without a bandwidth."""
    if not peer_bw_gbps or world_size < 2:
        return None
    return wire_bytes_per_rank(mode, count, itemsize, world_size) / (peer_bw_gbps * 1e9)
