"""TextCNN (Kim, 2014): word embeddings -> parallel 1-D convolutions -> max over time -> linear."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .base import Student


@dataclass(frozen=True)
class TextCNNParams:
    embed_dim: int = 128
    filters: int = 100
    kernel_sizes: tuple[int, ...] = (3, 4, 5)
    dropout: float = 0.5
    sparse_embedding: bool = False  # row-sparse embedding gradients: only a batch's rows are stepped


class TextCNN(Student):
    def __init__(self, p: TextCNNParams, vocab_size: int, num_labels: int, pad_id: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, p.embed_dim, padding_idx=pad_id, sparse=p.sparse_embedding)
        self.convs = nn.ModuleList(nn.Conv1d(p.embed_dim, p.filters, k, padding=k // 2) for k in p.kernel_sizes)
        self.drop = nn.Dropout(p.dropout)
        self.out = nn.Linear(p.filters * len(p.kernel_sizes), num_labels)
        self.hidden_sizes = [p.filters * len(p.kernel_sizes)]

    def forward(self, input_ids, attention_mask):
        x = self.embed(input_ids).transpose(1, 2)                     # [B, E, L]
        pad = (attention_mask == 0).unsqueeze(1)                      # [B, 1, L]
        pooled = [torch.relu(c(x))[..., : x.shape[-1]].masked_fill(pad, float("-inf")).amax(-1) for c in self.convs]
        h = torch.cat(pooled, -1)
        return self.out(self.drop(h)), [h]
