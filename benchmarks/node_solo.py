"""One GPU: time the hierarchical all-reduce's inter-node kernels, ``fc_node_encode`` and ``fc_node_sum``.

    python benchmarks/node_solo.py [--sizes 16M,64M,256M] [--bits 4,8,none] [--nodes 2]
                                   [--dtype float16] [--rotate both] [--json OUT.json]

The hierarchical path's local work, without NCCL and without a second GPU: every simulated node's
chunk is this GPU's own encoded chunk, copied into each node's slot of the receive buffer (as the
all-gather would leave it), so ``fc_node_sum`` decodes and sums ``--nodes`` chunks exactly as in
the real call (their exactness is tests/gpu/test_node_kernels_gpu.py's job, not this).  Each kernel is
timed on its own with CUDA events around ``--iters`` back-to-back launches, median of
``--repeats``.  Next to each time: the bytes the kernel must move through HBM (its input read
once, its output written once) and the bandwidth that implies.

Why it exists (benchmarks/NOTES.md v34): a host-mapped read that every block of ``fc_node_sum``
made cost 1.2-1.4 us per block, serialized -- 46 ms at 256 MB -- and the one-GPU node-kernel tests,
which time nothing, could not show it.  Run this after every change to ``kernels_cu/fc_node.cuh``
(``bash benchmarks/device_run.sh node-solo 1``): a kernel far below the memory system's speed
(``SLOW`` in the last column: under ``--slow-gbps``) has a serial cost per block again.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys

import numpy as np

from flashcomm_cupy.harness.sizes import parse_size
from flashcomm_cupy.harness.timing import event_seconds_per_call

#: below this effective bandwidth a node kernel is flagged: an H200's HBM moves about 4.8 TB/s; with
#: the serial host read of v34, fc_node_sum at 256 MB INT4 moved its ~420 MB in about 46 ms, under 10 GB/s
SLOW_GBPS = 200.0
#: what benchmarks/render_results.py tabulates from the JSON
COLUMNS = ["bytes", "mode", "blocks", "encode_us", "encode_gbps", "sum_us", "sum_gbps"]


def time_us(launch, iters: int, repeats: int) -> float:
    """Median over ``repeats`` of the mean time of ``iters`` back-to-back launches, in us."""
    return statistics.median(event_seconds_per_call(launch, iters, repeats)) * 1e6


def measure(nbytes: int, bits, dtype: str, nodes: int, rotate: bool, iters: int, repeats: int) -> dict:
    """Encode and sum times of one (size, mode) on this GPU, and any failure the sum recorded."""
    import cupy
    from flashcomm_cupy.backends.hierarchical import NodeFailure, _OneGpuPerNodePlan
    from flashcomm_cupy.config import Mode
    from flashcomm_cupy.dtypes import DTYPES
    mode = Mode.make(bits, 128, False, rotate, "hierarchical")
    itemsize = np.dtype(DTYPES[dtype]).itemsize
    n = nbytes // itemsize
    host = np.random.default_rng(n).standard_normal(n).astype(np.float32)
    x = cupy.asarray(host).astype(cupy.float32 if dtype == "float32" else cupy.float16)
    if dtype == "bfloat16":  # bfloat16 as its bits: round float32 to nearest even in the top half
        bits32 = cupy.asarray(host).view(cupy.uint32)
        x = ((bits32 + 0x7FFF + ((bits32 >> 16) & 1)) >> 16).astype(cupy.uint16)
    out = cupy.empty_like(x)
    failure = NodeFailure(rank=0)
    try:
        inter = _OneGpuPerNodePlan(n, dtype, mode, nodes, failure).inter
        stream = cupy.cuda.get_current_stream()

        def encode():
            inter.encode_into_send(x, stream)

        def deliver():  # every node's slot holds this GPU's chunk, its status "arrived"
            for k in range(nodes):
                cupy.cuda.runtime.memcpyAsync(inter.recv.data.ptr + k * inter.stride, inter.send.data.ptr,
                                              inter.stride, cupy.cuda.runtime.memcpyDeviceToDevice, stream.ptr)

        def node_sum():  # with the 4-byte copy of this rank's state that precedes it in every call
            inter.sum_received(out, stream)

        encode_us = time_us(encode, iters, repeats)
        encode()
        deliver()
        sum_us = time_us(node_sum, iters, repeats)
        stream.synchronize()
        record = failure.record()
    finally:
        failure.close()
    chunk = inter.stride
    encode_bytes = n * itemsize + chunk
    sum_bytes = nodes * chunk + n * itemsize
    return {"bytes": nbytes, "mode": mode.label, "dtype": dtype, "nodes": nodes, "elements": n,
            "blocks": int(inter.grid[0]), "chunk_bytes": int(chunk),
            "encode_us": encode_us, "sum_us": sum_us,
            "encode_gbps": encode_bytes / encode_us / 1e3, "sum_gbps": sum_bytes / sum_us / 1e3,
            "failure_recorded": record}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="16M,64M,256M", help="comma list of message sizes")
    ap.add_argument("--bits", default="4,8,none", help="comma list: 4, 6, 8, 4/8, none")
    ap.add_argument("--dtype", default="float16", choices=("float16", "bfloat16", "float32"))
    ap.add_argument("--nodes", type=int, default=2)
    ap.add_argument("--rotate", choices=("off", "on", "both"), default="off")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--slow-gbps", type=float, default=SLOW_GBPS,
                    help="flag a kernel whose effective bandwidth is below this (GB/s)")
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args(argv)
    rotations = {"off": (False,), "on": (True,), "both": (False, True)}[args.rotate]
    rows = []
    print(f"{'size':>6} {'mode':>26} {'blocks':>7} {'encode us':>10} {'GB/s':>7} {'sum us':>10} {'GB/s':>7}")
    for size in args.sizes.split(","):
        for bits_text in args.bits.split(","):
            bits = None if bits_text == "none" else bits_text
            for rot in rotations:
                if rot and bits is None:
                    continue
                row = measure(parse_size(size), bits, args.dtype, args.nodes, rot, args.iters, args.repeats)
                slow = [k for k in ("encode", "sum") if row[f"{k}_gbps"] < args.slow_gbps]
                row["slow"] = slow
                rows.append(row)
                flag = f"  SLOW: {', '.join(slow)}" if slow else ""
                failed = f"  RECORDED {row['failure_recorded']}" if row["failure_recorded"] else ""
                print(f"{size:>6} {row['mode']:>26} {row['blocks']:>7} {row['encode_us']:>10.1f} "
                      f"{row['encode_gbps']:>7.0f} {row['sum_us']:>10.1f} {row['sum_gbps']:>7.0f}{flag}{failed}",
                      flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"kind": "node_solo", "nodes": args.nodes, "dtype": args.dtype, "columns": COLUMNS,
                       "rows": rows}, f, indent=1)
    return 1 if any(r["slow"] or r["failure_recorded"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
