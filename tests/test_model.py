"""The end-to-end model benchmark (``flashcomm model``) on the CPU backend.

What is specified here:

* causal grouped-query attention equals a loop-by-loop float64 reference,
  for prefill (any head blocking) and for a decode step over a KV cache;
* the tensor-parallel split (column-parallel QKV and gate/up, row-parallel O
  and down, GQA heads split or replicated) with a lossless all-reduce gives
  the dense single-process forward of the same weights, to rounding;
  skipping the all-reduce does not (the comparison can fail);
* quantized all-reduces give a finite, small error that grows as bits shrink;
* the CLI prints one table (rank 0 only) and writes JSON whose numbers obey
  the documented definitions (scaling, comm share, speedup).
"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from flashcomm_cupy.model import attention, ops
from flashcomm_cupy.model.config import ModelShape, TensorParallelSplit, get_shape

from mpi_util import run_mpi_code

TINY = dict(hidden=64, heads=8, kv_heads=2, head_dim=16, ffn=128)


# ----------------------------------------------------------------------------- attention
def _split_qkv(qkv, tokens, hq, hkv, hd):
    q = qkv[:, :hq * hd].reshape(tokens, hq, hd)
    k = qkv[:, hq * hd:(hq + hkv) * hd].reshape(tokens, hkv, hd)
    v = qkv[:, (hq + hkv) * hd:].reshape(tokens, hkv, hd)
    return q, k, v


@pytest.mark.parametrize("block_bytes", [1, 1 << 30])  # one KV head per block / all at once
def test_prefill_attention_matches_naive_causal_loop(block_bytes):
    rng = np.random.default_rng(1)
    batch, tokens, hq, hkv, hd = 2, 9, 6, 2, 8
    qkv = rng.standard_normal((batch * tokens, (hq + 2 * hkv) * hd)).astype(np.float32)
    out = attention.prefill_attention(np, qkv, batch, tokens, hq, hkv, hd, block_bytes)
    assert out.shape == (batch * tokens, hq * hd)
    for b in range(batch):
        rows = slice(b * tokens, (b + 1) * tokens)
        ref = attention.naive_attention(*_split_qkv(qkv[rows], tokens, hq, hkv, hd))
        np.testing.assert_allclose(out[rows].reshape(tokens, hq, hd), ref, atol=2e-6, rtol=1e-5)


def test_prefill_attention_is_causal():
    """Changing the last token changes no earlier output row."""
    rng = np.random.default_rng(2)
    tokens, hq, hkv, hd = 7, 4, 4, 8
    qkv = rng.standard_normal((tokens, (hq + 2 * hkv) * hd)).astype(np.float32)
    before = attention.prefill_attention(np, qkv, 1, tokens, hq, hkv, hd)
    qkv[-1] += 5.0
    after = attention.prefill_attention(np, qkv, 1, tokens, hq, hkv, hd)
    np.testing.assert_array_equal(before[:-1], after[:-1])
    assert np.abs(before[-1] - after[-1]).max() > 1e-3


def test_decode_attention_matches_naive_loop_and_writes_the_cache():
    rng = np.random.default_rng(3)
    batch, context, hq, hkv, hd = 3, 6, 4, 2, 8
    k = rng.standard_normal((batch, hkv, context, hd)).astype(np.float32)
    v = rng.standard_normal((batch, hkv, context, hd)).astype(np.float32)
    qkv = rng.standard_normal((batch, (hq + 2 * hkv) * hd)).astype(np.float32)
    k_t, v_cache = np.ascontiguousarray(k.transpose(0, 1, 3, 2)), v.copy()
    out = attention.decode_attention(np, qkv, k_t, v_cache, hq, hkv, hd)
    for b in range(batch):
        q_b, k_new, v_new = _split_qkv(qkv[b:b + 1], 1, hq, hkv, hd)
        keys, values = k[b].transpose(1, 0, 2).copy(), v[b].transpose(1, 0, 2).copy()
        keys[-1], values[-1] = k_new[0], v_new[0]
        ref = attention.naive_attention(q_b, keys, values, causal_offset=context - 1)
        np.testing.assert_allclose(out[b].reshape(1, hq, hd), ref, atol=2e-6, rtol=1e-5)
        np.testing.assert_array_equal(k_t[b, :, :, -1], k_new[0])
        np.testing.assert_array_equal(v_cache[b, :, -1, :], v_new[0])


def test_masked_softmax_rows_sum_to_one_and_masked_entries_are_zero():
    rng = np.random.default_rng(4)
    s = rng.standard_normal((3, 5, 5)).astype(np.float32)
    ops.masked_softmax_(np, s, 5, 0.5)
    np.testing.assert_allclose(s.sum(axis=-1), 1.0, rtol=1e-6)
    assert np.all(np.triu(np.ones((5, 5)), 1)[None] * s == 0.0)


# ----------------------------------------------------------------------------- shapes and split
def test_presets_have_the_published_llama3_shapes():
    s70, s8 = get_shape("llama3-70b"), get_shape("llama3-8b")
    assert (s70.hidden, s70.heads, s70.kv_heads, s70.head_dim, s70.ffn, s70.layers) == (8192, 64, 8, 128, 28672, 80)
    assert (s8.hidden, s8.heads, s8.kv_heads, s8.head_dim, s8.ffn, s8.layers) == (4096, 32, 8, 128, 14336, 32)
    split = TensorParallelSplit(s70, 3, 4)
    assert (split.q_heads, split.kv_heads, split.ffn) == (16, 2, 7168)
    assert split.kv_head_ids() == [6, 7]


def test_kv_heads_are_replicated_when_fewer_than_ranks():
    shape = ModelShape("t", layers=1, **TINY)  # 8 query heads, 2 KV heads: 4 query heads per KV head
    assert [TensorParallelSplit(shape, r, 4).kv_head_ids() for r in range(4)] == [[0], [0], [1], [1]]
    assert [TensorParallelSplit(shape, r, 2).kv_head_ids() for r in range(2)] == [[0], [1]]
    assert [TensorParallelSplit(shape, r, 8).q_head_ids() for r in range(8)] == [[r] for r in range(8)]


@pytest.mark.parametrize("bad", [dict(heads=6, kv_heads=2), dict(heads=12, kv_heads=3), dict(ffn=130)])
def test_shapes_that_do_not_split_are_refused(bad):
    fields = dict(TINY, **bad)
    with pytest.raises(ValueError):
        TensorParallelSplit(ModelShape("t", layers=1, **fields), 0, 4)


def test_custom_model_needs_every_dimension():
    with pytest.raises(ValueError, match="--ffn"):
        get_shape("custom", hidden=64, heads=8, kv_heads=2, head_dim=16, layers=2)


# ----------------------------------------------------------------------------- TP == dense, under MPI
_TP_EQUALS_DENSE = r"""
import numpy as np
from flashcomm_cupy import Communicator
from flashcomm_cupy.dtypes import resolve_dtype
from flashcomm_cupy.model.config import ModelShape
from flashcomm_cupy.model.forward import TensorParallelModel
from flashcomm_cupy.model.timing import relative_rms

