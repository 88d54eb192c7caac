"""What rotation costs: rotate off vs on, per mode and size, from one ``flashcomm bench --rotate both`` JSON.

    python benchmarks/rotation_price.py bench.json

One line per (codec, size): the primary time (CUDA-graph where measured) without and with
rotation, the difference, and issue 21's target: at most 10 % over the unrotated call from
1 MB up, at most 1 us below.  Both rows come from the same run, so the comparison is fair;
rows whose correctness pass failed are marked.  Exit status 0 (a report, not a gate).
"""
from __future__ import annotations

import argparse
import json
import sys

#: issue 21's target: relative bound from this size up, absolute bound below it
TARGET_FROM_BYTES = 1 << 20
TARGET_REL = 0.10
TARGET_ABS_US = 1.0


def price_rows(rows):
    """[(codec label, size_bytes, off_us, on_us, ok)] for every mode measured with and without rotation."""
    timed = {}
    for r in rows:
        if r.get("baseline") or r.get("bits") in (None, "none") or r.get("time_us") is None:
            continue
        key = (r["bits"], r["group_size"], r["symmetric"], r["algo"], r["dtype"], r["size_bytes"])
        timed.setdefault(key, {})[bool(r["rotate"])] = r
    out = []
    for (bits, g, sym, algo, dtype, size), pair in sorted(timed.items(), key=lambda kv: (str(kv[0][0]), kv[0][5])):
        if False in pair and True in pair:
            off, on = pair[False], pair[True]
            ran = {f"{r.get('protocol') or ''} {r.get('algo_resolved') or algo}".strip() for r in (off, on)}
            label = f"int{bits} g{g}{' sym' if sym else ''} {dtype} {'/'.join(sorted(ran))}"
            out.append((label, size, off["time_us"], on["time_us"], bool(off.get("ok")) and bool(on.get("ok"))))
    return out


def within_target(size: int, off_us: float, on_us: float) -> bool:
    if size >= TARGET_FROM_BYTES:
        return on_us <= off_us * (1 + TARGET_REL)
    return on_us - off_us <= TARGET_ABS_US


def _size(n: int) -> str:
    for unit, shift in (("G", 30), ("M", 20), ("K", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift}{unit}"
    return str(n)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bench_json")
    args = ap.parse_args(argv)
    with open(args.bench_json) as f:
        rows = json.load(f)["rows"]
    table = price_rows(rows)
    if not table:
        print("no mode was measured both with and without rotation (run bench with --rotate both)")
        return 0
    print(f"{'mode':40s} {'size':>6s} {'off us':>9s} {'on us':>9s} {'+us':>7s} {'+%':>6s}  target")
    for label, size, off, on, ok in table:
        verdict = "met" if within_target(size, off, on) else "missed"
        print(f"{label:40s} {_size(size):>6s} {off:9.2f} {on:9.2f} {on - off:7.2f} {100 * (on / off - 1):5.1f}%  "
              f"{verdict}{'' if ok else '  (correctness pass FAILED)'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
