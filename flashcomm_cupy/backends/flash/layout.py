"""Every workspace offset, and the host's mirrors of the kernels' argument and error records.

One rank's workspace, by :class:`WorkspaceLayout` (bytes; all offsets 4 KiB aligned):

====================  =====================================================
canary                ``uint32[8]`` written by peers during the access check
flags                 three flag sets (reduce-scatter, all-gather, one-shot),
                      each ``uint32[8 ranks][max_blocks]``, then this rank's
                      per-block epochs of the two-shot and of the one-shot
                      sets and per-block LL call counters (each
                      ``uint32[max_blocks]``), then the poison area
                      (kernels_cu/fc_signal.cuh)
rs slots              ``[world][max_blocks]`` slots of ``slot_bytes``
ag slots              ``[world][max_blocks]`` slots
one-shot slots        ``[2 parities][world][max_blocks]`` slots
LL slots              ``[2 parities][2 areas][world][max_blocks]`` slots of
                      ``ll_slot_bytes``, filled with 0xFF bytes (the "empty"
                      sentinel of kernels_cu/fc_ll.cuh) instead of zeros
====================  =====================================================

Every offset reaches the kernels through their argument record (``FcArgs``, mirrored by
:data:`ARGS_DTYPE` and filled by :meth:`WorkspaceLayout.fill_args`): the kernels derive none.
``tests/test_kernels_compile.py`` pins :data:`ARGS_DTYPE`, :data:`ERROR_FIELDS` and the poison
area against the CUDA structs with ``static_assert``s.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MAX_RANKS = 8
#: the poison area's layout (FC_POISON_PEERS_OFF / FC_POISON_AREA_BYTES in fc_signal.cuh)
POISON_PEERS_OFF = 32
POISON_AREA_BYTES = POISON_PEERS_OFF + 8 * MAX_RANKS
_PAGE = 4096
_ALLOC_ALIGN = 2 << 20  # IPC shares whole allocations; keep ours on their own 2 MiB


def _up(x: int, a: int) -> int:
    return (x + a - 1) // a * a


@dataclass(frozen=True)
class WorkspaceLayout:
    world: int
    max_blocks: int
    slot_bytes: int
    ll_slot_bytes: int = 8 << 10

    @property
    def canary_off(self) -> int:
        return 0

    @property
    def flags_off(self) -> int:
        return _PAGE

    @property
    def flag_set_bytes(self) -> int:
        return 4 * MAX_RANKS * self.max_blocks

    @property
    def ag_flags_off(self) -> int:
        """The two-shot's all-gather flag set (after the reduce-scatter set at :attr:`flags_off`)."""
        return self.flags_off + self.flag_set_bytes

    @property
    def os_flags_off(self) -> int:
        """The one-shot flag set."""
        return self.flags_off + 2 * self.flag_set_bytes

    @property
    def ts_epoch_off(self) -> int:
        """Per-block epochs of the two-shot's reduce-scatter and all-gather flag sets."""
        return self.flags_off + 3 * self.flag_set_bytes

    @property
    def os_epoch_off(self) -> int:
        """Per-block epochs of the one-shot flag set (counted apart: see fc_signal.cuh)."""
        return self.ts_epoch_off + 4 * self.max_blocks

    @property
    def ll_epoch_off(self) -> int:
        """Per-block LL call counters."""
        return self.os_epoch_off + 4 * self.max_blocks

    @property
    def poison_off(self) -> int:
        """The poison area (fc_signal.cuh): ``uint32[8]`` poison words, one per source rank and
        non-zero once that rank gave up, then at :attr:`poison_peers_off` every rank's
        workspace base as this rank maps it (``uint64[8]``, written by the host)."""
        return self.ll_epoch_off + 4 * self.max_blocks

    @property
    def poison_peers_off(self) -> int:
        return self.poison_off + POISON_PEERS_OFF

    @property
    def rs_off(self) -> int:
        return _up(self.poison_off + POISON_AREA_BYTES, _PAGE)

    @property
    def region_bytes(self) -> int:
        return self.world * self.max_blocks * self.slot_bytes

    @property
    def ag_off(self) -> int:
        return self.rs_off + self.region_bytes

    @property
    def os_off(self) -> int:
        return self.ag_off + self.region_bytes

    @property
    def ll_off(self) -> int:
        return self.os_off + 2 * self.region_bytes

    @property
    def ll_bytes(self) -> int:
        return 2 * 2 * self.world * self.max_blocks * self.ll_slot_bytes

    @property
    def total(self) -> int:
        return _up(self.ll_off + self.ll_bytes, _ALLOC_ALIGN)

    def fill_args(self, a) -> None:
        """Write every workspace offset and size of this layout into an FcArgs record ``a``
        (``flashcomm_cupy._kernels.ARGS_DTYPE``): the kernels derive none of them."""
        a["slot_bytes"], a["max_blocks"], a["flags_off"] = self.slot_bytes, self.max_blocks, self.flags_off
        a["rs_off"], a["ag_off"], a["os_off"] = self.rs_off, self.ag_off, self.os_off
        a["ll_off"], a["ll_slot_bytes"] = self.ll_off, self.ll_slot_bytes
        a["ts_epoch_off"], a["os_epoch_off"] = self.ts_epoch_off, self.os_epoch_off
        a["ll_epoch_off"], a["poison_off"] = self.ll_epoch_off, self.poison_off
        a["ag_flags_off"], a["os_flags_off"] = self.ag_flags_off, self.os_flags_off


