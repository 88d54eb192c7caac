"""Compare two ``flashcomm accuracy --model minilm --json`` results, e.g. the CPU and the GPU backend.

    python -m flashcomm_cupy.minilm.compare cpu.json gpu.json

The all-reduce is bit-exact on every backend (each equals the NumPy
reference), but the forward's matmuls are not: NumPy's BLAS and cuBLAS
round differently, about 1e-7 relative.  Those differences move a few
values across a quantization boundary, and the flipped codes propagate, so
two backends agree on each mode's numbers only to within a margin that
scales with the mode's own error.  The tolerances below are about 10x what
a different rounding of the same forward measured: the CPU study re-run
with every weight matmul in float64 (rounded once to float32) moved
``1 - mean cos`` by at most 0.56 % of itself, each site's rel RMS by at most
0.2 % of itself, and top-1 / top-5 agreement by at most 1 query of 300 (six
modes, int8 g128 to int4 g128; docs/accuracy.md).  Retrieval agreement is a
count of near-ties, so its margin grows with the mode's misses (_query_tolerance).  The worst cosine is not
compared: it is one text's, and moved by up to 0.013 (int8 g1024).
CuPy's float32 matmuls must stay float32 (no ``CUPY_TF32=1``).

Exit status: 0 when every shared mode agrees, 1 when one does not, 2 when
the runs are not comparable (other corpus, other TP size, no shared mode).
"""
from __future__ import annotations

import argparse
import math
import re
import sys
from typing import List, Tuple

from ..harness.results import read_document

#: |delta (1 - mean cos)| <= COS_REL * (1 - mean cos) + COS_ABS
COS_REL, COS_ABS = 0.05, 2e-6
#: |delta rel RMS| <= RMS_REL * rel RMS + RMS_ABS, per all-reduce site
RMS_REL, RMS_ABS = 0.02, 1e-6
#: top-1 / top-5 agreement may differ by this many queries (near-ties among the documents flip), plus
#: the square root of the queries that disagree with the lossless run (see _query_tolerance)
QUERY_FLIPS = 3
#: the lossless embeddings (unit vectors) of the sample texts: float32 rounding of two forwards differs
#: by ~1e-7 (TP vs single rank: 1.3e-7); a wrong forward differs at the 1e-2 level
SAMPLE_ABS = 1e-5


def compare(a: dict, b: dict) -> Tuple[List[str], List[str]]:
    """(problems that make the runs incomparable, modes that disagree beyond the tolerances)."""
    fatal = []
    if a.get("corpus", {}).get("digest") != b.get("corpus", {}).get("digest"):
        fatal.append("different corpora: run the second study with --corpus FIRST.json")
    if a.get("ranks") != b.get("ranks"):
        fatal.append(f"different TP sizes: {a.get('ranks')} vs {b.get('ranks')} ranks")
    if a.get("dtype") != b.get("dtype"):
        fatal.append(f"different all-reduce payloads: {a.get('dtype')} vs {b.get('dtype')}")
    rows_b = {_mode_key(r): r for r in b["rows"]}
    shared = [(r, rows_b[_mode_key(r)]) for r in a["rows"] if _mode_key(r) in rows_b]
    if not shared:
        fatal.append("no mode in common")
    mismatched = [(ra, rb) for ra, rb in shared if ra.get("algos_run") and rb.get("algos_run")
                  and ra["algos_run"] != rb["algos_run"]]
    if mismatched:  # one-shot quantizes once, two-shot twice: their errors differ by design
        first = mismatched[0][0]["algos_run"]
        advice = (f"run the second study with --algo {first[0]}" if len(first) == 1 else
                  "run both studies with one --algo")
        fatal.append(f"different all-reduce algorithms ({advice}): " + "; ".join(
            f"{ra['label']} ran {'+'.join(ra['algos_run'])} vs {'+'.join(rb['algos_run'])}"
            for ra, rb in mismatched[:3]))
    queries = a.get("queries") or 1
    bad = _compare_lossless(a, b, queries)
    for ra, rb in shared:
        why = []
        deficit = 1 - ra["mean_cos"]
        if not _close(ra["mean_cos"], rb["mean_cos"], COS_REL * deficit + COS_ABS):
            why.append(f"mean cos {ra['mean_cos']:.6f} vs {rb['mean_cos']:.6f}")
        for key in ("top1", "top5"):
            if not _close(ra[key] * queries, rb[key] * queries, _query_tolerance(ra[key], rb[key], queries)):
                why.append(f"{key} {100 * ra[key]:.1f} % vs {100 * rb[key]:.1f} %")
        for site, va in ra["site_rel_rms"].items():
            vb = rb["site_rel_rms"].get(site)
            if not _close(va, vb, RMS_REL * va + RMS_ABS):
                why.append(f"{site} rel RMS {va:.4g} vs {vb}")
        if why:
            bad.append(f"{ra['label']}: " + "; ".join(why))
    return fatal, bad


