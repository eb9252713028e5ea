"""The shared optimiser recipe: the fused AdamW kernel takes the same steps as torch's reference loop, and the
schedule warms up linearly and decays to zero."""

from __future__ import annotations

import pytest
import torch

from kdcache.optim import adamw, warmup_linear


def test_fused_adamw_matches_the_reference_loop():
    torch.manual_seed(0)
    ref_net = torch.nn.Sequential(torch.nn.Embedding(500, 16), torch.nn.Linear(16, 3))
    net = torch.nn.Sequential(torch.nn.Embedding(500, 16), torch.nn.Linear(16, 3))
    net.load_state_dict(ref_net.state_dict())
    ref = torch.optim.AdamW(ref_net.parameters(), lr=1e-2, weight_decay=0.01, foreach=False, fused=False)
    opt = adamw(net.parameters(), 1e-2, 0.01)
    assert opt.defaults.get("fused"), "this CPU build of torch has a fused AdamW; it must be the one taken"
    for step in range(20):
        x, y = torch.randint(0, 500, (8, 5)), torch.randint(0, 3, (8,))
        for n, o in ((ref_net, ref), (net, opt)):
            o.zero_grad()
            torch.nn.functional.cross_entropy(n(x).mean(1), y).backward()
            o.step()
    for a, b in zip(ref_net.parameters(), net.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_warmup_then_linear_decay_to_zero():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = warmup_linear(opt, steps=10, warmup_ratio=0.2)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:3] == pytest.approx([0.5, 1.0, 1.0]) and lrs[-1] == pytest.approx(0.125)
    assert opt.param_groups[0]["lr"] == 0.0
