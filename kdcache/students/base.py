"""What every student is: a module mapping (input_ids, attention_mask) to logits and pooled hidden states."""

from __future__ import annotations

import torch
from torch import nn


class Student(nn.Module):
    """forward(input_ids [B, L], attention_mask [B, L]) -> (logits [B, C], hidden: list of [B, H_i]).

    `hidden` lists the student's pooled representations (feature losses pick one by index);
    `hidden_sizes` gives their widths.
    """

    hidden_sizes: list[int]


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B, L, H] averaged over positions where mask [B, L] is 1."""
    m = mask.unsqueeze(-1).to(x.dtype)
    return (x * m).sum(1) / m.sum(1).clamp_min(1.0)
