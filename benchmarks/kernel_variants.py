"""Where does a kernel's time go?  Leave-one-stage-out timing of kernel variants.

    mpirun -n 4 python benchmarks/kernel_variants.py [--base-dir DIR] [--json OUT.json]

Times the same calls (fixed launch shapes, graph timing, median of repeats,
max over ranks; the harness of ``flashcomm bench``) under kernel builds that
differ only in compile-time switches:

* ``full``: the kernel as shipped;
* ``no-wait``: ``FC_PROFILE_NO_WAIT``, every wait for peers skipped (the
  signals are still sent): what synchronisation and peer skew cost;
* ``local``: ``FC_PROFILE_LOCAL_DATA``, payload stores go to the rank's own
  workspace: the same bytes through HBM, none over NVLink;
* ``local+no-wait``: compute and HBM traffic only;
* ``base``: with ``--base-dir``, the ``full`` kernel from another source
  directory, for an A/B of two versions in one run; ``--kernel-dirs`` names
  more such directories (``label=DIR;label2=DIR``), for an A/B/C.

``--cases rot`` replaces the case list with issue 21's rotation A/B (:data:`ROT_CASES`):
INT8 and INT6, groups 128 and 512, rotation off and on, at 4 KB-256 MB, each at the
launch the shipped table picks (no forced shape).  ``--rounds N`` runs the whole
sweep N times (variants in turn within each round), so drift between variants
shows; the summary takes each row's median over rounds and, for pairs of cases
that differ only in rotation, prints what rotation costs under each variant.
Every variant's kernel modules are compiled first, in parallel processes on
rank 0 (the binaries land in the shared on-disk cache the ranks then load).

Each variant is a communicator built with its own ``kernel_build``
(:class:`flashcomm_cupy.backends.flash.kernels.KernelBuild`); each case passes its
launch as ``force=``.

LL cases (``protocol`` "ll") skip the ``local`` variants (LL readers poll the
peers' slots, which local-only writers never fill); after a ``no-wait``
variant the LL slots are refilled with the sentinel, since its readers empty
slots before the peers' late payloads land.

Only ``full`` and ``base`` compute correct results; nothing here checks them.
Differences between rows are what to read (``benchmarks/NOTES.md``).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from typing import NamedTuple, Optional

import numpy as np

class Case(NamedTuple):
    """One timed call: ``threads`` None means the launch the shipped table picks (``algo`` as a
    mode names it, e.g. "auto"); otherwise ``threads``/``blocks``/``units``/``protocol`` are forced."""
    label: str
    nbytes: int
    bits: Optional[int]
    algo: str
    threads: Optional[int]
    blocks: int = 0
    units: int = 1
    protocol: str = "flag"
    rotate: bool = False
    group: int = 128


# (label, bytes, bits, algo, threads, blocks, units, protocol[, rotate]): shapes the shipped table picks,
# the LL kernels (fc_ll.cuh) at the sizes they serve, and the staged two-shot (protocol "staged":
# the flag protocol with fc_twoshot_staged).
CASES = [
    ("int4 256M staged", 256 << 20, 4, "twoshot", 256, 264, 8, "staged"),
    ("int4 256M u8", 256 << 20, 4, "twoshot", 256, 264, 8, "flag"),
    ("int4 64M staged", 64 << 20, 4, "twoshot", 256, 264, 8, "staged"),
    ("int4 64M u8", 64 << 20, 4, "twoshot", 256, 264, 8, "flag"),
    ("int8 256M staged", 256 << 20, 8, "twoshot", 256, 264, 8, "staged"),
    ("int4 256M", 256 << 20, 4, "twoshot", 256, 264, 2, "flag"),
    ("int4 64M", 64 << 20, 4, "twoshot", 256, 264, 1, "flag"),
    ("int4 16M", 16 << 20, 4, "twoshot", 256, 264, 1, "flag"),
    ("int8 256M", 256 << 20, 8, "twoshot", 256, 264, 2, "flag"),
    ("int4 4M 1shot", 4 << 20, 4, "oneshot", 512, 132, 1, "flag"),
    ("lossless 4K 1shot", 4 << 10, None, "oneshot", 128, 8, 1, "flag"),
    ("lossless 4K 2shot", 4 << 10, None, "twoshot", 128, 1, 1, "flag"),
    ("int4 4K 1shot", 4 << 10, 4, "oneshot", 128, 8, 1, "flag"),
    ("ll 4K 1shot", 4 << 10, None, "oneshot", 128, 0, 1, "ll"),
    ("ll 4K 2shot", 4 << 10, None, "twoshot", 128, 0, 1, "ll"),
    ("ll 1M 1shot", 1 << 20, None, "oneshot", 256, 0, 1, "ll"),
    ("ll 1M 2shot", 1 << 20, None, "twoshot", 256, 0, 1, "ll"),
    ("llq int4 4K", 4 << 10, 4, "twoshot", 128, 0, 1, "ll"),
    ("llq int4 1M", 1 << 20, 4, "twoshot", 64, 0, 1, "ll"),
    ("llq int4 1M t128", 1 << 20, 4, "twoshot", 128, 0, 1, "ll"),
    ("llq int4 4M", 4 << 20, 4, "twoshot", 64, 0, 1, "ll"),
    ("llq int4 4M u2", 4 << 20, 4, "twoshot", 128, 0, 2, "ll"),
    # the quantized LL one-shot with and without rotation, at the H200 table's shapes (issue 21)
    ("llq1 int4 64K", 64 << 10, 4, "oneshot", 128, 0, 1, "ll"),
    ("llq1 int4 64K rot", 64 << 10, 4, "oneshot", 128, 0, 1, "ll", True),
    ("llq1 int4 1M", 1 << 20, 4, "oneshot", 256, 0, 1, "ll"),
    ("llq1 int4 1M rot", 1 << 20, 4, "oneshot", 256, 0, 1, "ll", True),
    ("llq1 int8 64K", 64 << 10, 8, "oneshot", 64, 0, 1, "ll"),
    ("llq1 int8 64K rot", 64 << 10, 8, "oneshot", 64, 0, 1, "ll", True),
]
CASES = [Case(*c) for c in CASES]

#: issue 21's rotation A/B: the modes that need rotation (INT6, INT8 at large groups), off and on,
#: at the launch the table picks -- LL one-shot / two-shot up to 1 MB, the staged two-shot beyond
ROT_SIZES = (("4K", 4 << 10), ("64K", 64 << 10), ("256K", 256 << 10), ("1M", 1 << 20), ("16M", 16 << 20),
             ("256M", 256 << 20))
ROT_CASES = [Case(f"int{bits} g{group} {size}{' rot' if rot else ''}", nbytes, bits, "auto", None,
                  rotate=rot, group=group)
             for bits in (8, 6) for group in (128, 512) for size, nbytes in ROT_SIZES for rot in (False, True)]
# ... and the LL one-shot at 1 MB, where the table runs the LL two-shot for these codecs (two rotations on a
# call's critical path instead of three or four): would rotated calls be better served by it?
ROT_CASES += [Case(f"int{bits} g128 1M 1shot{' rot' if rot else ''}", 1 << 20, bits, "oneshot", 256, 0, 1, "ll",
                   rotate=rot) for bits in (8, 6) for rot in (False, True)]
CASE_SETS = {"default": CASES, "rot": ROT_CASES}

VARIANTS = [
    ("full", None, ""),
    ("no-wait", None, "FC_PROFILE_NO_WAIT"),
    ("local", None, "FC_PROFILE_LOCAL_DATA"),
    ("local+no-wait", None, "FC_PROFILE_LOCAL_DATA FC_PROFILE_NO_WAIT"),
]


def reset_ll_slots(backend) -> None:
    """Fill every LL slot of ``backend``'s workspace with the sentinel again (collective).

    Only for profiling builds (``FC_PROFILE_NO_WAIT``), whose readers empty
    slots before the peers' data lands, leaving stale payloads behind.
    """
    import cupy
    dev = cupy.cuda.Device(backend.device_id)
    dev.synchronize()
    backend.mpi_comm.Barrier()  # no peer is still writing into my slots
    lay = backend.ws.layout
    cupy.cuda.runtime.memset(backend.ws.ptr + lay.ll_off, 0xFF, lay.ll_bytes)
    dev.synchronize()
    backend.mpi_comm.Barrier()


def _module_jobs(variants, cases):
    """(directory, defines, bits, unit elems) of every fp16 module a variant's cases can run."""
    bits = sorted({c.bits or 0 for c in cases})
    return [(kdir, defines, b, elems) for _, kdir, defines in variants for b in bits
            for elems in ((16, 32) if b else (32,))]


