"""Every all-reduce mode on the tensor-parallel MiniLM, measured against the lossless run.

:func:`run_minilm_study` is collective over a :class:`~flashcomm_cupy.Communicator`
(TP = its world size).  It embeds the corpus once per mode -- the lossless
mode first, as the reference -- and rank 0 measures, per mode:

* ``mean_cos`` / ``worst_cos``: cosine similarity of each text's embedding
  with its lossless embedding (mean and minimum over all texts);
* ``top1`` / ``top5``: nearest-neighbour retrieval agreement with the
  lossless run -- each query's best document is the lossless one's (top-1),
  and the share of the lossless top-5 documents found in this mode's top-5;
* ``site_rel_rms``: per all-reduce site (``L0.attn`` ... ``L5.ffn``), the
  error of the all-reduce itself, ``||quantized - exact|| / ||exact||``
  over all tokens, where ``exact`` is a lossless all-reduce of the same
  partial sums (so the error does not include the drift from earlier layers);
* the outlier channels: per site, the hidden channels with the largest
  ``max |y| / rms(y)`` in the lossless all-reduce output ``y``.

All ranks hold bit-identical hidden states (the all-reduce returns the same
bits everywhere and the rest is replicated); the study checks that the
embeddings are, too.
"""
from __future__ import annotations

import hashlib
import time
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Sequence

import numpy as np

from ..accuracy import total_wire_bytes
from ..config import Mode
from . import assets
from .corpus import Corpus, build_corpus
from .forward import TensorParallelMiniLM, sites

#: The default sweep (24 quantized modes, ~7 min on 2 shared CPU cores, docs/accuracy.md): every bit width, the smallest, the
#: library's default and the largest group, rotation off and on, asymmetric codes (the library's
#: default).  The full grid: --group-size 32,64,128,256,512,1024 --symmetric both.
DEFAULT_BITS = ("8", "6", "4/8", "4")
DEFAULT_GROUP_SIZES = (32, 128, 1024)
DEFAULT_ROTATE = (False, True)
DEFAULT_SYMMETRIC = (False,)
_SWITCH_NAME = {(False, True): "both", (True,): "on", (False,): "off"}
#: the default sweep as command-line options (the CLI's help shows it)
DEFAULT_SWEEP_TEXT = (f"--bits {','.join(DEFAULT_BITS)} --group-size {','.join(map(str, DEFAULT_GROUP_SIZES))} "
                      f"--rotate {_SWITCH_NAME[DEFAULT_ROTATE]} --symmetric {_SWITCH_NAME[DEFAULT_SYMMETRIC]}")
#: texts per forward batch: ~700 tokens of this corpus per all-reduce (a prefill-sized message)
DEFAULT_BATCH = 64
#: outlier channels reported per all-reduce site
OUTLIER_CHANNELS = 4
TOP_K = 5
#: lossless embeddings of this many texts go into the result, so two backends' forwards can be compared
SAMPLE_TEXTS = 8


@dataclass
class ModeRow:
    """One mode's numbers (see the module docstring)."""

    mode: Mode
    bytes_per_element: float
    mean_cos: float
    worst_cos: float
    top1: float
    top5: float
    site_rel_rms: Dict[str, float]
    seconds: float
    #: the algorithms the backend ran for this mode's all-reduces (what ``algo="auto"`` resolved to):
    #: one-shot quantizes once, two-shot twice, so two studies compare only when these agree
    algos_run: List[str] = None

    @property
    def label(self) -> str:
        return self.mode.label

    @property
    def max_rel_rms(self) -> float:
        return max(self.site_rel_rms.values()) if self.site_rel_rms else 0.0

    def to_json(self) -> dict:
        out = {k: v for k, v in asdict(self).items() if k != "mode"}
        m = self.mode
        out.update(label=m.label, bits=m.bits_label, group_size=m.group_size, rotate=m.rotate,
                   symmetric=m.symmetric, algo=m.algo, max_rel_rms=self.max_rel_rms)
        return out


@dataclass
class SiteChannels:
    """The lossless all-reduce output at one site: its RMS, peak, and the channels carrying the peaks."""

    site: str
    rms: float
    peak: float
    channels: List[int]          # by decreasing max |y_c|
    channel_peak_over_rms: List[float]


