"""Compare the machine code of two versions of ``kernels_cu``, function by function.

A kernel refactoring that only moves code must compile to identical SASS.
This script builds every specialisation the product compiles (the
``precompile`` list of ``flashcomm_cupy.backends.gpu``: FC_DT 0/1/2 x
(RS, AG) bits (0,0) (4,4) (6,6) (8,8) (4,8) with 32-element units, plus the
quantized ones with 16-element units for the LL kernels and 8-element ones for
the small one-shot) with nvcc for sm_90, dumps each cubin's SASS with
``cuobjdump -sass`` and ptxas's resource lines (``-Xptxas -v``), and compares
two such builds::

    python benchmarks/sass_diff.py build /path/to/old/kernels_cu /tmp/sass_before
    python benchmarks/sass_diff.py build kernels_cu /tmp/sass_after
    python benchmarks/sass_diff.py compare /tmp/sass_before /tmp/sass_after

``compare`` prints one line per (specialisation, function): ``identical``
when every instruction and its encoding match (instruction addresses are
dropped: only their order matters), ``DIFFERENT`` with the number of
differing lines otherwise, and ptxas's register/stack/spill line whenever it
changed.  The exit status is 0 only when everything is identical, so the
script can gate a pure move.  To get an old tree::

    mkdir -p /tmp/old && git archive <rev> kernels_cu | tar -x -C /tmp/old

``cuobjdump`` is taken from ``$CUOBJDUMP`` or the PATH (on the team machine:
/work/wt/bin/cuobjdump).
"""
from __future__ import annotations

import argparse
import difflib
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

DTYPES = (0, 1, 2)
BITS = ((0, 0), (4, 4), (6, 6), (8, 8), (4, 8))
LLQ_UNIT_ELEMS = (16, 8)  # plan.LLQ_UNIT_ELEMS and LLQ_SMALL_UNIT_ELEMS: quantized modules only


def specialisations():
    """(name, defines) for every module the product builds."""
    specs = []
    for dt in DTYPES:
        for rs, ag in BITS:
            specs.append((f"dt{dt}_rs{rs}_ag{ag}_e32", (f"FC_DT={dt}", f"FC_RS_BITS={rs}", f"FC_AG_BITS={ag}")))
    for elems in LLQ_UNIT_ELEMS:
        for dt in DTYPES:
            for rs, ag in BITS:
                if rs:
                    specs.append((f"dt{dt}_rs{rs}_ag{ag}_e{elems}", (f"FC_DT={dt}", f"FC_RS_BITS={rs}",
                                                                    f"FC_AG_BITS={ag}", f"FC_ELEMS={elems}")))
    return specs


def _cuobjdump() -> str:
    exe = os.environ.get("CUOBJDUMP") or shutil.which("cuobjdump")
    if not exe and Path("/work/wt/bin/cuobjdump").is_file():
        exe = "/work/wt/bin/cuobjdump"
    if not exe:
        sys.exit("cuobjdump not found: set $CUOBJDUMP")
    return exe


def build_one(kdir: Path, out: Path, name: str, defines, extra) -> str:
    cubin = out / f"{name}.cubin"
    cmd = ["nvcc", "-cubin", "-arch=sm_90", "-std=c++17", f"-I{kdir}", "-Xptxas", "-v",
           "-DFC_SOURCE_DIGEST=0ull", *(f"-D{d}" for d in defines), *extra,
           "-o", str(cubin), str(kdir / "fc_allreduce.cu")]
    r = subprocess.run(cmd, capture_output=True, text=True)
    (out / f"{name}.ptxas.txt").write_text(r.stdout + r.stderr)
    if r.returncode != 0:
        return f"{name}: nvcc failed (see {name}.ptxas.txt)"
    sass = subprocess.run([_cuobjdump(), "-sass", str(cubin)], capture_output=True, text=True, check=True).stdout
    (out / f"{name}.sass").write_text(sass)
    return f"{name}: ok"


def build(kdir: Path, out: Path, jobs: int, only, extra) -> int:
    out.mkdir(parents=True, exist_ok=True)
    specs = [s for s in specialisations() if not only or s[0] in only]
    with ThreadPoolExecutor(jobs) as pool:
        results = list(pool.map(lambda s: build_one(kdir.resolve(), out, s[0], s[1], extra), specs))
    for line in results:
        print(line)
    return 0 if all(line.endswith(": ok") for line in results) else 1


_ADDR = re.compile(r"^\s*/\*[0-9a-f]{4,}\*/\s*")


