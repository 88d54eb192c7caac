"""Where does an eager (non-graph) call's time go?  Host cost per call, flashcomm against NCCL.

    mpirun -n 2 python benchmarks/eager_host.py [--calls 200] [--repeats 7] [--json OUT.json]
    torchrun --nproc-per-node 2 benchmarks/eager_host.py          # same, bootstrapped by torch.distributed

Two tables, both from ``repeats`` windows of ``calls`` back-to-back eager calls per
row on the same buffers (median over windows, max over ranks):

* **API** (``Communicator.all_reduce``, what users call): CuPy arrays and torch
  CUDA tensors at 4 KB, 64 KB and 1 MB, every mode, in place and ``out=``,
  against NCCL through ``cupy.cuda.nccl`` on the same CuPy buffers and
  ``torch.distributed.all_reduce`` (NCCL backend) on the same tensors.
  ``host us`` is the wall time of the Python call loop divided by ``calls``
  (the host cost: launches are asynchronous); ``eager us`` adds the final
  synchronize (the GPU's pace when it is slower than the host).  ``<=nccl``
  says whether the host cost is at most NCCL's for the same input kind
  (torch.distributed for tensors, cupy.cuda.nccl for CuPy arrays).
* **launch paths** (``--paths``, the backend alone): cuLaunchKernel with the
  plan's prebuilt kernelParams (``driver``) against ``RawKernel.__call__``
  (``cupy``), and the plan lookup alone.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

SIZES = [("4K", 4 << 10), ("64K", 64 << 10), ("1M", 1 << 20)]
MODES = [("lossless", None), ("int8", 8), ("int6", 6), ("int4", 4), ("int4/8", (4, 8))]
PATH_CASES = [("lossless 4K", 4 << 10, None), ("int4 4K", 4 << 10, 4), ("lossless 1M", 1 << 20, None)]


class Clock:
    """Host and eager µs per call of a function: the median over ``repeats`` windows of ``calls``
    back-to-back calls (each window starts from an idle GPU), max over ranks.

    Windows are short so the GPU's launch queue never fills: a full queue makes the host wait for
    the GPU, and the loop would then time the kernels, not the host (one window of 1,000 calls
    did at 1 MB, where a call's kernel outlasts its launch).  The median keeps one descheduled
    window on a shared host from deciding a row.
    """

    def __init__(self, mpi_comm, calls: int, sync, repeats: int = 7):
        self.mpi, self.calls, self.sync, self.repeats = mpi_comm, calls, sync, repeats

    def per_call_us(self, fn):
        for _ in range(50):
            fn()
        self.sync()
        hosts, eagers = [], []
        for _ in range(self.repeats):
            self.mpi.Barrier()
            t0 = time.perf_counter()
            for _ in range(self.calls):
                fn()
            t1 = time.perf_counter()
            self.sync()
            t2 = time.perf_counter()
            hosts.append((t1 - t0) / self.calls * 1e6)
            eagers.append((t2 - t0) / self.calls * 1e6)
        mine = (float(np.median(hosts)), float(np.median(eagers)))
        host, eager = (max(column) for column in zip(*self.mpi.allgather(mine)))
        return round(host, 2), round(eager, 2)


def setup():
    """(Communicator, torch.distributed ready or not) under mpirun or torchrun."""
    import cupy

    from flashcomm_cupy import Communicator
    from flashcomm_cupy.torch_group import init_torch_from_mpi, launched_by_torchrun
    try:
        import torch
        import torch.distributed as dist
    except ImportError:
        torch = None
    if torch is not None and launched_by_torchrun():
        from flashcomm_cupy.launchers import launched_local_rank
        local = launched_local_rank() or 0
        torch.cuda.set_device(local)
        cupy.cuda.Device(local).use()
        dist.init_process_group("nccl")
        return Communicator.from_torch(backend="gpu", device=local), True
    comm = Communicator(backend="gpu")
    if torch is None:
        return comm, False
    torch.cuda.set_device(comm.backend.device_id)
    init_torch_from_mpi(comm.mpi_comm, "nccl")
    return comm, True


def api_rows(comm, clock, with_torch: bool, out_rows: list):
    import cupy

    from flashcomm_cupy.backends.nccl import _NCCL_DTYPE
    nccl = comm.backend.nccl.comm
    kinds = ["cupy"] + (["torch"] if with_torch else [])
    for size_label, nbytes in SIZES:
        n = nbytes // 2
        host = np.random.default_rng(comm.rank).standard_normal(n).astype(np.float16)
        for kind in kinds:
            if kind == "cupy":
                x, o = cupy.asarray(host), cupy.empty(n, dtype=np.float16)
                stream = cupy.cuda.get_current_stream()

                def baseline(x=x):
                    nccl.allReduce(x.data.ptr, x.data.ptr, n, _NCCL_DTYPE["float16"], 0, stream.ptr)
                base_name = "cupy.cuda.nccl"
            else:
                import torch
                import torch.distributed as dist
                x = torch.from_numpy(host).cuda()
                o = torch.empty_like(x)

                def baseline(x=x):
                    dist.all_reduce(x)
                base_name = "torch.distributed"
            base_host, base_eager = clock.per_call_us(baseline)
            _emit(out_rows, comm, dict(size=size_label, input=kind, mode=f"NCCL ({base_name})", form="in place",
                                       host_us=base_host, eager_us=base_eager, le_nccl=""))
            for mode_label, bits in MODES:
                for form, out in (("in place", x), ("out=", o)):
                    h, e = clock.per_call_us(lambda x=x, out=out, bits=bits: comm.all_reduce(x, bits=bits, out=out))
                    _emit(out_rows, comm, dict(size=size_label, input=kind, mode=mode_label, form=form, host_us=h,
                                               eager_us=e, le_nccl="yes" if h <= base_host else "NO"))


def _emit(rows, comm, row):
    rows.append(row)
    if comm.rank == 0:
        print(f"{row['size']:>4s}  {row['input']:5s}  {row['mode']:30s} {row['form']:8s}  host {row['host_us']:7.2f} us"
              f"  eager {row['eager_us']:7.2f} us  {row['le_nccl']}", flush=True)


def path_rows(comm, clock, out_rows: list):
    import cupy

    from flashcomm_cupy.config import Mode
    backend = comm.backend
    for label, nbytes, bits in PATH_CASES:
        n = nbytes // 2
        x = cupy.asarray(np.random.default_rng(comm.rank).standard_normal(n).astype(np.float16))
        out = cupy.empty_like(x)
        mode = Mode.make(bits, 128)
        row = {"case": label, "bytes": nbytes}
        row["driver"] = clock.per_call_us(lambda: backend.all_reduce(x, out, mode, dtype=np.float16))[1]
        launch = backend.prepared(n, "float16", mode)
        if getattr(launch, "func", 0):  # the same call with the launch through RawKernel.__call__
            func, launch.func = launch.func, 0  # (CuPy marshals the arguments) instead of cuLaunchKernel
            try:
                row["cupy"] = clock.per_call_us(lambda: backend.all_reduce(x, out, mode, dtype=np.float16))[1]
            finally:
                launch.func = func
        row["plan lookup"] = clock.per_call_us(lambda: backend.prepared(n, "float16", mode))[1]
        if bits is None:
            nccl = Mode.make(None, algo="nccl")
            row["nccl"] = clock.per_call_us(lambda: backend.all_reduce(x, out, nccl, dtype=np.float16))[1]
        out_rows.append(row)
        if comm.rank == 0:
            print("  ".join(f"{k}={v}" for k, v in row.items()), flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=200, help="back-to-back calls per timed window")
    ap.add_argument("--repeats", type=int, default=7, help="timed windows per row (the median counts)")
    ap.add_argument("--paths", action="store_true", help="also time the backend's launch paths")
    ap.add_argument("--json", help="write the rows here (rank 0)")
    args = ap.parse_args(argv)

    import cupy
    comm, with_torch = setup()

    def sync():
        cupy.cuda.Device().synchronize()
    clock = Clock(comm.mpi_comm, args.calls, sync, args.repeats)
    api, paths = [], []
    if comm.rank == 0:
        print(f"# eager host cost per call, {comm.world_size} ranks, median of {args.repeats} windows of {args.calls} calls per row, max over ranks",
              flush=True)
    api_rows(comm, clock, with_torch, api)
    if args.paths:
        path_rows(comm, clock, paths)
    info = comm.backend.describe()  # collective
    if comm.rank == 0:
        verdicts = [r["le_nccl"] for r in api if r["le_nccl"]]
        print(f"# flashcomm rows with host cost <= NCCL's: {verdicts.count('yes')} of {len(verdicts)}", flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"card": info.get("gpu"), "world": comm.world_size, "calls": args.calls, "repeats": args.repeats, "api": api,
                           "paths": paths}, f, indent=1)
    comm.close()
    if with_torch:
        import torch.distributed as dist
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
