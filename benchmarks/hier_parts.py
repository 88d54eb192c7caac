"""What limits the hierarchical all-reduce across nodes: its parts timed apart (issue 20).

    FLASHCOMM_RANKS_PER_NODE=1 NCCL_P2P_DISABLE=1 NCCL_SHM_DISABLE=1 \\
        mpirun -n 2 python benchmarks/hier_parts.py [--sizes 16M,64M,256M] [--bits 4,8] [--json OUT.json]

With one GPU per simulated node and NCCL forced onto its socket transport
(the path it takes between hosts without InfiniBand), per message size (fp16):

* ``flat``: NCCL's all-reduce of the fp16 message (the baseline of the bench);
* ``hier``: ``Communicator.all_reduce(algo="hierarchical")``: encode, NCCL
  all-gather of the codes, decode and sum, one after another;
* ``ag``: NCCL's all-gather of exactly the bytes ``hier`` all-gathers (the
  plan's chunk: ``quant.wire_nbytes`` of the padded message and its sender's
  status), alone;
* ``local``: ``hier`` with the backend's NCCL all-gather replaced by marking each node's chunk
  "arrived" (two 4-byte memsets; the bytes stay the last call's: results wrong, time right):
  encode, decode and sum, and the launches alone;
* ``hier - ag - local``: what running them one after another with the all-gather costs beyond
  the sum of the parts (the all-gather slower inside the call than alone, say).

``flat / ag`` is the most a scheme that all-gathers these codes through NCCL
can gain, however well it overlaps its local work; ``flat / hier`` is what the
current serial scheme gains.  Times: CUDA events around ``--iters`` back-to-back
calls after a warm-up, median of ``--repeats``, max over ranks (milliseconds).
"""
from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from flashcomm_cupy.harness.sizes import parse_size
from flashcomm_cupy.harness.timing import event_seconds_per_call


def timed_ms(mpi, fn, iters: int, repeats: int) -> float:
    """Median over ``repeats`` of the mean time of ``iters`` back-to-back calls, max over ranks."""
    per_call = event_seconds_per_call(fn, iters, repeats, before_each=mpi.Barrier)
    return mpi.allreduce(float(np.median(per_call)) * 1e3, op=_max())


def _local_only_ms(mpi, comm, call, iters: int, repeats: int) -> float:
    """``call``'s time with the hierarchical backend's inter-node all-gather replaced by marking
    every node's chunk arrived (its status word OK), so the sum decodes as after a real one."""
    import cupy
    from flashcomm_cupy.backends.hierarchical import NODE_TAIL_BYTES
    handle = getattr(comm.backend, "cross_nccl", None) or comm.backend.nccl  # the inter-node hop's handle
    nodes = mpi.Get_size()  # one GPU per node

    def mark_arrived(send_ptr, recv_ptr, count, dtype, stream_ptr):
        for k in range(nodes):
            cupy.cuda.runtime.memsetAsync(recv_ptr + (k + 1) * count - NODE_TAIL_BYTES, 0, 4, stream_ptr)

    real = handle.all_gather
    handle.all_gather = mark_arrived
    try:
        return timed_ms(mpi, call, iters, repeats)
    finally:
        handle.all_gather = real
        comm.backend.synchronize()  # raises if a status was ever read as failed


def _max():
    from mpi4py import MPI
    return MPI.MAX


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="16M,64M,256M", help="message sizes in bytes of fp16 (K/M suffixes)")
    ap.add_argument("--bits", default="4,8", help="codecs of the hierarchical rows (comma list)")
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", dest="json_path")
    args = ap.parse_args(argv)

    import cupy
    from cupy.cuda import nccl
    from mpi4py import MPI

    from flashcomm_cupy import Communicator
    from flashcomm_cupy.config import Mode

    mpi = MPI.COMM_WORLD
    rank = mpi.Get_rank()
    comm = Communicator(mpi, backend="gpu")
    if getattr(comm.backend, "nodes", None) is None or comm.backend.nodes.ranks_per_node != 1:
        sys.exit("hier_parts.py times one GPU per node (the all-gather row is the whole message's): "
                 "run it with FLASHCOMM_RANKS_PER_NODE=1")
    uid = mpi.bcast(nccl.get_unique_id() if rank == 0 else None)
    raw = nccl.NcclCommunicator(mpi.Get_size(), uid, rank)
    stream = cupy.cuda.get_current_stream()
    rows = []
    if rank == 0:
        print(f"{'size':>6} {'mode':>6} {'flat ms':>9} {'hier ms':>9} {'ag ms':>9} {'local ms':>9} {'rest ms':>8} "
              f"{'ag MB':>8} {'ag GB/s':>8} {'flat GB/s':>9} {'flat/hier':>9} {'flat/ag':>8}", flush=True)
    for size_text in args.sizes.split(","):
        nbytes = parse_size(size_text)
        n = nbytes // 2
        x = cupy.random.default_rng(rank).standard_normal(n, dtype=cupy.float32).astype(cupy.float16)
        y = cupy.empty_like(x)
        flat = timed_ms(mpi, lambda: raw.allReduce(x.data.ptr, y.data.ptr, n, nccl.NCCL_FLOAT16, nccl.NCCL_SUM,
                                                    stream.ptr), args.iters, args.repeats)
        for bits in args.bits.split(","):
            bits_value = tuple(int(b) for b in bits.split("/")) if "/" in bits else int(bits)
            mode = Mode.make(bits_value, args.group_size)
            hier = timed_ms(mpi, lambda: comm.all_reduce(x, bits=bits_value, group_size=args.group_size,
                                                          algo="hierarchical", out=y), args.iters, args.repeats)
            chunk = comm.backend._plan(n, "float16", mode).inter.stride  # what each node all-gathers
            send = cupy.zeros(chunk, dtype=cupy.uint8)
            recv = cupy.zeros(chunk * mpi.Get_size(), dtype=cupy.uint8)
            ag = timed_ms(mpi, lambda: raw.allGather(send.data.ptr, recv.data.ptr, chunk, nccl.NCCL_UINT8,
                                                      stream.ptr), args.iters, args.repeats)
            local = _local_only_ms(mpi, comm, lambda: comm.all_reduce(x, bits=bits_value, group_size=args.group_size,
                                                                      algo="hierarchical", out=y),
                                   args.iters, args.repeats)
            row = {"bytes": nbytes, "mode": f"int{bits}", "flat_ms": flat, "hier_ms": hier, "ag_ms": ag,
                   "local_ms": local, "rest_ms": hier - ag - local, "ag_bytes": chunk, "ag_gbps": chunk / ag / 1e6,
                   "flat_gbps": nbytes / flat / 1e6, "flat_over_hier": flat / hier, "flat_over_ag": flat / ag}
            rows.append(row)
            if rank == 0:
                print(f"{size_text:>6} {row['mode']:>6} {flat:9.2f} {hier:9.2f} {ag:9.2f} {local:9.2f} "
                      f"{hier - ag - local:8.2f} "
                      f"{chunk / 1e6:8.1f} {row['ag_gbps']:8.2f} {row['flat_gbps']:9.2f} "
                      f"{row['flat_over_hier']:8.2f}x {row['flat_over_ag']:7.2f}x", flush=True)
    comm.close()
    raw.destroy()
    if rank == 0 and args.json_path:
        with open(args.json_path, "w") as f:
            json.dump({"kind": "hier-parts", "ranks": mpi.Get_size(), "group_size": args.group_size, "rows": rows},
                      f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
