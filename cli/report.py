"""Rendering of results for the terminal (rich) and as plots (matplotlib).

Everything here formats data that the harness produced; nothing measures.
rich and matplotlib are imported inside the functions so that importing the
CLI (and ``flashcomm --help``) stays fast.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Callable, Iterable, List, Optional, Sequence

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


def _speedup_text(value: Optional[float]):
    from rich.text import Text
    text = fmt_speedup(value)
    if value is None:
        return Text(text)
    style = "green" if value > 1.0 else ("red" if value < 1.0 else "")
    return Text(text, style=style)


# ----------------------------------------------------------------------------- bench
def transport_note(transport: str, nccl_p2p_disabled) -> str:
    """The transport in use, and when NCCL ran with P2P disabled, that its baseline did too."""
    return f"transport {transport}" + (
        "; baseline NCCL with NCCL_P2P_DISABLE=1 (through host memory, the same configuration)"
        if nccl_p2p_disabled else "")


def bench_header_lines(meta: dict) -> List[str]:
    """nccl-tests-like header: what runs, how it is measured, and one line per rank."""
    cfg = meta.get("config", {})
    counts = cfg.get("counts") or []
    itemsize = {"float16": 2, "bfloat16": 2, "float32": 4}.get(meta.get("dtype"), 1)
    span = (f"{format_size(counts[0] * itemsize)} .. {format_size(counts[-1] * itemsize)}"
            if counts else "none")
    timing = (f"warmup {cfg.get('warmup')}, iters {cfg.get('iters')}, repeats {cfg.get('repeats')}, "
              f"graph {'on' if cfg.get('graph') else 'off'}")
    check = "off"
    if cfg.get("check"):
        check = f"on (reference up to {format_size(int(cfg.get('reference_max_bytes', 0)))})"
    lines = [
        f"# flashcomm {meta.get('flashcomm_version')} bench: backend {meta.get('backend')} "
        f"(baseline {meta.get('baseline')}), {meta.get('world_size')} ranks, {meta.get('dtype')}"
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
    lines.append("# time(us) per call: CUDA-graph replay when available, else eager; algbw/busbw in GB/s "
                 "(1e9 B/s); errors vs the float64 exact sum")
    lines.append("#")
    for r in meta.get("ranks", []):
        extra = f" [{r['pci_bus_id']}]" if r.get("pci_bus_id") else ""
        lines.append(f"#  Rank {r.get('rank', '?'):>3} host {r.get('host')} pid {r.get('pid')} "
                     f"device {r.get('device')}{extra}")
    return lines


def _by_size(rows: Iterable[Row]) -> "OrderedDict[int, List[Row]]":
    groups: "OrderedDict[int, List[Row]]" = OrderedDict()
    for r in rows:
        groups.setdefault(r.size_bytes, []).append(r)
    return groups


def bench_table(rows: Sequence[Row], title: Optional[str] = None):
    """One rich table, one row per size x mode, grouped by size (baseline first).

    Eager and floor columns appear only when some row has them.
    """
    from rich import box
    from rich.table import Table
    from rich.text import Text

    show_eager = any(r.eager_us is not None and r.graph_us is not None for r in rows)
    show_floor = any(r.floor_us is not None for r in rows)
    show_check = any(r.check != "off" for r in rows)
    table = Table(box=box.SIMPLE_HEAD, title=title, pad_edge=False, show_edge=False)
    for name in ("size", "count", "type"):
        table.add_column(name, justify="right" if name != "type" else "left", no_wrap=True)
    table.add_column("mode", no_wrap=True)
    table.add_column("algo", no_wrap=True)
    table.add_column("time(us)", justify="right", no_wrap=True)
    if show_eager:
        table.add_column("eager(us)", justify="right", no_wrap=True)
        table.add_column("host(us)", justify="right", no_wrap=True)
    table.add_column("algbw", justify="right", no_wrap=True)
    table.add_column("busbw", justify="right", no_wrap=True)
    table.add_column("speedup", justify="right", no_wrap=True)
    if show_floor:
        table.add_column("floor(us)", justify="right", no_wrap=True)
        table.add_column("xfloor", justify="right", no_wrap=True)
    if show_check:
        table.add_column("rel-RMS", justify="right", no_wrap=True)
        table.add_column("max-abs", justify="right", no_wrap=True)
        table.add_column("#wrong", justify="right", no_wrap=True)
        table.add_column("check", no_wrap=True)
    for size, group in _by_size(rows).items():
        for i, r in enumerate(group):
            first = i == 0
            cells = [format_size(size) if first else "", str(r.count) if first else "",
                     r.dtype if first else "", r.mode, algo_text(r), fmt_us(r.time_us)]
            if show_eager:
                cells += [fmt_us(r.eager_us), fmt_us(r.host_us)]
            cells += [fmt_num(r.algbw_gbps), fmt_num(r.busbw_gbps), _speedup_text(r.speedup)]
            if show_floor:
                cells += [fmt_us(r.floor_us), fmt_num(r.floor_ratio)]
            if show_check:
                verdict = (Text("ok", style="green") if r.ok else Text("FAIL", style="bold red")) \
                    if r.check != "off" else Text(DASH)
                cells += [fmt_err(r.rel_rms), fmt_err(r.max_abs), fmt_count(r.wrong), verdict]
            table.add_row(*cells, end_section=(i == len(group) - 1))
    return table


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


def render_bench(console, result: BenchResult, header: bool = True) -> None:
    if header:
        for line in bench_header_lines(result.meta):
            console.print(line, markup=False, highlight=False)
    console.print(bench_table(result.rows))
    for line in bench_footer(result):
        style = None
        if line.startswith("# OK"):
            style = "bold green"
        elif line.startswith("# FAILED"):
            style = "bold red"
        console.print(line, style=style, markup=False, highlight=False)


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
    """A rich progress bar on rank 0 when stdout is a terminal; otherwise does nothing.

    Use as a context manager; the instance is the harness's progress callback.
    """

    def __init__(self, console, enabled: bool, description: str = "measuring"):
        self.enabled = enabled and console.is_terminal
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

    def __call__(self, done: int, total: int, what: str) -> None:
        if self._progress is not None:
            self._progress.update(self._task, completed=done, total=total,
                                  description=f"{self.description} {what}")

    def __exit__(self, *exc):
        if self._progress is not None:
            self._progress.__exit__(*exc)
        return False


# ----------------------------------------------------------------------------- verify
def verify_table(rows):
    """One row per (mode, algo) with one column per dtype: ok / number of failing lengths."""
    from rich import box
    from rich.table import Table
    from rich.text import Text

    dtypes = list(OrderedDict.fromkeys(r.dtype for r in rows))
    groups: "OrderedDict[tuple, list]" = OrderedDict()
    for r in rows:
        groups.setdefault((r.mode, r.algo), []).append(r)
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False)
    table.add_column("mode", no_wrap=True)
    table.add_column("algo", no_wrap=True)
    table.add_column("ran", no_wrap=True)
    for dt in dtypes:
        table.add_column(dt, no_wrap=True)
    table.add_column("max rel-RMS", justify="right", no_wrap=True)
    table.add_column("bound", justify="right", no_wrap=True)
    table.add_column("#wrong", justify="right", no_wrap=True)
    for (mode, algo), group in groups.items():
        cells = [mode, algo, ",".join(OrderedDict.fromkeys(algo_text(r) for r in group))]
        for dt in dtypes:
            sub = [r for r in group if r.dtype == dt]
            bad = [r for r in sub if not r.ok]
            if not sub:
                cells.append(Text(DASH))
            elif bad:
                cells.append(Text(f"FAIL {len(bad)}/{len(sub)}", style="bold red"))
            else:
                cells.append(Text(f"ok {len(sub)}/{len(sub)}", style="green"))
        errs = [r.rel_rms for r in group if r.rel_rms is not None]
        worst = max(errs, key=lambda e: (not math.isfinite(e), e)) if errs else None
        wrong = [r.wrong for r in group if r.wrong is not None]
        cells += [fmt_err(worst), fmt_err(max(r.bound for r in group)),
                  fmt_count(sum(wrong) if wrong else None)]
        table.add_row(*cells)
    return table


# ----------------------------------------------------------------------------- info
def info_lines(info: dict) -> List[str]:
    """Plain lines for the parts of ``flashcomm info`` that are not tables."""
    lines = [f"flashcomm {info['versions'].get('flashcomm')}: backend {info['backend']} "
             f"(baseline {info['baseline']}), {info['world_size']} rank(s)"]
    for k, v in info["versions"].items():
        lines.append(f"  {k:<14} {v if v is not None else 'not available'}")
    return lines


def ranks_table(ranks: Sequence[dict]):
    from rich import box
    from rich.table import Table
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False, title="ranks")
    for name in ("rank", "host", "pid", "device", "PCI bus", "memory GiB"):
        table.add_column(name, no_wrap=True)
    for r in ranks:
        table.add_row(str(r.get("rank")), str(r.get("host")), str(r.get("pid")), str(r.get("device")),
                      str(r.get("pci_bus_id") or DASH), fmt_num(r.get("memory_gib")))
    return table


def matrix_table(matrix: Sequence[Sequence], title: str):
    """A square matrix (e.g. peer access) with rank labels."""
    from rich import box
    from rich.table import Table
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False, title=title)
    table.add_column("", no_wrap=True)
    for j in range(len(matrix)):
        table.add_column(str(j), justify="center", no_wrap=True)
    for i, row in enumerate(matrix):
        cells = row if isinstance(row, (list, tuple)) and len(row) == len(matrix) else [None] * len(matrix)
        table.add_row(str(i), *[("yes" if v is True else "no" if v is False else "n/a" if v is None else str(v))
                                for v in cells])
    return table


ProgressCallback = Callable[[int, int, str], None]
