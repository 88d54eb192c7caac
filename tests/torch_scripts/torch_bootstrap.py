"""Run by tests/test_torch.py under ``torchrun --nproc-per-node N`` with the gloo backend: no MPI anywhere.

Checks, on every rank: the bootstrap through a torch.distributed group, the
CPU backend bit-identical to the reference over every mode, CPU tensors in
place and out=, the custom ops (eager and under torch.compile with
fullgraph=True), and that mpi4py was never imported.  Prints FAIL lines and a
summary line ``torch_bootstrap rank R/N: C checks, F failures``.
"""
from __future__ import annotations

import datetime
import sys

import numpy as np
import torch
import torch.distributed as dist

import flashcomm_cupy as fc
from flashcomm_cupy.dtypes import bfloat16

failures = []
checks = 0


def check(ok, what):
    global checks
    checks += 1
    if not ok:
        failures.append(what)
        print(f"FAIL rank {dist.get_rank()}: {what}", flush=True)


def inputs(world, n, dtype, seed=7):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(n).astype(np.float32).astype(dtype) for _ in range(world)]


def main():
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))  # no hang outlives the test
    rank, world = dist.get_rank(), dist.get_world_size()
    comm = fc.Communicator(group=dist.group.WORLD, backend="cpu", validate=True)
    check((comm.rank, comm.world_size) == (rank, world), f"rank/size {comm.rank}/{comm.world_size}")
    check(comm.backend_name == "cpu", comm.backend_name)

    # every mode bit-identical to the reference, NumPy in and out
    for dtype in (np.float16, bfloat16, np.float32):
        for bits in (None, 4, 6, 8, (4, 8)):
            for algo in ("oneshot", "twoshot"):
                for rotate in ((False, True) if bits else (False,)):
                    xs = inputs(world, 1000, dtype)
                    mode = fc.Mode.make(bits, 128, False, rotate, algo)
                    want = fc.flash_all_reduce_reference(xs, mode=mode)[rank]
                    got = comm.all_reduce(xs[rank], bits=bits, algo=algo, rotate=rotate)
                    check(np.array_equal(got.view(np.uint8), want.view(np.uint8)),
                          f"{np.dtype(dtype)} bits={bits} {algo} rot={rotate}")
    # the baseline: MPI_Allreduce's stand-in over gloo
    xs = inputs(world, 100, np.float32)
    got = comm.all_reduce(xs[rank], algo="mpi", bits=None)
    check(np.allclose(got, np.sum(xs, axis=0), rtol=1e-6), "algo=mpi over gloo")

    # CPU tensors: in place, out=, new result; bf16 too
    for tdt in (torch.float32, torch.bfloat16):
        x = torch.ones(300, dtype=tdt)
        comm.all_reduce(x, bits=None, out=x)
        check(torch.equal(x, torch.full((300,), float(world), dtype=tdt)), f"in place {tdt}: {x[:3]}")
        x = torch.ones(300, dtype=tdt)
        o = torch.zeros(300, dtype=tdt)
        check(comm.all_reduce(x, bits=None, out=o) is o and torch.equal(o, torch.full((300,), float(world), dtype=tdt)),
              f"out= {tdt}: {o[:3]}")
        r = comm.all_reduce(torch.ones(2, 3, dtype=tdt), bits=None)
        check(isinstance(r, torch.Tensor) and r.shape == (2, 3) and bool((r == world).all()), f"new result {tdt}")

    # a disagreement raises on every rank (validate=True), over the torch bootstrap
    try:
        comm.all_reduce(np.ones(10 + rank, dtype=np.float32), bits=None)
        check(world == 1, "size mismatch did not raise")
    except ValueError as exc:
        check("differ" in str(exc), f"mismatch message: {exc}")

    # the custom ops, eager
    from flashcomm_cupy import torch_ops
    x = torch.full((256,), float(rank + 1))
    total = float(sum(range(1, world + 1)))
    y = torch_ops.all_reduce(comm, x, bits=None)
    check(torch.equal(y, torch.full((256,), total)) and torch.equal(x, torch.full((256,), float(rank + 1))),
          "op out of place")
    torch_ops.all_reduce_(comm, x, bits=None)
    check(torch.equal(x, torch.full((256,), total)), "op in place")

    # torch.compile: fullgraph=True raises on any graph break
    def block(h):
        h = torch.relu(h) * 2
        s = torch_ops.all_reduce(comm, h, bits=None)
        torch_ops.all_reduce_(comm, h, bits=None)
        return s + h

    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    h = torch.arange(512, dtype=torch.float32) - 100
    got = compiled(h.clone())
    want = block(h.clone())
    check(torch.equal(got, want), "torch.compile result differs from eager")
    check(torch.equal(want, 2 * world * torch.relu(h) * 2), "eager block result")

    # a second communicator over a subgroup (all ranks), through Communicator.from_torch
    sub = dist.new_group(list(range(world)))
    comm2 = fc.Communicator.from_torch(sub, backend="cpu")
    first = torch.compile(lambda h: torch_ops.all_reduce(comm2, h * 1, bits=None), fullgraph=True,
                          backend="aot_eager")  # compiled before this communicator's first call
    check(torch.equal(first(torch.full((64,), float(rank))), torch.full((64,), float(sum(range(world))))),
          "compiled call on a fresh communicator")
    v = comm2.all_reduce(np.full(64, rank, dtype=np.float32), bits=None)
    check(np.array_equal(v, np.full(64, sum(range(world)), dtype=np.float32)), "subgroup communicator")
    # a group of this rank alone: the other ranks take no part in building its communicator
    alone = dist.new_group([rank], use_local_synchronization=True)
    solo = fc.Communicator(group=alone, backend="cpu")
    check(solo.world_size == 1 and np.array_equal(solo.all_reduce(np.full(8, rank + 0.5, np.float32), bits=None),
                                                  np.full(8, rank + 0.5, np.float32)), "one-rank subgroup")
    solo.close()
    handle = comm2.torch_handle
    comm2.close()
    try:
        torch.ops.flashcomm.all_reduce(torch.ones(4), handle, 0, 0, 128, "auto", False, False)
        check(False, "a closed communicator's handle still works")
    except ValueError as exc:
        check("no open communicator" in str(exc), f"closed handle: {exc}")
    check(comm.describe()["mpi_library"].startswith("not in use"), "describe() under torch")
    comm.close()
    check("mpi4py" not in sys.modules, "mpi4py was imported")
    print(f"torch_bootstrap rank {rank}/{world}: {checks} checks, {len(failures)} failures", flush=True)
    dist.destroy_process_group()
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