@dataclass
class MiniLMStudy:
    """Everything :func:`run_minilm_study` measured (rank 0)."""

    rows: List[ModeRow]
    outliers: List[SiteChannels]
    corpus: Corpus
    ranks: int
    backend: str
    dtype: str
    tokens: int
    batch: int
    #: the lossless run's own retrieval quality: the paired document ranks first / in the top 5
    lossless_accuracy_top1: float = 0.0
    lossless_accuracy_top5: float = 0.0
    #: the lossless embeddings of the first :data:`SAMPLE_TEXTS` texts
    lossless_sample: List[List[float]] = None

    def to_json(self) -> dict:
        return {"model": "minilm", "ranks": self.ranks, "backend": self.backend, "dtype": self.dtype,
                "tokens": self.tokens, "texts": len(self.corpus.texts), "queries": len(self.corpus.pairs),
                "batch": self.batch, "lossless_accuracy_top1": self.lossless_accuracy_top1,
                "lossless_accuracy_top5": self.lossless_accuracy_top5,
                "lossless_sample": self.lossless_sample,
                "rows": [r.to_json() for r in self.rows],
                "outliers": [asdict(o) for o in self.outliers],
                "corpus": self.corpus.to_json()}


def default_corpus(pairs: int) -> Corpus:
    """``pairs`` standard-library pairs plus the model card's sentences (needs the ``model`` extra)."""
    return build_corpus(pairs, assets.model_dir() / "README.md")


def run_minilm_study(communicator, modes: Sequence[Mode], corpus: Corpus, dtype=np.float32,
                     batch: int = DEFAULT_BATCH) -> Optional[MiniLMStudy]:
    """Embed ``corpus`` with the lossless all-reduce and with each of ``modes``; the study on rank 0.

    Collective over ``communicator`` (every rank passes the same arguments);
    returns None on the other ranks.  Raises
    :class:`.assets.ModelExtraMissing` when the ``model`` extra is absent
    and ValueError when the world size does not divide the model's heads.
    """
    assets.require_model_extra()
    if batch < 1:
        raise ValueError(f"batch must be positive, got {batch}")
    config = assets.load_config()
    model = TensorParallelMiniLM(config, assets.load_weights(), communicator.rank,
                                 communicator.world_size, communicator.backend.xp)
    token_ids = assets.Tokenizer(config.max_seq_length).encode(corpus.texts)
    batches = [token_ids[i:i + batch] for i in range(0, len(token_ids), batch)]
    dtype = np.dtype(dtype)
    root = communicator.rank == 0

    reference = _Reducer(communicator, Mode.make(None), dtype, config.layers, record_channels=True)
    lossless = _embed(model, batches, reference)
    _check_ranks_agree(communicator, lossless, "lossless")
    rows: List[ModeRow] = []
    for mode in modes:
        start = time.perf_counter()
        reducer = _Reducer(communicator, mode, dtype, config.layers, record_error=not mode.lossless)
        emb = lossless if mode.lossless else _embed(model, batches, reducer)
        _check_ranks_agree(communicator, emb, mode.label)
        if root:
            rows.append(_measure(mode, emb, lossless, len(corpus.pairs), reducer.rel_rms(),
                                 total_wire_bytes(mode, dtype.itemsize), time.perf_counter() - start,
                                 sorted(reducer.algos_run)))
    if not root:
        return None
    truth = np.arange(len(corpus.pairs))
    top = _top_documents(lossless, len(corpus.pairs))
    return MiniLMStudy(rows=rows, outliers=reference.outlier_channels(), corpus=corpus,
                       ranks=communicator.world_size, backend=communicator.backend_name,
                       dtype=dtype.name, tokens=sum(len(t) for t in token_ids), batch=batch,
                       lossless_accuracy_top1=float(np.mean(top[:, 0] == truth)),
                       lossless_accuracy_top5=float(np.mean((top == truth[:, None]).any(axis=1))),
                       lossless_sample=lossless[:SAMPLE_TEXTS].tolist())


