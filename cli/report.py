"""Rendering of results for the terminal (rich) and as plots (matplotlib).

Everything here formats data that the harness produced; nothing measures.
rich and matplotlib are imported inside the functions so that importing the
CLI (and ``flashcomm --help``) stays fast.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Callable, List, Optional, Sequence

from flashcomm_cupy.harness.results import BenchResult, Row
from flashcomm_cupy.harness.sizes import format_size

DASH = "-"


# ----------------------------------------------------------------------------- numbers

def algo_text(row) -> str:
    """What ran: the algorithm, with "/ll" when the data-as-signal kernels ran and "/staged"
    when the two-shot staged its reads in shared memory."""
    protocol = getattr(row, "protocol", "")
    return f"{row.algo_resolved}/{protocol}" if protocol in ("ll", "staged") else row.algo_resolved

def fmt_num(value: Optional[float], digits: int = 3) -> str:
    """Fixed-width friendly number: 3 significant digits, '-' for None."""
    if value is None:
        return DASH
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    if isinstance(value, float) and math.isinf(value):
        return "inf" if value > 0 else "-inf"
    if value == 0:
        return "0"
    if abs(value) >= 1000:
        return f"{value:.0f}"
    return f"{value:.{digits}g}"


def fmt_us(value: Optional[float]) -> str:
    if value is None:
        return DASH
    return f"{value:.1f}" if value < 1e4 else f"{value:.0f}"


def fmt_err(value: Optional[float]) -> str:
    """Errors in scientific notation (they span many decades)."""
    if value is None:
        return DASH
    if isinstance(value, float) and not math.isfinite(value):
        return fmt_num(value)
    return "0" if value == 0 else f"{value:.2e}"


def fmt_count(value: Optional[int]) -> str:
    return DASH if value is None else str(value)


def fmt_speedup(value: Optional[float]) -> str:
    return DASH if value is None else f"{value:.2f}x"


# ----------------------------------------------------------------------------- bench
def transport_note(transport: str, nccl_p2p_disabled) -> str:
    """The transport in use, and when NCCL ran with P2P disabled, that its baseline did too."""
    return f"transport {transport}" + (
        "; baseline NCCL with NCCL_P2P_DISABLE=1 (through host memory, the same configuration)"
        if nccl_p2p_disabled else "")


#: what a CPU run measures, said in its header (issue 19: CPU numbers were read as GPU-like figures)
CPU_MEANING = ("# CPU backend: flash modes are NumPy quantization + MPI_Alltoall/MPI_Allgather of the packed bytes, "
               "the baseline MPI_Allreduce (float32); eager calls, no CUDA graphs; host wall-clock times that "
               "swing with machine load: they show correctness and relative cost here, not GPU speed")


def what_the_numbers_mean(meta: dict) -> List[str]:
    """The header line that says what time, algbw/busbw and the errors are, for this backend."""
    cfg = meta.get("config", {})
    if meta.get("backend") == "cpu":
        return [CPU_MEANING, "# time(us) per call (eager); algbw/busbw in GB/s (1e9 B/s); errors vs the "
                             "float64 exact sum"]
    timing = "CUDA-graph replay" if cfg.get("graph") else "eager calls (-G 0)"
    return [f"# time(us) per call: {timing}; algbw/busbw in GB/s (1e9 B/s); errors vs the float64 exact sum"]


def oversubscription_lines(meta: dict) -> List[str]:
    """A warning per host where ranks outnumber the CPU cores they may run on."""
    out = []
    for host, e in sorted((meta.get("host_cores") or {}).items()):
        if e["ranks"] > e["cores"]:
            out.append(f"# WARNING: {e['ranks']} ranks share {e['cores']} CPU core(s) on {host}: ranks wait "
                       "for each other's time slices, so times are noisy and inflated (run fewer ranks)")
    return out


def bench_header_lines(meta: dict) -> List[str]:
    """nccl-tests-like header: what runs, how it is measured, and one line per rank."""
    cfg = meta.get("config", {})
    counts = cfg.get("counts") or []
    itemsize = {"float16": 2, "bfloat16": 2, "float32": 4}.get(meta.get("dtype"), 1)
    span = (f"{format_size(counts[0] * itemsize)} .. {format_size(counts[-1] * itemsize)}"
            if counts else "none")
    timing = f"warmup {cfg.get('warmup')}, iters {cfg.get('iters')}, repeats {cfg.get('repeats')}"
    if meta.get("backend") != "cpu":
        timing += f", graph {'on' if cfg.get('graph') else 'off'}"
    check = "off"
    if cfg.get("check"):
        check = f"on (reference up to {format_size(int(cfg.get('reference_max_bytes', 0)))})"
    ranks = meta.get("world_size")
    lines = [
        f"# flashcomm {meta.get('flashcomm_version')} bench: backend {meta.get('backend')} "
        f"(baseline {meta.get('baseline')}), {ranks} rank{'' if ranks == 1 else 's'}, {meta.get('dtype')}"
        + (f", {meta['nodes']} (baseline flat over all ranks)" if meta.get("nodes") else ""),
        f"# sizes {span} x{cfg.get('extra', {}).get('step_factor', 0):g} ({len(counts)} size{'s' if len(counts) != 1 else ''}), {timing}, check {check}",
        f"# modes: {', '.join(cfg.get('modes', []))}",
    ]
    if cfg.get("peer_bw_gbps"):
        lines.append(f"# wire floor at {cfg['peer_bw_gbps']:g} GB/s per rank")
    if meta.get("transport"):
        lines.append("# " + transport_note(meta["transport"], meta.get("nccl_p2p_disabled")))
    versions = meta.get("versions", {})
    shown = ", ".join(f"{k} {v}" for k, v in versions.items() if v is not None and k != "flashcomm")
    lines.append(f"# {shown}")
    lines += what_the_numbers_mean(meta)
    lines += oversubscription_lines(meta)
    lines.append("#")
    for r in meta.get("ranks", []):
        extra = f" [{r['pci_bus_id']}]" if r.get("pci_bus_id") else ""
        lines.append(f"#  Rank {r.get('rank', '?'):>3} host {r.get('host')} pid {r.get('pid')} "
                     f"device {r.get('device')}{extra}")
    return lines


def bench_columns_for(meta: dict, rows: Sequence[Row], algos: Sequence[str] = ()) -> list:
    """The table columns of a sweep described by ``meta`` (its config) plus the texts of ``rows``."""
    from . import table
    cfg = meta.get("config", {})
    itemsize = _ITEMSIZE.get(meta.get("dtype"), 1)
    counts = list(cfg.get("counts") or []) + [r.count for r in rows]
    baseline = meta.get("baseline") or ""
    labels = [baseline] + list(cfg.get("modes") or []) + [r.mode for r in rows]
    world = int(meta.get("world_size") or 1)
    return table.bench_columns(
        sizes=[c * itemsize for c in counts] + [r.size_bytes for r in rows], counts=counts,
        dtype=str(meta.get("dtype", "")), mode_labels=labels,
        algos=list(algos) + [baseline] + [algo_text(r) for r in rows],
        eager=bool(cfg.get("eager") and cfg.get("graph")) or any(
            r.eager_us is not None and r.graph_us is not None for r in rows),
        floor=bool(cfg.get("peer_bw_gbps")) or any(r.floor_us is not None for r in rows),
        check=bool(cfg.get("check")) or any(r.check != "off" for r in rows),
        wrong_max=max(counts, default=1) * world)


_ITEMSIZE = {"float16": 2, "bfloat16": 2, "float32": 4}


def bench_table_lines(meta: dict, rows: Sequence[Row], width: Optional[int] = None) -> List[str]:
    """The whole bench table (note, header and rows) as plain lines that fit ``width`` (None: any)."""
    from . import table
    stream = table.StreamTable(bench_columns_for(meta, rows), width)
    lines = [part for note in stream.note_lines(str(meta.get("dtype", "")), _ITEMSIZE.get(meta.get("dtype"), 1))
             for part in fold_prose(note, width)]
    lines += stream.header_lines()
    for r in rows:
        lines += stream.row_lines(r)
    return lines


def fold_prose(text: str, width: Optional[int]) -> List[str]:
    """A ``# ...`` header line folded at word boundaries to ``width`` (no word is ever split)."""
    from .table import fold_text
    return fold_text(text, width, "#   ")


