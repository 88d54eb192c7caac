"""The accuracy study behind ``flashcomm accuracy``: error of quantized all-reduce vs bytes on the wire.

For every mode of a sweep (bit widths, group sizes, rotation, symmetric or
asymmetric) the all-reduce of a data set is compared with the float64 sum of
the ranks' inputs.  Two ways to run it, same numbers:

* simulated: :func:`study` runs :func:`reference.flash_all_reduce_reference`
  on ``N`` simulated ranks in one process (no MPI needed);
* distributed: :func:`study_distributed` runs inside an MPI job, every rank
  reducing its own data through :meth:`Communicator.all_reduce`; rank 0
  gathers the results, checks them bit for bit against the reference and
  measures them.

Data sets (see :class:`DataSpec` and ``docs/accuracy.md``):

* ``gaussian`` -- i.i.d. N(0, 1) per rank;
* ``outliers`` -- Gaussian with 0.1% of the elements (random positions per
  rank) multiplied by 50: the simulation of the Flash Communication issue;
* ``llm`` -- LLM-like activations of shape ``[tokens, hidden]``: heavy-tailed
  Student-t values plus a few outlier *channels* (fixed columns, the same on
  every rank) 50-100x larger;
* ``file`` -- one ``.npy`` holding every rank's array along axis 0, or an
  ``.npz`` with one key per rank;
* ``per-rank`` -- one file per rank named by a pattern with ``{rank}``.

This module imports NumPy only (the CLI adds click, rich and matplotlib).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, replace
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

from . import reference
from .config import Mode, wire_bytes_per_element
from .dtypes import bfloat16, dtype_name, from_f32, resolve_dtype

DATA_KINDS = ("gaussian", "outliers", "llm", "file", "per-rank")
GENERATED_KINDS = ("gaussian", "outliers", "llm")

#: The sweep of the study (``docs/accuracy.md``).
DEFAULT_BITS = ("8", "6", "4", "4/8")
DEFAULT_GROUP_SIZES = (32, 64, 128, 256)

#: outliers data set: fraction of elements and their magnification (the issue's simulation)
OUTLIER_FRACTION = 1e-3
OUTLIER_FACTOR = 50.0
#: llm data set: Student-t degrees of freedom, outlier channels and their gain range
LLM_T_DOF = 4
LLM_OUTLIER_CHANNELS = 8
LLM_OUTLIER_GAIN = (50.0, 100.0)


# ============================================================================ data
@dataclass(frozen=True)
class DataSpec:
    """Where the ranks' inputs come from.

    ``kind`` is one of :data:`DATA_KINDS`.  Generated kinds use ``elements``
    per rank (``llm`` rounds down to whole rows of ``hidden``), ``seed`` and
    ``dtype``; rank ``r`` draws from ``default_rng([seed, r])`` so each rank
    can make its own input without the others.  ``path`` is the file
    (``file``) or the pattern with ``{rank}`` (``per-rank``); ``dtype`` None
    keeps the file's dtype.
    """

    kind: str = "gaussian"
    elements: int = 1 << 20
    seed: int = 0
    dtype: Optional[str] = "float32"
    hidden: int = 4096
    path: Optional[str] = None

    def __post_init__(self):
        if self.kind not in DATA_KINDS:
            raise ValueError(f"data kind must be one of {DATA_KINDS}, got {self.kind!r}")
        if self.kind in GENERATED_KINDS and self.elements < 1:
            raise ValueError("elements must be positive")
        if self.kind in ("file", "per-rank") and not self.path:
            raise ValueError(f"data kind {self.kind!r} needs a path")
        if self.kind == "per-rank" and "{rank}" not in self.path:
            raise ValueError(f"--input-per-rank pattern must contain {{rank}}, got {self.path!r}")

    @property
    def name(self) -> str:
        """Label used in tables and JSON: the kind, or the file name."""
        if self.kind in GENERATED_KINDS:
            return self.kind
        return os.path.basename(self.path)

    def ranks_in_file(self) -> Optional[int]:
        """How many ranks a ``file`` input holds (None for other kinds)."""
        if self.kind != "file":
            return None
        if self.path.endswith(".npz"):
            with np.load(self.path) as z:
                return len(z.files)
        return int(np.load(self.path, mmap_mode="r").shape[0])

    def rank_input(self, rank: int, ranks: int) -> np.ndarray:
        """Rank ``rank``'s input (of ``ranks``), in the spec's dtype."""
        if not 0 <= rank < ranks:
            raise ValueError(f"rank {rank} out of range for {ranks} ranks")
        if self.kind == "gaussian":
            x = _gaussian(self.elements, self.seed, rank)
        elif self.kind == "outliers":
            x = _outliers(self.elements, self.seed, rank)
        elif self.kind == "llm":
            x = llm_activations(self.elements // self.hidden or 1, self.hidden, self.seed, rank)
        elif self.kind == "file":
            x = _load_from_file(self.path, rank, ranks)
        else:
            x = _load_array(self.path.format(rank=rank))
        return _to_dtype(x, self.dtype)

    def all_inputs(self, ranks: int) -> List[np.ndarray]:
        """Every rank's input, in rank order."""
        return [self.rank_input(r, ranks) for r in range(ranks)]