# ============================================================================ running
class _Reducer:
    """The ``reduce`` callback of the forward: ``comm.all_reduce`` in one mode, with bookkeeping.

    ``record_error`` also reduces every partial losslessly and accumulates
    the squared error per site; ``record_channels`` accumulates the
    per-channel peak and the RMS of the output per site.
    """

    def __init__(self, communicator, mode: Mode, dtype: np.dtype, layers: int,
                 record_error: bool = False, record_channels: bool = False):
        self.comm, self.mode, self.dtype = communicator, mode, dtype
        self.xp = communicator.backend.xp
        self.record_error, self.record_channels = record_error, record_channels
        self.sq_err = {s: 0.0 for s in sites(layers)}
        self.sq_ref = {s: 0.0 for s in sites(layers)}
        self.count = {s: 0 for s in sites(layers)}
        self.peak = {}
        self.algos_run = set()

    def _all_reduce(self, payload, mode: Mode):
        if mode is self.mode:
            self.algos_run.add(self.comm.backend.resolve_algo(payload.nbytes, mode, payload.dtype.itemsize))
        return self.comm.all_reduce(payload, bits=(mode.rs_bits, mode.ag_bits), group_size=mode.group_size,
                                    algo=mode.algo, rotate=mode.rotate, symmetric=mode.symmetric)

    def __call__(self, partial, site: str):
        xp = self.xp
        payload = xp.ascontiguousarray(partial.astype(self.dtype, copy=False))
        out = self._all_reduce(payload, self.mode).astype(np.float32)
        if self.record_error:
            exact = self._all_reduce(payload, Mode.make(None)).astype(np.float64)
            diff = out.astype(np.float64) - exact
            self.sq_err[site] += float((diff * diff).sum())
            self.sq_ref[site] += float((exact * exact).sum())
        if self.record_channels:
            y = out.astype(np.float64)
            self.sq_ref[site] += float((y * y).sum())
            self.count[site] += y.size
            col_peak = xp.abs(y).max(axis=0)
            self.peak[site] = col_peak if site not in self.peak else xp.maximum(self.peak[site], col_peak)
        return out

    def rel_rms(self) -> Dict[str, float]:
        if not self.record_error:
            return {s: 0.0 for s in self.sq_err}
        return {s: float(np.sqrt(self.sq_err[s] / self.sq_ref[s])) if self.sq_ref[s] > 0 else 0.0
                for s in self.sq_err}

    def outlier_channels(self) -> List[SiteChannels]:
        out = []
        for site, peak in self.peak.items():
            peak = _to_numpy(peak)
            rms = float(np.sqrt(self.sq_ref[site] / self.count[site]))
            order = np.argsort(-peak, kind="stable")[:OUTLIER_CHANNELS]
            out.append(SiteChannels(site, rms, float(peak.max()), [int(c) for c in order],
                                    [float(peak[c] / rms) if rms > 0 else 0.0 for c in order]))
        return out


def _embed(model: TensorParallelMiniLM, batches, reduce) -> np.ndarray:
    return np.concatenate([_to_numpy(model.encode(b, reduce)) for b in batches]).astype(np.float64)


def _to_numpy(a) -> np.ndarray:
    return a if isinstance(a, np.ndarray) else a.get()


def _check_ranks_agree(communicator, emb: np.ndarray, label: str) -> None:
    """Every rank must hold the same embeddings bit for bit (the all-reduce's contract)."""
    digest = hashlib.sha256(np.ascontiguousarray(emb).tobytes()).hexdigest()
    digests = communicator.mpi_comm.allgather(digest)
    if len(set(digests)) != 1:
        raise RuntimeError(f"{label}: the ranks' embeddings differ (all-reduce results not bit-identical)")


# ============================================================================ metrics
def _top_documents(emb: np.ndarray, queries: int) -> np.ndarray:
    """Indices (into the documents) of each query's :data:`TOP_K` nearest documents, best first."""
    q, d = emb[:queries], emb[queries:]
    sims = q @ d.T
    return np.argsort(-sims, axis=1, kind="stable")[:, :TOP_K]


def _measure(mode: Mode, emb: np.ndarray, lossless: np.ndarray, queries: int, site_rel_rms: Dict[str, float],
             bytes_per_element: float, seconds: float, algos_run: List[str]) -> ModeRow:
    def unit(a):
        return a / np.linalg.norm(a, axis=1, keepdims=True)

    cos = np.sum(unit(emb) * unit(lossless), axis=1)
    top, ref = _top_documents(emb, queries), _top_documents(lossless, queries)
    overlap = [len(set(a) & set(b)) / TOP_K for a, b in zip(top, ref)]
    return ModeRow(mode=mode, bytes_per_element=bytes_per_element, mean_cos=float(cos.mean()),
                   worst_cos=float(cos.min()), top1=float(np.mean(top[:, 0] == ref[:, 0])),
                   top5=float(np.mean(overlap)), site_rel_rms=site_rel_rms, seconds=seconds,
                   algos_run=algos_run)
