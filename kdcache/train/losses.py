"""Distillation losses on cached targets.

Conventions, which others have got wrong:
- the temperature T is applied here, at training time, to raw cached logits; KL-type losses are scaled by T² so
  their gradients keep the hard-label loss's scale as T changes (Hinton et al., 2015);
- the student is always normalised over its FULL output (log_softmax over every class / token);
- with top-k targets the teacher's mass outside the top-k is one tail bucket with its exact probability
  (1 - Σ top-k), and the student's tail is its own mass outside those ids: nothing is renormalised away.
  With k = number of classes there is no tail bucket at all, so every sparse loss IS its dense version.
- computation is in float32, or float64 when the inputs are float64 (never narrower than the input).

Shapes: N rows (examples or token positions), C classes (or V vocabulary), k cached ids per row.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .loss_names import KD_KINDS as KINDS

_EPS = 1e-12


def _wide(x: torch.Tensor) -> torch.Tensor:
    """x in the dtype the losses compute in: float64 stays float64, anything else becomes float32."""
    return x if x.dtype == torch.float64 else x.float()


@dataclass
class TopKTargets:
    """Teacher targets for N rows at one temperature.

    ids: [N, k] int64 class/token ids; logprobs: [N, k] float32 teacher log-probabilities of those ids at
    temperature T (normalised over the FULL teacher output, so exp(logprobs).sum(-1) <= 1; the rest is the tail);
    tail: [N] float32 exact log-mass of every other id, or None to derive it as log(1 - Σ exp(logprobs)) (fine
    for a few classes; for a vocabulary the cache stores it, because that difference cancels when the tail is small).
    present: [N, k] bool or None (all present). Targets projected onto another vocabulary (train/crosstok.py) have
    fewer distinct ids than slots: an absent slot repeats a present id of its row and carries no mass on either side.
    """

    ids: torch.Tensor
    logprobs: torch.Tensor
    tail: torch.Tensor | None = None
    present: torch.Tensor | None = None

    @classmethod
    def from_logits(cls, teacher_logits: torch.Tensor, temperature: float, k: int | None = None) -> "TopKTargets":
        """Top-k of dense teacher logits [N, C] (k=None: all of them); the top-k is taken on the raw logits."""
        logp = F.log_softmax(_wide(teacher_logits) / temperature, dim=-1)
        if k is None or k >= teacher_logits.shape[-1]:
            ids = torch.arange(teacher_logits.shape[-1], device=teacher_logits.device).expand_as(logp)
            return cls(ids, logp)
        _, ids = teacher_logits.topk(k, dim=-1)
        return cls(ids, logp.gather(-1, ids), torch.logsumexp(logp.scatter(-1, ids, float("-inf")), dim=-1))

    @classmethod
    def from_cached(cls, ids: torch.Tensor, logits: torch.Tensor, lse: torch.Tensor, tail: torch.Tensor,
                    temperature: float) -> "TopKTargets":
        """From an LM cache row at one cached temperature T: raw top-k logits [N, k] (float16 on disk),
        logsumexp(z / T) of the FULL logits [N] and the tail's exact log-mass [N] (both float32).
        log p_i = z_i / T - lse_T, exact up to the float16 rounding of z_i (<= 2^-8 / T relative per id)."""
        logprobs = (_wide(logits) / temperature - _wide(lse)[:, None]).clamp(max=0.0)
        return cls(ids.long(), logprobs, _wide(tail))

    def to(self, device: torch.device | str) -> "TopKTargets":
        return TopKTargets(self.ids.to(device), self.logprobs.to(device),
                           None if self.tail is None else self.tail.to(device),
                           None if self.present is None else self.present.to(device))


@dataclass
class SampledTargets:
    """Random-sampling KD targets: for each of N rows, n draws from the teacher at the cache's sampling
    temperature, kept as distinct ids [N, m] with their counts [N, m] (padding: count 0)."""

    ids: torch.Tensor
    counts: torch.Tensor

    def to(self, device: torch.device | str) -> "SampledTargets":
        return SampledTargets(self.ids.to(device), self.counts.to(device))

    def weights(self) -> torch.Tensor:
        """counts / draws per row: an unbiased estimate of the teacher's probabilities of those ids."""
        c = self.counts.float()
        return c / c.sum(-1, keepdim=True).clamp_min(1.0)


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