class BenchPrinter:
    """Rank 0's bench output: header, one line (or folded lines) per finished row, footer.

    Plain lines written and flushed as they come, so rows appear as each size finishes under
    any launcher; they fit :func:`options.output_width` and carry no control codes.  On an
    interactive terminal (:func:`options.interactive_terminal`) a transient progress bar runs
    below the rows.  Use as a context manager; ``enabled`` False (ranks other than 0) prints nothing.
    """

    def __init__(self, meta: dict, algos: Sequence[str], enabled: bool, stream=None, width=None):
        import sys

        from . import options, table
        self.meta = meta
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stdout
        width = options.output_width(self.stream) if width is None else width
        self.table = table.StreamTable(bench_columns_for(meta, [], algos), width)
        self.itemsize = _ITEMSIZE.get(meta.get("dtype"), 1)
        self._bar = None
        if enabled and options.interactive_terminal(self.stream):
            from rich.console import Console
            self._bar = ProgressBar(Console(file=self.stream), enabled=True, description="bench")

    def __enter__(self):
        if self._bar is not None:
            self._bar.__enter__()
        return self

    def __exit__(self, *exc):
        if self._bar is not None:
            self._bar.__exit__(*exc)
            self._bar = None
        return False

    def line(self, text: str) -> None:
        """Write one line; ``# ...`` prose folds to the table's width at word boundaries."""
        if not self.enabled:
            return
        if text.startswith("#") and self.table.width and len(text) > self.table.width:
            for part in fold_prose(text, self.table.width):
                self.line(part)
            return
        if self._bar is not None and self._bar.live:
            self._bar.console.print(text, markup=False, highlight=False, soft_wrap=True)
        else:
            self.stream.write(text + "\n")
            self.stream.flush()

    def header(self) -> None:
        for text in bench_header_lines(self.meta):
            self.line(text)
        for text in self.table.note_lines(str(self.meta.get("dtype", "")), self.itemsize):
            self.line(text)
        for text in self.table.header_lines():
            self.line(text)

    def row(self, row: Row) -> None:
        for text in self.table.row_lines(row):
            self.line(text)

    def progress(self, done: int, total: int, what: str) -> None:
        if self._bar is not None:
            self._bar(done, total, what)

    def footer(self, result: BenchResult, interrupted: bool = False) -> None:
        self.__exit__(None, None, None)
        self.line("")
        lines = bench_footer(result)
        if interrupted:
            cfg = self.meta.get("config", {})
            total = len(cfg.get("counts") or []) * (1 + len(cfg.get("modes") or []))
            verdict = lines.pop()[2:]
            lines.append(f"# INTERRUPTED after {len(result.rows)} of {total} rows (finished rows: {verdict})")
        for text in lines:
            self.line(text)


