"""A cross-task student: the BiLSTM tagger's word-level encoder shared by several tasks, with a linear head per
task — per word for token-classification tasks, on the mean and max of the word states for sequence
classification."""

from __future__ import annotations

import torch
from torch import nn

from ..heads import WORD_ROWS, has
from .tagger import BiLSTMTagger, BiLSTMTaggerParams


class MultiTaskBiLSTM(BiLSTMTagger):
    """Embeddings (word + shape) -> BiLSTM shared by every task -> the task's head."""

    def __init__(self, p: BiLSTMTaggerParams, vocab_size: int, heads: dict[str, tuple[str, int]]) -> None:
        super().__init__(p, vocab_size, num_labels=1)
        del self.out  # one head per task instead
        self.per_word = {task: has(kind, WORD_ROWS) for task, (kind, _) in heads.items()}  # else per sentence
        self.heads = nn.ModuleDict({task: nn.Linear(2 * p.hidden * (1 if self.per_word[task] else 2), n)
                                    for task, (kind, n) in sorted(heads.items())})  # same init whatever the order

    def forward(self, task: str, ids, shapes, mask):
        """Logits of `task`: [B, W, C] per word, or [B, C] per sentence."""
        h = self.encode(ids, shapes, mask)
        if self.per_word[task]:
            return self.heads[task](self.drop(h))
        m = mask.unsqueeze(-1).to(h.dtype)
        mean = (h * m).sum(1) / m.sum(1).clamp_min(1)
        top = h.masked_fill(m == 0, torch.finfo(h.dtype).min).max(1).values
        return self.heads[task](self.drop(torch.cat([mean, top], -1)))
