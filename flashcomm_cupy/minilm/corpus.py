"""Real text that ships with the environment: Python's own docstrings and the model card.

The retrieval task pairs a *query* -- the dotted name of a standard-library
function or class written as words (``json dumps``) -- with its *document*,
the first sentence of that object's docstring.  Sentences of the model card
(the README inside the model package) join the documents as distractors.
Every text is embedded; each query searches all documents.

Selection is deterministic: a fixed module list, names in sorted order, and
``pairs`` taken evenly spaced over all candidates.  Docstrings change between
Python versions, so a corpus also travels as JSON (:meth:`Corpus.to_json`,
written into every ``--json`` result and read back by ``--corpus``) and is
identified by :meth:`Corpus.digest`.
"""
from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Optional, Tuple

#: Standard-library modules the pairs come from, in this order (pure documentation, no side effects).
STDLIB_MODULES = (
    "abc", "argparse", "array", "ast", "base64", "binascii", "bisect", "calendar", "cmath", "codecs",
    "collections", "colorsys", "configparser", "contextlib", "copy", "csv", "dataclasses", "datetime",
    "decimal", "difflib", "email.utils", "enum", "filecmp", "fnmatch", "fractions", "functools", "glob",
    "gzip", "hashlib", "heapq", "hmac", "html", "http.client", "inspect", "io", "ipaddress", "itertools",
    "json", "keyword", "locale", "logging", "math", "mimetypes", "numbers", "operator", "os", "os.path",
    "pathlib", "pickle", "platform", "plistlib", "pprint", "queue", "random", "re", "reprlib", "sched",
    "secrets", "selectors", "shlex", "shutil", "signal", "socket", "stat", "statistics", "string",
    "struct", "subprocess", "sysconfig", "tarfile", "tempfile", "textwrap", "threading", "time",
    "timeit", "tokenize", "traceback", "types", "typing", "unicodedata", "urllib.parse", "uuid",
    "warnings", "weakref", "zipfile", "zlib",
)
DEFAULT_PAIRS = 300
#: a document or model-card sentence must have this many words (shorter ones say nothing; longer
#: ones are lists or tables flattened by the extraction)
MIN_WORDS, MAX_WORDS = 5, 60
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z`\"'(])")


@dataclass(frozen=True)
class Corpus:
    """Texts to embed and the retrieval task over them.

    ``texts`` = the ``len(pairs)`` queries, then the documents (the pairs'
    documents first, in pair order, then the distractors).  ``pairs[i]`` is
    (query text, document text); query ``i`` is ``texts[i]`` and its document
    ``texts[len(pairs) + i]``.
    """

    pairs: Tuple[Tuple[str, str], ...]
    distractors: Tuple[str, ...]

    @property
    def queries(self) -> List[str]:
        return [q for q, _ in self.pairs]

    @property
    def documents(self) -> List[str]:
        return [d for _, d in self.pairs] + list(self.distractors)

    @property
    def texts(self) -> List[str]:
        return self.queries + self.documents

    def to_json(self) -> dict:
        return {"pairs": [list(p) for p in self.pairs], "distractors": list(self.distractors),
                "digest": self.digest()}

    @classmethod
    def from_json(cls, obj: dict) -> "Corpus":
        """Inverse of :meth:`to_json`; also accepts a whole ``--json`` result (its ``corpus`` key)."""
        obj = obj.get("corpus", obj)
        try:
            corpus = cls(tuple((str(q), str(d)) for q, d in obj["pairs"]),
                         tuple(str(s) for s in obj["distractors"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"not a MiniLM corpus (needs 'pairs' and 'distractors'): {exc}") from None
        if not corpus.pairs:
            raise ValueError("the corpus has no query/document pairs")
        return corpus

    def digest(self) -> str:
        """SHA-256 of the corpus: equal digests, equal texts."""
        blob = json.dumps([list(map(list, self.pairs)), list(self.distractors)], ensure_ascii=False)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def build_corpus(pairs: int = DEFAULT_PAIRS, model_card: Optional[Path] = None) -> Corpus:
    """``pairs`` stdlib name/docstring pairs and up to ``pairs`` model-card sentences as distractors."""
    if pairs < 1:
        raise ValueError(f"pairs must be positive, got {pairs}")
    candidates = list(_stdlib_pairs())
    if len(candidates) < pairs:
        raise ValueError(f"only {len(candidates)} docstring pairs found, {pairs} asked for")
    chosen = tuple(candidates[i * len(candidates) // pairs] for i in range(pairs))
    card = _card_sentences(model_card) if model_card is not None else []
    taken = {d for _, d in chosen}
    distractors = tuple(s for s in card if s not in taken)[:pairs]
    return Corpus(chosen, distractors)


def first_sentence(doc: str) -> Optional[str]:
    """The first sentence of a docstring's first prose paragraph (not a signature line), or None."""
    for paragraph in doc.strip().split("\n\n"):
        text = " ".join(paragraph.split())
        if not text or re.match(r"^[\w.]+\(.*\)( ->.*)?$", text) or text.startswith((">>>", "..")):
            continue  # C functions' docstrings open with their signature
        sentence = _SENTENCE_END.split(text, maxsplit=1)[0]
        return sentence if MIN_WORDS <= len(sentence.split()) <= MAX_WORDS else None
    return None


def _stdlib_pairs() -> Iterator[Tuple[str, str]]:
    seen = set()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # importing or reading deprecated names (typing.re, ...) warns
        for module_name in STDLIB_MODULES:
            try:
                module = importlib.import_module(module_name)
            except ImportError:  # a Python built without e.g. zlib
                continue
            for name in sorted(n for n in vars(module) if not n.startswith("_")):
                obj = getattr(module, name)
                if not (inspect.isfunction(obj) or inspect.isbuiltin(obj) or inspect.isclass(obj)):
                    continue
                doc = inspect.getdoc(obj)
                sentence = first_sentence(doc) if doc else None
                if sentence is None or sentence in seen:
                    continue  # re-exports and shared docstrings would make two right answers
                seen.add(sentence)
                yield f"{module_name} {name}".replace(".", " ").replace("_", " "), sentence


def _card_sentences(path: Path) -> List[str]:
    """Prose sentences of a Markdown model card: no front matter, code, tables, headings or URLs."""
    text = Path(path).read_text(encoding="utf-8")
    text = re.sub(r"\A---\n.*?\n---\n", "", text, flags=re.S)
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)       # [label](url) -> label
    text = re.sub(r"https?://\S+", "", text)
    out, seen = [], set()
    for paragraph in re.split(r"\n\s*\n", text):
        lines = [ln for ln in paragraph.splitlines()
                 if not ln.lstrip().startswith(("#", "|", "<", "-", "*", ">"))]
        for s in _SENTENCE_END.split(" ".join(" ".join(lines).split())):
            s = s.strip()
            if MIN_WORDS <= len(s.split()) <= MAX_WORDS and s not in seen:
                seen.add(s)
                out.append(s)
    return out
