"""``flashcomm accuracy --model minilm``: the quantized all-reduce inside a real tensor-parallel model.

The study lives in :mod:`flashcomm_cupy.minilm.study`; this module opens the
communicator, prints rank 0's tables and writes ``--json`` / ``--plot``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

import click

from flashcomm_cupy.accuracy import sweep_modes
from flashcomm_cupy.dtypes import resolve_dtype
from flashcomm_cupy.harness.results import write_document

from .options import check_outputs, open_communicator, require_quantizing_backend

MODELS = ("minilm",)
#: the thresholds docs/accuracy.md judges modes by; the table marks the modes that meet both
GOOD_MEAN_COS = 0.999
GOOD_TOP1 = 0.99


def run_model_accuracy(model: str, bits: Optional[Sequence[str]], group_sizes: Optional[Sequence[int]],
                       rotate: Optional[Sequence[bool]], symmetric: Optional[Sequence[bool]],
                       algo: str, backend: str, dtype: Optional[str], pairs: int, corpus_path: Optional[str],
                       json_path: Optional[str], plot_path: Optional[str]) -> None:
    """Run the study on ``mpiexec -n TP`` ranks; rank 0 prints the tables and writes the files.

    ``bits``, ``group_sizes``, ``rotate`` and ``symmetric`` None take the
    study's defaults (:data:`flashcomm_cupy.minilm.study.DEFAULT_BITS` ...).
    """
    from flashcomm_cupy.minilm import assets
    from flashcomm_cupy.minilm.corpus import Corpus
    from flashcomm_cupy.minilm.study import default_corpus, run_minilm_study

    from flashcomm_cupy.minilm import study as defaults
    bits = bits or defaults.DEFAULT_BITS
    group_sizes = group_sizes or defaults.DEFAULT_GROUP_SIZES
    rotate = rotate or defaults.DEFAULT_ROTATE
    symmetric = symmetric or defaults.DEFAULT_SYMMETRIC
    if model not in MODELS:
        raise click.BadParameter(f"{model!r} is not one of {', '.join(MODELS)}", param_hint="--model")
    try:
        modes = sweep_modes(bits, group_sizes, rotate, symmetric, algo)
        payload = resolve_dtype(dtype or "float32")
        assets.require_model_extra()
        corpus = Corpus.from_json(json.loads(Path(corpus_path).read_text())) if corpus_path else default_corpus(pairs)
    except assets.ModelExtraMissing as exc:
        raise click.ClickException(str(exc)) from None
    except (ValueError, OSError) as exc:
        raise click.BadParameter(str(exc)) from None

    communicator = open_communicator("auto" if backend == "reference" else backend)
    try:
        check_outputs({"--json": json_path, "--plot": plot_path}, communicator.mpi_comm)
        require_quantizing_backend(communicator, modes, backend)
    except click.ClickException:
        communicator.close()
        raise
    if communicator.world_size < 2:
        communicator.close()
        raise click.UsageError("--model runs tensor-parallel over the MPI job's ranks: launch with "
                               "mpiexec -n N (N = 2, 3, 4, 6 or 12)")
    try:
        study = run_minilm_study(communicator, modes, corpus, payload)
    except ValueError as exc:  # the TP size does not fit the model: every rank sees it
        communicator.close()
        raise click.UsageError(str(exc)) from None
    communicator.close()
    if study is None:
        return
    print_tables(study)
    if json_path:
        write_document(json_path, "accuracy", study.to_json())
        click.echo(f"wrote {json_path}")
    if plot_path:
        write_plot(study, plot_path)
        click.echo(f"wrote {plot_path}")


def meets_targets(row) -> bool:
    return row.mean_cos >= GOOD_MEAN_COS and row.top1 >= GOOD_TOP1


def print_tables(study, stream=None) -> None:
    """The mode table, the per-site all-reduce error table and the outlier-channel table, as plain
    lines that fit the output's width (see :mod:`.table`)."""
    import sys

    from .options import output_width
    from .table import fold_text, plain_table
    stream = sys.stdout if stream is None else stream
    width = output_width(stream)
    c = study.corpus
    title = (f"all-MiniLM-L6-v2, TP={study.ranks} ({study.backend}), all-reduce payload {study.dtype}: "
             f"{len(c.texts)} texts / {study.tokens} tokens, {len(c.pairs)} queries over {len(c.documents)} "
             f"documents (lossless finds the paired document top-1 {100 * study.lossless_accuracy_top1:.1f} %, "
             f"top-5 {100 * study.lossless_accuracy_top5:.1f} %); corpus {c.digest()}")
    target = f"cos>={GOOD_MEAN_COS:g} & top1>={100 * GOOD_TOP1:g}%"
    names = ["mode", "B/elem RS+AG", "mean cos", "worst cos", "top-1 %", "top-5 %", "AR rel RMS % max",
             "AR rel RMS % mean", target]
    cells = []
    for r in study.rows:
        rel = list(r.site_rel_rms.values())
        cells.append([r.label, f"{r.bytes_per_element:.3f}", f"{r.mean_cos:.6f}", f"{r.worst_cos:.6f}",
                      f"{100 * r.top1:.1f}", f"{100 * r.top5:.1f}", f"{100 * r.max_rel_rms:.3g}",
                      f"{100 * sum(rel) / len(rel):.3g}", "yes" if meets_targets(r) else "NO"])
    lines = fold_text(title, width, "  ") + [""]
    lines += plain_table(names, cells, [n not in ("mode", target) for n in names], width) + [""]

    sites = list(study.rows[0].site_rel_rms) if study.rows else []
    lines += fold_text("rel RMS % of each all-reduce (vs a lossless all-reduce of the same partial sums)",
                       width, "  ") + [""]
    lines += plain_table(["mode", *sites], [[r.label, *(f"{100 * r.site_rel_rms[s]:.3g}" for s in sites)]
                                            for r in study.rows if not r.mode.lossless],
                         [False] + [True] * len(sites), width) + [""]

    lines += fold_text("outlier channels of the lossless all-reduce output (channel: max|y_c| / rms(y))",
                       width, "  ") + [""]
    lines += plain_table(["site", "rms", "peak / rms", "channels"],
                         [[o.site, f"{o.rms:.3g}", f"{o.peak / o.rms:.1f}" if o.rms else "-",
                           ", ".join(f"{ch}: {ratio:.1f}" for ch, ratio in zip(o.channels, o.channel_peak_over_rms))]
                          for o in study.outliers], [False, True, True, False], width)
    stream.write("\n".join(lines) + "\n")
    stream.flush()


