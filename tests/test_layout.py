"""The workspace layout every rank shares, and the offsets it hands the kernels (no GPU needed)."""
from __future__ import annotations

import numpy as np
import pytest

from flashcomm_cupy.backends import ipc
from flashcomm_cupy.backends.flash import layout as flash_layout
from flashcomm_cupy.backends.flash.layout import ARGS_DTYPE, MAX_RANKS, POISON_AREA_BYTES, WorkspaceLayout

OFFSET_FIELDS = ("slot_bytes", "max_blocks", "flags_off", "rs_off", "ag_off", "os_off", "ll_off", "ll_slot_bytes",
                 "ts_epoch_off", "os_epoch_off", "ll_epoch_off", "poison_off", "ag_flags_off", "os_flags_off")


@pytest.mark.parametrize("world,max_blocks", [(2, 264), (8, 132), (3, 1)])
def test_the_kernels_get_every_offset_from_the_layout(world, max_blocks):
    layout = WorkspaceLayout(world, max_blocks, 48 << 10)
    a = np.zeros(1, dtype=ARGS_DTYPE)[0]
    layout.fill_args(a)
    for field in OFFSET_FIELDS:
        assert int(a[field]) == getattr(layout, field), field


@pytest.mark.parametrize("world,max_blocks", [(2, 264), (8, 132), (3, 1)])
def test_flag_sets_epochs_and_poison_words_never_overlap_the_slots(world, max_blocks):
    lay = WorkspaceLayout(world, max_blocks, 48 << 10)
    set_bytes = 4 * MAX_RANKS * max_blocks
    assert lay.ts_epoch_off == lay.flags_off + 3 * set_bytes  # after the RS, AG and one-shot flag sets
    assert (lay.ag_flags_off, lay.os_flags_off) == (lay.flags_off + set_bytes, lay.flags_off + 2 * set_bytes)
    # the two-shot and one-shot epochs are separate words (fc_signal.cuh: no 2^31 gap between sets)
    assert lay.os_epoch_off - lay.ts_epoch_off == 4 * max_blocks
    assert lay.ll_epoch_off - lay.os_epoch_off == 4 * max_blocks
    assert lay.poison_off - lay.ll_epoch_off == 4 * max_blocks
    assert lay.poison_off + POISON_AREA_BYTES <= lay.rs_off < lay.ag_off < lay.os_off < lay.ll_off < lay.total


def test_the_layout_has_one_home_and_its_old_import_paths_name_the_same_objects():
    from flashcomm_cupy import _kernels
    assert ipc.WorkspaceLayout is WorkspaceLayout and ipc.MAX_RANKS == MAX_RANKS
    assert _kernels.ARGS_DTYPE is flash_layout.ARGS_DTYPE and _kernels.ERROR_FIELDS is flash_layout.ERROR_FIELDS