class _ChunkedLogSumExp(torch.autograd.Function):
    """logsumexp(x / T) over the last dim and, when `exclude` ids are given, also the log-sum-exp of every other id,
    row chunk by row chunk in one pass, saving only x and the results [N]: the backward recomputes the softmaxes
    per chunk, so no [N, V] intermediate outlives a chunk (and small chunks stay in cache: faster too)."""

    @staticmethod
    def forward(ctx, x, temperature, chunk, exclude):
        full = torch.empty(x.shape[:-1], dtype=_wide(x[:0]).dtype, device=x.device)
        rest = torch.empty_like(full) if exclude is not None else None
        for a in range(0, x.shape[0], chunk):
            z = _wide(x[a:a + chunk]) / temperature
            full[a:a + chunk] = torch.logsumexp(z, dim=-1)
            if exclude is not None:
                rest[a:a + chunk] = torch.logsumexp(z.scatter_(-1, exclude[a:a + chunk], float("-inf")), dim=-1)
        ctx.save_for_backward(x, full, *(() if exclude is None else (rest, exclude)))
        ctx.temperature, ctx.chunk = temperature, chunk
        return (full, rest) if exclude is not None else full

    @staticmethod
    def backward(ctx, g_full, g_rest=None):
        x, full, *more = ctx.saved_tensors
        T, chunk = ctx.temperature, ctx.chunk
        gx = torch.empty_like(x)
        for a in range(0, x.shape[0], chunk):
            z = _wide(x[a:a + chunk]) / T
            g = torch.exp(z - full[a:a + chunk, None]).mul_(g_full[a:a + chunk, None] / T)
            if more and g_rest is not None:
                rest, exclude = more
                p = torch.exp(z.scatter_(-1, exclude[a:a + chunk], float("-inf")) - rest[a:a + chunk, None])
                g.add_(p.nan_to_num_(nan=0.0).mul_(g_rest[a:a + chunk, None] / T))  # NaN: every id excluded
            gx[a:a + chunk] = g.to(x.dtype)
        return gx, None, None, None


def logsumexp_t(x: torch.Tensor, temperature: float = 1.0, chunk: int | None = None) -> torch.Tensor:
    """logsumexp(x / T, -1) of [N, V]. With `chunk`, the memory-lean chunked version (same value and gradient,
    no second [N, V] tensor kept for backward)."""
    if chunk is None:
        return torch.logsumexp(_wide(x) / temperature, dim=-1)
    return _ChunkedLogSumExp.apply(x, float(temperature), int(chunk), None)