def _gaussian(n: int, seed: int, rank: int) -> np.ndarray:
    return np.random.default_rng([seed, rank]).standard_normal(n, dtype=np.float32)


def _outliers(n: int, seed: int, rank: int) -> np.ndarray:
    """Gaussian with ``OUTLIER_FRACTION`` of the elements, at random positions, ``OUTLIER_FACTOR`` x larger."""
    rng = np.random.default_rng([seed, rank])
    x = rng.standard_normal(n, dtype=np.float32)
    count = max(1, int(round(n * OUTLIER_FRACTION)))
    x[rng.choice(n, count, replace=False)] *= np.float32(OUTLIER_FACTOR)
    return x


def llm_activations(tokens: int, hidden: int, seed: int = 0, rank: int = 0) -> np.ndarray:
    """LLM-like partial activations ``[tokens, hidden]`` of one tensor-parallel rank.

    Values are Student-t with :data:`LLM_T_DOF` degrees of freedom scaled to
    unit variance (heavy tails), and :data:`LLM_OUTLIER_CHANNELS` columns are
    multiplied by a gain in :data:`LLM_OUTLIER_GAIN`.  The outlier columns
    and their gains depend on ``seed`` only, so every rank has its outliers
    in the same channels, as real activations do; the values depend on
    ``rank`` too.
    """
    shared = np.random.default_rng([seed, 0xC0FFEE])
    channels = shared.choice(hidden, min(LLM_OUTLIER_CHANNELS, hidden), replace=False)
    gains = shared.uniform(*LLM_OUTLIER_GAIN, size=channels.size)
    rng = np.random.default_rng([seed, rank])
    dof = LLM_T_DOF
    x = rng.standard_t(dof, size=(tokens, hidden)) / np.sqrt(dof / (dof - 2))
    x[:, channels] *= gains
    return x.astype(np.float32)


def _npz_rank_keys(files: Sequence[str]) -> List[str]:
    """npz keys in rank order: by trailing integer when every key has one, else as stored."""
    nums = [re.search(r"(\d+)$", k) for k in files]
    if all(nums):
        return sorted(files, key=lambda k: int(re.search(r"(\d+)$", k).group(1)))
    return list(files)


def _load_from_file(path: str, rank: int, ranks: int) -> np.ndarray:
    if path.endswith(".npz"):
        with np.load(path) as z:
            keys = _npz_rank_keys(z.files)
            if len(keys) != ranks:
                raise ValueError(f"{path} has {len(keys)} arrays (one per rank), but there are {ranks} ranks")
            return _fix_void(z[keys[rank]])
    arr = np.load(path, mmap_mode="r")
    if arr.ndim < 1 or arr.shape[0] != ranks:
        raise ValueError(f"{path} has shape {arr.shape}; axis 0 must be the {ranks} ranks")
    return _fix_void(np.array(arr[rank]))


