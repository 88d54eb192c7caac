"""The end-to-end model benchmark: prefill (TTFT proxy) and decode-step time per all-reduce mode.

For every workload -- a prefill of ``T`` prompt tokens, or a decode step for
``B`` sequences over a ``context``-position KV cache -- the same weights and
input run with:

* the baseline all-reduce (``backend.baseline_algo``: NCCL on GPUs, MPI on CPUs),
* no all-reduce at all ("compute only", the floor),
* each flashcomm mode asked for.

Reported per (workload, mode):

* ``time_ms``: the step time for the whole model depth.  When only ``K`` of
  the model's ``L`` layers are built (``layers < shape.layers``), the measured
  time is multiplied by ``L / K``; layers are identical in shape and cost, and
  the skipped embedding/LM head are the same for every mode.
* ``comm_share``: ``1 - compute_only / time`` -- the part of the step that
  exists only because of the all-reduces (their own time plus the waiting for
  the slowest rank they imply).  Measured by difference: a step issues its
  kernels and collectives in order on one stream, with no overlap, so
  removing the collectives removes their time and nothing else.
* ``speedup``: baseline time / this mode's time (>1 is faster than the baseline).
* ``rel_err``: relative RMS (float64) of this mode's final hidden state
  against the baseline's, same weights and input.

Collective: every rank calls :func:`run_model_benchmark` with the same config.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np

from ..config import Mode
from ..dtypes import dtype_name, resolve_dtype
from . import timing
from .config import ModelShape
from .forward import TensorParallelModel

COMPUTE_ONLY = "compute-only"


@dataclass
class ModelBenchConfig:
    """What to run.  ``modes`` are the flashcomm modes; the baseline and compute-only runs are always added."""

    shape: ModelShape
    layers: int
    tokens: Sequence[int] = (1024,)
    batches: Sequence[int] = (1,)
    modes: Sequence[Mode] = field(default_factory=lambda: (Mode.make(4),))
    prefill_batch: int = 1
    context: int = 1024
    dtype: str = "float16"
    repeats: int = 5
    warmup: int = 1
    seed: int = 0
    graphs: str = "auto"          # "auto": decode steps only; "on": all steps; "off": none
    attn_block_mb: int = 1024

    def __post_init__(self):
        if not 1 <= self.layers <= self.shape.layers:
            raise ValueError(f"layers must be in [1, {self.shape.layers}], got {self.layers}")
        if self.graphs not in ("auto", "on", "off"):
            raise ValueError("graphs must be auto, on or off")
        for name in ("tokens", "batches"):
            if any(int(v) < 1 for v in getattr(self, name)):
                raise ValueError(f"{name} must be positive")
        if self.context < 1 or self.prefill_batch < 1 or self.repeats < 1:
            raise ValueError("context, prefill_batch and repeats must be positive")
        if any(m.is_baseline for m in self.modes):
            raise ValueError("the baseline is always run; list only flashcomm modes")

    @property
    def scale(self) -> float:
        """Factor from the timed layers to the whole model."""
        return self.shape.layers / self.layers


def _bits_arg(mode: Mode):
    return None if mode.lossless else (mode.rs_bits, mode.ag_bits)


def _reducer(comm, mode: Optional[Mode]):
    """In-place all-reduce for ``mode`` (None: the backend's baseline collective)."""
    if mode is None:
        algo = comm.backend.baseline_algo

        def reduce(y):
            comm.all_reduce(y, bits=None, algo=algo, out=y)
    else:
        kwargs = dict(bits=_bits_arg(mode), group_size=mode.group_size, algo=mode.algo,
                      rotate=mode.rotate, symmetric=mode.symmetric)

        def reduce(y):
            comm.all_reduce(y, out=y, **kwargs)
    return reduce


def _device_stream(xp):
    """A non-default CUDA stream on the GPU (graphs cannot capture the legacy stream); None on the CPU."""
    if xp is np:
        return None
    return xp.cuda.Stream(non_blocking=True)


def run_model_benchmark(comm, cfg: ModelBenchConfig,
                        progress: Optional[Callable[[str], None]] = None) -> dict:
    """Run every workload x mode; return ``{"meta": ..., "rows": [...]}`` (same on every rank)."""
    say = progress or (lambda msg: None)
    backend = comm.backend
    xp = backend.xp
    dt = resolve_dtype(cfg.dtype)
    stream = _device_stream(xp)
    with (stream if stream is not None else contextlib.nullcontext()):
        say(f"building {cfg.layers} of {cfg.shape.layers} layers of {cfg.shape.name} "
            f"(TP={comm.world_size}, {dtype_name(dt)})")
        model = TensorParallelModel(cfg.shape, comm.rank, comm.world_size, xp, dt, cfg.layers, cfg.seed,
                                    attn_block_bytes=cfg.attn_block_mb << 20)
        rows: List[dict] = []
        for tokens in cfg.tokens:
            say(f"prefill: {cfg.prefill_batch} x {tokens} tokens")
            x0 = model.prefill_input(cfg.prefill_batch, int(tokens))
            rows += _workload(comm, cfg, model, stream, "prefill", int(tokens), cfg.prefill_batch,
                              lambda reduce, x0=x0: model.prefill(x0, cfg.prefill_batch, reduce),
                              message_rows=x0.shape[0], use_graph=cfg.graphs == "on")
            del x0
        for batch in cfg.batches:
            say(f"decode: batch {batch}, context {cfg.context}")
            x0 = model.decode_input(int(batch))
            caches = model.decode_caches(int(batch), cfg.context)
            rows += _workload(comm, cfg, model, stream, "decode", cfg.context, int(batch),
                              lambda reduce, x0=x0, caches=caches: model.decode(x0, caches, reduce),
                              message_rows=int(batch), use_graph=cfg.graphs != "off")
            del x0, caches
        weight_bytes = model.weight_bytes()
        del model
    return {"meta": _meta(comm, cfg, dt, weight_bytes), "rows": rows}


def _workload(comm, cfg: ModelBenchConfig, model, stream, phase: str, tokens: int, batch: int,
              forward, message_rows: int, use_graph: bool) -> List[dict]:
    backend, xp = comm.backend, comm.backend.xp
    nbytes = message_rows * cfg.shape.hidden * resolve_dtype(cfg.dtype).itemsize
    runs: List[Tuple[str, Optional[Mode], Optional[Callable]]] = [
        (backend.baseline_algo, None, _reducer(comm, None)),
        (COMPUTE_ONLY, None, None),
    ] + [(m.label, m, _reducer(comm, m)) for m in cfg.modes]

    results = []
    baseline_out = None
    for label, mode, reduce in runs:
        t = timing.time_step(lambda reduce=reduce: forward(reduce), backend, comm.mpi_comm, stream,
                             cfg.warmup, cfg.repeats, use_graph)
        out = t.output
        if reduce is not None and baseline_out is None:
            baseline_out = out
            rel = 0.0
        elif reduce is None:
            rel = None
        else:
            rel = max(comm.mpi_comm.allgather(timing.relative_rms(xp, out, baseline_out)))
        finite = all(comm.mpi_comm.allgather(timing.all_finite(xp, out)))
        if mode is None:
            algo = backend.baseline_algo if reduce is not None else None
        else:
            algo = comm.resolve_algo(nbytes, bits=_bits_arg(mode), group_size=mode.group_size,
                                     algo=mode.algo, rotate=mode.rotate, symmetric=mode.symmetric)
        results.append(dict(label=label, mode=mode, algo=algo, timing=t, rel=rel, finite=finite))
        del out

    base_s = results[0]["timing"].median
    floor_s = results[1]["timing"].median
    rows = []
    for r in results:
        t, mode = r["timing"], r["mode"]
        measured = t.median
        rows.append({
            "model": cfg.shape.name, "phase": phase,
            "tokens": tokens if phase == "prefill" else None,
            "context": tokens if phase == "decode" else None,
            "batch": batch, "mode": r["label"],
            "bits": None if mode is None else mode.bits_label,
            "rotate": None if mode is None else mode.rotate,
            "group_size": None if mode is None or mode.lossless else mode.group_size,
            "algo": r["algo"],
            "baseline": r["label"] == backend.baseline_algo and mode is None,
            "layers_timed": cfg.layers, "layers_total": cfg.shape.layers,
            "measured_ms": measured * 1e3,
            "time_ms": measured * cfg.scale * 1e3,
            "per_layer_ms": measured / cfg.layers * 1e3,
            "compute_only_ms": floor_s * cfg.scale * 1e3,
            "comm_share": max(0.0, 1.0 - floor_s / measured) if measured > 0 else 0.0,
            "speedup_vs_baseline": base_s / measured if measured > 0 else None,
            "rel_err_vs_baseline": r["rel"],
            "finite": r["finite"],
            "allreduce_bytes": nbytes,
            "allreduces_per_step": 2 * cfg.shape.layers if r["label"] != COMPUTE_ONLY else 0,
            "rank_medians_ms": [m * 1e3 for m in t.rank_medians],
            "graph": t.graph,
            "graph_error": t.graph_error,
        })
    return rows


def _meta(comm, cfg: ModelBenchConfig, dt, weight_bytes: int) -> dict:
    try:
        device = comm.describe()
    except Exception as exc:  # describe() is informational; never fail the benchmark for it...
        if comm.world_size > 1:
            # ...except that it may be collective (the GPU backend all-gathers peer access):
            # a rank that swallowed its error would leave the others waiting in it.
            # main() aborts every rank instead.
            raise
        device = {"error": str(exc)}
    return {
        "model": cfg.shape.to_dict(),
        "world_size": comm.world_size,
        "backend": comm.backend_name,
        "baseline": comm.backend.baseline_algo,
        "dtype": dtype_name(dt),
        "layers_timed": cfg.layers,
        "layers_total": cfg.shape.layers,
        "scale": cfg.scale,
        "tokens": [int(t) for t in cfg.tokens],
        "prefill_batch": cfg.prefill_batch,
        "batches": [int(b) for b in cfg.batches],
        "context": cfg.context,
        "modes": [m.label for m in cfg.modes],
        "repeats": cfg.repeats,
        "warmup": cfg.warmup,
        "graphs": cfg.graphs,
        "weight_bytes_per_rank_timed": weight_bytes,
        "device": device,
        "notes": notes(cfg),
    }


def notes(cfg: ModelBenchConfig) -> List[str]:
    """The statements every report of this benchmark must carry."""
    out = []
    if cfg.layers < cfg.shape.layers:
        out.append(f"timed {cfg.layers} of {cfg.shape.layers} layers; totals scaled x{cfg.shape.layers}/{cfg.layers}")
    out += [
        "embedding and LM head not modelled (vocabulary-dependent, no all-reduce); no rotary embedding",
        "comm share = 1 - compute-only time / step time (compute-only: the same step with every all-reduce skipped)",
        "time = max over ranks of each rank's median; rel err = relative RMS of the final hidden state vs the baseline",
    ]
    return out
