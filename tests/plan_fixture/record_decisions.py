"""Record the flash GPU backend's kernel-selection decisions as they stood before select_plan.

Run once at commit ce74c20 (the last one whose ``FlashGpuBackend`` still had ``_resolve``,
``_plan``, ``_staged_launch`` ...):  ``python tests/plan_fixture/record_decisions.py``.
It builds the backend object the way tests/test_dispatch.py did (hardware faked: kernels
are names, the occupancy probe is :func:`fake_blocks_per_sm`) over a grid of tables,
workspace shapes, world sizes, dtypes, modes, sizes, protocol settings and forced launches,
and writes ``decisions.json.gz`` with the tables it used (in the format of the time), so the
check does not depend on files that change later (the shipped table, the device logs).  ``tests/test_plan.py`` checks that ``select_plan``
reproduces every decision exactly.  The grid itself (:func:`cases`) is shared with the test.
"""
from __future__ import annotations

import gzip
import itertools
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
FIXTURE = HERE / "decisions.json.gz"

DTYPES = ("float16", "bfloat16", "float32")
#: message sizes in elements: 1 .. 2^28, powers of two and their odd neighbours
SIZES = sorted({1, 7, 31, 32, 33, 1000, 4099} | {1 << k for k in range(6, 29, 2)}
               | {(1 << k) + 5 for k in range(9, 28, 3)} | {(1 << k) - 3 for k in (12, 17, 21, 24)})
#: (bits, group, symmetric, rotate)
MODE_SPECS = ([(None, 128, False, False)]
              + [(b, g, False, False) for b in (4, 6, 8, (4, 8)) for g in (32, 128, 512, 1024)]
              + [(b, 128, s, r) for b in (4, (4, 8)) for s, r in ((True, False), (False, True), (True, True))]
              + [((8, 4), 64, False, False), (6, 256, True, True)])
ALGOS = ("auto", "oneshot", "twoshot", "nccl")
PROTOCOLS = ("auto", "flag", "ll")
#: forced launches (threads, blocks, units[, protocol[, staged]]) as harness/tune.py and the GPU checks set them
FORCES = (None, (256, 132, 8), (128, 16, 1, "ll"), (256, 264, 2, "ll", True), (256, 264, 1, "flag", True),
          (512, 0, 4, "flag", False), (64, 0, 2, "ll"))

#: (name, max_blocks, slot_bytes, max_threads, sm_count, staged_ok, transport)
WORKSPACES = (("h100", 264, 48 << 10, 512, 132, True, "ipc"),
              ("small", 16, 4096, 256, 8, True, "ipc"),
              ("mixed", 264, 48 << 10, 512, 132, False, "ipc"),
              ("host", 264, 48 << 10, 512, 132, True, "host"))


