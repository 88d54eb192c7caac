"""Run under mpiexec: lossless tensor-parallel MiniLM embeddings equal the single-rank forward.

Every rank runs the TP forward with the lossless all-reduce of the CPU
backend; rank 0 also runs the whole model on its own (no all-reduce) and
compares.  Sentences: argv[1] (default 6) of the default corpus, with one
long text that is truncated to the model's 256 tokens.
Usage: ``mpiexec -n K python -m mpi4py minilm_lossless_tp.py [N]``
"""
from __future__ import annotations

import sys

import numpy as np

import flashcomm_cupy as fc
from flashcomm_cupy.minilm import assets
from flashcomm_cupy.minilm.forward import TensorParallelMiniLM
from flashcomm_cupy.minilm.study import default_corpus

#: fp32 rounding of a 6-layer forward whose K-sums are split in TP parts: measured max |diff| of the unit
#: embeddings is ~1e-7 at TP=2; 16x float32 epsilon leaves room without hiding a real error (one wrong
#: shard changes embeddings at the 1e-2 level).
TOLERANCE = 16 * float(np.finfo(np.float32).eps)

comm = fc.Communicator(backend="cpu")
count = int(sys.argv[1]) if len(sys.argv) > 1 else 6
texts = default_corpus(count).texts[:count] + ["all-reduce " * 400]
config, weights = assets.load_config(), assets.load_weights()
ids = assets.Tokenizer(config.max_seq_length).encode(texts)
assert max(map(len, ids)) == config.max_seq_length, "the long text must be truncated to max_seq_length"

tp = TensorParallelMiniLM(config, weights, comm.rank, comm.world_size, np)
got = tp.encode(ids, lambda partial, site: comm.all_reduce(partial, bits=None))
gathered = comm.mpi_comm.gather(got, root=0)
if comm.rank == 0:
    whole = TensorParallelMiniLM(config, weights, 0, 1, np).encode(ids, lambda partial, site: partial)
    assert got.dtype == np.float32 and got.shape == (len(texts), config.hidden)
    assert all(np.array_equal(g, got) for g in gathered), "ranks' embeddings differ"
    diff = float(np.abs(got - whole).max())
    print(f"max |TP - single| = {diff:.3g} (tolerance {TOLERANCE:.3g})")
    assert diff <= TOLERANCE, f"lossless TP embeddings differ from the single-rank forward by {diff}"
    assert np.allclose(np.linalg.norm(got, axis=1), 1, atol=1e-6)
comm.close()