def _query_tolerance(agree_a: float, agree_b: float, queries: int) -> float:
    """How many queries two runs' retrieval agreement may differ by: QUERY_FLIPS + sqrt(misses),
    ``misses`` counted in the first run (the reference: a degraded second run must not widen its
    own margin).

    A query whose neighbours differ from the lossless run's sits near a tie, and a different
    rounding of the forward re-draws which of those near-ties flip; with ``misses`` such queries
    the count spreads by about its square root (2xH200 against the CPU run: INT4 modes with 15-99
    misses differed by 2-6 queries, INT8 modes by at most 3).
    """
    misses = queries * (1.0 - agree_a)
    return QUERY_FLIPS + math.sqrt(max(misses, 0.0)) + 1e-9


def _mode_key(row: dict) -> str:
    """A row's mode without the forced algorithm (``int8 g32 [twoshot]`` -> ``int8 g32``): which
    algorithm ran is compared through ``algos_run``, so an ``auto`` study meets a forced one."""
    return re.sub(r" \[\w+\]$", "", row["label"])


def _close(x, y, tolerance) -> bool:
    """|x - y| <= tolerance; False when either is missing or not finite (a broken run never agrees)."""
    return x is not None and y is not None and math.isfinite(x) and math.isfinite(y) and abs(x - y) <= tolerance


def _compare_lossless(a: dict, b: dict, queries: int) -> List[str]:
    """The two forwards themselves: sample embeddings and the lossless retrieval accuracy."""
    why = []
    sa, sb = a.get("lossless_sample"), b.get("lossless_sample")
    if sa and sb:
        diff = max(abs(x - y) for ra, rb in zip(sa, sb) for x, y in zip(ra, rb))
        if len(sa) != len(sb) or diff > SAMPLE_ABS:
            why.append(f"lossless embeddings differ by {diff:.3g} (> {SAMPLE_ABS:g})")
    for key in ("lossless_accuracy_top1", "lossless_accuracy_top5"):
        if key in a and key in b and not _close(a[key] * queries, b[key] * queries, QUERY_FLIPS + 1e-9):
            why.append(f"{key} {100 * a[key]:.1f} % vs {100 * b[key]:.1f} %")
    return [f"lossless forward: {w}" for w in why]


def summary(a: dict, b: dict) -> str:
    """One line per shared mode: mean cos, top-1 and max rel RMS of both runs."""
    rows_b = {r["label"]: r for r in b["rows"]}
    lines = [f"{'mode':18} {'mean cos A':>11} {'mean cos B':>11} {'top1 A':>7} {'top1 B':>7} "
             f"{'max rel RMS A':>14} {'B':>9}"]
    for ra in a["rows"]:
        rb = rows_b.get(ra["label"])
        if rb is not None:
            lines.append(f"{ra['label']:18} {ra['mean_cos']:11.6f} {rb['mean_cos']:11.6f} {100 * ra['top1']:7.1f} "
                         f"{100 * rb['top1']:7.1f} {100 * ra['max_rel_rms']:13.4g}% {100 * rb['max_rel_rms']:8.4g}%")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("first", help="a flashcomm accuracy --model minilm --json result (e.g. the CPU run)")
    parser.add_argument("second", help="another one (e.g. the GPU run, made with --corpus FIRST)")
    args = parser.parse_args(argv)
    a, b = read_document(args.first), read_document(args.second)
    fatal, bad = compare(a, b)
    if fatal:
        print("not comparable: " + "; ".join(fatal), file=sys.stderr)
        return 2
    print(f"A = {args.first} ({a['backend']}), B = {args.second} ({b['backend']})")
    print(summary(a, b))
    if bad:
        print(f"DISAGREE beyond the forward's rounding in {len(bad)} modes:\n  " + "\n  ".join(bad))
        return 1
    print(f"AGREE: every shared mode within the forward's rounding (mean cos {COS_REL:g} x (1 - cos) + {COS_ABS:g}, "
          f"rel RMS {RMS_REL:g} x + {RMS_ABS:g}, retrieval {QUERY_FLIPS} + sqrt(misses) queries)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
