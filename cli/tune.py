"""``flashcomm tune``: measure the auto-dispatch table on this machine and save it.

The library loads the saved table on the next start (``~/.cache/flashcomm/
tuning.json`` by default, or ``$FLASHCOMM_TUNING``; see
``flashcomm_cupy.tuning``).  Tables for several world sizes merge into one
file: run ``mpirun -n 2 flashcomm tune`` and ``mpirun -n 4 flashcomm tune``.
Re-tuning a range (``-b 256K -e 16M``) replaces only those sizes' rows.
"""
from __future__ import annotations

import json
from pathlib import Path

import click

from .options import (check_outputs, command, make_console, mpi_launch, open_communicator, parse_max_size_option,
                      parse_min_size_option, transport_option)

#: what ``tune`` needs GPUs for, in its error messages
GPU_ONLY = "flashcomm tune (it tunes the GPU kernels)"


@command("tune")
@click.option("-b", "--minbytes", default="4K", callback=parse_min_size_option, show_default=True, metavar="SIZE",
              help="Smallest message (K/M/G suffixes).")
@click.option("-e", "--maxbytes", default="256M", callback=parse_max_size_option, show_default=True, metavar="SIZE",
              help="Largest message.")
@click.option("-f", "--stepfactor", default=4, type=click.IntRange(min=2), show_default=True,
              help="Size multiplication factor, a whole number: each size is a table row's upper bound.")
@click.option("--bits", "tune_bits", default=4, type=click.Choice(["4", "6", "8"]), show_default=True,
              help="Bit width the quantized rows are tuned on.")
@click.option("-n", "--iters", default=20, type=click.IntRange(min=1), show_default=True)
@click.option("--repeats", default=5, type=click.IntRange(min=1), show_default=True)
@click.option("-o", "--out", "out_path", type=click.Path(dir_okay=False), default=None, metavar="PATH",
              help="Table to write (default ~/.cache/flashcomm/tuning.json); rows of the sizes tuned replace "
                   "those in it, the rest stay.")
@click.option("--backend", type=click.Choice(["gpu"]), default="gpu", hidden=True)
@transport_option
@mpi_launch(needs_gpus=GPU_ONLY)
def tune(minbytes, maxbytes, stepfactor, tune_bits, iters, repeats, out_path, backend):
    """Measure one-shot vs two-shot vs NCCL and launch shapes per size; save the table.

    Needs CUDA GPUs (CuPy, one rank per GPU): it tunes the GPU kernels, which the CPU backend
    does not have.
    """
    from flashcomm_cupy import tuning
    from flashcomm_cupy.harness.tune import merge, tune as run_tune

    comm = open_communicator(backend, who=GPU_ONLY)
    check_outputs({"--out": out_path}, comm.mpi_comm)
    console = make_console(comm.rank)
    sizes = []
    s = minbytes
    while s <= maxbytes:
        sizes.append(s)
        s *= stepfactor
    # Collective: an error here may be one rank's alone, so it must reach main(), which
    # aborts every rank; closing (collective: the workspace teardown waits for every
    # rank) happens only on success.
    table = run_tune(comm, sizes, tune_bits=int(tune_bits), iters=iters, repeats=repeats,
                     progress=console.print if comm.rank == 0 else None)
    comm.close()
    if comm.rank == 0:
        path = Path(out_path) if out_path else tuning.USER
        base = json.loads(path.read_text()) if path.is_file() else {}
        merged = merge(base, table)
        tuning.TuningTable(merged, str(path)).save(path)
        console.print(f"wrote {path} ({len(sizes)} sizes, world {comm.world_size}); "
                      "flashcomm loads it on the next start")
