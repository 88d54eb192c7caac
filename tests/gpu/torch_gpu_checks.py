"""GPU checks of flashcomm from PyTorch, under torchrun (no MPI) or mpirun.

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/gpu/torch_gpu_checks.py
    mpirun -n 2 python tests/gpu/torch_gpu_checks.py

Every rank runs every check (they are collective) and compares its own output
with the NumPy reference bit for bit (each rank regenerates every rank's
inputs).  Covers: CUDA tensors of each dtype in place / out= / new result,
the eager cache (repeated calls, one address seen with two dtypes, non-contiguous
views), CPU tensors and NumPy on the GPU backend, a misaligned input on a side
stream, the errors (partial overlap, out on another GPU, host arrays or
misaligned arrays under graph capture), both custom ops inside
``torch.cuda.graph`` (replayed on new data) and under ``torch.compile``
(inductor, fullgraph).  Prints FAIL lines and ``torch_gpu_checks rank R: C checks,
F failures``; exit status 0 only if every check passed on this rank.
"""
from __future__ import annotations

import os
import sys
import traceback

import numpy as np
import torch
import torch.distributed as dist

import flashcomm_cupy as fc
from flashcomm_cupy import torch_ops
from flashcomm_cupy.dtypes import DTYPES, bfloat16
from flashcomm_cupy.torch_group import init_torch_from_mpi, launched_by_torchrun

TORCH = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
BITS = (None, 4, 6, 8, (4, 8))


class Checks:
    def __init__(self, comm):
        self.comm, self.rank, self.world = comm, comm.rank, comm.world_size
        self.count, self.failures = 0, []

    def ok(self, cond, what):
        self.count += 1
        if not cond:
            self.failures.append(what)
            print(f"FAIL rank {self.rank}: {what}", flush=True)

    def raises(self, exc, fn, what, match=""):
        try:
            fn()
        except exc as e:
            self.ok(match in str(e), f"{what}: message {e}")
            return
        except Exception as e:  # noqa: BLE001
            self.ok(False, f"{what}: raised {type(e).__name__}: {e}")
            return
        self.ok(False, f"{what}: did not raise")


def host_inputs(world, n, dtype, seed):
    return [np.random.default_rng([seed, r, n]).standard_normal(n, dtype=np.float32).astype(DTYPES[dtype])
            for r in range(world)]


def to_torch(a: np.ndarray, device):
    if a.dtype == bfloat16:
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16).to(device)
    return torch.from_numpy(a).to(device)


def same_bits(got, want: np.ndarray) -> bool:
    return np.array_equal(np.ascontiguousarray(fc.as_numpy(got)).view(np.uint8), want.view(np.uint8))


def expected(comm, n, dtype, bits, seed):
    """Every rank's input and the reference sum, for the algorithm the communicator runs at this size
    (NCCL's lossless sum of two ranks rounds like the reference's)."""
    xs = host_inputs(comm.world_size, n, dtype, seed)
    algo = comm.backend.resolve_algo(n * xs[0].itemsize, fc.Mode.make(bits), xs[0].itemsize)
    return xs, fc.flash_all_reduce_reference(xs, bits=bits, algo=algo if algo in ("oneshot", "twoshot") else "twoshot")[0]


def check_tensors(c: Checks, dev):
    for dtype in TORCH:
        for bits in BITS:
            for n in (1000, 4096, 1 << 18):
                xs, want = expected(c.comm, n, dtype, bits, seed=1)
                x = to_torch(xs[c.rank], dev)
                o = torch.empty_like(x)
                for rep in range(3):  # the first call fills the eager cache, the later ones hit it
                    c.ok(c.comm.all_reduce(x, bits=bits, out=o) is o and same_bits(o, want),
                         f"out= {dtype} bits={bits} n={n} call {rep}")
                c.ok(same_bits(c.comm.all_reduce(x, bits=bits), want), f"new result {dtype} bits={bits} n={n}")
                for rep in range(2):
                    y = to_torch(xs[c.rank], dev)
                    c.comm.all_reduce(y, bits=bits, out=y)
                    c.ok(same_bits(y, want), f"in place {dtype} bits={bits} n={n} call {rep}")


