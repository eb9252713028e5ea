"""The BiLSTM students' recurrence (students/lstm.py: each direction over padded rows, the fused kernel) against
the packed `nn.LSTM` it replaced, the simple reference: outputs, final states, gradients and training steps."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import kdcache.students.bilstm
import kdcache.students.tagger
from kdcache.optim import adamw
from kdcache.students import build_student
from kdcache.students.lstm import bilstm


def packed_lstm(lstm: nn.LSTM, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What the students computed before: nn.LSTM on the packed sequence (an empty row counts one position)."""
    packed = pack_padded_sequence(x, lengths.clamp_min(1).cpu(), batch_first=True, enforce_sorted=False)
    out, (h_n, _) = lstm(packed)
    return (pad_packed_sequence(out, batch_first=True, total_length=x.shape[1])[0],
            torch.cat([h_n[-2], h_n[-1]], -1))


@pytest.mark.parametrize("layers", [1, 2])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
def test_bilstm_equals_the_packed_lstm_in_outputs_states_and_gradients(layers, dtype, tol):
    torch.manual_seed(0)
    lstm = nn.LSTM(12, 8, layers, batch_first=True, bidirectional=True).to(dtype)
    lengths = torch.tensor([11, 1, 4, 0, 11, 7, 2])  # full rows, a one-token row, an empty row
    x = torch.randn(len(lengths), 11, 12, dtype=dtype, requires_grad=True)
    w_out, w_last = torch.randn(len(lengths), 11, 16, dtype=dtype), torch.randn(len(lengths), 16, dtype=dtype)
    got = []
    for fn in (bilstm, packed_lstm):
        lstm.zero_grad()
        x.grad = None
        out, last = fn(lstm, x, lengths)
        ((out * w_out).sum() + (last * w_last).sum()).backward()
        got.append([out, last, x.grad, *(p.grad for p in lstm.parameters())])
    for name, a, b in zip(["outputs", "last", "input grad", *(n for n, _ in lstm.named_parameters())], *got):
        torch.testing.assert_close(a, b, atol=tol, rtol=tol, msg=lambda m: f"{name}: {m}")
    out = got[0][0]
    assert (out[2, 4:] == 0).all() and (x.grad[2, 4:] == 0).all()  # padding neither read nor written
    assert out[2, :4].abs().min() > 0


def _steps(model: nn.Module, inputs: tuple, labels: torch.Tensor, n: int = 3) -> list[torch.Tensor]:
    torch.manual_seed(1)  # the same dropout draws for both versions (the LSTM kernels draw none)
    opt = adamw(model.parameters(), 1e-2, 0.01)
    model.train()
    for _ in range(n):
        out = model(*inputs)
        logits = out[0] if isinstance(out, tuple) else out
        nn.functional.cross_entropy(logits.flatten(0, -2), labels.flatten(), ignore_index=-100).backward()
        opt.step()
        opt.zero_grad()
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("arch", ["bilstm", "bilstm-tagger"])
def test_a_bilstm_student_takes_the_same_training_steps_as_with_the_packed_lstm(arch, monkeypatch):
    torch.manual_seed(0)
    ids = torch.randint(2, 60, (6, 9))
    mask = (torch.arange(9) < torch.tensor([9, 3, 1, 6, 9, 2]).unsqueeze(1)).long()
    ids = ids * mask
    if arch == "bilstm":
        sizes, inputs, labels = (60, 3, 0), (ids, mask), torch.tensor([0, 1, 2, 0, 1, 2])
    else:
        shapes = torch.randint(1, 4, ids.shape) * mask
        sizes, inputs, labels = (60, 5), (ids, shapes, mask), torch.randint(0, 5, ids.shape).masked_fill(mask == 0, -100)
    torch.manual_seed(3)
    fused = build_student(arch, {"embed_dim": 16, "hidden": 8}, *sizes)
    packed = build_student(arch, {"embed_dim": 16, "hidden": 8}, *sizes)
    packed.load_state_dict(fused.state_dict())
    before = {k: v.clone() for k, v in fused.state_dict().items()}
    after_fused = _steps(fused, inputs, labels)
    module = kdcache.students.bilstm if arch == "bilstm" else kdcache.students.tagger
    monkeypatch.setattr(module, "bilstm", packed_lstm)
    after_packed = _steps(packed, inputs, labels)
    for (name, _), a, b in zip(packed.named_parameters(), after_fused, after_packed):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")
        if name.startswith("lstm."):
            assert not torch.allclose(a, before[name]), f"{name} did not move: the comparison would be empty"
