"""A bidirectional LSTM over right-padded batches without packing: the BiLSTM students' recurrence.

On a packed sequence `torch.nn.LSTM` runs its recurrence as a dozen small autograd operations per time step and
direction, and on a CPU that graph's bookkeeping, not the arithmetic, is most of a BiLSTM student's step. On a
padded batch it uses the fused kernel instead (oneDNN on CPU, cuDNN on GPU, each with its own backward pass). So
each direction runs as a one-way LSTM over rows that start at their first token (forward) or, reversed within
their length, at their last (backward); padding then only ever follows a row's real tokens, and is never read.
The weights stay the `nn.LSTM` module's, so checkpoints are unchanged; outputs and gradients equal the packed
`nn.LSTM`'s to float rounding (tests/test_students.py), in about a third of the time (docs/benchmarks.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_WEIGHTS = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")


def _reverse_index(lengths: torch.Tensor, T: int) -> torch.Tensor:
    """[B, T] positions that reverse each row within its length and leave its padding in place (an involution)."""
    t = torch.arange(T, device=lengths.device).unsqueeze(0)
    n = lengths.unsqueeze(1)
    return torch.where(t < n, n - 1 - t, t)


def bilstm(lstm: nn.LSTM, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Run a bidirectional, batch-first `nn.LSTM`'s weights over x [B, T, E] whose rows are `lengths` long
    (right-padded). Returns (outputs [B, T, 2H], zero past each row's end; last [B, 2H]: the last layer's final
    forward and backward states), as `nn.LSTM` gives on the packed sequence."""
    if not (lstm.bidirectional and lstm.batch_first) or lstm.proj_size or not lstm.bias:
        raise ValueError("bilstm: needs a bidirectional, batch-first nn.LSTM with biases and no projection")
    B, T, _ = x.shape
    lengths = lengths.to(x.device).clamp(1, T)
    rev = _reverse_index(lengths, T).unsqueeze(-1)
    mask = (torch.arange(T, device=x.device).unsqueeze(0) < lengths.unsqueeze(1)).unsqueeze(-1).to(x.dtype)
    zeros = x.new_zeros(1, B, lstm.hidden_size)
    for layer in range(lstm.num_layers):
        if layer and lstm.training and lstm.dropout:
            x = F.dropout(x, lstm.dropout, True)
        # each direction as a one-way LSTM over rows that start at their first (forward) or last (backward) token
        fwd, bwd = (torch.lstm(inp, (zeros, zeros), [getattr(lstm, f"{w}_l{layer}{sfx}") for w in _WEIGHTS],
                               True, 1, 0.0, lstm.training, False, True)[0]
                    for inp, sfx in ((x, ""), (x.gather(1, rev.expand_as(x)), "_reverse")))
        bwd = bwd.gather(1, rev.expand_as(bwd))
        x = torch.cat([fwd, bwd], -1) * mask
    last = torch.cat([fwd[torch.arange(B, device=x.device), lengths - 1], bwd[:, 0]], -1)
    return x, last