def fake_blocks_per_sm(threads: int, smem: int) -> int:
    """The occupancy probe, faked: an H100-like SM of 228 KiB shared memory (1 KiB reserved per block)
    and 2048 threads."""
    return min(2048 // threads, (228 << 10) // (smem + 1024), 32)


def tables() -> dict:
    """name -> table dict in today's format (the shipped one, the 4xH200 one, and the test tables)."""
    repo = HERE.parent.parent
    out = {"none": {}}
    out["shipped"] = json.loads((repo / "flashcomm_cupy" / "tuning" / "default.json").read_text())
    h200 = Path("/work/device-logs/x4-1/tuning.json")
    out["h200x4"] = json.loads(h200.read_text()) if h200.is_file() else json.loads(
        (repo / "flashcomm_cupy" / "tuning" / "default.json").read_text())
    ll = {"algo": "oneshot", "threads": 256, "blocks": 0, "units": 1, "protocol": "ll"}
    flag = {"algo": "oneshot", "threads": 128, "blocks": 32, "units": 1, "protocol": "flag"}
    staged = {"algo": "twoshot", "threads": 256, "blocks": 264, "units": 4, "staged": True}
    rows = [
        {"max_bytes": 256 << 10, "lossless": ll, "quantized": ll, "quantized_flag": flag,
         "quantized_wide": ll, "quantized_wide_flag": flag},
        {"max_bytes": 1 << 20, "lossless": dict(ll, algo="twoshot"), "lossless_flag": {"algo": "nccl"},
         "quantized": dict(ll, algo="twoshot", threads=64), "quantized_wide": flag},
        {"max_bytes": 4 << 20, "lossless": ll, "quantized": ll, "quantized_flag": flag},  # an older table's row
        {"max_bytes": 64 << 20, "lossless": {"algo": "nccl"}, "quantized": staged,
         "quantized_wide": {"algo": "twoshot", "threads": 512, "blocks": 132, "units": 2}},
        {"max_bytes": 256 << 20, "lossless": {"algo": "twoshot", "threads": 512, "blocks": 0, "protocol": "ll"},
         "quantized": dict(staged, units=2), "quantized_wide": dict(staged, units=1)},
    ]
    out["mixed"] = {"worlds": {str(w): rows for w in (2, 3, 4, 8)} | {"2/host": rows[3:]}}
    return out


def cases():
    """Every (table, workspace, world, protocol, force, dtype, mode spec, algo, n) recorded.

    Full product on the sizes x modes x dtypes; the settings axes (table, workspace, protocol,
    force) are crossed with a thinned world/algo set to keep the fixture a few MB.
    """
    for table, ws, world in itertools.product(tables(), [w[0] for w in WORKSPACES], (2, 3, 4, 8)):
        if ws != "h100" and (table not in ("shipped", "mixed") or world == 3):
            continue
        for protocol, force in itertools.product(PROTOCOLS, FORCES):
            if force is not None and (protocol != "auto" or table != "mixed" or ws not in ("h100", "mixed")):
                continue
            if protocol != "auto" and ws != "h100":
                continue
            for dtype, spec, algo in itertools.product(DTYPES, MODE_SPECS, ALGOS):
                if algo == "nccl" and spec[0] is not None:
                    continue  # Mode refuses it
                if force is not None and algo not in ("oneshot", "twoshot"):
                    continue
                if dtype == "bfloat16" and (force is not None or protocol != "auto"):
                    continue
                base = (protocol, force, ws) == ("auto", None, "h100")
                if not base and spec[1] in (32, 512) and spec[0] != 8:
                    continue
                sizes = SIZES[::2] if base else SIZES[::5]
                for n in sizes:
                    yield table, ws, world, protocol, force, dtype, spec, algo, n


def mode_of(spec, algo):
    from flashcomm_cupy.config import Mode
    bits, g, sym, rot = spec
    return Mode.make(bits, g, symmetric=sym, rotate=rot, algo=algo)


def _record():
    import types

    import numpy as np

    from flashcomm_cupy import _kernels, tuning
    from flashcomm_cupy.backends import gpu
    from flashcomm_cupy.backends.ipc import WorkspaceLayout

    gpu._kernels.function = lambda name, *spec: types.SimpleNamespace(name=name, spec=tuple(int(s or 0) for s in spec))
    gpu._resident_blocks = lambda fn, threads, smem: fake_blocks_per_sm(threads, smem)
    tabs = tables()
    backends = {}

    def backend(table, ws, world, protocol):
        key = (table, ws, world, protocol)
        if key not in backends:
            _, max_blocks, slot_bytes, max_threads, sm_count, staged_ok, transport = \
                next(w for w in WORKSPACES if w[0] == ws)
            b = object.__new__(gpu.FlashGpuBackend)
            b.world_size, b.max_threads, b.force_launch, b.protocol = world, max_threads, None, protocol
            b.table = tuning.TuningTable(tabs[table], table)
            layout = WorkspaceLayout(world, max_blocks, max(slot_bytes, 2 * gpu.ELEMS_PER_THREAD * 128 + 256))
            b.ws = types.SimpleNamespace(layout=layout, transport=transport)
            b.sm_count, b.staged_ok = sm_count, staged_ok
            b._args = np.zeros(1, dtype=_kernels.ARGS_DTYPE)
            b._plans = {}
            backends[key] = b
        return backends[key]

    out = []
    for table, ws, world, protocol, force, dtype, spec, algo, n in cases():
        b = backend(table, ws, world, protocol)
        b.force_launch = force
        mode = mode_of(spec, algo)
        item = np.dtype(dtype).itemsize
        try:
            plan = b._plan(n, dtype, mode)
            rec = {"algo": b.resolve_algo(n * item, mode, item),
                   "protocol": b.resolve_protocol(n * item, mode, item)}
            if plan is not None:
                a = plan.args[0]
                rec.update(kernel=plan.fn.name, build=list(plan.fn.spec), threads=plan.block[0],
                           blocks=plan.grid[0], seg=int(a["seg_elems"]), units=int(a["units"]),
                           ll_tile=int(a["ll_tile"]), smem=plan.smem)
        except Exception as exc:  # noqa: BLE001 - recorded: select_plan must raise the same
            rec = {"error": type(exc).__name__}
        out.append(rec)
        b._plans.clear()
    return out


if __name__ == "__main__":
    sys.path.insert(0, str(HERE.parent.parent))
    recs = _record()
    with gzip.open(FIXTURE, "wt") as fh:
        json.dump({"commit": "ce74c20", "tables": tables(), "decisions": recs}, fh, separators=(",", ":"))
    print(f"{len(recs)} decisions -> {FIXTURE}")