def check_cache_never_stale(c: Checks, dev):
    """One address seen as float32 then float16, then through a non-contiguous view."""
    base = torch.empty(4096 * 4, dtype=torch.uint8, device=dev)
    for dtype, n in (("float32", 4096), ("float16", 8192), ("float32", 4096), ("bfloat16", 8192)):
        xs, want = expected(c.comm, n, dtype, None, seed=2)
        x = base.view(TORCH[dtype])
        x.copy_(to_torch(xs[c.rank], dev))
        c.comm.all_reduce(x, bits=None, out=x)
        c.ok(same_bits(x, want), f"same address as {dtype}")
    strided = base.view(torch.float16).view(64, 128).t()
    c.raises(ValueError, lambda: c.comm.all_reduce(strided, bits=None, out=strided), "non-contiguous view at a "
             "cached address", "contiguous")


def check_host_inputs(c: Checks, dev):
    xs, want = expected(c.comm, 5000, "bfloat16", 4, seed=3)
    t = to_torch(xs[c.rank].copy(), "cpu")  # a CPU tensor shares the array's memory: keep xs the inputs
    c.comm.all_reduce(t, bits=4, out=t)
    c.ok(same_bits(t, want), "CPU tensor in place on the GPU backend")
    t = to_torch(xs[c.rank].copy(), "cpu")
    o = torch.zeros_like(t)
    c.ok(c.comm.all_reduce(t, bits=4, out=o) is o and same_bits(o, want), "CPU tensor out= on the GPU backend")
    a = xs[c.rank].copy()
    c.comm.all_reduce(a, bits=4, out=a)
    c.ok(same_bits(a, want), "NumPy in place on the GPU backend")


def check_misaligned_and_errors(c: Checks, dev):
    n = 3000
    xs, want = expected(c.comm, n, "float16", 8, seed=4)
    side = torch.cuda.Stream()
    base = torch.zeros(n + 8, dtype=torch.float16, device=dev)
    with torch.cuda.stream(side):
        x = base[1:n + 1]  # 2 bytes past an aligned address
        x.copy_(to_torch(xs[c.rank], dev))
        c.comm.all_reduce(x, bits=8, out=x)
    side.synchronize()
    c.ok(same_bits(x, want), "misaligned input on a side stream")
    a = torch.zeros(2 * n, dtype=torch.float16, device=dev)
    c.raises(ValueError, lambda: c.comm.all_reduce(a[:n], bits=None, out=a[8:n + 8]), "partial overlap",
             "partially overlap")
    if torch.cuda.device_count() > 1:
        other = (dev.index + 1) % torch.cuda.device_count()
        c.raises(ValueError, lambda: c.comm.all_reduce(a[:n], bits=None, out=torch.empty(n, dtype=torch.float16,
                                                                                         device=f"cuda:{other}")),
                 "out on another GPU", "GPU")
    import cupy
    host = np.ones(n, dtype=np.float16)
    s = cupy.cuda.Stream(non_blocking=True)
    with s:  # a NumPy input under (CuPy) capture: its device copy would die with the call
        s.begin_capture()
        try:
            c.raises(ValueError, lambda: c.comm.all_reduce(host, bits=None), "NumPy input under capture", "graph")
        finally:
            s.end_capture()
    g = torch.cuda.CUDAGraph()
    try:  # a misaligned tensor under torch capture: its aligned copies would too
        with torch.cuda.graph(g):
            c.comm.all_reduce(base[1:n + 1], bits=8, out=base[1:n + 1])
        c.ok(False, "misaligned input under graph capture did not raise")
    except ValueError as e:
        c.ok("graph" in str(e), f"misaligned input under capture: {e}")
    except Exception as e:  # noqa: BLE001  (the capture itself must end cleanly)
        c.ok(False, f"misaligned input under capture raised {type(e).__name__}: {e}")
    torch.cuda.synchronize()
    dist.barrier()


