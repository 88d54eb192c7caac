"""``flashcomm accuracy``: error of the quantized all-reduce against bytes on the wire.

The study itself lives in :mod:`flashcomm_cupy.accuracy`; this module parses
options, prints the table on rank 0 and writes ``--json`` / ``--plot``.
"""
from __future__ import annotations

import math
import sys
from typing import List, Optional

import click

from flashcomm_cupy.dtypes import dtype_name
from flashcomm_cupy.harness.results import write_document

from flashcomm_cupy.accuracy import (DEFAULT_BITS, DEFAULT_GROUP_SIZES, GENERATED_KINDS, DataSpec, Row,
                                     StudyConfig, run_study, sweep_modes)
from flashcomm_cupy.launchers import launched_rank
from flashcomm_cupy.minilm.study import DEFAULT_SWEEP_TEXT as MODEL_DEFAULT_SWEEP

from .options import (MATPLOTLIB_HINT, algo_option, backend_option, bits_option, check_outputs, command,
                      command_line, dtype_option, group_size_option, json_option, mpi_launch, open_communicator,
                      output_option, require_quantizing_backend, split_list, switch_option)


def _data_specs(data, input_file, per_rank, elements, hidden, seed, dtype) -> List[DataSpec]:
    kinds = split_list(data)
    for k in kinds:
        if k not in GENERATED_KINDS:
            raise click.BadParameter(f"{k!r} is not one of {', '.join(GENERATED_KINDS)}", param_hint="--data")
    if not kinds and not input_file and not per_rank:
        kinds = list(GENERATED_KINDS)
    specs = [DataSpec(k, elements, seed, dtype or "float32", hidden) for k in kinds]
    if input_file:
        specs.append(DataSpec("file", elements, seed, dtype, hidden, path=input_file))
    if per_rank:
        try:
            specs.append(DataSpec("per-rank", elements, seed, dtype, hidden, path=per_rank))
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--input-per-rank") from None
    return specs


def _progress(text: str) -> None:
    """Progress on stderr, from rank 0 only."""
    if launched_rank() == 0:
        click.echo(f"[flashcomm accuracy] {text}", err=True)


