"""``flashcomm bench``: nccl-tests-style timing of every mode against the baseline."""
from __future__ import annotations

import click

from flashcomm_cupy.backends.flash.plan import PROTOCOL_SETTINGS as PROTOCOL_CHOICES

from . import table
from .options import (algo_option, backend_option, bits_option, check_outputs, command, command_line,
                      dtype_option, group_size_option, json_option, mpi_launch, open_communicator,
                      output_option, parse_max_size_option, parse_min_size_option, parse_size_option,
                      require_quantizing_backend, switch_option, transport_option)

#: defaults that differ between the GPU and the CPU backend
GPU_DEFAULTS = {"minbytes": 4 << 10, "maxbytes": 256 << 20, "iters": 20, "warmup": 5, "repeats": 5,
                "graph": 1, "peer_bw": 350.0, "check_max_bytes": 16 << 20}
CPU_DEFAULTS = {"minbytes": 1 << 10, "maxbytes": 4 << 20, "iters": 5, "warmup": 1, "repeats": 3,
                "graph": 0, "peer_bw": None, "check_max_bytes": 16 << 20}


@command("bench")
@click.option("-b", "--minbytes", callback=parse_min_size_option, metavar="SIZE",
              help="Smallest message (K/M/G suffixes). [default: 4K on GPUs, 1K on CPUs]")
@click.option("-e", "--maxbytes", callback=parse_max_size_option, metavar="SIZE",
              help="Largest message. [default: 256M on GPUs, 4M on CPUs]")
@click.option("-f", "--stepfactor", type=click.FloatRange(min=1, min_open=True), default=4.0,
              show_default=True, help="Size multiplication factor (nccl-tests uses 2; 4 halves the run time).")
@click.option("-n", "--iters", type=click.IntRange(min=1), default=None,
              help="Timed calls per repeat. [default: 20 on GPUs, 5 on CPUs]")
@click.option("-w", "--warmup", type=click.IntRange(min=0), default=None,
              help="Untimed calls before timing. [default: 5 on GPUs, 1 on CPUs]")
@click.option("-r", "--repeats", type=click.IntRange(min=1), default=None,
              help="Timed repeats; the median per rank, then the max over ranks, is reported. "
                   "[default: 5 on GPUs, 3 on CPUs]")
@click.option("-c", "--check", type=click.IntRange(0, 1), default=1, show_default=True,
              help="Correctness pass: #wrong vs the reference and error vs the exact sum.")
@dtype_option("float16")
@click.option("-G", "--graph", type=click.IntRange(0, 1), default=None,
              help="Time CUDA-graph replays of the calls (the primary figure when available). "
                   "[default: 1 on GPUs; CPUs have no graphs]")
@click.option("--eager", is_flag=True, help="Also report eager (non-graph) timing.")
@bits_option("none,8,4,4/8")
@group_size_option()
@algo_option("auto")
@switch_option("--rotate", "Hadamard rotation of quantized modes: off, on (bare --rotate), or both.")
@switch_option("--symmetric", "Symmetric (abs-max) codecs for quantized modes: off, on, or both.")
@backend_option()
@click.option("--peer-bw", "peer_bw", type=click.FloatRange(min=0, min_open=True), default=None,
              metavar="GBPS", help="Per-rank send bandwidth for the wire floor. [default: 350 on GPUs, "
                                   "none on CPUs]")
@click.option("--check-max-bytes", callback=parse_size_option, metavar="SIZE",
              help="Largest size checked bit-exactly against the host reference; larger sizes get "
                   "the error vs the exact sum and the rank agreement only. [default: 16M]")
@click.option("--seed", type=int, default=1234, show_default=True, help="Seed of the inputs.")
@json_option("Write the results (with machine and versions) as JSON.")
@output_option("--csv", "csv_path", "Write the result rows as CSV.")
@output_option("--plot", "plot_path", "Plot latency and speedup vs size to a PNG (needs the 'plot' extra).")
@click.option("--protocol", type=click.Choice(list(PROTOCOL_CHOICES)), default=None,
              help="GPU signalling protocol: the tuning table's choice (auto), or flag / ll forced wherever "
                   "it applies (default: $FLASHCOMM_PROTOCOL or auto).")
