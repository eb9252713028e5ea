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

_WORD = re.compile(r"\w+|[^\w\s]")


class WordTokenizer:
    """Lower-cased words and punctuation; id 0 = padding, 1 = unknown word."""

    PAD, UNK = 0, 1
    FILE = "word_vocab.json"

    def __init__(self, words: Sequence[str]) -> None:
        self.words = ["<pad>", "<unk>", *words]
        self.index = {w: i for i, w in enumerate(self.words)}

    @classmethod
    def build(cls, texts: Sequence[str], size: int) -> "WordTokenizer":
        counts = Counter(w for t in texts for w in _WORD.findall(t.lower()))
        return cls([w for w, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:size]])

    @property
    def vocab_size(self) -> int:
        return len(self.words)

    @property
    def pad_id(self) -> int:
        return self.PAD

    def __call__(self, texts: Sequence[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows = [[self.index.get(w, self.UNK) for w in _WORD.findall(t.lower())][:max_length] or [self.UNK]
                for t in texts]
        width = max(len(r) for r in rows)
        ids = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.as_tensor(r)
        return ids, (ids != self.PAD).long()

    def save(self, folder: Path) -> None:
        (Path(folder) / self.FILE).write_text(json.dumps(self.words[2:]))

    @classmethod
    def load(cls, folder: Path) -> "WordTokenizer":
        return cls(json.loads((Path(folder) / cls.FILE).read_text()))


class HFTokenizer:
    """A `transformers` tokenizer behind the same call as WordTokenizer."""

    def __init__(self, name_or_path: str) -> None:
        from transformers import AutoTokenizer

        from ..resolve import resolve_model_name
        self.tok = AutoTokenizer.from_pretrained(resolve_model_name(name_or_path))

    @property
    def vocab_size(self) -> int:
        return len(self.tok)

    @property
    def pad_id(self) -> int:
        return self.tok.pad_token_id or 0

    def __call__(self, texts: Sequence[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        enc = self.tok(list(texts), truncation=True, max_length=max_length, padding=True, return_tensors="pt",
                       return_token_type_ids=False)
        return enc["input_ids"], enc["attention_mask"]

    def save(self, folder: Path) -> None:
        self.tok.save_pretrained(folder)