def _load_array(path: str) -> np.ndarray:
    if path.endswith(".npz"):
        with np.load(path) as z:
            if len(z.files) != 1:
                raise ValueError(f"{path}: a per-rank .npz must hold exactly one array, has {z.files}")
            return _fix_void(z[z.files[0]])
    return _fix_void(np.load(path))


def _fix_void(a: np.ndarray) -> np.ndarray:
    """np.save writes ml_dtypes bfloat16 as the opaque 2-byte void '|V2'; read it back as bf16."""
    if a.dtype.kind == "V" and a.dtype.itemsize == 2 and bfloat16 is not None:
        return a.view(bfloat16)
    return a


def _to_dtype(x: np.ndarray, dtype: Optional[str]) -> np.ndarray:
    x = np.ascontiguousarray(x)
    if dtype is None:
        if x.dtype == np.float64:  # float64 is not reducible; float32 is the closest
            return x.astype(np.float32)
        resolve_dtype(x.dtype)  # raises for integers and other unsupported types
        return x
    dt = resolve_dtype(dtype)
    if x.dtype == dt:
        return x
    if x.dtype.kind != "f" and x.dtype != bfloat16:
        raise ValueError(f"cannot use {x.dtype} data as {dtype_name(dt)} activations")
    return from_f32(np.asarray(x, dtype=np.float32), dt) if x.dtype != np.float64 else x.astype(dt)


# ============================================================================ modes
def sweep_modes(bits: Sequence = DEFAULT_BITS, group_sizes: Sequence[int] = DEFAULT_GROUP_SIZES,
                rotate: Sequence[bool] = (False, True), symmetric: Sequence[bool] = (False, True),
                algo: str = "auto", lossless: bool = True) -> List[Mode]:
    """Every combination of the arguments as a :class:`Mode` (plus the lossless one first)."""
    modes = [Mode.make(None, algo=algo)] if lossless else []
    for b in bits:
        for g in group_sizes:
            for sym in symmetric:
                for rot in rotate:
                    modes.append(Mode.make(b, int(g), bool(sym), bool(rot), algo))
    return modes


def total_wire_bytes(mode: Mode, itemsize: int) -> float:
    """Bytes per element over both steps (reduce-scatter + all-gather)."""
    rs, ag = wire_bytes_per_element(mode, itemsize)
    return rs + ag


# ============================================================================ metrics
def make_residual(truth: np.ndarray, scale: float, seed: int = 0) -> np.ndarray:
    """A Gaussian residual stream (float64) whose RMS is exactly ``scale * rms(truth)``."""
    t = np.asarray(truth, dtype=np.float64).reshape(-1)
    r = np.random.default_rng([seed, 0x5E51D]).standard_normal(t.size)
    rms_t = float(np.sqrt(np.mean(t * t))) if t.size else 0.0
    rms_r = float(np.sqrt(np.mean(r * r))) if r.size else 0.0
    if rms_r == 0:
        return r
    return r * (scale * rms_t / rms_r)


def residual_rel_error(result, truth, residual) -> float:
    """Relative RMS error of ``residual + result`` against ``residual + truth`` (float64).

    In a transformer the all-reduce output is added to the residual stream,
    so what the next layer sees is the error relative to that stream, not to
    the all-reduce output alone.
    """
    res = np.asarray(residual, dtype=np.float64).reshape(-1)
    got = res + np.asarray(result, dtype=np.float64).reshape(-1)
    want = res + np.asarray(truth, dtype=np.float64).reshape(-1)
    denom = float(np.sqrt(np.mean(want * want)))
    err = float(np.sqrt(np.mean((got - want) ** 2)))
    if not np.isfinite(err):
        return float("nan")
    return err / denom if denom > 0 else (0.0 if err == 0 else float("inf"))