def split_functions(sass: str) -> dict:
    """{function name: [normalised instruction lines]} of one cuobjdump -sass listing.

    The address comment before each instruction is dropped; the instruction
    text and the encoding comment after it (and the encoding continuation
    lines) are kept.
    """
    funcs, cur = {}, None
    for line in sass.splitlines():
        m = re.match(r"\s*Function : (\S+)", line)
        if m:
            cur = funcs.setdefault(m.group(1), [])
            continue
        if cur is None:
            continue
        s = line.strip()
        if not s or s.startswith(".") and not s.startswith(".L"):
            continue
        cur.append(" ".join(_ADDR.sub("", line).split()))
    return funcs


def resources(ptxas: str) -> dict:
    """{function name: "Used N registers ... / stack, spill line"} from ptxas -v output."""
    res, cur = {}, None
    for line in ptxas.splitlines():
        m = re.search(r"(?:Function properties for|Compiling entry function) '?([\w$]+)'?", line)
        if m:
            cur = m.group(1)
            continue
        if cur and ("spill" in line or "Used" in line):
            res.setdefault(cur, []).append(" ".join(line.replace("ptxas info    :", "").split()))
    return {k: " | ".join(v) for k, v in res.items()}


def compare(a: Path, b: Path, verbose: int, partial: bool = False) -> int:
    names = sorted({p.stem for p in a.glob("*.sass")} | {p.stem for p in b.glob("*.sass")})
    if partial:  # only the specialisations the after-build has (a quick check of a few)
        names = [n for n in names if (b / f"{n}.sass").is_file()]
    bad = 0
    total = 0
    for name in names:
        pa, pb = a / f"{name}.sass", b / f"{name}.sass"
        if not pa.is_file() or not pb.is_file():
            print(f"{name:18s} {'(missing in ' + (str(a) if not pa.is_file() else str(b)) + ')'}")
            bad += 1
            continue
        fa, fb = split_functions(pa.read_text()), split_functions(pb.read_text())
        ra = resources((a / f"{name}.ptxas.txt").read_text()) if (a / f"{name}.ptxas.txt").is_file() else {}
        rb = resources((b / f"{name}.ptxas.txt").read_text()) if (b / f"{name}.ptxas.txt").is_file() else {}
        for fn in sorted(set(fa) | set(fb)):
            total += 1
            if fn not in fa or fn not in fb:
                print(f"{name:18s} {fn:40s} only in {'after' if fn not in fa else 'before'}")
                bad += 1
                continue
            if fa[fn] == fb[fn]:
                status = f"identical ({len(fa[fn])} lines)"
            else:
                bad += 1
                diff = [d for d in difflib.unified_diff(fa[fn], fb[fn], lineterm="", n=0)
                        if d[:1] in "+-" and not d.startswith(("+++", "---"))]
                status = f"DIFFERENT ({len(fa[fn])} -> {len(fb[fn])} lines, {len(diff)} changed)"
                if verbose:
                    for d in diff[:verbose]:
                        print("      " + d)
            line = f"{name:18s} {fn:40s} {status}"
            key = fn
            if ra.get(key) != rb.get(key):
                line += f"\n{'':18s}   ptxas before: {ra.get(key)}\n{'':18s}   ptxas after:  {rb.get(key)}"
            elif verbose and key in ra:
                line += f"   [{ra[key]}]"
            print(line)
    print(f"{total - bad} of {total} functions identical" + ("" if not bad else f"; {bad} differ"))
    return 0 if bad == 0 else 1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    pb = sub.add_parser("build", help="compile every specialisation of a kernels_cu directory")
    pb.add_argument("kernel_dir", type=Path)
    pb.add_argument("out", type=Path)
    pb.add_argument("-j", "--jobs", type=int, default=1)
    pb.add_argument("--only", nargs="*", help="specialisation names (e.g. dt0_rs4_ag4_e32)")
    pb.add_argument("--nvcc-option", action="append", default=[], help="extra nvcc option (repeatable)")
    pc = sub.add_parser("compare", help="compare two builds function by function")
    pc.add_argument("before", type=Path)
    pc.add_argument("after", type=Path)
    pc.add_argument("-v", "--verbose", type=int, default=0, metavar="N",
                    help="print up to N differing SASS lines per function, and every ptxas line")
    pc.add_argument("--partial", action="store_true",
                    help="compare only the specialisations present in the after-build (built with --only)")
    args = ap.parse_args(argv)
    if args.cmd == "build":
        return build(args.kernel_dir, args.out, args.jobs, args.only, args.nvcc_option)
    return compare(args.before, args.after, args.verbose, args.partial)


if __name__ == "__main__":
    sys.exit(main())
