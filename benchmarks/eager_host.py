"""Where does an eager (non-graph) call's time go?  Host cost per call, by launch path.

    mpirun -n 4 python benchmarks/eager_host.py [--calls 2000] [--json OUT.json]

For a few sizes and modes, times ``calls`` back-to-back eager
``backend.all_reduce`` calls (wall clock around the loop, then one
synchronize; max over ranks) with each launch path of the flash backend:

* ``driver``: cuLaunchKernel with the plan's prebuilt kernelParams;
* ``cupy``: ``RawKernel.__call__``, which marshals the argument struct on every call;

plus the plan lookup alone (``_plan``) and NCCL through ``cupy.cuda.nccl``.
Small messages are host-bound in eager mode, so per-call wall time is the host cost.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

CASES = [("lossless 4K", 4 << 10, None), ("int4 4K", 4 << 10, 4), ("lossless 1M", 1 << 20, None)]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--json", help="write the rows here (rank 0)")
    args = ap.parse_args(argv)

    import cupy
    from flashcomm_cupy import Communicator
    from flashcomm_cupy.config import Mode

    comm = Communicator(backend="gpu")
    backend, mpi = comm.backend, comm.mpi_comm
    rows = []

    def per_call_us(fn):
        for _ in range(50):
            fn()
        cupy.cuda.get_current_stream().synchronize()
        mpi.Barrier()
        t0 = time.perf_counter()
        for _ in range(args.calls):
            fn()
        cupy.cuda.get_current_stream().synchronize()
        dt = (time.perf_counter() - t0) / args.calls * 1e6
        return max(mpi.allgather(dt))

    for label, nbytes, bits in CASES:
        n = nbytes // 2
        x = cupy.asarray(np.random.default_rng(comm.rank).standard_normal(n).astype(np.float16))
        out = cupy.empty_like(x)
        mode = Mode.make(bits, 128)
        row = {"case": label, "bytes": nbytes}
        for launcher in ("driver", "cupy"):
            backend.launcher = launcher
            row[launcher] = round(per_call_us(lambda: backend.all_reduce(x, out, mode, dtype=np.float16)), 2)
        backend.launcher = "driver"
        row["plan lookup"] = round(per_call_us(lambda: backend._plan(n, "float16", mode)), 2)
        if bits is None:
            nccl = Mode.make(None, algo="nccl")
            row["nccl"] = round(per_call_us(lambda: backend.all_reduce(x, out, nccl, dtype=np.float16)), 2)
        rows.append(row)
        if comm.rank == 0:
            print("  ".join(f"{k}={v}" for k, v in row.items()), flush=True)
    info = backend.describe()  # collective
    if comm.rank == 0 and args.json:
        with open(args.json, "w") as f:
            json.dump({"card": info.get("gpu"), "world": comm.world_size, "calls": args.calls, "rows": rows}, f,
                      indent=1)
    comm.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
