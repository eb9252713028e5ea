"""BiLSTM classifier, the classic distillation student (Tang et al., 2019): embeddings -> BiLSTM -> MLP."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .base import Student
from .lstm import bilstm


@dataclass(frozen=True)
class BiLSTMParams:
    embed_dim: int = 100
    hidden: int = 64
    layers: int = 1
    mlp: int = 128
    dropout: float = 0.2
    sparse_embedding: bool = False  # row-sparse embedding gradients: only a batch's rows are stepped


class BiLSTM(Student):
    def __init__(self, p: BiLSTMParams, vocab_size: int, num_labels: int, pad_id: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, p.embed_dim, padding_idx=pad_id, sparse=p.sparse_embedding)
        self.lstm = nn.LSTM(p.embed_dim, p.hidden, num_layers=p.layers, batch_first=True, bidirectional=True,
                            dropout=p.dropout if p.layers > 1 else 0.0)
        self.mlp = nn.Sequential(nn.Dropout(p.dropout), nn.Linear(2 * p.hidden, p.mlp), nn.ReLU(), nn.Dropout(p.dropout))
        self.out = nn.Linear(p.mlp, num_labels)
        self.hidden_sizes = [2 * p.hidden, p.mlp]

    def forward(self, input_ids, attention_mask):
        _, h = bilstm(self.lstm, self.embed(input_ids), attention_mask.sum(1))  # last layer, both directions
        m = self.mlp(h)
        return self.out(m), [h, m]
