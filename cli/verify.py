"""``flashcomm verify``: every mode x dtype x length against the reference, pass/fail."""
from __future__ import annotations

import dataclasses

import click

from .options import (algo_option, backend_option, bits_option, check_outputs, command, command_line,
                      dtype_option, group_size_option, json_option, make_console, mpi_launch, open_communicator,
                      output_width, parse_count_list, require_quantizing_backend, switch_option)

DEFAULT_LENGTHS = "1,127,4099,65537"
#: GPUs also get a length that spans many thread blocks and chunks
GPU_EXTRA_LENGTHS = (1048583,)


@command("verify")
@bits_option("none,4,6,8,4/8")
@switch_option("--rotate", "Rotation of quantized modes: off, on, or both.", default="both")
@switch_option("--symmetric", "Symmetric codecs for quantized modes: off, on, or both.", default="both")
@algo_option("auto,oneshot,twoshot")
@dtype_option("float16,bfloat16,float32", multiple=True, help_text="Element types.")
@click.option("--lengths", default=None, callback=lambda c, p, v: None if v is None else parse_count_list(c, p, v),
              help=f"Comma list of message lengths in elements (odd ones catch padding bugs). "
                   f"[default: {DEFAULT_LENGTHS}, plus {','.join(map(str, GPU_EXTRA_LENGTHS))} on GPUs]")
@group_size_option()
@click.option("--inplace/--no-inplace", default=True, show_default=True,
              help="Also run each flash mode in place; it must match the out-of-place result bit for bit.")
@click.option("--seed", type=int, default=4321, show_default=True, help="Seed of the inputs.")
@backend_option()
@json_option("Write every case as JSON.")
@mpi_launch
@click.pass_context
def verify(ctx, bits, rotate, symmetric, algo, dtype, lengths, group_size, inplace, seed, backend,
           json_path):
    """Check every mode on this machine against the NumPy reference (exit 1 on any failure).

    Flash modes must match the reference bit for bit on every rank; the
    baseline must stay within a few ulps of the exact sum.  Rotation and
    symmetric codecs default to both settings here, unlike in bench.
    """
    from flashcomm_cupy.harness import build_modes
    from flashcomm_cupy.harness.results import write_document
    from flashcomm_cupy.harness.verify import run_verify

    from . import report

    dtypes = dtype
    comm = open_communicator(backend)
    with comm:
        check_outputs({"--json": json_path}, comm.mpi_comm)
        if lengths is None:
            lengths = parse_count_list(None, None, DEFAULT_LENGTHS)
            if comm.backend.xp.__name__ != "numpy":
                lengths += list(GPU_EXTRA_LENGTHS)
        modes = build_modes(bits, algo, rotate, symmetric, group_size)
        require_quantizing_backend(comm, modes, backend)
        console = make_console(comm.rank)
        console.print(f"# flashcomm verify: backend {comm.backend_name}, {comm.world_size} ranks, "
                      f"{len(modes)} modes + baseline x {len(dtypes)} dtypes x {len(lengths)} lengths",
                      markup=False, highlight=False)
        with report.ProgressBar(console, enabled=comm.rank == 0, description="verify") as bar:
            rows = run_verify(comm, dtypes, lengths, modes, seed=seed, inplace=inplace, progress=bar)
        failures = [r for r in rows if not r.ok]
        if comm.rank == 0:
            for line in report.verify_table_lines(rows, output_width()):
                console.print(line, markup=False, highlight=False, soft_wrap=True)
            for r in failures:
                console.print(f"# FAILED {r.dtype} n={r.count} {r.mode} [{r.algo_resolved}]: {r.failure}",
                              style="bold red", markup=False, highlight=False)
            console.print(f"# {len(rows)} cases: " + ("OK" if not failures else f"FAILED ({len(failures)})"),
                          style="bold green" if not failures else "bold red", markup=False, highlight=False)
            if json_path:
                write_document(json_path, "verify", {
                    "command": command_line(), "backend": comm.backend_name, "world_size": comm.world_size,
                    "ok": not failures, "rows": [dataclasses.asdict(r) for r in rows]})
        comm.mpi_comm.Barrier()
    ctx.exit(0 if not failures else 1)