def check_graph(c: Checks, dev):
    """Both ops captured in one graph, replayed on new inputs copied into the captured buffers."""
    n = 1 << 16
    x = torch.empty(n, dtype=torch.bfloat16, device=dev)
    y = torch.empty_like(x)
    xs0, _ = expected(c.comm, n, "bfloat16", 4, seed=10)
    x.copy_(to_torch(xs0[c.rank], dev))
    y.copy_(x)
    torch_ops.all_reduce(c.comm, x, bits=4)  # warm up: kernels compiled, plans built
    torch_ops.all_reduce_(c.comm, y, bits=None)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        z = torch_ops.all_reduce(c.comm, x, bits=4)
        torch_ops.all_reduce_(c.comm, y, bits=None)
    for seed in (11, 12, 13):
        xs, want4 = expected(c.comm, n, "bfloat16", 4, seed)
        _, want_lossless = expected(c.comm, n, "bfloat16", None, seed)
        x.copy_(to_torch(xs[c.rank], dev))
        y.copy_(x)
        g.replay()
        torch.cuda.synchronize()
        c.ok(same_bits(z, want4), f"graph replay seed {seed}: out-of-place op")
        c.ok(same_bits(y, want_lossless), f"graph replay seed {seed}: in-place op")


def check_compile(c: Checks, dev):
    comm = c.comm

    def block(h):
        h = torch.relu(h) * 3
        s = torch_ops.all_reduce(comm, h, bits=None)
        torch_ops.all_reduce_(comm, h, bits=8)
        return s + h

    compiled = torch.compile(block, fullgraph=True)
    for seed in (20, 21):
        xs, _ = expected(c.comm, 8192, "float16", None, seed)
        h = to_torch(xs[c.rank], dev)
        got = compiled(h.clone())
        want = block(h.clone())
        c.ok(torch.equal(got, want), f"torch.compile(fullgraph) equals eager, seed {seed}")


def check_cupy(c: Checks, dev=None):
    import cupy
    for bits in BITS:
        xs, want = expected(c.comm, 4096, "float16", bits, seed=30)
        for rep in range(3):
            y = cupy.asarray(xs[c.rank])
            c.comm.all_reduce(y, bits=bits, out=y)
            c.ok(same_bits(y, want), f"CuPy in place bits={bits} call {rep}")


def setup():
    if launched_by_torchrun():
        local = int(os.environ["LOCAL_RANK"])
        torch.cuda.set_device(local)
        dist.init_process_group("nccl")
        return fc.Communicator.from_torch(backend="gpu", device=local)
    comm = fc.Communicator(backend="gpu")
    torch.cuda.set_device(comm.backend.device_id)
    init_torch_from_mpi(comm.mpi_comm, "nccl")
    return comm


#: the checks, in the order main() runs them; each takes (Checks, device)
CHECKS = (check_tensors, check_cache_never_stale, check_host_inputs, check_misaligned_and_errors, check_graph,
          check_compile, check_cupy)


def run_check(c: Checks, check, dev) -> None:
    """One check; an exception is reported as a failure and the next check goes on (the peers run the same checks)."""
    try:
        check(c, dev)
    except Exception:  # noqa: BLE001
        c.ok(False, f"{check.__name__} raised:\n{traceback.format_exc()}")


def main():
    comm = setup()
    dev = torch.device("cuda", torch.cuda.current_device())
    c = Checks(comm)
    for check in CHECKS:
        run_check(c, check, dev)
    c.ok("mpi4py" not in sys.modules or not launched_by_torchrun(), "mpi4py imported under torchrun")
    print(f"torch_gpu_checks rank {c.rank}: {c.count} checks, {len(c.failures)} failures, "
          f"{len(comm._eager)} cached launches", flush=True)
    comm.close()
    dist.destroy_process_group()
    return 1 if c.failures else 0


if __name__ == "__main__":
    sys.exit(main())