@dataclass
class Row:
    """One line of the study: a mode measured on a data set."""

    data: str
    mode: Mode
    dtype: str
    ranks: int
    elements: int
    rs_bytes: float
    ag_bytes: float
    rel_rms: float
    max_abs: float
    snr_db: float
    nonfinite: int = 0
    residual_rel: Optional[float] = None
    matches_reference: Optional[bool] = None
    pareto: bool = False

    @property
    def bytes_per_element(self) -> float:
        return self.rs_bytes + self.ag_bytes

    @property
    def label(self) -> str:
        """The mode's label without the algorithm (shown in its own column)."""
        return replace(self.mode, algo="auto").label

    def to_json(self) -> Dict:
        m = self.mode
        return {"data": self.data, "mode": self.label, "bits": m.bits_label, "rs_bits": m.rs_bits,
                "ag_bits": m.ag_bits, "group_size": m.group_size, "symmetric": m.symmetric,
                "rotate": m.rotate, "algo": m.algo, "dtype": self.dtype, "ranks": self.ranks,
                "elements": self.elements, "rs_bytes_per_element": self.rs_bytes,
                "ag_bytes_per_element": self.ag_bytes, "bytes_per_element": self.bytes_per_element,
                "rel_rms": self.rel_rms, "max_abs": self.max_abs, "snr_db": self.snr_db,
                "nonfinite": self.nonfinite, "residual_rel": self.residual_rel,
                "matches_reference": self.matches_reference, "pareto": self.pareto}


def measure(data: str, mode: Mode, result, truth, ranks: int, residual=None) -> Row:
    """Measure one all-reduce ``result`` against the float64 ``truth``."""
    result = np.asarray(result)
    stats = reference.error_stats(result, truth)
    rs, ag = wire_bytes_per_element(mode, result.dtype.itemsize)
    row = Row(data, mode, dtype_name(result.dtype), ranks, int(result.size), rs, ag,
              stats["rel_rms"], stats["max_abs"], stats["snr_db"], stats["nonfinite"])
    if residual is not None:
        row.residual_rel = residual_rel_error(result, truth, residual)
    return row


def mark_pareto(rows: List[Row]) -> List[Row]:
    """Flag, per data set, the rows no other row beats in both bytes/element and error."""
    for row in rows:
        row.pareto = not any(
            o.data == row.data and o is not row
            and o.bytes_per_element <= row.bytes_per_element and o.rel_rms <= row.rel_rms
            and (o.bytes_per_element < row.bytes_per_element or o.rel_rms < row.rel_rms)
            for o in rows)
    return rows


def sort_rows(rows: List[Row]) -> List[Row]:
    """Data set in order of appearance, then most bytes first, then lowest error."""
    order = {d: i for i, d in enumerate(dict.fromkeys(r.data for r in rows))}
    return sorted(rows, key=lambda r: (order[r.data], -r.bytes_per_element,
                                       r.rel_rms if np.isfinite(r.rel_rms) else np.inf))


# ============================================================================ runs
def study(inputs: Sequence[np.ndarray], modes: Sequence[Mode], data: str = "data",
          residual_scale: Optional[float] = None, seed: int = 0) -> List[Row]:
    """Simulated study: every mode on ``inputs`` (one array per rank) with the reference."""
    truth = reference.exact_sum(inputs)
    residual = None if residual_scale is None else make_residual(truth, residual_scale, seed)
    rows = []
    for mode in modes:
        # the reference runs two-shot for "auto"; record the algorithm that ran
        concrete = mode.with_algo("twoshot") if mode.algo == "auto" else mode
        out = reference.flash_all_reduce_reference(inputs, mode=concrete)[0]
        rows.append(measure(data, concrete, out, truth, len(inputs), residual))
    return rows


def _bit_equal(a: np.ndarray, b: np.ndarray) -> bool:
    a = np.ascontiguousarray(a)
    b = np.ascontiguousarray(b)
    return a.shape == b.shape and a.dtype == b.dtype and bytes(a.data) == bytes(b.data)


