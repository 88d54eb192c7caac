"""One GPU, no peers: time (or profile) the compute and HBM side of a flash kernel.

    python benchmarks/kernel_solo.py [--world 4] [--bytes 256M] [--bits 4] [--algo twoshot]
                                     [--shape 256,264,2] [--base-dir DIR] [--iters 10]
    ncu --clock-control none -k regex:fc_ -s 2 -c 1 python benchmarks/kernel_solo.py --iters 1

The kernel runs as rank 0 of a ``--world``-rank job whose every "peer"
pointer is this GPU's own workspace, built with ``FC_PROFILE_LOCAL_DATA``
and ``FC_PROFILE_NO_WAIT`` (benchmarks/kernel_variants.py): it does all of
rank 0's loads, arithmetic and stores, and no communication, so one GPU
(and Nsight Compute, which cannot replay a kernel that waits for other
processes) sees the same instruction and HBM stream as in the real job.
Results are wrong by construction; only time is measured.  With
``--base-dir`` the kernel from that source directory is timed too (A/B).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

import numpy as np

PROFILE_DEFINES = "FC_PROFILE_LOCAL_DATA FC_PROFILE_NO_WAIT"


def parse_bytes(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip().upper()
    return int(float(text[:-1]) * units[text[-1]]) if text[-1] in units else int(text)


def build_launch(world, nbytes, bits, algo, shape, dtype_name="float16", rank=0, max_blocks=264,
                 slot_bytes=48 << 10, build=None, rotate=False, group_size=128, protocol="flag"):
    """(function, grid, block, args, keepalive, used shape) for one solo launch; compiles on first use.
    The keepalive tuple ends with the plan (its ``kernel`` names what runs).

    The launch is what the backend would run for a forced ``shape`` and ``protocol`` ("flag", or
    "ll" for the data-as-signal kernels, whose polls the profiling build skips too; ``select_plan``
    with this GPU's limits), on a workspace whose peers all alias this GPU's own.
    """
    import cupy
    from flashcomm_cupy.backends.flash import kernels
    from flashcomm_cupy.backends.flash.backend import launch_args, resident_blocks
    from flashcomm_cupy.backends.flash.layout import ARGS_DTYPE, WorkspaceLayout
    from flashcomm_cupy.backends.flash.plan import Force, Limits, select_plan
    from flashcomm_cupy.backends.flash.table import TuningTable
    from flashcomm_cupy.config import Mode

    build = build or kernels.SHIPPED
    staged = algo == "staged"  # the staged flag two-shot (quantized 16-bit modes)
    algo = "twoshot" if staged else algo
    mode = Mode.make(bits, group_size, rotate=rotate and bits is not None, algo=algo)
    layout = WorkspaceLayout(world, max_blocks, slot_bytes)
    ws = cupy.zeros(layout.total, dtype=cupy.uint8)
    err = cupy.zeros(16, dtype=cupy.uint32)
    n = nbytes // np.dtype(dtype_name).itemsize
    x = cupy.asarray(np.random.default_rng(0).standard_normal(n).astype(dtype_name))
    out = cupy.empty_like(x)
    sms = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)["multiProcessorCount"]
    limits = Limits.of_layout(layout, sm_count=sms, blocks_per_sm=lambda kernel, key, threads, smem:
                              resident_blocks(kernels.kernel(kernel, key, build), threads, smem))
    plan = select_plan(n, dtype_name, mode, world=world, table=TuningTable({}, "none"), limits=limits,
                       force=Force(shape[0], shape[1], shape[2], protocol, staged))
    if staged and plan.protocol != "staged":
        raise SystemExit(f"staged: the staged two-shot does not serve this call ({plan})")
    base = np.zeros(1, dtype=ARGS_DTYPE)
    a = base[0]
    a["peers"][:world] = ws.data.ptr  # every peer aliased to this GPU's workspace
    layout.fill_args(a)
    a["err"], a["timeout_ns"] = err.data.ptr, 10 ** 10
    a["rank"], a["world"] = rank, world
    args = launch_args(base, plan, n, mode)
    args[0]["in_ptr"], args[0]["out_ptr"] = x.data.ptr, out.data.ptr
    fn = kernels.kernel(plan.kernel, plan.build, build)
    return (fn, (plan.blocks,), (plan.threads,), args, (ws, err, x, out, plan),
            (plan.threads, plan.blocks, plan.units, plan.smem))


def time_launch(fn, grid, block, args, iters, smem=0):
    import cupy
    for _ in range(2):
        fn(grid, block, (args,), shared_mem=smem)
    cupy.cuda.Device().synchronize()
    times = []
    for _ in range(iters):
        start, stop = cupy.cuda.Event(), cupy.cuda.Event()
        start.record()
        fn(grid, block, (args,), shared_mem=smem)
        stop.record()
        stop.synchronize()
        times.append(cupy.cuda.get_elapsed_time(start, stop) * 1e3)
    return statistics.median(times)


def time_graph(fn, grid, block, args, calls, iters, smem=0):
    """GPU µs per launch of a CUDA graph of ``calls`` back-to-back launches, median of ``iters`` replays.

    For kernels of a few µs, where a single launch's events also time the gap before it starts."""
    import cupy
    from flashcomm_cupy.harness.timing import event_seconds_per_call
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        fn(grid, block, (args,), shared_mem=smem)
        stream.begin_capture()
        for _ in range(calls):
            fn(grid, block, (args,), shared_mem=smem)
        graph = stream.end_capture()
        per_launch = event_seconds_per_call(lambda: graph.launch(stream), 1, iters)  # events on `stream`
    return statistics.median(per_launch) * 1e6 / calls


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world", type=int, default=4)
    ap.add_argument("--bytes", default="256M", help="comma list of message sizes")
    ap.add_argument("--bits", default="4", help="comma list: 4, 8, none")
    ap.add_argument("--algo", default="twoshot", help="comma list: twoshot, oneshot, staged (staged two-shot)")
    ap.add_argument("--shape", default="256,264,2", help="threads,blocks,units; ';'-separated list to compare")
    ap.add_argument("--protocol", default="flag", choices=("flag", "ll"),
                    help="ll: the data-as-signal kernels (where they serve the call; the flag ones otherwise)")
    ap.add_argument("--max-blocks", type=int, default=264, help="workspace blocks (slots per source)")
    ap.add_argument("--slot-kib", type=int, default=48, help="workspace slot size")
    ap.add_argument("--base-dir", help="also time the kernel from this source directory")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--group-size", default="128", help="comma list of quantization group sizes")
    ap.add_argument("--dtype", default="float16", choices=("float16", "float32"))
    ap.add_argument("--rotate", choices=("off", "on", "both"), default="off",
                    help="Hadamard rotation of the quantized modes (both: each row rotated and not)")
    ap.add_argument("--define-sets", default="",
                    help="extra compile-time defines to compare, e.g. 'b1=FC_BATCH=1;b2=FC_BATCH=2'")
    ap.add_argument("--calls", type=int, default=1,
                    help="above 1: time a CUDA graph of this many launches (small kernels), per launch")
    ap.add_argument("--llq-small-max-elems", type=int, default=0,
                    help="the largest one-shot that may run 8-element units, every codec alike (default: "
                         "plan.llq_small_unit_max_elems; -1: never)")
    args = ap.parse_args(argv)
    if args.llq_small_max_elems:
        from flashcomm_cupy.backends.flash import plan as plan_module
        plan_module.LLQ_SMALL_UNIT_MAX_ELEMS = args.llq_small_max_elems
        plan_module.LLQ_SMALL_UNIT_MAX_ELEMS_MORE_BYTES = args.llq_small_max_elems
    shapes = [tuple(int(v) for v in sh.split(",")) for sh in args.shape.split(";")]
    dirs = [("new", None, "")]
    for item in filter(None, args.define_sets.split(";")):
        name, _, defines = item.partition("=")
        dirs.append((name, None, defines.replace(",", " ")))
    if args.base_dir:
        dirs.append(("base", os.path.abspath(args.base_dir), ""))
    from flashcomm_cupy.backends.flash.kernels import KernelBuild
    from flashcomm_cupy import settings
    lineinfo = settings.value(settings.KERNEL_LINEINFO)  # for Nsight Compute's source view (ncu stage)
    rotations = {"off": (False,), "on": (True,), "both": (False, True)}
    for label, kdir, defines in dirs:
        build = KernelBuild(kdir, tuple(f"{PROFILE_DEFINES} {defines}".split()), lineinfo)
        for size, algo in ((sz, al) for sz in args.bytes.split(",") for al in args.algo.split(",")):
            for bits, group, shape, rot in ((b, int(g), sh, r) for b in args.bits.split(",")
                                            for g in args.group_size.split(",") for sh in shapes
                                            for r in rotations[args.rotate]):
                b = None if bits == "none" else int(bits)
                if rot and b is None:
                    continue
                fn, grid, block, kargs, keep, used = build_launch(args.world, parse_bytes(size), b, algo, shape,
                                                                  max_blocks=args.max_blocks,
                                                                  slot_bytes=args.slot_kib << 10, build=build,
                                                                  rotate=rot, group_size=group,
                                                                  dtype_name=args.dtype, protocol=args.protocol)
                us = (time_graph(fn, grid, block, kargs, args.calls, args.iters, used[-1]) if args.calls > 1
                      else time_launch(fn, grid, block, kargs, args.iters, used[-1]))
                print(f"solo {label:>4} world={args.world} {algo} {args.dtype} {size:>5} bits={bits:>4} g{group:<4}"
                      f"{' rot' if rot else '    '} "
                      f"{keep[-1].kernel} e{keep[-1].build.unit_elems} shape={used}: {us:9.2f} us", flush=True)
                del keep
    return 0


if __name__ == "__main__":
    sys.exit(main())