shape = ModelShape("tiny", hidden=64, heads=8, kv_heads=2, head_dim=16, ffn=128, layers=3)
with Communicator(backend="cpu") as comm:
    for name in ("float32", "float16"):
        dt = resolve_dtype(name)
        tp = TensorParallelModel(shape, comm.rank, comm.world_size, np, dt)
        x, xd = tp.prefill_input(2, 5), tp.decode_input(3)
        caches = tp.decode_caches(3, 7)
        def reducer(bits, algo):
            return lambda y: comm.all_reduce(y, bits=bits, algo=algo, out=y)
        runs = {"mpi": reducer(None, "mpi"), "lossless": reducer(None, "auto"),
                "int8": reducer(8, "auto"), "int4": reducer(4, "auto"), "skip": None}
        outs = {k: (tp.prefill(x, 2, r), tp.decode(xd, caches, r)) for k, r in runs.items()}
        if comm.rank == 0:
            dense = TensorParallelModel(shape, 0, 1, np, dt)
            ref = (dense.prefill(x, 2), dense.decode(xd, dense.decode_caches(3, 7)))
            for k, (p, d) in outs.items():
                errs = [relative_rms(np, p, ref[0]), relative_rms(np, d, ref[1])]
                print(f"ERR {name} {k} {errs[0]:.6e} {errs[1]:.6e}", flush=True)