def precompile(jobs, timeout_s: float = 300.0) -> None:
    """Compile every module of ``jobs`` into the on-disk kernel cache, in parallel processes.
    One line per failure (the timing compiles that module again and raises its error there)."""
    from flashcomm_cupy.backends.flash.kernels import KernelBuild, compile_in_parallel
    specs = [(KernelBuild(kdir, tuple(defines.split())), 0, bits, bits, elems) for kdir, defines, bits, elems in jobs]
    for line in compile_in_parallel(specs, timeout_s):
        print(line, flush=True)


def summarize(rows, labels, cases) -> None:
    """Print each case's median over rounds per variant, then rotation's price per variant."""
    med = {}
    for v in labels:
        for c in cases:
            us = [r["us"] for r in rows if r["variant"] == v and r["case"] == c.label]
            if us:
                med[v, c.label] = statistics.median(us)
    nan = float("nan")
    print("\n" + f"{'case':>22} " + " ".join(f"{v:>14}" for v in labels))
    for c in cases:
        print(f"{c.label:>22} " + " ".join(f"{med.get((v, c.label), nan):14.2f}" for v in labels))
    pairs = [(c, d) for c in cases for d in cases
             if not c.rotate and d.rotate and d._replace(label=c.label, rotate=False) == c]
    if pairs:
        print("\nrotation's price (on - off; issue 21: at most 1 us below 1 MB, 10 % from 1 MB)")
        print(f"{'case':>22} " + " ".join(f"{v:>14}" for v in labels))
        for off, on in pairs:
            cells = []
            for v in labels:
                a, b = med.get((v, off.label)), med.get((v, on.label))
                if a is None or b is None:
                    cells.append(f"{'':>14}")
                elif off.nbytes >= 1 << 20:
                    cells.append(f"{100 * (b / a - 1):+13.1f}%")
                else:
                    cells.append(f"{b - a:+12.2f}us")
            print(f"{off.label:>22} " + " ".join(cells))