@transport_option
@mpi_launch
@click.pass_context
def bench(ctx, minbytes, maxbytes, stepfactor, iters, warmup, repeats, check, dtype, graph, eager, bits,
          group_size, algo, rotate, symmetric, backend, peer_bw, check_max_bytes, seed, json_path,
          csv_path, plot_path, protocol):
    """Time the all-reduce of every mode against the baseline over a sweep of sizes.

    The baseline (NCCL on GPUs, MPI_Allreduce on CPUs) is always measured
    first; speedups are relative to it at the same size.  The exit status is
    0 when every checked row passes, 1 otherwise.
    """
    import numpy as np

    from flashcomm_cupy.harness import SweepConfig, build_modes, sweep_sizes

    outputs = {"--json": json_path, "--csv": csv_path, "--plot": plot_path}
    # --protocol is a constructor option of the GPU backend (checked and agreed between ranks there)
    from flashcomm_cupy.backends import registry
    gpu_options = {"protocol": protocol} if protocol is not None and registry.spec(backend).name == "gpu" else {}
    comm = open_communicator(backend, **gpu_options)
    with comm:
        check_outputs(outputs, comm.mpi_comm)
        on_gpu = comm.backend.xp is not np
        if protocol not in (None, "auto") and getattr(comm.backend, "protocol", None) != protocol:
            raise click.ClickException(f"--protocol {protocol} needs the flash GPU backend, "
                                       f"not {comm.backend_name}")
        if graph and not on_gpu:
            # -G 1 is a GPU default that scripts pass everywhere: run eagerly, record graph false, say so
            graph = 0
            if comm.rank == 0:
                click.echo(f"flashcomm: -G 1 ignored: the {comm.backend_name} backend has no CUDA graphs "
                           "(times are eager calls)", err=True)
        d = GPU_DEFAULTS if on_gpu else CPU_DEFAULTS
        pick = lambda value, key: d[key] if value is None else value  # noqa: E731
        lo, hi = pick(minbytes, "minbytes"), pick(maxbytes, "maxbytes")
        if hi < lo:
            raise click.BadParameter(f"max bytes {hi} is below min bytes {lo}", param_hint="'-e'")
        sizes = sweep_sizes(lo, hi, stepfactor, dtype.itemsize)
        modes = build_modes(bits, algo, rotate, symmetric, group_size)
        require_quantizing_backend(comm, modes, backend)
        config = SweepConfig(
            counts=[s.count for s in sizes], dtype=dtype, modes=modes,
            warmup=pick(warmup, "warmup"), iters=pick(iters, "iters"), repeats=pick(repeats, "repeats"),
            graph=bool(pick(graph, "graph")), eager=eager, check=bool(check),
            reference_max_bytes=pick(check_max_bytes, "check_max_bytes"), seed=seed,
            peer_bw_gbps=pick(peer_bw, "peer_bw"),
            extra={"minbytes": lo, "maxbytes": hi, "step_factor": stepfactor})
        result = _run_and_print(comm, config, on_gpu, outputs)
        comm.mpi_comm.Barrier()  # files are written before any rank exits
    ctx.exit(0 if result.ok else 1)


def _run_and_print(comm, config, on_gpu: bool, outputs: dict):
    """Run the sweep, printing the header, each row as it finishes and the footer (rank 0); write the files.

    Ctrl-C keeps what finished: rank 0 prints the footer of the finished rows, writes them to the
    output files (marked ``"interrupted": true``), and the interrupt goes on to end the job.  A job
    ended without that chance (Open MPI's ``mpirun`` kills it at the first Ctrl-C) still leaves the
    finished rows: rank 0 rewrites the JSON and CSV files after every row, before printing it (every
    row on the screen is in them), the JSON marked ``"unfinished": true`` until the end -- where
    they are files (:func:`~flashcomm_cupy.harness.results.replaceable`); a pipe gets the end's only.
    """
    from flashcomm_cupy.dtypes import dtype_name
    from flashcomm_cupy.harness import BenchResult, machine, run_sweep
    from flashcomm_cupy.harness.interrupts import AgreedInterrupt, AgreedInterrupts
    from flashcomm_cupy.harness.results import replaceable

    from . import report

    descriptions = machine.gather_descriptions(comm.backend, comm.mpi_comm)
    meta = machine.run_meta(comm.backend, descriptions, command_line(), dtype_name(config.dtype),
                            config.as_meta())
    result = BenchResult(meta=meta, rows=[])
    printer = report.BenchPrinter(meta, algos=table.algo_texts(comm.backend.supported_algos(), on_gpu),
                                  enabled=comm.rank == 0)

    # files, not pipes or terminals (which would get one document per row) nor links (/dev/stdout)
    every_row = {flag: path for flag, path in outputs.items()
                 if flag in EVERY_ROW_OUTPUTS and path and replaceable(path)}

    def keep(row):  # each finished row goes to the JSON and CSV files (rank 0) before the screen
        result.rows.append(row)
        if comm.rank == 0 and every_row:
            meta["unfinished"] = True
            _write_outputs(printer, result, every_row, quiet=True)
        printer.row(row)

    # Ctrl-C is noted, and the sweep ends on every rank between the same two rows (AgreedInterrupts):
    # a KeyboardInterrupt where the signal lands could leave rank 0 waiting in a collective.
    with printer, AgreedInterrupts(comm.mpi_comm) as interrupts:
        printer.header()
        try:
            run_sweep(comm, config, progress=printer.progress, on_row=keep, interrupts=interrupts)
        except KeyboardInterrupt as exc:
            if comm.rank == 0:
                meta.pop("unfinished", None)
                meta["interrupted"] = True
                printer.footer(result, interrupted=True)
                _write_outputs(printer, result, outputs)
            if isinstance(exc, AgreedInterrupt):  # every rank is here: none leaves before rank 0 has written
                comm.mpi_comm.Barrier()
            raise
        printer.footer(result)
    if comm.rank == 0:
        meta.pop("unfinished", None)
        _write_outputs(printer, result, outputs)
    return result


#: the output files rank 0 rewrites after every row (the plot only at the end: drawing it takes seconds)
EVERY_ROW_OUTPUTS = ("--json", "--csv")


def _write_outputs(printer, result, outputs: dict, quiet: bool = False) -> None:
    from flashcomm_cupy.harness import results as results_io

    from . import report
    writers = {"--json": results_io.write_json, "--csv": results_io.write_csv, "--plot": report.plot_bench}
    for flag, path in outputs.items():
        if path:
            writers[flag](result, path)
            if not quiet:
                printer.line(f"# wrote {path}")