"""


def _errors(output: str) -> dict:
    errs = {}
    for line in output.splitlines():
        if line.startswith("ERR "):
            _, dtype, mode, prefill, decode = line.split()
            errs[(dtype, mode)] = (float(prefill), float(decode))
    return errs


@pytest.mark.parametrize("world_size", [2, 4])
def test_tensor_parallel_forward_equals_the_dense_forward(world_size):
    proc = run_mpi_code(_TP_EQUALS_DENSE, world_size, timeout=120)
    assert proc.returncode == 0, proc.stdout
    errs = _errors(proc.stdout)
    assert len(errs) == 10, proc.stdout
    for dtype, exact_bound in (("float32", 1e-5), ("float16", 4e-3)):
        for mode in ("mpi", "lossless"):  # the split is right: only rounding differs
            assert max(errs[(dtype, mode)]) < exact_bound, (dtype, mode, errs[(dtype, mode)])
        # without the all-reduce each rank holds a partial sum: far from the dense result
        assert min(errs[(dtype, "skip")]) > 0.1, errs[(dtype, "skip")]
        int8, int4 = errs[(dtype, "int8")], errs[(dtype, "int4")]
        for e8, e4 in zip(int8, int4):
            assert exact_bound < e8 < 3e-2 and e8 < e4 < 0.35, (dtype, int8, int4)
            assert math.isfinite(e4)


# ----------------------------------------------------------------------------- the command
def test_model_command_prints_one_table_and_writes_consistent_json(tmp_path):
    out_json = tmp_path / "model.json"
    out_md = tmp_path / "model.md"
    args = ["--model", "custom", "--hidden", "64", "--heads", "8", "--kv-heads", "2", "--head-dim", "16",
            "--ffn", "128", "--num-layers", "4", "--layers", "2", "--tokens", "8,16", "--batch", "1,3",
            "--context", "12", "--bits", "none,8,4/8", "--rotate", "--dtype", "float16", "--repeats", "2",
            "--backend", "cpu", "--json", str(out_json), "--markdown", str(out_md)]
    code = ("import sys\nfrom flashcomm_cupy.cli.model import model\n"
            f"model.main(args={args!r}, prog_name='flashcomm model')\n")
    proc = run_mpi_code(code, 2, timeout=120)
    assert proc.returncode == 0, proc.stdout
    assert proc.stdout.count("custom forward, TP=2") == 1, proc.stdout  # rank 0 only
    assert "timed 2 of 4 layers; totals scaled x4/2" in proc.stdout

    report = json.loads(out_json.read_text())
    meta, rows = report["meta"], report["rows"]
    assert meta["world_size"] == 2 and meta["baseline"] == "mpi" and meta["scale"] == 2.0
    assert meta["modes"] == ["lossless", "int8 g128 rot", "int4/8 g128 rot"]
    assert len(rows) == 4 * (3 + 2)  # (2 prompt lengths + 2 batch sizes) x (modes + baseline + compute-only)
    assert [r["phase"] for r in rows].count("prefill") == 10
    for r in rows:
        assert r["time_ms"] == pytest.approx(2 * r["measured_ms"])
        assert r["per_layer_ms"] == pytest.approx(r["measured_ms"] / 2)
        assert 0.0 <= r["comm_share"] < 1.0
        assert r["finite"] is True
        if r["mode"] == "mpi":
            assert r["baseline"] and r["speedup_vs_baseline"] == 1.0 and r["rel_err_vs_baseline"] == 0.0
        elif r["mode"] == "compute-only":
            assert r["comm_share"] == 0.0 and r["rel_err_vs_baseline"] is None and r["allreduces_per_step"] == 0
        else:
            assert r["allreduces_per_step"] == 8 and r["algo"] in ("oneshot", "twoshot")
            assert r["comm_share"] == pytest.approx(1 - r["compute_only_ms"] / r["time_ms"], abs=1e-9)
    quantized = [r for r in rows if r["bits"] not in (None, "none")]
    assert quantized and all(0 < r["rel_err_vs_baseline"] < 0.35 and r["rotate"] for r in quantized)
    prefill_8 = [r for r in rows if r["phase"] == "prefill" and r["tokens"] == 8]
    base = next(r for r in prefill_8 if r["baseline"])
    for r in prefill_8:
        assert r["speedup_vs_baseline"] == pytest.approx(base["measured_ms"] / r["measured_ms"])
    md = out_md.read_text()
    assert md.count("\n| prefill |") == 10 and "timed 2 of 4 layers" in md


def test_model_command_rejects_a_model_that_does_not_split():
    code = ("from flashcomm_cupy.cli.model import model\n"
            "model.main(args=['--model', 'custom', '--hidden', '64', '--heads', '6', '--kv-heads', '2', "
            "'--head-dim', '16', '--ffn', '128', '--num-layers', '2', '--backend', 'cpu'], prog_name='flashcomm model')\n")
    proc = run_mpi_code(code, 4, timeout=60)
    assert proc.returncode != 0
    assert "cannot run with TP=4" in proc.stdout
