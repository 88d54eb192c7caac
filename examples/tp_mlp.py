"""A tensor-parallel transformer MLP block with flashcomm's all-reduce, against NCCL.

    torchrun --nproc-per-node 2 examples/tp_mlp.py            # torch.distributed bootstrap, no MPI
    mpirun -n 2 python examples/tp_mlp.py                      # MPI bootstrap
    torchrun --nproc-per-node 2 examples/tp_mlp.py --graph     # also time the block replayed from a CUDA graph

The block is the SwiGLU MLP of a Llama-style layer split over the ranks as in
Megatron-LM: the gate and up projections are column-parallel (each rank holds
``ffn / world`` of their output columns), the down projection is row-parallel
(each rank holds the matching rows), so every rank ends with a partial sum of
the block's output, which one all-reduce completes.  For each flashcomm mode
the script prints the time per block (max over ranks) and the error of the
block's output against the same block reduced by ``torch.distributed``
(NCCL on GPUs, gloo on CPUs), relative to that output's RMS.

With GPUs each rank uses the GPU of its local rank, bf16 and the flash GPU
backend; without, float32 tensors on the CPU backend and gloo.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

import flashcomm_cupy as fc
from flashcomm_cupy import torch_ops
from flashcomm_cupy.torch_group import init_torch_from_mpi, launched_by_torchrun

MODES = [("lossless", None, False), ("int8", 8, False), ("int6", 6, False), ("int4", 4, False),
         ("int4 rot", 4, True)]


def setup(use_cuda: bool):
    """(flashcomm communicator, device) for either launcher."""
    torch_backend = "nccl" if use_cuda else "gloo"
    if launched_by_torchrun():
        local = int(os.environ.get("LOCAL_RANK", 0))
        if use_cuda:
            torch.cuda.set_device(local)
        dist.init_process_group(torch_backend)
        comm = fc.Communicator.from_torch(backend="auto" if use_cuda else "cpu",
                                          **({"device": local} if use_cuda else {}))
    else:
        comm = fc.Communicator(backend="auto" if use_cuda else "cpu")
        if use_cuda:
            torch.cuda.set_device(comm.backend.device_id)
        init_torch_from_mpi(comm.mpi_comm, torch_backend)
    device = torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")
    return comm, device


class TensorParallelMLP:
    """SwiGLU MLP: column-parallel gate/up, row-parallel down; ``reduce`` completes the partial output."""

    def __init__(self, hidden: int, ffn: int, rank: int, world: int, dtype, device, seed: int = 0):
        if ffn % world:
            raise SystemExit(f"--ffn {ffn} must be a multiple of the world size {world}")
        g = torch.Generator().manual_seed(seed)  # the same full weights on every rank
        scale = hidden ** -0.5
        gate = torch.randn(hidden, ffn, generator=g) * scale
        up = torch.randn(hidden, ffn, generator=g) * scale
        down = torch.randn(ffn, hidden, generator=g) * ffn ** -0.5
        cols = slice(rank * ffn // world, (rank + 1) * ffn // world)
        self.gate = gate[:, cols].to(device, dtype).contiguous()
        self.up = up[:, cols].to(device, dtype).contiguous()
        self.down = down[cols, :].to(device, dtype).contiguous()

    def partial(self, x):
        return (F.silu(x @ self.gate) * (x @ self.up)) @ self.down

    def __call__(self, x, reduce):
        y = self.partial(x)
        reduce(y)
        return y


def time_block(block, x, reduce, iters: int, warmup: int, device, graph: bool):
    """Seconds per block (this rank): eager calls, or replays of a CUDA graph of ``iters`` blocks."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        block(x, reduce)
    sync()
    if graph:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(iters):
                block(x, reduce)
        g.replay()  # once untimed (upload)
        sync()
        t0 = time.perf_counter()
        g.replay()
        sync()
        return (time.perf_counter() - t0) / iters
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(iters):
        block(x, reduce)
    sync()
    return (time.perf_counter() - t0) / iters


def max_over_ranks(value: float, device) -> float:
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    use_cuda_default = torch.cuda.is_available() and fc.gpu_available()
    ap.add_argument("--tokens", type=int, default=16, help="rows of the block's input (decode batch)")
    ap.add_argument("--hidden", type=int, default=8192 if use_cuda_default else 512)
    ap.add_argument("--ffn", type=int, default=28672 if use_cuda_default else 1536)
    ap.add_argument("--dtype", choices=("bfloat16", "float16", "float32"),
                    default="bfloat16" if use_cuda_default else "float32")
    ap.add_argument("--iters", type=int, default=200 if use_cuda_default else 10)
    ap.add_argument("--warmup", type=int, default=20 if use_cuda_default else 2)
    ap.add_argument("--cpu", action="store_true", help="CPU backend and gloo even where GPUs are present")
    ap.add_argument("--graph", action="store_true", help="also time the blocks replayed from a CUDA graph")
    ap.add_argument("--compile", action="store_true", help="run the block through torch.compile")
    args = ap.parse_args(argv)

    use_cuda = use_cuda_default and not args.cpu
    comm, device = setup(use_cuda)
    rank, world = comm.rank, comm.world_size
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(1)
    x = torch.randn(args.tokens, args.hidden).to(device, dtype)  # replicated input, as in TP
    block = TensorParallelMLP(args.hidden, args.ffn, rank, world, dtype, device)
    run = torch.compile(block.__call__, fullgraph=True) if args.compile else block.__call__

    reference = block(x, lambda y: dist.all_reduce(y))
    ref_rms = float(reference.float().pow(2).mean().sqrt())
    rows = [("torch.distributed", lambda y: dist.all_reduce(y), None)]
    for label, bits, rotate in MODES:
        rows.append((f"flashcomm {label}",
                     lambda y, bits=bits, rotate=rotate: torch_ops.all_reduce_(comm, y, bits=bits, rotate=rotate),
                     (bits, rotate)))
    if rank == 0:
        print(f"TP MLP block: {world} ranks ({comm.backend_name} backend, torch.distributed "
              f"{dist.get_backend()}), tokens={args.tokens} hidden={args.hidden} ffn={args.ffn} {args.dtype}, "
              f"all-reduce of {args.tokens * args.hidden * x.element_size()} bytes", flush=True)
        graph_col = "  graph us/block" if args.graph and use_cuda else ""
        print(f"{'all-reduce':28s} {'eager us/block':>14s}{graph_col}  {'rel err vs NCCL' if use_cuda else 'rel err vs gloo':>16s}",
              flush=True)
    finite = True
    for label, reduce, _ in rows:
        y = run(x, reduce)
        err = float((y.float() - reference.float()).pow(2).mean().sqrt()) / max(ref_rms, 1e-30)
        err = max_over_ranks(err, device)
        finite = finite and err == err and err != float("inf")
        eager = max_over_ranks(time_block(run, x, reduce, args.iters, args.warmup, device, False), device)
        line = f"{label:28s} {eager * 1e6:14.1f}"
        if args.graph and use_cuda:
            try:
                graph_s = time_block(block, x, reduce, args.iters, 3, device, True)
            except Exception as exc:  # noqa: BLE001  (say why, keep timing the other rows)
                print(f"rank {rank}: {label}: CUDA graph capture failed: {exc}", flush=True)
                graph_s = float("nan")
            line += f"  {max_over_ranks(graph_s, device) * 1e6:15.1f}"
        if rank == 0:
            print(f"{line}  {err:16.2e}", flush=True)
    comm.close()
    dist.destroy_process_group()
    return 0 if finite else 1


if __name__ == "__main__":
    sys.exit(main())
