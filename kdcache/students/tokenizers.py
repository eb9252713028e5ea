"""Student tokenizers: a word vocabulary built from the cached training text, or any `transformers` tokenizer.

Both turn a list of texts into (input_ids [B, L] int64, attention_mask [B, L] int64), L <= max_length.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Sequence

import torch

WORD = re.compile(r"\w+|[^\w\s]")


NUM_SHAPES = 6


def word_shape(w: str) -> int:
    """1 lower, 2 Capitalised, 3 UPPER, 4 has a digit, 5 other (0 = padding)."""
    if any(c.isdigit() for c in w):
        return 4
    if w.isupper():
        return 3
    if w[:1].isupper():
        return 2
    if w.islower():
        return 1
    return 5


class WordTokenizer:
    """Lower-cased words and punctuation; id 0 = padding, 1 = unknown word."""

    PAD, UNK = 0, 1
    FILE = "word_vocab.json"

    def __init__(self, words: Sequence[str]) -> None:
        self.words = ["<pad>", "<unk>", *words]
        self.index = {w: i for i, w in enumerate(self.words)}

    @classmethod
    def build(cls, texts: Sequence[str], size: int) -> "WordTokenizer":
        counts = Counter(w for t in texts for w in WORD.findall(t.lower()))
        return cls([w for w, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:size]])

    @property
    def vocab_size(self) -> int:
        return len(self.words)

    @property
    def pad_id(self) -> int:
        return self.PAD

    def encode(self, texts: Sequence[str], max_length: int | None) -> list[list[int]]:
        """Ids per text (at most `max_length`; None: all), `<unk>` alone for a text without words."""
        return [[self.index.get(w, self.UNK) for w in WORD.findall(t.lower())][:max_length] or [self.UNK]
                for t in texts]

    def __call__(self, texts: Sequence[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows = self.encode(texts, max_length)
        width = max(len(r) for r in rows)
        ids = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.as_tensor(r)
        return ids, (ids != self.PAD).long()

    @classmethod
    def build_from_words(cls, sentences: Sequence[Sequence[str]], size: int) -> "WordTokenizer":
        """A vocabulary of lower-cased words for word-level taggers (case goes to `shapes`)."""
        counts = Counter(w.lower() for s in sentences for w in s)
        return cls([w for w, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:size]])

    def encode_words(self, sentences: Sequence[Sequence[str]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One id per word: (ids [B, W], shapes [B, W], mask [B, W]); shapes keep what lower-casing drops."""
        width = max(1, max(len(s) for s in sentences))
        ids = torch.zeros((len(sentences), width), dtype=torch.long)
        shapes = torch.zeros_like(ids)
        for i, s in enumerate(sentences):
            ids[i, :len(s)] = torch.as_tensor([self.index.get(w.lower(), self.UNK) for w in s], dtype=torch.long)
            shapes[i, :len(s)] = torch.as_tensor([word_shape(w) for w in s], dtype=torch.long)
        return ids, shapes, (torch.arange(width)[None, :] < torch.as_tensor([len(s) for s in sentences])[:, None]).long()

    def save(self, folder: Path) -> None:
        (Path(folder) / self.FILE).write_text(json.dumps(self.words[2:]))

    @classmethod
    def load(cls, folder: Path) -> "WordTokenizer":
        return cls(json.loads((Path(folder) / cls.FILE).read_text()))


class HFTokenizer:
    """A `transformers` tokenizer behind the same call as WordTokenizer."""

    def __init__(self, name_or_path: str) -> None:
        from transformers import AutoTokenizer

        from ..hub import from_pretrained
        self.tok = from_pretrained(AutoTokenizer, name_or_path)

    @property
    def vocab_size(self) -> int:
        return len(self.tok)

    @property
    def pad_id(self) -> int:
        return self.tok.pad_token_id or 0

    def encode(self, texts: Sequence[str], max_length: int | None) -> list[list[int]]:
        """Ids per text (at most `max_length`; None: all)."""
        return self.tok(list(texts), truncation=max_length is not None, max_length=max_length,
                        return_attention_mask=False, return_token_type_ids=False, verbose=False)["input_ids"]

    def __call__(self, texts: Sequence[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        enc = self.tok(list(texts), truncation=True, max_length=max_length, padding=True, return_tensors="pt",
                       return_token_type_ids=False)
        return enc["input_ids"], enc["attention_mask"]

    def save(self, folder: Path) -> None:
        self.tok.save_pretrained(folder)