def logsumexp_split(x: torch.Tensor, ids: torch.Tensor, temperature: float = 1.0,
                    chunk: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(logsumexp(x / T) over every id, logsumexp over the ids NOT in `ids` [N, k]), both [N], in one pass."""
    if chunk is None:
        z = _wide(x) / temperature
        return torch.logsumexp(z, dim=-1), torch.logsumexp(z.scatter(-1, ids, float("-inf")), dim=-1)
    return _ChunkedLogSumExp.apply(x, float(temperature), int(chunk), ids)


LOG_TINY = -80.0  # log of a mass below float32 resolution: an empty tail, kept finite so 0·log0 stays 0


def _buckets(student_logits: torch.Tensor, t: TopKTargets, temperature: float,
             chunk: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities over k+1 buckets (the k ids, then the tail) for teacher and student: both [N, k+1]; over
    the k ids alone when they cover every class (k = C: the dense distributions, exactly, with no tail bucket).

    The student is normalised over its full output (its log-sum-exp over every class/token); its tail is the
    log-sum-exp over the ids NOT in the top-k (exact even when the top-k holds nearly all of the student's mass,
    where log(1 - Σ q) would cancel). Extra memory is [N, k], plus [chunk, V] transiently when `chunk` is given.
    """
    if t.ids.shape[-1] >= student_logits.shape[-1]:  # top-k ids are distinct, so these are all of them
        s_lse = logsumexp_t(student_logits, temperature, chunk)
        return t.logprobs, _wide(student_logits.gather(-1, t.ids)) / temperature - s_lse[:, None]
    s_lse, s_rest = logsumexp_split(student_logits, t.ids, temperature, chunk)        # [N], [N]
    s_top = _wide(student_logits.gather(-1, t.ids)) / temperature - s_lse[:, None]   # [N, k]
    if t.present is not None:  # a repeated id is counted once, in its present slot
        s_top = s_top.masked_fill(~t.present, LOG_TINY)
    s_tail = (s_rest - s_lse).clamp(min=LOG_TINY)[:, None]
    t_tail = (t.tail.clamp(min=LOG_TINY)[:, None] if t.tail is not None
              else _log1mexp(torch.logsumexp(t.logprobs, dim=-1, keepdim=True)))
    return torch.cat([t.logprobs, t_tail], -1), torch.cat([s_top, s_tail], -1)


def _kl(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per row over the last dim; 0·log0 = 0."""
    p = logp.exp()
    return torch.where(p > 0, p * (logp - logq), torch.zeros_like(p)).sum(-1)


def kd_loss_per_row(student_logits: torch.Tensor, targets: TopKTargets, kind: str = "kl",
                    temperature: float = 1.0, beta: float = 0.5, chunk: int | None = None) -> torch.Tensor:
    """Distillation loss per row [N] (T² scaled) between student logits [N, C] and teacher top-k targets.

    kinds: kl = KL(teacher || student) (forward); reverse_kl = KL(student || teacher); jsd = generalised
    Jensen-Shannon with weight beta on the teacher, β·KL(p||m) + (1-β)·KL(q||m), m = β·p + (1-β)·q;
    soft_ce = -Σ p log q (KL plus the teacher's entropy); uld = `uld_loss_per_row` (not T²-scaled). `chunk`: memory-lean student normalisation.
    """
    if kind == "mse":
        raise ValueError("mse works on logits, not distributions: use mse_logits_loss")
    if kind == "uld":
        return uld_loss_per_row(student_logits, targets, temperature, chunk)
    logp, logq = _buckets(student_logits, targets, temperature, chunk)
    return _divergence(logp, logq, kind, beta) * temperature ** 2


def _divergence(logp: torch.Tensor, logq: torch.Tensor, kind: str, beta: float) -> torch.Tensor:
    """The KD divergence per row between teacher log-probabilities logp and the student's logq (same buckets)."""
    if kind == "kl":
        return _kl(logp, logq)
    if kind == "reverse_kl":
        return _kl(logq, logp)
    if kind == "jsd":
        if not 0.0 < beta < 1.0:
            raise ValueError(f"jsd beta must be in (0, 1), got {beta}")
        logm = torch.logaddexp(logp + math.log(beta), logq + math.log(1.0 - beta))
        return beta * _kl(logp, logm) + (1.0 - beta) * _kl(logq, logm)
    if kind == "soft_ce":
        return -(logp.exp() * logq).sum(-1)
    raise ValueError(f"unknown KD loss {kind!r}; one of {KINDS}")


def uld_loss_per_row(student_logits: torch.Tensor, targets: TopKTargets, temperature: float = 1.0,
                     chunk: int | None = None) -> torch.Tensor:
    """Universal Logit Distillation (Boizard et al., 2024) per row [N]: the L1 distance between the teacher's and the
    student's probabilities, each sorted in decreasing order, so no id needs to match across vocabularies. The
    teacher's cached top-k are its k largest; the student's k largest are compared with them and the remaining mass
    of each as one bucket (the cached tail makes that exact). Not T²-scaled: it compares probabilities, not logits."""
    k = targets.logprobs.shape[-1]
    p_top = targets.logprobs.exp().sort(-1, descending=True).values
    s_lse = logsumexp_t(student_logits, temperature, chunk)
    q_top = (_wide(student_logits.topk(min(k, student_logits.shape[-1]), -1).values) / temperature
             - s_lse[:, None]).exp()
    if q_top.shape[-1] < k:
        q_top = F.pad(q_top, (0, k - q_top.shape[-1]))
    p_tail = targets.tail.exp() if targets.tail is not None else (1.0 - p_top.sum(-1)).clamp_min(0.0)
    return (p_top - q_top).abs().sum(-1) + (p_tail - (1.0 - q_top.sum(-1)).clamp_min(0.0)).abs()


def sampled_kd_loss_per_row(student_logits: torch.Tensor, targets: SampledTargets, temperature: float = 1.0,
                            chunk: int | None = None) -> torch.Tensor:
    """Unbiased estimate (value and gradient) of the soft cross-entropy -Σ p log q per row [N], T² scaled, from
    sampled targets; it equals forward KL plus the teacher's entropy, a constant. `temperature` must be the
    one the samples were drawn at. The student is normalised over its full output."""
    s_lse = logsumexp_t(student_logits, temperature, chunk)
    s_logq = _wide(student_logits.gather(-1, targets.ids.long())) / temperature - s_lse[:, None]
    return -(targets.weights() * s_logq).sum(-1) * temperature ** 2


def token_ce_per_row(student_logits: torch.Tensor, labels: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """Cross-entropy per row [N] against hard ids [N] (rows with label < 0 give 0), full normalisation."""
    lse = logsumexp_t(student_logits, 1.0, chunk)
    picked = _wide(student_logits.gather(-1, labels.clamp_min(0)[:, None]))[:, 0]
    return torch.where(labels >= 0, lse - picked, torch.zeros_like(lse))


def mse_logits_loss_per_row(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean squared error between raw logits [N, C] per row [N] (the classic "soft-label MSE", no temperature)."""
    return (_wide(student_logits) - _wide(teacher_logits)).pow(2).mean(-1)


def dense_kd_loss_per_row(student_logits: torch.Tensor, teacher_logits: torch.Tensor, kind: str = "kl",
                          temperature: float = 1.0, beta: float = 0.5) -> torch.Tensor:
    """Any KD loss per row on full teacher logits [N, C] (the exact path for classification caches)."""
    if kind == "mse":
        return mse_logits_loss_per_row(student_logits, teacher_logits)
    if kind == "uld":
        return kd_loss_per_row(student_logits, TopKTargets.from_logits(teacher_logits, temperature), kind, temperature)
    # every class is a target: no tail bucket, so both sides are plain log-softmaxes (half the top-k path's cost)
    logp = F.log_softmax(_wide(teacher_logits) / temperature, -1)
    logq = F.log_softmax(_wide(student_logits) / temperature, -1)
    return _divergence(logp, logq, kind, beta) * temperature ** 2


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                      kind: str = "kl", temperature: float = 2.0, alpha: float = 0.5,
                      beta: float = 0.5) -> tuple[torch.Tensor, dict[str, float]]:
    """α·CE(hard labels) + (1-α)·KD per labelled row; KD alone on unlabelled rows (label < 0); mean over rows.

    student_logits, teacher_logits: [N, C]; labels: [N] int64, -1 = unlabelled. alpha=1 is hard labels only.
    """
    labelled = labels >= 0
    ce = F.cross_entropy(_wide(student_logits), labels.clamp_min(0), reduction="none")
    ce_mean = (ce * labelled).sum() / labelled.sum().clamp_min(1)  # no unlabelled row counts (and no host sync)
    if alpha >= 1.0:  # hard labels only (the "twin" of a KD student): unlabelled rows teach nothing
        return ce_mean, {"ce": float(ce_mean.detach()), "kd": 0.0}
    kd = dense_kd_loss_per_row(student_logits, teacher_logits, kind, temperature, beta)
    per_row = torch.where(labelled, alpha * ce + (1.0 - alpha) * kd, kd)
    return per_row.mean(), {"ce": float(ce_mean.detach()), "kd": float(kd.detach().mean())}


def ensemble_logits(teacher_logits: torch.Tensor, weights: torch.Tensor, temperature: float) -> torch.Tensor:
    """Logits [N, C] whose softmax at `temperature` is the weighted mean of the teachers' distributions at it:
    T·log Σ_t w_t softmax(z_t / T). teacher_logits: [N, teachers, C]; weights: [teachers], summing to 1."""
    logp = F.log_softmax(_wide(teacher_logits) / temperature, -1)
    return temperature * torch.logsumexp(logp + weights.to(logp).log()[None, :, None], dim=1)


def multi_teacher_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, weights: torch.Tensor,
                       labels: torch.Tensor, kind: str = "kl", temperature: float = 2.0, alpha: float = 0.5,
                       beta: float = 0.5, ensemble: str = "mean") -> tuple[torch.Tensor, dict[str, float]]:
    """`distillation_loss` with several teachers (teacher_logits [N, teachers, C], weights [teachers] summing to 1):
    `mean` distils the weighted mean distribution (`ensemble_logits`), `terms` sums one weighted loss per teacher
    (the hard-label term once in all: the weights sum to 1)."""
    if ensemble == "mean":
        return distillation_loss(student_logits, ensemble_logits(teacher_logits, weights, temperature), labels, kind,
                                 temperature, alpha, beta)
    if ensemble != "terms":
        raise ValueError(f"unknown ensemble {ensemble!r}; use mean or terms")
    total, parts = student_logits.new_zeros(()), {"ce": 0.0, "kd": 0.0}
    for t in range(teacher_logits.shape[1]):
        value, p = distillation_loss(student_logits, teacher_logits[:, t], labels, kind, temperature, alpha, beta)
        total = total + weights[t] * value
        parts = {k: parts[k] + float(weights[t]) * p[k] for k in parts}
    return total, parts


def feature_loss(student: torch.Tensor, teacher: torch.Tensor, kind: str = "mse") -> torch.Tensor:
    """Loss between projected student features and teacher features, both [N, H] (or [N, T, H])."""
    student, teacher = _wide(student), _wide(teacher)
    if kind == "mse":
        return F.mse_loss(student, teacher)
    if kind == "cosine":
        return (1.0 - F.cosine_similarity(student, teacher, dim=-1)).mean()
    raise ValueError(f"unknown feature loss {kind!r}; use mse or cosine")
