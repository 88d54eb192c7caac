"""``flashcomm model``: a tensor-parallel LLaMA-style forward pass, timed per all-reduce mode.

The benchmark lives in :mod:`flashcomm_cupy.model`; this module parses
options, runs it on every rank, and prints the table (rank 0 only) and
writes ``--json``.  Launch one process per GPU::

    mpirun -n 4 flashcomm model --model llama3-70b --tokens 1024,4096,8192 --batch 1,16,64
"""
from __future__ import annotations

import json
import math
import os
import sys
from typing import List, Optional

import click

from flashcomm_cupy.config import Mode
from flashcomm_cupy.model.config import PRESETS

from .options import transport_option

_RANK_VARS = ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "SLURM_PROCID")
DEFAULT_LAYERS = 4


def _launcher_rank() -> int:
    """This process's rank as the MPI launcher tells it (0 when not launched by one)."""
    for var in _RANK_VARS:
        value = os.environ.get(var, "")
        if value.isdigit():
            return int(value)
    return 0


def _ints(text: str, what: str) -> List[int]:
    try:
        values = [int(v) for v in str(text).replace(" ", "").split(",") if v]
    except ValueError:
        raise click.BadParameter(f"expected a comma-separated list of integers, got {text!r}",
                                 param_hint=what) from None
    if not values or min(values) < 1:
        raise click.BadParameter("values must be positive integers", param_hint=what)
    return values


def parse_modes(bits: str, group_size: int, rotate: bool, symmetric: bool, algo: str) -> List[Mode]:
    """``--bits none,8,4/8,4`` -> flashcomm modes (``rotate`` applies to the quantized ones)."""
    modes = []
    for item in [b.strip() for b in str(bits).split(",") if b.strip()]:
        try:
            probe = Mode.make(item, group_size, symmetric, False, algo)
            modes.append(Mode.make(item, group_size, symmetric, rotate and not probe.lossless, algo))
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--bits") from None
    if not modes:
        raise click.BadParameter("give at least one mode", param_hint="--bits")
    return list(dict.fromkeys(modes))


