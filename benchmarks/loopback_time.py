"""One GPU, several simulated ranks: time flash kernels under several kernel builds (A/B).

    python benchmarks/loopback_time.py [--world 2] [--cases ll] [--rounds 5]
        [--variants 'nofail=FC_PROFILE_LL_NO_FAIL_PATH;base=DIR']

Every rank of a :class:`~flashcomm_cupy.backends.flash.loopback.LoopbackJob` runs its kernel
on its own stream of this GPU, so the calls exchange data and signals through this GPU's L2
instead of NVLink.  A CUDA graph holds ``--calls`` back-to-back calls per rank (the ranks'
chains joined only at the start and the end); time per call = graph time / calls, median
over ``--repeats`` replays, then the median over ``--rounds`` rounds, the variants taking
turns within each round so drift hits them alike.  A variant is ``label=DEFINES`` (compile-
time switches, comma-separated) or ``label=DIR`` (another kernel source directory).

What this can and cannot say: the kernels' own instruction and memory latency, and what a
change to them costs, without a second GPU; not what the interconnect adds (the real figures
come from ``flashcomm bench`` on the multi-GPU machines).  Results are also checked: each
variant's first call is compared with the reference, unless its defines break results.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
from typing import NamedTuple, Optional

import numpy as np


class Case(NamedTuple):
    label: str
    nbytes: int
    bits: object
    algo: str
    protocol: str
    force: Optional[tuple] = None
    rotate: bool = False
    group: int = 128


CASES = {
    "ll": [Case("LL one-shot 4K", 4 << 10, None, "oneshot", "ll"),
           Case("LL two-shot 4K", 4 << 10, None, "twoshot", "ll"),
           Case("LL one-shot 256K", 256 << 10, None, "oneshot", "ll"),
           Case("LL two-shot 1M", 1 << 20, None, "twoshot", "ll"),
           Case("LLQ int4 1S 4K", 4 << 10, 4, "oneshot", "ll"),
           Case("LLQ int4 2S 4K", 4 << 10, 4, "twoshot", "ll"),
           Case("LLQ int4 2S 256K", 256 << 10, 4, "twoshot", "ll")],
    "llq": [Case(f"LLQ int{b} 2S {size}{' rot' if rot else ''}", nbytes, b, "twoshot", "ll", rotate=rot)
            for b in (4, 8) for size, nbytes in (("64K", 64 << 10), ("1M", 1 << 20)) for rot in (False, True)],
    "llq1": [Case(f"LLQ int{b} 1S {size}{' rot' if rot else ''}", nbytes, b, "oneshot", "ll", rotate=rot)
             for b in (4, 8) for size, nbytes in (("4K", 4 << 10), ("64K", 64 << 10)) for rot in (False, True)],
    "llq1r": [Case(f"LLQ int{b} 1S {size}{' rot' if rot else ''}", nbytes, b, "oneshot", "ll", rotate=rot)
              for b in (4, 6, 8) for size, nbytes in (("16K", 16 << 10), ("256K", 256 << 10), ("1M", 1 << 20))
              for rot in (False, True)],
    # issue 21: which quantized LL kernel a rotated call should run at 256 KB-1 MB (the table, tuned
    # unrotated, picks the two-shot for INT6/INT8 at 1 MB; the one-shot shares its butterflies)
    "llqalgo": [Case(f"LLQ int{b} {k}S {size}{' rot' if rot else ''}", nbytes, b, algo, "ll", rotate=rot)
                for b in (6, 8) for size, nbytes in (("256K", 256 << 10), ("1M", 1 << 20))
                for k, algo in ((1, "oneshot"), (2, "twoshot")) for rot in (False, True)],
    # issue 21: rotation's price for the modes the MiniLM study says need it (INT6 at every group,
    # INT8 at g512 and up) against the default's group, below 1 MB and at it
    "rotgroups": [Case(f"LLQ int{b} g{g} {k}S {size}{' rot' if rot else ''}", nbytes, b, algo, "ll", rotate=rot,
                       group=g)
                  for b, g in ((6, 32), (6, 128), (8, 128), (8, 1024))
                  for size, nbytes in (("64K", 64 << 10), ("256K", 256 << 10), ("1M", 1 << 20))
                  for k, algo in ((1, "oneshot"), (2, "twoshot")) for rot in (False, True)],
    # issue 21: the quantized LL one-shot's 8-element units (plan.LLQ_SMALL_UNIT_ELEMS) against 16-element
    # ones (--llq-small-units off), each codec, rotated and not
    "units8": [Case(f"LLQ int{b} g{g} 1S {size}{' rot' if rot else ''}", nbytes, b, "oneshot", "ll", rotate=rot,
                    group=g)
               for b, g in ((4, 128), (6, 32), (6, 128), (8, 128))
               for size, nbytes in (("4K", 4 << 10), ("16K", 16 << 10), ("64K", 64 << 10), ("128K", 128 << 10),
                                    ("256K", 256 << 10))
               for rot in (False, True)],
    # issue 21: where the 8-element one-shot stops paying (--llq-small-max-elems)
    "units8big": [Case(f"LLQ int{b} g{g} 1S {size}{' rot' if rot else ''}", nbytes, b, "oneshot", "ll", rotate=rot,
                       group=g)
                  for b, g in ((4, 128), (6, 32), (8, 128))
                  for size, nbytes in (("256K", 256 << 10), ("512K", 512 << 10))
                  for rot in (False, True)],
    # issue 21: the rotating LL one-shot at the table's shapes and at twice the warps per block
    # (each SM scheduler then runs two warps of the same code, which share its fetches)
    "rotshape": [Case(f"LLQ int{b} g{g} 1S {size} {t}x{nb}{' rot' if rot else ''}", nbytes, b, "oneshot", "ll",
                      (t, nb, 1, "ll", False), rotate=rot, group=g)
                 for b, g in ((6, 32), (6, 128), (8, 128))
                 for size, nbytes, shapes in (("16K", 16 << 10, ((128, 4), (256, 2))),
                                              ("64K", 64 << 10, ((128, 16), (256, 8))),
                                              ("256K", 256 << 10, ((256, 32), (128, 64))))
                 for t, nb in shapes for rot in (False, True)],
    # issue 21: the rotating LL one-shot around SHARED_ROTATION_MIN_WARPS (plan.py), each codec
    "rotsmall": [Case(f"LLQ int{b} g{g} 1S {size}{' rot' if rot else ''}", nbytes, b, "oneshot", "ll", rotate=rot,
                      group=g)
                 for b, g in ((4, 128), (6, 32), (6, 128), (8, 128), (8, 1024))
                 for size, nbytes in (("4K", 4 << 10), ("8K", 8 << 10), ("16K", 16 << 10), ("32K", 32 << 10),
                                      ("64K", 64 << 10))
                 for rot in (False, True)],
    # issue 21: the rotating LL one-shot at the launch shapes the 2xH200 table picks below 1 MB
    # (flashcomm_cupy/tuning/default.json: 64-thread blocks for INT6/INT8 from 16 KB, INT4 128 from 64 KB)
    "rottable": [Case(f"LLQ int{b} g{g} 1S {size} {t}x{u}{' rot' if rot else ''}", nbytes, b, "oneshot", "ll",
                      (t, 0, u, "ll", False), rotate=rot, group=g)
                 for b, g, shapes in ((4, 128, ((64, 1), (64, 1), (128, 1), (128, 1))),
                                      (6, 128, ((128, 2), (64, 1), (64, 1), (64, 1))),
                                      (8, 128, ((128, 2), (64, 1), (64, 1), (64, 1))),
                                      (6, 32, ((128, 2), (64, 1), (64, 1), (64, 1))))
                 for (size, nbytes), (t, u) in zip((("4K", 4 << 10), ("16K", 16 << 10), ("64K", 64 << 10),
                                                   ("256K", 256 << 10)), shapes)
                 for rot in (False, True)],
    # issue 21: rotation's price in the staged two-shot by group (INT6 g32, the INT6 mode the MiniLM study
    # keeps, against g128) at 16 MB and 256 MB (each simulated rank has half the GPU: 132 blocks, and
    # twice the 2xH200 table's units asked, which the plan caps at what a slot holds); a price above
    # the one over NVLink, where each rank's local work has a GPU of its own
    "rotstaged": [Case(f"staged int{b} g{g} {size}{' rot' if rot else ''}", nbytes, b, "twoshot", "auto",
                       (256, 0, units, "flag", True), rotate=rot, group=g)
                  for b, g in ((6, 32), (6, 128), (8, 128))
                  for size, nbytes, units in (("16M", 16 << 20, 4), ("256M", 256 << 20, 16))
                  for rot in (False, True)],
    "flag": [Case("flag 2S int4 16M", 16 << 20, 4, "twoshot", "auto", (256, 0, 2, "flag", True)),
             Case("flag 2S int8 16M", 16 << 20, 8, "twoshot", "auto", (256, 0, 2, "flag", True)),
             Case("flag 1S int8 64K", 64 << 10, 8, "oneshot", "auto", (256, 0, 1, "flag", False))],
    "flagrot": [Case(f"flag 2S int{b} 16M{' rot' if rot else ''}", 16 << 20, b, "twoshot", "auto",
                     (256, 0, 2, "flag", True), rotate=rot) for b in (4, 8) for rot in (False, True)]
               + [Case(f"flag 1S int8 {size}{' rot' if rot else ''}", nbytes, 8, "oneshot", "auto",
                       (256, 0, 1, "flag", False), rotate=rot)
                  for size, nbytes in (("64K", 64 << 10), ("1M", 1 << 20)) for rot in (False, True)],
}
BREAKS_RESULTS = ("FC_PROFILE_NO_WAIT", "FC_PROFILE_LOCAL_DATA", "FC_PROFILE_ROT_TIMES")
#: the largest case checked against the reference (the bench's own default limit; larger ones take the
#: NumPy reference minutes)
CHECK_MAX_BYTES = 16 << 20


def parse_variants(text: str):
    """[(label, KernelBuild)]: the shipped kernels first, then each ``label=DEFINES|DIR``."""
    from flashcomm_cupy.backends.flash.kernels import SHIPPED, KernelBuild
    out = [("shipped", SHIPPED)]
    for item in filter(None, (t.strip() for t in text.split(";"))):
        label, _, value = item.partition("=")
        if os.path.isdir(value):
            out.append((label, KernelBuild(os.path.abspath(value))))
        else:
            out.append((label, KernelBuild(defines=tuple(filter(None, value.replace(",", " ").split())))))
    return out


def time_case(job, case, calls, repeats, check):
    import cupy
    from flashcomm_cupy import flash_all_reduce_reference
    from flashcomm_cupy.config import Mode
    from flashcomm_cupy.harness.timing import event_seconds_per_call
    mode = Mode.make(case.bits, case.group, False, case.rotate, case.algo)
    n = case.nbytes // 2
    host = [np.random.default_rng([r, n]).standard_normal(n).astype(np.float16) for r in range(job.world)]
    ins = [cupy.asarray(x) for x in host]
    outs = [cupy.empty_like(x) for x in ins]
    plan = job.plan(n, "float16", mode, case.force, case.protocol)
    job.launch(ins, outs, mode, plan)
    job.synchronize()
    if check:
        want = flash_all_reduce_reference(host, mode=mode)[0].view(np.uint16)
        for r, o in enumerate(outs):
            if not np.array_equal(o.get().view(np.uint16), want):
                raise SystemExit(f"{case.label}: rank {r} differs from the reference")
    graph = job.capture([(ins, outs, mode, plan)], repeat=calls)
    origin = job.streams[0]
    with origin:  # the timer's events go on the stream the graph runs on
        times = [s * 1e6 / calls for s in event_seconds_per_call(lambda: graph.launch(origin), 1, repeats)]
    for r in range(job.world):
        if job.failure(r) is not None:
            raise SystemExit(f"{case.label}: rank {r} recorded {job.failure(r)}")
    return statistics.median(times), plan


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--cases", default="ll", help=f"comma list of {sorted(CASES)}")
    ap.add_argument("--variants", default="", help="'label=DEFINES|DIR;...' besides the shipped kernels")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--calls", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--llq-small-units", choices=("on", "off"), default="on",
                    help="off: the quantized LL one-shot keeps 16-element units at every size")
    ap.add_argument("--llq-small-max-elems", type=int, default=0,
                    help="the largest one-shot that may run 8-element units, every codec alike (default: "
                         "plan.llq_small_unit_max_elems)")
    args = ap.parse_args(argv)
    from flashcomm_cupy.backends.flash import plan as plan_module
    if args.llq_small_max_elems:
        plan_module.LLQ_SMALL_UNIT_MAX_ELEMS = args.llq_small_max_elems
        plan_module.LLQ_SMALL_UNIT_MAX_ELEMS_MORE_BYTES = args.llq_small_max_elems
    if args.llq_small_units == "off":
        plan_module.LLQ_SMALL_UNIT_MAX_ELEMS = -1
    from flashcomm_cupy.backends.flash import kernels
    from flashcomm_cupy.backends.flash.loopback import LoopbackJob
    from flashcomm_cupy.config import parse_bits
    from flashcomm_cupy.dtypes import KERNEL_DTYPE_CODE
    from flashcomm_cupy.backends.flash.plan import llq_unit_elems
    variants = parse_variants(args.variants)
    cases = [c for name in args.cases.split(",") for c in CASES[name]]
    specs = [(build, KERNEL_DTYPE_CODE["float16"], *parse_bits(c.bits),
              llq_unit_elems(c.group, c.algo, c.nbytes // 2, rs_bits=parse_bits(c.bits)[0])
              if c.bits and c.protocol == "ll" else 32)
             for _, build in variants for c in cases]
    for line in kernels.compile_in_parallel(specs):
        print(line, flush=True)
    jobs = {label: LoopbackJob(args.world, build=build, timeout_s=5.0) for label, build in variants}
    rows = {}
    for rnd in range(args.rounds):
        for case in cases:
            for label, build in variants:
                check = (rnd == 0 and case.nbytes <= CHECK_MAX_BYTES
                         and not any(d.split("=")[0] in BREAKS_RESULTS for d in build.defines))
                us, plan = time_case(jobs[label], case, args.calls, args.repeats, check)
                rows.setdefault((case.label, label), []).append(us)
                if rnd == 0 and label == "shipped":
                    print(f"{case.label}: {plan.kernel} threads={plan.threads} blocks={plan.blocks} "
                          f"units={plan.units} elems={plan.build.unit_elems if plan.build else '-'}", flush=True)
    labels = [v for v, _ in variants]
    print(f"\nloopback, world {args.world}, fp16, us per call (median of {args.rounds} rounds; range)")
    print(f"{'case':>20} " + " ".join(f"{v:>22}" for v in labels))
    for case in cases:
        cells = []
        for v in labels:
            t = rows[case.label, v]
            cells.append(f"{statistics.median(t):8.2f} ({min(t):5.2f}-{max(t):5.2f})")
        print(f"{case.label:>20} " + " ".join(f"{c:>22}" for c in cells))
    for job in jobs.values():
        job.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