def bench_footer(result: BenchResult) -> List[str]:
    """Summary lines: per-mode average speedup, failures, and OK/FAILED last."""
    lines = []
    modes: "OrderedDict[str, List[float]]" = OrderedDict()
    for r in result.rows:
        if not r.baseline and r.speedup:
            modes.setdefault(r.mode, []).append(r.speedup)
    if modes:
        parts = [f"{m} {math.exp(sum(map(math.log, v)) / len(v)):.2f}x" for m, v in modes.items()]
        lines.append("# geometric-mean speedup vs baseline: " + ", ".join(parts))
    for r in result.failures:
        lines.append(f"# FAILED {format_size(r.size_bytes)} {r.mode}: {r.failure}")
    checked = any(r.check != "off" for r in result.rows)
    if not checked:
        lines.append("# OK (correctness check off: -c 1 to enable)")
    else:
        lines.append("# OK" if result.ok else f"# FAILED ({len(result.failures)} of {len(result.rows)} rows)")
    return lines


def render_bench(stream, result: BenchResult, width: Optional[int] = None) -> None:
    """Write the header, the whole table and the footer of a finished ``result`` to ``stream``."""
    for text in bench_header_lines(result.meta) + bench_table_lines(result.meta, result.rows, width) + [""] \
            + bench_footer(result):
        stream.write(text + "\n")


