"""Distillation losses on cached targets.

Conventions, which others have got wrong:
- the temperature T is applied here, at training time, to raw cached logits; KL-type losses are scaled by T² so
  their gradients keep the hard-label loss's scale as T changes (Hinton et al., 2015);
- the student is always normalised over its FULL output (log_softmax over every class / token);
- with top-k targets the teacher's mass outside the top-k is one tail bucket with its exact probability
  (1 - Σ top-k), and the student's tail is its own mass outside those ids: nothing is renormalised away.
  With k = number of classes the tail is empty and every sparse loss equals its dense version.

Shapes: N rows (examples or token positions), C classes (or V vocabulary), k cached ids per row.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

KINDS = ("kl", "reverse_kl", "jsd", "soft_ce", "mse")
_EPS = 1e-12


@dataclass
class TopKTargets:
    """Teacher targets for N rows at one temperature.

    ids: [N, k] int64 class/token ids; logprobs: [N, k] float32 teacher log-probabilities of those ids at
    temperature T (normalised over the FULL teacher output, so exp(logprobs).sum(-1) <= 1; the rest is the tail).
    """

    ids: torch.Tensor
    logprobs: torch.Tensor

    @classmethod
    def from_logits(cls, teacher_logits: torch.Tensor, temperature: float, k: int | None = None) -> "TopKTargets":
        """Top-k of dense teacher logits [N, C] (k=None: all of them); the top-k is taken on the raw logits."""
        logp = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
        if k is None or k >= teacher_logits.shape[-1]:
            ids = torch.arange(teacher_logits.shape[-1], device=teacher_logits.device).expand_as(logp)
            return cls(ids, logp)
        _, ids = teacher_logits.topk(k, dim=-1)
        return cls(ids, logp.gather(-1, ids))


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, stable at both ends and with finite gradients everywhere.

    Each branch gets a safe input: torch.where passes a zero gradient to the branch it did not pick, and
    0 · inf = NaN would otherwise poison training when the tail is empty (k = number of classes, x = 0).
    """
    x = x.clamp(max=-_EPS)
    near = x > -0.6931
    safe = torch.full_like(x, -1.0)
    return torch.where(near, torch.log(-torch.expm1(torch.where(near, x, safe))),
                       torch.log1p(-torch.exp(torch.where(near, safe, x))))


def _buckets(student_logits: torch.Tensor, t: TopKTargets, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities over k+1 buckets (the k ids, then the tail) for teacher and student: both [N, k+1].

    The student is normalised over its full output; its tail is log(1 - Σ_topk q). Only [N, k] extra memory.
    """
    s_logp_full = F.log_softmax(student_logits.float() / temperature, dim=-1)  # [N, C]
    s_top = s_logp_full.gather(-1, t.ids)                                       # [N, k]
    s_tail = _log1mexp(torch.logsumexp(s_top, dim=-1, keepdim=True))
    t_tail = _log1mexp(torch.logsumexp(t.logprobs, dim=-1, keepdim=True))
    return torch.cat([t.logprobs, t_tail], -1), torch.cat([s_top, s_tail], -1)


def _kl(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per row over the last dim; 0·log0 = 0."""
    p = logp.exp()
    return torch.where(p > 0, p * (logp - logq), torch.zeros_like(p)).sum(-1)


def kd_loss_per_row(student_logits: torch.Tensor, targets: TopKTargets, kind: str = "kl",
                    temperature: float = 1.0, beta: float = 0.5) -> torch.Tensor:
    """Distillation loss per row [N] (T² scaled) between student logits [N, C] and teacher top-k targets.

    kinds: kl = KL(teacher || student) (forward); reverse_kl = KL(student || teacher); jsd = generalised
    Jensen-Shannon with weight beta on the teacher, β·KL(p||m) + (1-β)·KL(q||m), m = β·p + (1-β)·q;
    soft_ce = -Σ p log q (KL plus the teacher's entropy).
    """
    if kind == "mse":
        raise ValueError("mse works on logits, not distributions: use mse_logits_loss")
    logp, logq = _buckets(student_logits, targets, temperature)
    if kind == "kl":
        loss = _kl(logp, logq)
    elif kind == "reverse_kl":
        loss = _kl(logq, logp)
    elif kind == "jsd":
        if not 0.0 < beta < 1.0:
            raise ValueError(f"jsd beta must be in (0, 1), got {beta}")
        logm = torch.logaddexp(logp + torch.log(torch.tensor(beta)), logq + torch.log(torch.tensor(1.0 - beta)))
        loss = beta * _kl(logp, logm) + (1.0 - beta) * _kl(logq, logm)
    elif kind == "soft_ce":
        loss = -(logp.exp() * logq).sum(-1)
    else:
        raise ValueError(f"unknown KD loss {kind!r}; one of {KINDS}")
    return loss * temperature ** 2


def mse_logits_loss_per_row(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean squared error between raw logits [N, C] per row [N] (the classic "soft-label MSE", no temperature)."""
    return (student_logits.float() - teacher_logits.float()).pow(2).mean(-1)


def dense_kd_loss_per_row(student_logits: torch.Tensor, teacher_logits: torch.Tensor, kind: str = "kl",
                          temperature: float = 1.0, beta: float = 0.5) -> torch.Tensor:
    """Any KD loss per row on full teacher logits [N, C] (the exact path for classification caches)."""
    if kind == "mse":
        return mse_logits_loss_per_row(student_logits, teacher_logits)
    return kd_loss_per_row(student_logits, TopKTargets.from_logits(teacher_logits, temperature), kind, temperature, beta)


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                      kind: str = "kl", temperature: float = 2.0, alpha: float = 0.5,
                      beta: float = 0.5) -> tuple[torch.Tensor, dict[str, float]]:
    """α·CE(hard labels) + (1-α)·KD per labelled row; KD alone on unlabelled rows (label < 0); mean over rows.

    student_logits, teacher_logits: [N, C]; labels: [N] int64, -1 = unlabelled. alpha=1 is hard labels only.
    """
    labelled = labels >= 0
    ce = F.cross_entropy(student_logits.float(), labels.clamp_min(0), reduction="none")
    ce_mean = ce[labelled].mean() if labelled.any() else ce.sum() * 0.0
    if alpha >= 1.0:  # hard labels only (the "twin" of a KD student): unlabelled rows teach nothing
        return ce_mean, {"ce": float(ce_mean.detach()), "kd": 0.0}
    kd = dense_kd_loss_per_row(student_logits, teacher_logits, kind, temperature, beta)
    per_row = torch.where(labelled, alpha * ce + (1.0 - alpha) * kd, kd)
    return per_row.mean(), {"ce": float(ce_mean.detach()), "kd": float(kd.detach().mean())}


def feature_loss(student: torch.Tensor, teacher: torch.Tensor, kind: str = "mse") -> torch.Tensor:
    """Loss between projected student features and teacher features, both [N, H] (or [N, T, H])."""
    student, teacher = student.float(), teacher.float()
    if kind == "mse":
        return F.mse_loss(student, teacher)
    if kind == "cosine":
        return (1.0 - F.cosine_similarity(student, teacher, dim=-1)).mean()
    raise ValueError(f"unknown feature loss {kind!r}; use mse or cosine")
