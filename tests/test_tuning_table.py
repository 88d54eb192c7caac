"""The tuning table's format: class -> ordered candidates per row, sections per card/world/transport,
the single-card format of before upgraded on load, merging and writing."""
from __future__ import annotations

import json

import pytest

from flashcomm_cupy import tuning as old_path
from flashcomm_cupy.backends.flash import table as tuning
from flashcomm_cupy.backends.flash.table import Choice

LL = {"algo": "oneshot", "threads": 128, "blocks": 0, "units": 1, "protocol": "ll", "us": 3.3}
FLAG = {"algo": "oneshot", "threads": 128, "blocks": 8, "units": 1, "protocol": "flag", "us": 6.0}
STAGED = {"algo": "twoshot", "threads": 256, "blocks": 264, "units": 2, "protocol": "flag", "staged": True}
OLD = {"card": "NVIDIA H100 80GB HBM3", "date": "2026-11-26", "tuned_bits": 4, "wide_bits": 8, "worlds": {
    "2": [{"max_bytes": 1 << 20, "lossless": LL, "lossless_flag": {"algo": "nccl"}, "quantized": LL,
           "quantized_flag": FLAG, "quantized_wide": LL, "quantized_wide_flag": FLAG},
          {"max_bytes": 4096, "lossless": LL, "quantized": LL, "quantized_flag": FLAG},
          {"max_bytes": 1 << 28, "lossless": {"algo": "nccl"}, "quantized": STAGED, "quantized_wide": FLAG}],
    "2/host": [{"max_bytes": 1 << 30, "lossless": FLAG, "quantized": FLAG}]}}


def test_the_old_format_becomes_ordered_candidate_lists():
    new = tuning.upgrade(OLD)
    assert new["format"] == tuning.FORMAT
    ipc, host = new["sections"]
    assert (ipc["card"], ipc["world"], ipc["transport"], ipc["date"]) == ("NVIDIA H100 80GB HBM3", 2, "ipc", "2026-11-26")
    assert (host["world"], host["transport"]) == (2, "host")
    small, mid, large = ipc["rows"]  # sorted by size
    assert small["max_bytes"] == 4096
    # an LL choice without a recorded flag fallback gets its own shape with flags
    assert small["lossless"] == [LL, {k: v for k, v in LL.items() if k != "us"} | {"protocol": "flag"}]
    # a row from before INT8 was timed: wide modes take the narrow list's flag choice
    assert small["wide"] == [FLAG]
    assert mid["lossless"] == [LL, {"algo": "nccl"}]
    assert mid["narrow"] == [LL, FLAG] and mid["wide"] == [LL, FLAG]
    assert large["narrow"] == [STAGED] and large["wide"] == [FLAG] and large["lossless"] == [{"algo": "nccl"}]
    assert tuning.upgrade(new) is new  # already new: unchanged
    with pytest.raises(ValueError, match="format"):
        tuning.upgrade({"format": "flashcomm.tuning/9", "sections": []})


def test_lookups_read_the_same_in_either_format():
    old, new = tuning.TuningTable(OLD, "old"), tuning.TuningTable(tuning.upgrade(OLD), "new")
    assert old.sections == new.sections and old.digest() == new.digest()
    for nbytes, cls in ((100, "lossless"), (100, "wide"), (1 << 19, "narrow"), (1 << 29, "narrow")):
        assert old.candidates(2, nbytes, cls) == new.candidates(2, nbytes, cls)
    assert new.candidates(2, 1 << 29, "narrow") == (Choice("twoshot", 256, 264, 2, "flag", True),)  # last row
    assert new.candidates(4, 100, "narrow") is None  # no section: the caller's heuristic
    assert new.choose(2, 100, True) == Choice("oneshot", 128, 0, 1, "ll")
    assert new.choose(2, 100, True, flag_only=True) == Choice("oneshot", 128, 0, 1, "flag")
    assert new.choose(2, 100, False, transport="host") == Choice("oneshot", 128, 8, 1)
    assert new.choose(3, 100, True) == tuning.heuristic(3, 100, True)


def test_written_tables_load_back_identically_and_old_import_paths_still_work(tmp_path):
    path = tmp_path / "t.json"
    tuning.TuningTable(OLD, "x").save(path)
    text = path.read_text()
    assert json.loads(text) == tuning.upgrade(OLD)
    assert tuning.load(str(path)).sections == tuning.TuningTable(OLD, "x").sections
    assert tuning.dumps(json.loads(text)) == text  # the writer is stable
    assert old_path.TuningTable is tuning.TuningTable and old_path.Choice is Choice


def test_merge_replaces_the_retuned_range_of_one_section_and_keeps_the_rest():
    base = tuning.upgrade(OLD)
    rows = base["sections"][0]["rows"]
    retuned = dict(rows[0], narrow=[FLAG])
    merged = tuning.merge(OLD, {"card": "NVIDIA H100 80GB HBM3", "date": "2026-12-01",
                                "worlds": {"2": [dict(OLD["worlds"]["2"][1], quantized=FLAG)]}})
    ipc = merged["sections"][0]
    assert ipc["rows"] == [retuned] + rows[1:] and ipc["date"] == "2026-12-01"
    assert merged["sections"][1] == base["sections"][1]  # the host section stays
    # another card's rows are a new section beside, not over, these
    other = tuning.merge(base, {"card": "NVIDIA H200", "worlds": {"2": OLD["worlds"]["2"][:1]}})
    assert [(s["card"], s["world"], s["transport"]) for s in other["sections"]] == [
        ("NVIDIA H100 80GB HBM3", 2, "ipc"), ("NVIDIA H100 80GB HBM3", 2, "host"), ("NVIDIA H200", 2, "ipc")]
    # rows inside the re-tuned range go even when the new grid skips their sizes
    a = dict(rows[0], max_bytes=2048)
    b = dict(rows[-1], max_bytes=1 << 29)
    spans = tuning.merge(base, {"format": tuning.FORMAT, "sections": [dict(base["sections"][0], rows=[a, b])]})
    assert spans["sections"][0]["rows"] == [a, b]
    assert tuning.merge(base, {"format": tuning.FORMAT, "sections": [dict(base["sections"][0], rows=[])]}) == base


def test_the_shipped_table_keeps_the_h100_rows_by_card_beside_the_h200_ones():
    t = tuning.load(str(tuning.SHIPPED))
    assert list(t.sections) == [("NVIDIA H100 80GB HBM3", 2, "ipc"), ("NVIDIA H100 80GB HBM3", 4, "ipc"),
                                ("NVIDIA H200", 4, "ipc"), ("NVIDIA H200", 2, "ipc"), ("NVIDIA H200", 2, "host")]
    assert t.describe()["worlds"] == [2, 4]
