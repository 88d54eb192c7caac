"""``flashcomm model``: a tensor-parallel LLaMA-style forward pass, timed per all-reduce mode.

The benchmark lives in :mod:`flashcomm_cupy.model`; this module parses
options, runs it on every rank, and prints the table (rank 0 only) and
writes ``--json``.  Launch one process per GPU::

    mpirun -n 4 flashcomm model --model llama3-70b --tokens 1024,4096,8192 --batch 1,16,64
"""
from __future__ import annotations

import math
from typing import List

import click

from flashcomm_cupy.dtypes import dtype_name
from flashcomm_cupy.model.config import PRESETS

from .options import (algo_option, backend_option, bits_option, check_outputs, command, dtype_option,
                      group_size_option, json_option, mpi_launch, open_communicator, output_option,
                      require_quantizing_backend, switch_option, transport_option)

DEFAULT_LAYERS = 4


def _ints(text: str, what: str) -> List[int]:
    try:
        values = [int(v) for v in str(text).replace(" ", "").split(",") if v]
    except ValueError:
        raise click.BadParameter(f"expected a comma-separated list of integers, got {text!r}",
                                 param_hint=what) from None
    if not values or min(values) < 1:
        raise click.BadParameter("values must be positive integers", param_hint=what)
    return values


def _fmt(value, spec: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return format(value, spec)


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


def print_report(report: dict, stream=None, width=None) -> None:
    """The table of a :func:`run_model_benchmark` report as plain lines that fit the output, plus its notes."""
    import sys

    from .options import output_width
    from .table import fold_text, plain_table
    stream = sys.stdout if stream is None else stream
    width = output_width(stream) if width is None else width
    rows = report["rows"]
    lines = [_title(report["meta"]), ""]
    lines += plain_table(COLUMNS, [_cells(r) for r in rows], [i >= 5 for i in range(len(COLUMNS))], width,
                         groups=[(r["phase"], r["tokens"], r["batch"]) for r in rows])
    lines.append("")
    lines += [part for note in _footnotes(report) for part in fold_text(f"- {note}", width, "  ")]
    stream.write("\n".join(lines) + "\n")
    stream.flush()


#: defaults that differ between the GPU and the CPU backend (None: the option was not given).
#: On the CPU the full LLaMA-3-70B layers take minutes per step in NumPy (issue 19 measured two
#: lines in 120 s), so the CPU default is the small "tiny" shape in float32 (NumPy has no fast
#: float16 matrix product), a short prompt and context, two layers and three repeats.
GPU_DEFAULTS = {"model_name": "llama3-70b", "layers": DEFAULT_LAYERS, "tokens": "1024", "context": 1024,
                "dtype": "float16", "repeats": 5}
CPU_DEFAULTS = {"model_name": "tiny", "layers": 2, "tokens": "64", "context": 64, "dtype": "float32",
                "repeats": 3}


@command("model")
@click.option("--model", "model_name", type=click.Choice(list(PRESETS) + ["custom"]), default=None,
              help="Model shapes; custom takes --hidden/--heads/--kv-heads/--head-dim/--ffn/--num-layers. "
                   "[default: llama3-70b on GPUs, tiny on the CPU backend]")
@click.option("--hidden", type=click.IntRange(1), default=None, help="custom: model width.")
@click.option("--heads", type=click.IntRange(1), default=None, help="custom: query heads.")
@click.option("--kv-heads", type=click.IntRange(1), default=None, help="custom: key/value heads (GQA).")
@click.option("--head-dim", type=click.IntRange(1), default=None, help="custom: head dimension.")
@click.option("--ffn", type=click.IntRange(1), default=None, help="custom: MLP width.")
@click.option("--num-layers", type=click.IntRange(1), default=None, help="custom: the model's depth.")
@click.option("--layers", type=click.IntRange(1), default=None,
              help="Layers actually built and timed (at most the model's depth); times are scaled to the "
                   f"full depth, and the output says so. [default: {DEFAULT_LAYERS} on GPUs, 2 on the CPU backend]")
@click.option("--tokens", default=None, help="Prompt lengths for prefill, e.g. 1024,4096,8192. "
                                              "[default: 1024 on GPUs, 64 on the CPU backend]")
@click.option("--batch", "batches", default="1", show_default=True, help="Decode batch sizes, e.g. 1,16,64.")
@click.option("--prefill-batch", type=click.IntRange(1), default=1, show_default=True,
              help="Prompts per prefill.")
@click.option("--context", type=click.IntRange(1), default=None,
              help="KV-cache positions a decode step attends over (its own included). "
                   "[default: 1024 on GPUs, 64 on the CPU backend]")
@bits_option("none,8,4/8,4", "flashcomm modes to compare with the baseline: none (lossless), 8, 6, 4 or RS/AG "
                             "like 4/8 (comma list, repeatable).")
@switch_option("--rotate", "Hadamard rotation for the quantized modes: off, on (bare --rotate), or both.")
@switch_option("--symmetric", "Symmetric (abs-max) codecs for the quantized modes: off, on, or both.")
@group_size_option()
@algo_option("auto")
@dtype_option(None, help_text="Element type. [default: float16 on GPUs, float32 on the CPU backend]")
@click.option("-r", "--repeats", type=click.IntRange(1), default=None,
              help="Timed repeats. [default: 5 on GPUs, 3 on the CPU backend]")
@click.option("-w", "--warmup", type=click.IntRange(0), default=1, show_default=True)
@click.option("--graphs", type=click.Choice(["auto", "on", "off"]), default="auto", show_default=True,
              help="CUDA graphs (GPUs): auto = decode steps only (they are launch-bound otherwise).")
@click.option("--attn-block-mb", type=click.IntRange(1), default=1024, show_default=True,
              help="Memory bound for one block of prefill attention scores.")
@click.option("--seed", type=int, default=0, show_default=True)
@backend_option()
@json_option("Write meta and rows as JSON (rank 0).")
@output_option("--markdown", "markdown_path", "Write the table and its notes as markdown (rank 0).")
@transport_option
@mpi_launch
def model(model_name, hidden, heads, kv_heads, head_dim, ffn, num_layers, layers, tokens, batches,
          prefill_batch, context, bits, rotate, symmetric, group_size, algo, dtype, repeats, warmup, graphs,
          attn_block_mb, seed, backend, json_path, markdown_path):
    """A LLaMA-style decoder forward with tensor parallelism over the MPI ranks.

    Per layer: RMSNorm, QKV projection (column-parallel), causal attention,
    O projection (row-parallel) + all-reduce, RMSNorm, gated MLP (column-
    then row-parallel) + all-reduce.  Reports prefill time (TTFT proxy) and
    decode-step time, the share of time spent in communication, the speedup
    of each flashcomm mode over the baseline all-reduce, and the relative
    error of its final hidden state against the baseline's.  On the CPU
    backend the defaults are a small shape (tiny, float32, 2 layers) that
    finishes in seconds; the output says so.
    """
    import numpy as np

    from flashcomm_cupy.harness import build_modes
    from flashcomm_cupy.model.benchmark import ModelBenchConfig, run_model_benchmark
    from flashcomm_cupy.model.config import TensorParallelSplit, get_shape

    given = {"model_name": model_name, "layers": layers, "tokens": tokens, "context": context,
             "dtype": None if dtype is None else dtype_name(dtype), "repeats": repeats}
    modes = build_modes(bits, algo, rotate, symmetric, group_size)
    comm = open_communicator(backend)
    with comm:
        check_outputs({"--json": json_path, "--markdown": markdown_path}, comm.mpi_comm)
        require_quantizing_backend(comm, modes, backend)
        root = comm.rank == 0
        on_gpu = comm.backend.xp is not np
        defaults = GPU_DEFAULTS if on_gpu else CPU_DEFAULTS
        v = {k: (defaults[k] if given[k] is None else given[k]) for k in given}
        try:
            shape = get_shape(v["model_name"], hidden=hidden, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
                              ffn=ffn, layers=num_layers)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="'--model'") from None
        if given["layers"] is not None and layers > shape.layers:
            raise click.BadParameter(f"{shape.name} has {shape.layers} layers", param_hint="'--layers'")
        try:
            TensorParallelSplit(shape, comm.rank, comm.world_size)
        except ValueError as exc:
            raise click.ClickException(f"{shape.name} cannot run with TP={comm.world_size}: {exc}") from None
        cfg = ModelBenchConfig(
            shape=shape, layers=min(shape.layers, v["layers"]), tokens=_ints(v["tokens"], "--tokens"),
            batches=_ints(batches, "--batch"), modes=modes, prefill_batch=prefill_batch, context=v["context"],
            dtype=v["dtype"], repeats=v["repeats"], warmup=warmup, seed=seed, graphs=graphs,
            attn_block_mb=attn_block_mb)
        if root:
            picked = [k for k in given if given[k] is None]
            if not on_gpu and picked:
                click.echo(f"[flashcomm model] CPU backend: small defaults for "
                           f"{', '.join('--' + k.replace('model_name', 'model') for k in picked)}: {shape.name} "
                           f"(hidden {shape.hidden}), {cfg.layers} layers, {v['tokens']} tokens, context "
                           f"{cfg.context}, {cfg.dtype}; --model llama3-70b for the full shape", err=True)

        def progress(msg: str) -> None:
            if root:
                click.echo(f"[flashcomm model] {msg}", err=True)

        report = run_model_benchmark(comm, cfg, progress)
        if root:
            _print_and_write(report, json_path, markdown_path)
        comm.mpi_comm.Barrier()  # files are written before any rank exits
    if not all(r["finite"] for r in report["rows"]):
        raise click.ClickException("some final hidden states are not finite (fp16 overflow?)")


def _print_and_write(report: dict, json_path, markdown_path) -> None:
    from flashcomm_cupy.harness.results import write_document, write_whole
    print_report(report)
    if json_path:
        # "columns" tells benchmarks/render_results.py which row fields make the table
        write_document(json_path, "model", dict(report, columns=[
            "phase", "tokens", "context", "batch", "mode", "algo", "time_ms", "per_layer_ms", "comm_share",
            "speedup_vs_baseline", "rel_err_vs_baseline"]))
        click.echo(f"wrote {json_path}")
    if markdown_path:
        write_whole(markdown_path, markdown_report(report))
        click.echo(f"wrote {markdown_path}")
