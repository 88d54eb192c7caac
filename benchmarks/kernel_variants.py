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
  directory, for an A/B of two versions in one run.

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
import sys

import numpy as np

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


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base-dir", help="kernel source directory of the version to compare against")
    ap.add_argument("--json", help="write the rows here (rank 0)")
    ap.add_argument("--only", default="", help="comma list of case labels to run (default: all)")
    ap.add_argument("--variants", default="", help="comma list of variant labels (default: all)")
    ap.add_argument("--define-sets", default="",
                    help='extra variants "label=DEF DEF;label2=DEF" (compile-time switches of the full kernel)')
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)

    import cupy
    from flashcomm_cupy import Communicator
    from flashcomm_cupy.backends.flash.kernels import KernelBuild
    from flashcomm_cupy.backends.flash.plan import Force
    from flashcomm_cupy.config import Mode
    from flashcomm_cupy.harness.timing import measure

    variants = list(VARIANTS)
    if args.base_dir:
        variants.insert(0, ("base", os.path.abspath(args.base_dir), ""))
    for item in filter(None, args.define_sets.split(";")):
        label, _, defines = item.partition("=")
        variants.append((label.strip(), None, defines.strip()))
    if args.variants:
        keep = set(args.variants.split(","))
        variants = [v for v in variants if v[0] in keep]
    cases = [c for c in CASES if not args.only or c[0] in args.only.split(",")]

    rows = []
    comm = None
    for vlabel, kdir, defines in variants:
        if comm is not None:
            comm.close()
        comm = Communicator(backend="gpu", kernel_build=KernelBuild(kdir, tuple(defines.split())))
        backend = comm.backend
        rank = comm.rank
        for clabel, nbytes, bits, algo, threads, blocks, units, protocol, *rotate in cases:
            if protocol == "ll" and "FC_PROFILE_LOCAL_DATA" in defines:
                continue  # LL slots are always the peers': local-only LL readers would wait forever
            n = nbytes // 2
            x = cupy.asarray(np.random.default_rng([rank, n]).standard_normal(n).astype(np.float16))
            out = cupy.empty_like(x)
            mode = Mode.make(bits, 128, rotate=bool(rotate and rotate[0]), algo=algo)
            force = (Force(threads, blocks, units, "flag", True) if protocol == "staged"
                     else Force(threads, blocks, units, protocol))
            t = measure(backend, comm.mpi_comm,
                        lambda: backend.all_reduce(x, out, mode, dtype=np.float16, force=force),
                        warmup=2, iters=args.iters, repeats=args.repeats, graph=True, eager=False).primary_s
            row = {"variant": vlabel, "case": clabel, "bytes": nbytes, "us": round(t * 1e6, 2),
                   "shape": [threads, blocks, units], "protocol": protocol}
            rows.append(row)
            if rank == 0:
                print(f"{vlabel:>14} {clabel:>18} {row['us']:10.1f} us", flush=True)
            del x, out
        if "FC_PROFILE_NO_WAIT" in defines:
            reset_ll_slots(backend)  # its LL readers left late payloads in the slots
    info = backend.describe()  # collective: every rank calls it
    if rank == 0:
        labels = [v[0] for v in variants]
        print("\n" + f"{'case':>18} " + " ".join(f"{v:>14}" for v in labels))
        for clabel, *_ in cases:
            us = {r["variant"]: r["us"] for r in rows if r["case"] == clabel}
            print(f"{clabel:>18} " + " ".join(f"{us.get(v, float('nan')):14.1f}" for v in labels))
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"card": info.get("gpu"), "world": comm.world_size, "rows": rows}, f, indent=1)
    comm.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