# Mirror of `struct FcArgs` in kernels_cu/fc_args.cuh (natural alignment, 248 bytes;
# tests/test_kernels_compile.py pins every offset with static_asserts).
_ARG_FIELDS = [
    ("in_ptr", "<u8", 0), ("out_ptr", "<u8", 8), ("n", "<i8", 16), ("seg_elems", "<i8", 24), ("err", "<u8", 32),
    ("slot_bytes", "<i8", 40), ("flags_off", "<i8", 48), ("rs_off", "<i8", 56), ("ag_off", "<i8", 64),
    ("os_off", "<i8", 72), ("timeout_ns", "<i8", 80), ("rank", "<i4", 88), ("world", "<i4", 92),
    ("group", "<i4", 96), ("flags", "<i4", 100), ("max_blocks", "<i4", 104), ("rot_norm", "<f4", 108),
    ("units", "<i4", 112), ("ll_tile", "<i4", 116), ("ll_off", "<i8", 120), ("ll_slot_bytes", "<i8", 128),
    ("peers", ("<u8", (8,)), 136), ("ts_epoch_off", "<i8", 200), ("os_epoch_off", "<i8", 208),
    ("ll_epoch_off", "<i8", 216), ("poison_off", "<i8", 224), ("ag_flags_off", "<i8", 232),
    ("os_flags_off", "<i8", 240),
]
ARGS_DTYPE = np.dtype({
    "names": [f for f, _, _ in _ARG_FIELDS],
    "formats": [t for _, t, _ in _ARG_FIELDS],
    "offsets": [o for _, _, o in _ARG_FIELDS],
    "itemsize": 248,
})

# Mirror of `struct FcError` in kernels_cu/fc_args.cuh (eight uint32 words in host-mapped
# memory; pinned by tests/test_kernels_compile.py) and its codes.
ERROR_FIELDS = ("code", "rank", "peer", "block", "epoch", "abort", "late", "claim")
ERR_TIMEOUT = 1  # FC_ERR_TIMEOUT: this rank waited past the bound for `peer`
ERR_POISON = 2   # FC_ERR_POISON: rank `peer` gave up and poisoned this rank
ERR_NODE = 3     # FC_ERR_NODE: the hierarchical inter-node step failed on this rank, which poisoned its node
LATE_OTHER_NODE = 0xFF  # FC_LATE_OTHER_NODE: `late` when what failed was another node

FLAG_ROTATE = 1
FLAG_SYM = 2