def _fmt(value: Optional[float], spec: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    return format(value, spec)


def _print_table(rows: List[Row], residual_scale: Optional[float], distributed: bool, stream=None) -> None:
    """One plain table per data set, fitting the output's width (see :mod:`.table`)."""
    from .options import output_width
    from .table import plain_table
    stream = sys.stdout if stream is None else stream
    width = output_width(stream)
    names = ["mode", "algo", "B/elem RS+AG", "rel RMS %", "max abs", "SNR dB"]
    if residual_scale is not None:
        names.append(f"resid x{residual_scale:g} rel %")
    if distributed:
        names.append("matches reference")
    names.append("pareto")
    lines: List[str] = []
    for data in dict.fromkeys(r.data for r in rows):
        part = [r for r in rows if r.data == data]
        first = part[0]
        lines += [f"{data}: {first.ranks} ranks x {first.elements:,} {first.dtype} elements, error vs float64 sum",
                  ""]
        cells = []
        for r in part:
            row = [r.label, r.mode.algo, f"{r.bytes_per_element:.3f}", _fmt(100 * r.rel_rms, ".4g"),
                   _fmt(r.max_abs, ".3g"), _fmt(r.snr_db, ".1f")]
            if residual_scale is not None:
                row.append(_fmt(None if r.residual_rel is None else 100 * r.residual_rel, ".4g"))
            if distributed:
                row.append("n/a" if r.matches_reference is None else "yes" if r.matches_reference else "NO")
            row.append("*" if r.pareto else "")
            cells.append(row)
        lines += plain_table(names, cells, [n not in ("mode", "algo", "matches reference", "pareto")
                                            for n in names], width)
        lines.append("")
    stream.write("\n".join(lines))
    stream.flush()


def write_plot(rows: List[Row], path: str) -> None:
    """Pareto chart per data set: relative RMS error (log) against bytes/element over both steps."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise click.ClickException(f"{MATPLOTLIB_HINT} ({exc})")
    datasets = list(dict.fromkeys(r.data for r in rows))
    fig, axes = plt.subplots(1, len(datasets), figsize=(6 * len(datasets), 4.8), squeeze=False)
    colors = {"8": "tab:blue", "6": "tab:green", "4/8": "tab:purple", "4": "tab:red"}
    for ax, data in zip(axes[0], datasets):
        # lossless is ~1e-8 and would flatten the log axis; it is in the table
        part = [r for r in rows if r.data == data and not r.mode.lossless and r.rel_rms > 0
                and math.isfinite(r.rel_rms)]
        for r in part:
            color = colors.get(r.mode.bits_label, "tab:gray")
            marker = "s" if r.mode.symmetric else "o"
            ax.scatter(r.bytes_per_element, 100 * r.rel_rms, marker=marker, s=14 + r.mode.group_size / 8,
                       facecolors=color if r.mode.rotate else "none", edgecolors=color)
        front = sorted((r for r in part if r.pareto), key=lambda r: r.bytes_per_element)
        ax.plot([r.bytes_per_element for r in front], [100 * r.rel_rms for r in front], "k--", lw=0.8)
        for r in front:
            ax.annotate(r.label, (r.bytes_per_element, 100 * r.rel_rms), fontsize=6,
                        xytext=(3, 3), textcoords="offset points")
        ax.set_yscale("log")
        ax.set_xlabel("bytes on the wire per element (reduce-scatter + all-gather)")
        ax.set_ylabel("relative RMS error (%)")
        ax.set_title(data)
        ax.grid(True, which="both", alpha=0.3)
    handles = [plt.Line2D([], [], ls="", marker="o", color=c, label=f"int{b}") for b, c in colors.items()]
    handles += [plt.Line2D([], [], ls="", marker="o", mfc="none", color="k", label="no rotation"),
                plt.Line2D([], [], ls="", marker="o", color="k", label="rotation"),
                plt.Line2D([], [], ls="", marker="s", mfc="none", color="k", label="symmetric"),
                plt.Line2D([], [], ls="--", color="k", label="Pareto front")]
    axes[0][-1].legend(handles=handles, fontsize=7, loc="upper right")
    fig.suptitle("flashcomm accuracy: error vs bandwidth (marker size ~ group size)")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def _study_bits(bits) -> list:
    """``--bits`` pairs as the studies take them: 8 or (4, 8); the lossless mode, always studied, left out."""
    return [b if b[0] != b[1] else b[0] for b in bits if b != (None, None)]


def _launch_backend(params: dict) -> str:
    """The backend ``accuracy`` runs (and relaunches) on, after the ``--model`` checks that must fail
    before any relaunch: the model study measures its own activations (no data options) and needs
    the 'model' extra; it always runs on an MPI job, so its ``--backend reference`` means auto."""
    if not params.get("model"):
        return params["backend"]
    if params.get("data") or params.get("input_file") or params.get("per_rank") \
            or params.get("residual_scale") is not None:
        raise click.UsageError("--model measures the model's own activations: drop --data, --input, "
                               "--input-per-rank and --residual-scale")
    from flashcomm_cupy.minilm import assets
    try:
        assets.require_model_extra()
    except assets.ModelExtraMissing as exc:
        raise click.ClickException(str(exc)) from None
    return "auto" if params["backend"] == "reference" else params["backend"]


@command("accuracy")
@click.option("--data", multiple=True, metavar="KIND",
              help="Generated data set: gaussian, outliers, llm (repeatable or comma-separated). "
                   "Default: all three, unless --input/--input-per-rank is given.")
@click.option("--input", "input_file", type=click.Path(exists=True, dir_okay=False),
              help="One .npy holding every rank's array along axis 0 (shape [ranks, ...]), or an .npz "
                   "with one array per rank (keys in order of their trailing number, e.g. rank0, rank1).")
@click.option("--input-per-rank", "per_rank", metavar="PATTERN",
              help="One .npy (or single-array .npz) per rank; PATTERN contains {rank}, e.g. acts_{rank}.npy.")
@click.option("--ranks", default=4, show_default=True, type=click.IntRange(1, 1024),
              help="Simulated ranks (ignored with --backend, where the MPI job's size counts, and with --input).")
@click.option("--elements", default=1 << 20, show_default=True, type=click.IntRange(1),
              help="Elements per rank of generated data (llm: rounded down to whole rows of --hidden).")
@click.option("--hidden", default=4096, show_default=True, type=click.IntRange(1),
              help="Hidden size (row length) of the llm data set.")
@dtype_option(None, help_text="Element type: float32 (default for generated data), float16 or bfloat16; "
                              "files keep their dtype unless given.")
@click.option("--seed", default=0, show_default=True, type=int)
@bits_option(",".join(DEFAULT_BITS), "Bit widths: 8, 6, 4 or RS/AG such as 4/8 (comma list, repeatable; "
                                     "the lossless mode is always included).")
@group_size_option(",".join(map(str, DEFAULT_GROUP_SIZES)), multiple=True)
@switch_option("--rotate", "Hadamard rotation off, on, or both.", default="both")
@switch_option("--symmetric", "Symmetric (abs-max) quantization off (asymmetric), on, or both.", default="both")
@algo_option("auto")
@click.option("--residual-scale", type=click.FloatRange(min=0, min_open=True), default=None, metavar="S",
              help="Also report the error relative to a residual stream of RMS S x rms(sum): "
                   "rel RMS of (residual + result) vs (residual + exact).")
@backend_option(extra=("reference",), default="reference",
                help_extra=" reference: simulate --ranks ranks in this process (no MPI). cpu/gpu/auto: a "
                           "real all-reduce on every rank (relaunched under mpiexec like the other commands); "
                           "rank 0 checks every result against the reference bit for bit.")
@click.option("--model", type=click.Choice(["minilm"]), default=None,
              help="Study a real tensor-parallel model instead of data sets: minilm (all-MiniLM-L6-v2, "
                   "TP = the MPI job's ranks, --backend reference means auto; needs the 'model' extra; "
                   f"see docs/accuracy.md). Its own defaults for options not given: {MODEL_DEFAULT_SWEEP}.")
@click.option("--pairs", default=300, show_default=True, type=click.IntRange(1),
              help="--model: query/document pairs of the retrieval corpus (standard-library docstrings).")
@click.option("--corpus", "corpus_path", type=click.Path(exists=True, dir_okay=False),
              help="--model: reuse the corpus of an earlier --json result, e.g. to compare backends "
                   "(--pairs is then ignored).")
@json_option("Write the rows as JSON.")
@output_option("--plot", "plot_path", "Write a Pareto chart (error vs bytes/element, log y) as PNG (needs matplotlib).")
@mpi_launch(launch_backend=_launch_backend)
def accuracy(data, input_file, per_rank, ranks, elements, hidden, dtype, seed, bits, group_size, rotate,
             symmetric, algo, residual_scale, backend, model, pairs, corpus_path, json_path, plot_path):
    """Accuracy study: error of each quantization mode against the float64 sum, and bytes on the wire.

    Sweeps bit widths, group sizes, rotation and symmetric/asymmetric codes
    over generated data (gaussian, outliers, llm) or your own activations,
    or (--model) inside a real tensor-parallel model against its lossless run.
    """
    if len(algo) > 1:
        raise click.BadParameter("accuracy takes one algorithm", param_hint="'--algo'")
    dtype = None if dtype is None else dtype_name(dtype)
    if model:
        from click.core import ParameterSource
        from .accuracy_model import run_model_accuracy
        given = click.get_current_context().get_parameter_source  # not given: the model study's default

        def unless_default(name, value):
            return value if given(name) is not ParameterSource.DEFAULT else None
        return run_model_accuracy(model, unless_default("bits", _study_bits(bits)),
                                  unless_default("group_size", group_size), unless_default("rotate", rotate),
                                  unless_default("symmetric", symmetric), algo[0], _launch_backend(
                                      {"model": model, "backend": backend}), dtype, pairs, corpus_path,
                                  json_path, plot_path)
    specs = _data_specs(data, input_file, per_rank, elements, hidden, seed, dtype)
    try:
        cfg = StudyConfig(data=specs, bits=_study_bits(bits),
                          group_sizes=group_size, rotate=rotate, symmetric=symmetric, algo=algo[0],
                          ranks=ranks, residual_scale=residual_scale)
        modes = sweep_modes(cfg.bits, cfg.group_sizes, cfg.rotate, cfg.symmetric, cfg.algo)  # validate early
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None

    communicator = None
    if backend != "reference":
        communicator = open_communicator(backend)
        check_outputs({"--json": json_path, "--plot": plot_path}, communicator.mpi_comm)
        require_quantizing_backend(communicator, modes, backend)
        if communicator.world_size < 2:
            communicator.close()
            raise click.UsageError(f"--backend {backend} measures a real all-reduce: launch with "
                                   "mpiexec -n N (N > 1); without --backend the study simulates --ranks ranks")
    if communicator is None:
        try:
            rows = run_study(cfg, communicator, progress=_progress)
        except (ValueError, OSError) as exc:
            raise click.ClickException(str(exc)) from None
    else:
        # Collective: an error here may be one rank's alone, so it must reach main(),
        # which aborts every rank; closing (collective) happens only on success.
        rows = run_study(cfg, communicator, progress=_progress)
        communicator.close()

    is_root = rows is not None if communicator is not None else launched_rank() == 0
    if not is_root:
        return
    distributed = communicator is not None
    _print_table(rows, residual_scale, distributed)
    if json_path:
        write_document(json_path, "accuracy", {"command": command_line(), "backend": backend,
                                               "residual_scale": residual_scale,
                                               "rows": [r.to_json() for r in rows]})
        click.echo(f"wrote {json_path}")
    if plot_path:
        write_plot(rows, plot_path)
        click.echo(f"wrote {plot_path}")
    if distributed and any(r.matches_reference is False for r in rows):
        bad = [f"{r.data}: {r.label}" for r in rows if r.matches_reference is False]
        click.echo(f"error: {len(bad)} results differ from the reference: {'; '.join(bad)}", err=True)
        sys.exit(1)
