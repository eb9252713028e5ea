"""A cross-task student: one word-level BiLSTM encoder shared by several tasks, with a linear head per task — per
word for token-classification tasks, on the mean and max of the word states for sequence-classification tasks."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from ..config import build
from .tokenizers import NUM_SHAPES

HEADS = ("sequence-classification", "token-classification")


@dataclass(frozen=True)
class MultiTaskParams:
    embed_dim: int = 100
    shape_dim: int = 16
    hidden: int = 128
    layers: int = 1
    dropout: float = 0.2


class MultiTaskBiLSTM(nn.Module):
    """Embeddings (word + shape) -> BiLSTM shared by every task -> the task's head."""

    def __init__(self, p: MultiTaskParams, vocab_size: int, heads: dict[str, tuple[str, int]]) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, p.embed_dim, padding_idx=0)
        self.shape = nn.Embedding(NUM_SHAPES, p.shape_dim, padding_idx=0)
        self.lstm = nn.LSTM(p.embed_dim + p.shape_dim, p.hidden, p.layers, batch_first=True, bidirectional=True)
        self.drop = nn.Dropout(p.dropout)
        self.kinds = {task: kind for task, (kind, _) in heads.items()}
        self.heads = nn.ModuleDict({task: nn.Linear(2 * p.hidden * (1 if kind == "token-classification" else 2), n)
                                    for task, (kind, n) in sorted(heads.items())})  # same init whatever the order

    def forward(self, task: str, ids, shapes, mask):
        """Logits of `task`: [B, W, C] per word, or [B, C] per sentence."""
        x = self.drop(torch.cat([self.embed(ids), self.shape(shapes)], -1))
        lengths = mask.sum(1).clamp_min(1).cpu()
        h, _ = self.lstm(pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False))
        h, _ = pad_packed_sequence(h, batch_first=True, total_length=ids.shape[1])
        if self.kinds[task] == "token-classification":
            return self.heads[task](self.drop(h))
        m = mask.unsqueeze(-1).to(h.dtype)
        mean = (h * m).sum(1) / m.sum(1).clamp_min(1)
        top = h.masked_fill(m == 0, torch.finfo(h.dtype).min).max(1).values
        return self.heads[task](self.drop(torch.cat([mean, top], -1)))


def build_multitask(params: dict, vocab_size: int, heads: dict[str, tuple[str, int]],
                    where: str = "student") -> MultiTaskBiLSTM:
    return MultiTaskBiLSTM(build(MultiTaskParams, params, f"{where}.params"), vocab_size, heads)