def study_distributed(communicator, my_input: np.ndarray, modes: Sequence[Mode], data: str = "data",
                      residual_scale: Optional[float] = None, seed: int = 0) -> Optional[List[Row]]:
    """Distributed study: collective over ``communicator``'s ranks; rows on rank 0, None elsewhere.

    Each rank reduces ``my_input`` with ``communicator.all_reduce``.  Rank 0
    gathers the inputs and every rank's result, runs the reference with the
    concrete algorithm the backend chose, and sets ``matches_reference`` to
    True only when every rank's result equals the reference bit for bit (None
    when "auto" chose the vendor collective, which the reference does not model).
    The numbers are those of rank 0's result.
    """
    comm = communicator.mpi_comm
    rank = communicator.rank
    inputs = comm.gather(np.ascontiguousarray(my_input), root=0)
    truth = residual = None
    if rank == 0:
        truth = reference.exact_sum(inputs)
        if residual_scale is not None:
            residual = make_residual(truth, residual_scale, seed)
    rows = []
    for mode in modes:
        algo = mode.algo
        if not mode.is_baseline:
            algo = communicator.resolve_algo(my_input.nbytes, bits=(mode.rs_bits, mode.ag_bits),
                                             group_size=mode.group_size, algo=mode.algo,
                                             rotate=mode.rotate, symmetric=mode.symmetric)
        concrete = mode.with_algo(algo)
        got = communicator.all_reduce(my_input, bits=(mode.rs_bits, mode.ag_bits),
                                      group_size=mode.group_size, algo=algo, rotate=mode.rotate,
                                      symmetric=mode.symmetric)
        results = comm.gather(np.ascontiguousarray(got), root=0)
        if rank != 0:
            continue
        row = measure(data, concrete, results[0], truth, len(inputs), residual)
        if algo in ("nccl", "mpi"):
            # "auto" handed this size to the vendor collective, whose summation order the
            # reference does not model: only the error vs the exact sum applies.
            row.matches_reference = None
        else:
            nodes = getattr(getattr(communicator, "backend", None), "nodes", None)  # hierarchical's layout
            want = reference.flash_all_reduce_reference(inputs, mode=concrete, nodes=nodes)[0]
            row.matches_reference = all(_bit_equal(r, want) for r in results)
        rows.append(row)
    return rows if rank == 0 else None


# ============================================================================ helpers for reports
@dataclass
class StudyConfig:
    """What :func:`run_study` sweeps; the CLI builds it from its options."""

    data: List[DataSpec] = field(default_factory=lambda: [DataSpec("gaussian")])
    bits: Sequence = DEFAULT_BITS
    group_sizes: Sequence[int] = DEFAULT_GROUP_SIZES
    rotate: Sequence[bool] = (False, True)
    symmetric: Sequence[bool] = (False, True)
    algo: str = "auto"
    ranks: int = 4
    residual_scale: Optional[float] = None
    lossless: bool = True


def run_study(cfg: StudyConfig, communicator=None,
              progress: Optional[Callable[[str], None]] = None) -> Optional[List[Row]]:
    """Run ``cfg`` simulated (``communicator`` None or world size 1) or distributed.

    Returns the sorted rows with Pareto flags on rank 0, None on other ranks.
    ``progress(text)`` is told which data set starts.
    """
    modes = sweep_modes(cfg.bits, cfg.group_sizes, cfg.rotate, cfg.symmetric, cfg.algo, cfg.lossless)
    rows: List[Row] = []
    distributed = communicator is not None and communicator.world_size > 1
    for i, spec in enumerate(cfg.data):
        if progress is not None:
            progress(f"data set {i + 1}/{len(cfg.data)}: {spec.name}, {len(modes)} modes")
        if distributed:
            world = communicator.world_size
            _check_file_ranks(spec, world)
            part = study_distributed(communicator, spec.rank_input(communicator.rank, world), modes,
                                     spec.name, cfg.residual_scale, spec.seed)
            if part is not None:
                rows.extend(part)
        else:
            ranks = spec.ranks_in_file() or cfg.ranks
            rows.extend(study(spec.all_inputs(ranks), modes, spec.name, cfg.residual_scale, spec.seed))
    if distributed and communicator.rank != 0:
        return None
    return sort_rows(mark_pareto(rows))


def _check_file_ranks(spec: DataSpec, world: int) -> None:
    n = spec.ranks_in_file()
    if n is not None and n != world:
        raise ValueError(f"{spec.path} holds {n} ranks' data but the job has {world} ranks")
