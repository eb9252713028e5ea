"""Every KD loss against a dense reference written out by hand; top-k with k = C equals dense; the tail is kept."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kdcache.losses import (TopKTargets, dense_kd_loss_per_row, distillation_loss, feature_loss, kd_loss_per_row,
                            mse_logits_loss_per_row)


def reference(kind, s, t, T, beta=0.5):
    """Textbook formulas on full softmaxes."""
    p, q = F.softmax(t / T, -1), F.softmax(s / T, -1)
    if kind == "kl":
        v = (p * (p.log() - q.log())).sum(-1)
    elif kind == "reverse_kl":
        v = (q * (q.log() - p.log())).sum(-1)
    elif kind == "soft_ce":
        v = -(p * q.log()).sum(-1)
    elif kind == "jsd":
        m = beta * p + (1 - beta) * q
        v = beta * (p * (p.log() - m.log())).sum(-1) + (1 - beta) * (q * (q.log() - m.log())).sum(-1)
    return v * T * T


def logits(n=6, c=5, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    # references in float64; the losses compute in float32
    return (torch.randn(n, c, generator=g, dtype=torch.float64) * scale,
            torch.randn(n, c, generator=g, dtype=torch.float64) * scale)


@pytest.mark.parametrize("kind", ["kl", "reverse_kl", "soft_ce", "jsd"])
@pytest.mark.parametrize("T", [1.0, 2.0, 4.0])
def test_dense_losses_equal_reference(kind, T):
    s, t = logits()
    got = dense_kd_loss_per_row(s.float(), t.float(), kind, T, beta=0.3)
    torch.testing.assert_close(got.double(), reference(kind, s, t, T, beta=0.3), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["kl", "reverse_kl", "soft_ce", "jsd"])
def test_topk_with_k_equal_classes_equals_dense_loss_and_gradient(kind):
    s, t = logits(n=8, c=7, seed=1)
    s1 = s.float().clone().requires_grad_()
    s2 = s.float().clone().requires_grad_()
    perm_k = TopKTargets.from_logits(t.float(), 2.0, k=7)  # topk ordering, all ids
    dense = dense_kd_loss_per_row(s1, t.float(), kind, 2.0)
    sparse = kd_loss_per_row(s2, perm_k, kind, 2.0)
    torch.testing.assert_close(sparse, dense, atol=1e-6, rtol=1e-6)
    dense.sum().backward()
    sparse.sum().backward()
    torch.testing.assert_close(s2.grad, s1.grad, atol=1e-6, rtol=1e-6)


def bucketed_reference(kind, s, t, T, k):
    """Teacher top-k ids plus ONE tail bucket holding the rest of each distribution, computed with masks."""
    p, q = F.softmax(t / T, -1), F.softmax(s / T, -1)
    ids = t.topk(k, -1).indices
    mask = torch.zeros_like(p, dtype=torch.bool).scatter(-1, ids, True)
    pb = torch.cat([p.gather(-1, ids), (p * ~mask).sum(-1, keepdim=True)], -1)
    qb = torch.cat([q.gather(-1, ids), (q * ~mask).sum(-1, keepdim=True)], -1)
    return reference(kind, qb.log() * T, pb.log() * T, T)


@pytest.mark.parametrize("kind", ["kl", "reverse_kl", "soft_ce", "jsd"])
@pytest.mark.parametrize("k", [1, 2, 4])
def test_topk_keeps_the_tail_bucket(kind, k):
    s, t = logits(n=5, c=9, seed=2)
    got = kd_loss_per_row(s.float(), TopKTargets.from_logits(t.float(), 1.5, k=k), kind, 1.5)
    torch.testing.assert_close(got.double(), bucketed_reference(kind, s, t, 1.5, k), atol=1e-5, rtol=1e-5)
    if kind in ("kl", "reverse_kl", "jsd"):  # merging outcomes never increases a divergence
        assert (got.double() <= reference(kind, s, t, 1.5) + 1e-6).all()


def test_tail_is_not_renormalised_away():
    """A student matching the teacher's top-k RATIOS but not its tail mass must still be penalised."""
    t = torch.tensor([[4.0, 3.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    s = torch.tensor([[4.0, 3.0, 2.0, 2.0, 2.0]], dtype=torch.float64)  # same top-2 ratio, much more mass outside the top-2
    got = kd_loss_per_row(s.float(), TopKTargets.from_logits(t.float(), 1.0, k=2), "kl", 1.0)
    assert got.item() > 0.05
    torch.testing.assert_close(got.double(), bucketed_reference("kl", s, t, 1.0, 2),
                               atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("x", [-1e-12, -1e-10, -1e-9, -1e-7, -0.5, -0.7, -3.0, -30.0])
def test_tail_log_mass_is_accurate_with_finite_gradient(x):
    """log(1 - exp(x)) near x = 0 is where an empty tail (k = C) lands; exp(x) rounds to 1 in float32 there."""
    from kdcache.losses import _log1mexp
    t = torch.tensor([x], dtype=torch.float32, requires_grad=True)
    y = _log1mexp(t)
    y.backward()
    assert torch.isfinite(t.grad).all(), "a NaN gradient here silently ruins every student trained on exact logits"
    expect = torch.log(-torch.expm1(torch.tensor(x, dtype=torch.float64)))
    assert y.item() == pytest.approx(expect.item(), rel=1e-3)


@pytest.mark.parametrize("kind", ["kl", "reverse_kl", "soft_ce", "jsd"])
def test_gradients_stay_finite_when_the_tail_is_empty(kind):
    """k = C with confident logits puts logsumexp of the top-k at exactly 0 in float32: no NaN may appear."""
    s = torch.tensor([[30.0, -30.0, 0.0], [0.0, 0.0, 0.0], [-5.0, 40.0, 1.0]], requires_grad=True)
    t = torch.tensor([[25.0, -20.0, 3.0], [60.0, 0.0, 0.0], [1.0, 2.0, 3.0]])
    loss = dense_kd_loss_per_row(s, t, kind, 1.0).sum()
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()
    ref = s.detach().double().requires_grad_()
    reference(kind, ref, t.double(), 1.0).sum().backward()
    torch.testing.assert_close(s.grad.double(), ref.grad, atol=1e-5, rtol=1e-4)


def test_temperature_scaling_is_t_squared():
    s, t = logits(seed=3)
    for T in (1.0, 3.0):
        raw = (F.softmax(t / T, -1) * (F.log_softmax(t / T, -1) - F.log_softmax(s / T, -1))).sum(-1)
        torch.testing.assert_close(dense_kd_loss_per_row(s.float(), t.float(), "kl", T).double(), raw * T * T,
                                   atol=1e-5, rtol=1e-5)


def test_mse_on_logits():
    s, t = logits(seed=4)
    torch.testing.assert_close(mse_logits_loss_per_row(s, t).double(), ((s - t) ** 2).mean(-1))


def test_alpha_mix_and_unlabelled_rows():
    s, t = logits(n=4, c=3, seed=5)
    labels = torch.tensor([0, 2, -1, 1])
    loss, _ = distillation_loss(s.float(), t.float(), labels, "kl", 2.0, alpha=0.25)
    ce = F.cross_entropy(s, labels.clamp_min(0), reduction="none")
    kd = reference("kl", s, t, 2.0)
    expect = torch.stack([0.25 * ce[0] + 0.75 * kd[0], 0.25 * ce[1] + 0.75 * kd[1], kd[2],
                          0.25 * ce[3] + 0.75 * kd[3]]).mean()
    torch.testing.assert_close(loss.double(), expect, atol=1e-5, rtol=1e-5)
    hard, parts = distillation_loss(s.float(), t.float(), labels, alpha=1.0)
    torch.testing.assert_close(hard.double(), ce[[0, 1, 3]].mean(), atol=1e-6, rtol=1e-6)
    assert parts["kd"] == 0.0


def test_feature_losses():
    a, b = logits(n=4, c=8, seed=6)
    torch.testing.assert_close(feature_loss(a, b, "mse").double(), ((a - b) ** 2).mean(), atol=1e-6, rtol=1e-6)
    cos = (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))
    torch.testing.assert_close(feature_loss(a, b, "cosine").double(), (1 - cos).mean(), atol=1e-6, rtol=1e-6)
    assert feature_loss(a, a * 3, "cosine").item() == pytest.approx(0.0, abs=1e-6)