def _fmt(value, spec: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return format(value, spec)


def _json_safe(obj):
    """JSON has no NaN/Infinity: write null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def _cells(r: dict) -> List[str]:
    """One row's cells, in the order of :data:`COLUMNS`."""
    tokens = r["tokens"] if r["phase"] == "prefill" else f"ctx {r['context']}"
    if r["baseline"]:
        err = "ref"
    else:
        err = _fmt(r["rel_err_vs_baseline"], ".2e") + ("" if r["finite"] else " (non-finite!)")
    return [r["phase"], str(tokens), str(r["batch"]), r["mode"], r["algo"] or "-",
            _fmt(r["time_ms"], ".2f"), _fmt(r["per_layer_ms"], ".3f"),
            _fmt(100 * r["comm_share"], ".1f") + " %", _fmt(r["speedup_vs_baseline"], ".3f") + "x", err]


COLUMNS = ("phase", "tokens", "batch", "mode", "algo", "time ms", "ms/layer", "comm share", "vs baseline",
           "rel err")


def _title(meta: dict) -> str:
    return (f"{meta['model']['name']} forward, TP={meta['world_size']} ({meta['backend']} backend, "
            f"{meta['dtype']}); baseline all-reduce: {meta['baseline']}")


def _footnotes(report: dict) -> List[str]:
    notes = list(report["meta"]["notes"])
    device = report["meta"].get("device") or {}
    if device.get("transport"):
        from .report import transport_note
        notes.append(transport_note(device["transport"], device.get("nccl_p2p_disabled")))
    if any(r["graph"] for r in report["rows"]):
        notes.append("decode steps replayed as CUDA graphs (kernel-launch overhead excluded)")
    errors = sorted({r["graph_error"] for r in report["rows"] if r.get("graph_error")})
    notes += [f"CUDA graph capture failed, ran eagerly: {e}" for e in errors]
    return notes


def markdown_report(report: dict) -> str:
    """The table as GitHub markdown (what benchmarks/RESULTS.md quotes), with its notes."""
    meta = report["meta"]
    gpu = meta.get("device", {}).get("gpu")
    lines = [f"**{_title(meta)}**" + (f" on {meta['world_size']}x {gpu}" if gpu else ""), "",
             "| " + " | ".join(COLUMNS) + " |",
             "|" + "|".join("---" if i < 5 else "---:" for i in range(len(COLUMNS))) + "|"]
    lines += ["| " + " | ".join(_cells(r)) + " |" for r in report["rows"]]
    lines.append("")
    lines += [f"- {note}" for note in _footnotes(report)]
    return "\n".join(lines) + "\n"


def print_report(report: dict) -> None:
    """The rich table of a :func:`run_model_benchmark` report, plus its notes."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not console.is_terminal:  # files and pipes: keep rows on one line
        console = Console(width=max(console.width, 150))
    table = Table(title=_title(report["meta"]))
    for i, col in enumerate(COLUMNS):
        table.add_column(col, justify="left" if i < 5 else "right")
    last = None
    for r in report["rows"]:
        key = (r["phase"], r["tokens"], r["batch"])
        if last is not None and key != last:
            table.add_section()
        last = key
        table.add_row(*_cells(r))
    console.print(table)
    for note in _footnotes(report):
        console.print(f"- {note}")


@click.command("model")
@click.option("--model", "model_name", type=click.Choice(list(PRESETS) + ["custom"]), default="llama3-70b",
              show_default=True, help="Model shapes; custom takes --hidden/--heads/--kv-heads/--head-dim/--ffn/--num-layers.")
@click.option("--hidden", type=click.IntRange(1), default=None, help="custom: model width.")
@click.option("--heads", type=click.IntRange(1), default=None, help="custom: query heads.")
@click.option("--kv-heads", type=click.IntRange(1), default=None, help="custom: key/value heads (GQA).")
@click.option("--head-dim", type=click.IntRange(1), default=None, help="custom: head dimension.")
@click.option("--ffn", type=click.IntRange(1), default=None, help="custom: MLP width.")
@click.option("--num-layers", type=click.IntRange(1), default=None, help="custom: the model's depth.")
@click.option("--layers", type=click.IntRange(1), default=None,
              help=f"Layers actually built and timed (default {DEFAULT_LAYERS}, at most the model's depth); "
                   "times are scaled to the full depth, and the output says so.")
@click.option("--tokens", default="1024", show_default=True, help="Prompt lengths for prefill, e.g. 1024,4096,8192.")
@click.option("--batch", "batches", default="1", show_default=True, help="Decode batch sizes, e.g. 1,16,64.")
@click.option("--prefill-batch", type=click.IntRange(1), default=1, show_default=True,
              help="Prompts per prefill.")
@click.option("--context", type=click.IntRange(1), default=1024, show_default=True,
              help="KV-cache positions a decode step attends over (its own included).")
@click.option("--bits", default="none,8,4/8,4", show_default=True,
              help="flashcomm modes to compare with the baseline: none (lossless), 8, 6, 4 or RS/AG like 4/8.")
@click.option("--rotate/--no-rotate", default=False, show_default=True,
              help="Hadamard rotation for the quantized modes.")
@click.option("--symmetric/--asymmetric", default=False, show_default=True)
@click.option("--group-size", type=int, default=128, show_default=True)
@click.option("--algo", type=click.Choice(["auto", "twoshot", "oneshot"]), default="auto", show_default=True,
              help="flashcomm algorithm for the modes.")
@click.option("--dtype", type=click.Choice(["float16", "bfloat16", "float32"]), default="float16",
              show_default=True)
@click.option("--repeats", type=click.IntRange(1), default=5, show_default=True)
@click.option("--warmup", type=click.IntRange(0), default=1, show_default=True)
@click.option("--graphs", type=click.Choice(["auto", "on", "off"]), default="auto", show_default=True,
              help="CUDA graphs: auto = decode steps only (they are launch-bound otherwise).")
@click.option("--attn-block-mb", type=click.IntRange(1), default=1024, show_default=True,
              help="Memory bound for one block of prefill attention scores.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--backend", type=click.Choice(["auto", "gpu", "nccl", "cpu"]), default="auto", show_default=True)
@transport_option
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None,
              help="Write meta and rows as JSON (rank 0).")
@click.option("--markdown", "markdown_path", type=click.Path(dir_okay=False), default=None,
              help="Write the table and its notes as markdown (rank 0).")
def model(model_name, hidden, heads, kv_heads, head_dim, ffn, num_layers, layers, tokens, batches,
          prefill_batch, context, bits, rotate, symmetric, group_size, algo, dtype, repeats, warmup, graphs,
          attn_block_mb, seed, backend, json_path, markdown_path):
    """A LLaMA-style decoder forward with tensor parallelism over the MPI ranks.

    Per layer: RMSNorm, QKV projection (column-parallel), causal attention,
    O projection (row-parallel) + all-reduce, RMSNorm, gated MLP (column-
    then row-parallel) + all-reduce.  Reports prefill time (TTFT proxy) and
    decode-step time, the share of time spent in communication, the speedup
    of each flashcomm mode over the baseline all-reduce, and the relative
    error of its final hidden state against the baseline's.
    """
    from flashcomm_cupy.model.benchmark import ModelBenchConfig, run_model_benchmark
    from flashcomm_cupy.model.config import get_shape

    try:
        shape = get_shape(model_name, hidden=hidden, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
                          ffn=ffn, layers=num_layers)
        cfg = ModelBenchConfig(
            shape=shape, layers=min(shape.layers, layers or DEFAULT_LAYERS),
            tokens=_ints(tokens, "--tokens"), batches=_ints(batches, "--batch"),
            modes=parse_modes(bits, group_size, rotate, symmetric, algo), prefill_batch=prefill_batch,
            context=context, dtype=dtype, repeats=repeats, warmup=warmup, seed=seed, graphs=graphs,
            attn_block_mb=attn_block_mb)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    if layers is not None and layers > shape.layers:
        raise click.BadParameter(f"{shape.name} has {shape.layers} layers", param_hint="--layers")

    from flashcomm_cupy import Communicator
    try:
        comm = Communicator(backend=backend)
    except ImportError as exc:  # the same on every rank (a missing package)
        raise click.ClickException(f"cannot create the {backend} communicator: {exc}") from None
    # Any other error may be one rank's alone (the others wait in the construction's
    # collectives): it goes to main(), which aborts every rank.
    root = comm.rank == 0
    try:
        from flashcomm_cupy.model.config import TensorParallelSplit
        TensorParallelSplit(shape, comm.rank, comm.world_size)
    except ValueError as exc:
        comm.close()
        raise click.BadParameter(f"{shape.name} cannot run with TP={comm.world_size}: {exc}") from None

    def progress(msg: str) -> None:
        if root:
            click.echo(f"[flashcomm model] {msg}", err=True)

    # Collective: on an error (possibly one rank's alone) skip the collective close so
    # main() reaches MPI_Abort on every rank.
    report = run_model_benchmark(comm, cfg, progress)
    comm.close()
    if not root:
        return
    print_report(report)
    if json_path:
        # "columns" tells benchmarks/render_results.py which row fields make the table
        doc = dict(report, columns=["phase", "tokens", "context", "batch", "mode", "algo", "time_ms",
                                    "per_layer_ms", "comm_share", "speedup_vs_baseline", "rel_err_vs_baseline"])
        _write(json_path, json.dumps(_json_safe(doc), indent=2, default=str) + "\n")
    if markdown_path:
        _write(markdown_path, markdown_report(report))
    if not all(r["finite"] for r in report["rows"]):
        click.echo("error: some final hidden states are not finite (fp16 overflow?)", err=True)
        sys.exit(1)


def _write(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as fh:
        fh.write(text)
    click.echo(f"wrote {path}")


def main(argv: Optional[List[str]] = None) -> None:  # pragma: no cover - convenience entry
    model.main(args=argv, prog_name="flashcomm model")


if __name__ == "__main__":  # pragma: no cover
    main()