def build_variants(args):
    """[(label, kernel directory or None, defines)] from the command line, in the order to run."""
    variants = list(VARIANTS)
    if args.base_dir:
        variants.insert(0, ("base", os.path.abspath(args.base_dir), ""))
    for item in filter(None, args.kernel_dirs.split(";")):
        label, _, kdir = item.partition("=")
        variants.insert(len(variants) - len(VARIANTS), (label.strip(), os.path.abspath(kdir.strip()), ""))
    for item in filter(None, args.define_sets.split(";")):
        label, _, defines = item.partition("=")
        kdir = None
        if "@" in label:  # "label@DIR=DEFINES": the switches on another source directory's kernels
            label, _, kdir = label.partition("@")
            kdir = os.path.abspath(kdir.strip())
        variants.append((label.strip(), kdir, defines.strip()))
    if args.variants:
        keep = args.variants.split(",")
        variants = sorted((v for v in variants if v[0] in keep), key=lambda v: keep.index(v[0]))
    return variants


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base-dir", help="kernel source directory of the version to compare against")
    ap.add_argument("--kernel-dirs", default="",
                    help='more variants from kernel source directories: "label=DIR;label2=DIR"')
    ap.add_argument("--cases", default="default", choices=sorted(CASE_SETS), help="which case list to run")
    ap.add_argument("--rounds", type=int, default=1, help="run the whole sweep this many times")
    ap.add_argument("--json", help="write the rows here (rank 0)")
    ap.add_argument("--only", default="", help="comma list of case labels to run (default: all)")
    ap.add_argument("--variants", default="", help="comma list of variant labels, in the order to run (default: all)")
    ap.add_argument("--define-sets", default="",
                    help='extra variants "label=DEF DEF;label2@DIR=DEF" (compile-time switches of the shipped '
                         'kernels, or of the kernels in DIR)')
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)

    import cupy
    from flashcomm_cupy import Communicator
    from flashcomm_cupy.backends.flash.kernels import KernelBuild
    from flashcomm_cupy.backends.flash.plan import Force
    from flashcomm_cupy.config import Mode
    from flashcomm_cupy.harness.timing import measure

    variants = build_variants(args)
    cases = [c for c in CASE_SETS[args.cases] if not args.only or c.label in args.only.split(",")]

    from mpi4py import MPI
    if MPI.COMM_WORLD.rank == 0:
        precompile(_module_jobs(variants, cases))
    MPI.COMM_WORLD.Barrier()

    rows = []
    comm = None
    inputs = {}  # elements -> (x, out): every variant and round times the same data

    def buffers(n, rank):
        if n not in inputs:
            x = cupy.asarray(np.random.default_rng([rank, n]).standard_normal(n).astype(np.float16))
            inputs[n] = (x, cupy.empty_like(x))
        return inputs[n]

    for rnd in range(args.rounds):
        for vlabel, kdir, defines in variants:
            if comm is not None:
                comm.close()
            comm = Communicator(backend="gpu", kernel_build=KernelBuild(kdir, tuple(defines.split())))
            backend = comm.backend
            rank = comm.rank
            for c in cases:
                if c.protocol == "ll" and "FC_PROFILE_LOCAL_DATA" in defines:
                    continue  # LL slots are always the peers': local-only LL readers would wait forever
                n = c.nbytes // 2
                x, out = buffers(n, rank)
                mode = Mode.make(c.bits, c.group, rotate=c.rotate, algo=c.algo)
                if c.threads is None:
                    force = None
                elif c.protocol == "staged":
                    force = Force(c.threads, c.blocks, c.units, "flag", True)
                else:
                    force = Force(c.threads, c.blocks, c.units, c.protocol)
                t = measure(backend, comm.mpi_comm,
                            lambda: backend.all_reduce(x, out, mode, dtype=np.float16, force=force),
                            warmup=2, iters=args.iters, repeats=args.repeats, graph=True, eager=False).primary_s
                plan = backend.plan(n, np.float16, mode, force)
                row = {"variant": vlabel, "case": c.label, "bytes": c.nbytes, "us": round(t * 1e6, 2),
                       "round": rnd, "shape": [plan.threads, plan.blocks, plan.units], "protocol": plan.protocol,
                       "kernel": plan.kernel, "rotate": c.rotate, "group": c.group, "bits": c.bits}
                rows.append(row)
                if rank == 0:
                    print(f"{vlabel:>14} {c.label:>22} {row['us']:10.2f} us  {plan.kernel} "
                          f"{plan.threads}x{plan.blocks}x{plan.units}", flush=True)
            if "FC_PROFILE_NO_WAIT" in defines:
                reset_ll_slots(backend)  # its LL readers left late payloads in the slots
    info = backend.describe()  # collective: every rank calls it
    if rank == 0:
        summarize(rows, [v[0] for v in variants], cases)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"card": info.get("gpu"), "world": comm.world_size, "rows": rows}, f, indent=1)
    comm.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