def plot_bench(result: BenchResult, path) -> None:
    """Latency and speedup vs message size (log axes), one line per mode, to ``path``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: "OrderedDict[str, List[Row]]" = OrderedDict()
    for r in result.rows:
        series.setdefault(r.mode, []).append(r)
    fig, (ax_t, ax_s) = plt.subplots(1, 2, figsize=(12, 4.5))
    for label, rows in series.items():
        pts = [(r.size_bytes, r.time_us) for r in rows if r.time_us]
        if pts:
            ax_t.plot(*zip(*pts), marker="o", ms=3, label=label, lw=2 if rows[0].baseline else 1.2,
                      color="black" if rows[0].baseline else None)
        sp = [(r.size_bytes, r.speedup) for r in rows if r.speedup and not r.baseline]
        if sp:
            ax_s.plot(*zip(*sp), marker="o", ms=3, label=label)
    ax_t.set(xscale="log", yscale="log", xlabel="message size (bytes)", ylabel="time per call (us)",
             title="all-reduce latency")
    ax_s.axhline(1.0, color="black", lw=1)
    ax_s.set(xscale="log", yscale="log", xlabel="message size (bytes)",
             ylabel=f"speedup vs {result.meta.get('baseline', 'baseline')}", title="speedup")
    for ax in (ax_t, ax_s):
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    meta = result.meta
    fig.suptitle(f"flashcomm bench: {meta.get('world_size')} x {meta.get('card')}, {meta.get('dtype')}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------- progress
class ProgressBar:
    """A rich progress bar on rank 0 on an interactive terminal (:func:`options.interactive_terminal`);
    otherwise does nothing.

    Use as a context manager; the instance is the harness's progress callback.
    """

    def __init__(self, console, enabled: bool, description: str = "measuring"):
        from .options import interactive_terminal
        # not console.is_terminal: under Open MPI every rank's stdout is a pseudo-terminal, even
        # when mpirun writes to a log, and a live bar there puts control codes in the log
        self.enabled = enabled and interactive_terminal(console.file)
        self.console = console
        self.description = description
        self._progress = None
        self._task = None

    def __enter__(self):
        if self.enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
            self._progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                      TimeElapsedColumn(), console=self.console, transient=True)
            self._progress.__enter__()
            self._task = self._progress.add_task(self.description, total=None)
        return self

    @property
    def live(self) -> bool:
        """True while the bar is on screen (print through :attr:`console` then)."""
        return self._progress is not None

    def __call__(self, done: int, total: int, what: str) -> None:
        if self._progress is not None:
            self._progress.update(self._task, completed=done, total=total,
                                  description=f"{self.description} {what}")

    def __exit__(self, *exc):
        if self._progress is not None:
            self._progress.__exit__(*exc)
        return False


# ----------------------------------------------------------------------------- verify
def verify_table_lines(rows, width: Optional[int] = None) -> List[str]:
    """One row per (mode, algo) with one column per dtype: ``ok n/n`` or ``FAIL k/n``; plain lines
    that fit ``width`` (see :mod:`.table`)."""
    from .table import plain_table

    dtypes = list(OrderedDict.fromkeys(r.dtype for r in rows))
    groups: "OrderedDict[tuple, list]" = OrderedDict()
    for r in rows:
        groups.setdefault((r.mode, r.algo), []).append(r)
    names = ["mode", "algo", "ran", *dtypes, "max rel-RMS", "bound", "#wrong"]
    cells = []
    for (mode, algo), group in groups.items():
        row = [mode, algo, ",".join(OrderedDict.fromkeys(algo_text(r) for r in group))]
        for dt in dtypes:
            sub = [r for r in group if r.dtype == dt]
            bad = [r for r in sub if not r.ok]
            row.append(DASH if not sub else f"FAIL {len(bad)}/{len(sub)}" if bad else f"ok {len(sub)}/{len(sub)}")
        errs = [r.rel_rms for r in group if r.rel_rms is not None]
        worst = max(errs, key=lambda e: (not math.isfinite(e), e)) if errs else None
        wrong = [r.wrong for r in group if r.wrong is not None]
        row += [fmt_err(worst), fmt_err(max(r.bound for r in group)), fmt_count(sum(wrong) if wrong else None)]
        cells.append(row)
    right = [False] * (3 + len(dtypes)) + [True] * 3
    return plain_table(names, cells, right, width)


# ----------------------------------------------------------------------------- info
def info_lines(info: dict) -> List[str]:
    """Plain lines for the parts of ``flashcomm info`` that are not tables."""
    lines = [f"flashcomm {info['versions'].get('flashcomm')}: backend {info['backend']} "
             f"(baseline {info['baseline']}), {info['world_size']} rank(s)"]
    for k, v in info["versions"].items():
        lines.append(f"  {k:<14} {v if v is not None else 'not available'}")
    return lines


def ranks_table_lines(ranks: Sequence[dict], width: Optional[int] = None) -> List[str]:
    from .table import plain_table
    names = ["rank", "host", "pid", "device", "PCI bus", "memory GiB"]
    cells = [[str(r.get("rank")), str(r.get("host")), str(r.get("pid")), str(r.get("device")),
              str(r.get("pci_bus_id") or DASH), fmt_num(r.get("memory_gib"))] for r in ranks]
    return ["ranks:"] + plain_table(names, cells, [True, False, True, False, False, True], width)


def matrix_table_lines(matrix: Sequence[Sequence], title: str, width: Optional[int] = None) -> List[str]:
    """A square matrix (e.g. peer access) with rank labels, as plain lines."""
    from .table import plain_table
    n = len(matrix)
    cells = []
    for i, row in enumerate(matrix):
        values = row if isinstance(row, (list, tuple)) and len(row) == n else [None] * n
        cells.append([str(i)] + ["yes" if v is True else "no" if v is False else "n/a" if v is None else str(v)
                                 for v in values])
    return [f"{title}:"] + plain_table([""] + [str(j) for j in range(n)], cells, [True] * (n + 1), width)


ProgressCallback = Callable[[int, int, str], None]
