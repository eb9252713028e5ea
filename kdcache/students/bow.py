"""fastText-style bag of words: mean word embedding -> linear classifier."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .base import Student, masked_mean


@dataclass(frozen=True)
class BowParams:
    embed_dim: int = 64
    dropout: float = 0.1
    sparse_embedding: bool = False  # row-sparse embedding gradients: only a batch's rows are stepped


class BagOfWords(Student):
    def __init__(self, p: BowParams, vocab_size: int, num_labels: int, pad_id: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, p.embed_dim, padding_idx=pad_id, sparse=p.sparse_embedding)
        self.drop = nn.Dropout(p.dropout)
        self.out = nn.Linear(p.embed_dim, num_labels)
        self.hidden_sizes = [p.embed_dim]

    def forward(self, input_ids, attention_mask):
        h = masked_mean(self.embed(input_ids), attention_mask)
        return self.out(self.drop(h)), [h]