def write_plot(study, path: str) -> None:
    """Three panels: 1 - mean cosine and top-1 agreement against bytes/element, per-site error per mode."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in study.rows if not r.mode.lossless]
    colors = {"8": "tab:blue", "6": "tab:green", "4/8": "tab:purple", "4": "tab:red"}
    fig, (ax_cos, ax_top, ax_site) = plt.subplots(1, 3, figsize=(18, 5))
    for r in rows:
        color = colors.get(r.mode.bits_label, "tab:gray")
        style = dict(marker="s" if r.mode.symmetric else "o", s=14 + r.mode.group_size / 8,
                     facecolors=color if r.mode.rotate else "none", edgecolors=color)
        ax_cos.scatter(r.bytes_per_element, max(1 - r.mean_cos, 1e-9), **style)
        ax_top.scatter(r.bytes_per_element, 100 * r.top1, **style)
        ax_site.plot(list(r.site_rel_rms), [100 * v for v in r.site_rel_rms.values()], color=color,
                     ls="-" if r.mode.rotate else ":", lw=0.8, alpha=0.7)
    ax_cos.axhline(1 - GOOD_MEAN_COS, color="k", ls="--", lw=0.8)
    ax_cos.set(yscale="log", xlabel="bytes on the wire per element (RS + AG)", ylabel="1 - mean cosine vs lossless")
    ax_top.axhline(100 * GOOD_TOP1, color="k", ls="--", lw=0.8)
    ax_top.set(xlabel="bytes on the wire per element (RS + AG)", ylabel="top-1 retrieval agreement (%)")
    ax_site.set(yscale="log", xlabel="all-reduce site", ylabel="rel RMS of the all-reduce (%)")
    ax_site.tick_params(axis="x", rotation=60)
    for ax in (ax_cos, ax_top, ax_site):
        ax.grid(True, which="both", alpha=0.3)
    handles = [plt.Line2D([], [], ls="", marker="o", color=c, label=f"int{b}") for b, c in colors.items()]
    handles += [plt.Line2D([], [], ls="", marker="o", mfc="none", color="k", label="no rotation (dotted)"),
                plt.Line2D([], [], ls="", marker="o", color="k", label="rotation (solid)"),
                plt.Line2D([], [], ls="", marker="s", mfc="none", color="k", label="symmetric")]
    ax_cos.legend(handles=handles, fontsize=7)
    fig.suptitle(f"all-MiniLM-L6-v2, TP={study.ranks} ({study.backend}): quantized all-reduce vs lossless "
                 f"(marker size ~ group size)")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
