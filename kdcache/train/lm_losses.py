"""The causal-LM losses of a batch read from an LM cache, packed (`lm_loss`: every position) or chat (`chat_loss`:
the response positions only): α·next-token CE + (1-α)·KD on the cached top-k + exact tail (or sampled) targets,
T² scaled, the student normalised over its whole vocabulary (losses.py). `loss` is a `LossConfig` or anything with
its fields `kind, temperature, alpha, beta, targets, chunk` (`LossTerms`): this module imports no config, so the
public API (kdcache.api) can use it."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

from ..lmhead import chunk_positions
from .losses import (LOG_TINY, SampledTargets, TopKTargets, kd_loss_per_row, sampled_kd_loss_per_row,
                     token_ce_per_row)


@dataclass(frozen=True)
class LossTerms:
    """The fields of a `LossConfig` these losses read (for callers without a pipeline: kdcache.api)."""

    kind: str = "kl"
    temperature: float = 1.0
    alpha: float = 0.5
    beta: float = 0.5
    targets: str = "topk"
    chunk: int | None = 32


def lm_targets(batch: dict[str, Any], loss: Any, lm: dict[str, Any]):
    """The KD targets of a batch, flattened to one row per position, at the loss's temperature (the config loader
    and `check_cache` made sure the cache holds them)."""
    T = loss.temperature
    if loss.targets == "sampled":
        return padded_samples(batch["sample_ids"], batch["sample_counts"], batch["sample_lengths"].reshape(-1))
    j = lm["temperatures"].index(T)
    k = batch["topk_ids"].shape[-1]
    t = TopKTargets.from_cached(batch["topk_ids"].reshape(-1, k), batch["topk_logits"].reshape(-1, k),
                                batch["lse"][..., j].reshape(-1), batch["tail"][..., j].reshape(-1), T)
    if loss.targets == "topk-renorm":  # the naive baseline: tail dropped, top-k renormalised to sum to 1
        t = TopKTargets(t.ids, torch.log_softmax(t.logprobs, -1), torch.full_like(t.tail, LOG_TINY))
    return t


def padded_samples(ids: torch.Tensor, counts: torch.Tensor, lengths: torch.Tensor) -> SampledTargets:
    """Flat position-major sampled ids/counts with per-position lengths [N] -> padded [N, max length]."""
    n, m = lengths.shape[0], int(lengths.max())
    pos = torch.repeat_interleave(torch.arange(n), lengths)
    start = torch.cumsum(lengths, 0) - lengths
    within = torch.arange(ids.shape[0]) - torch.repeat_interleave(start, lengths)
    out_ids = torch.zeros(n, m, dtype=torch.long)
    out_counts = torch.zeros(n, m, dtype=torch.long)
    out_ids[pos, within] = ids
    out_counts[pos, within] = counts
    return SampledTargets(out_ids, out_counts)


def next_token_labels(ids: torch.Tensor) -> torch.Tensor:
    """[B, L] input ids -> [B*L] next-token labels (-100 at each sequence's last position)."""
    return torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], 1).reshape(-1)


def _kd_rows(flat: torch.Tensor, t: Any, loss: Any) -> torch.Tensor:
    """KD per row [N] of student logits [N, V] against top-k or sampled targets (temperature and T² applied)."""
    if isinstance(t, SampledTargets):
        return sampled_kd_loss_per_row(flat, t, loss.temperature, loss.chunk)
    return kd_loss_per_row(flat, t, loss.kind, loss.temperature, loss.beta, loss.chunk)


def lm_loss(logits: torch.Tensor, batch: dict[str, Any], loss: Any,
            lm: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
    """α·next-token CE + (1-α)·KD per position, mean over positions; α = 1 is the CE-only twin."""
    V = logits.shape[-1]
    flat = logits.reshape(-1, V)
    labels = next_token_labels(batch["input_ids"]).to(flat.device)
    ce = token_ce_per_row(flat, labels, loss.chunk)
    has = labels >= 0
    ce_mean = ce[has].mean()
    if loss.alpha >= 1.0:
        return ce_mean, {"ce": float(ce_mean.detach()), "kd": 0.0}
    kd = _kd_rows(flat, lm_targets(batch, loss, lm).to(flat.device), loss)
    per = torch.where(has, loss.alpha * ce, torch.zeros_like(ce)) + (1.0 - loss.alpha) * kd
    return per.mean(), {"ce": float(ce_mean.detach()), "kd": float(kd.detach().mean())}


@dataclass
class AtTargets:
    """A chat student's last hidden states at the batch's N target positions [N, H] and its output head
    (lmhead.OutputHead): `chat_loss` makes the logits a chunk of positions at a time and recomputes them in the
    backward pass, so training never holds [N, V]; `logits()` makes them all at once (evaluation)."""

    hidden: torch.Tensor
    head: Any

    def logits(self) -> torch.Tensor:
        return self.head.logits(self.hidden)


def response_logits(logits: torch.Tensor, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """(the student's logits [N, V] at the batch's target positions, the tokens that follow them [N]) from logits
    [B, L, V] of the right-padded input_ids [B, L], or from logits already taken there ([N, V])."""
    index = batch["target_index"].to(logits.device)
    nxt = batch["input_ids"].reshape(-1).to(logits.device)[index + 1]
    return (logits if logits.dim() == 2 else logits.reshape(-1, logits.shape[-1])[index]), nxt


def _rows(t: Any, a: int, b: int) -> Any:
    """Targets of rows a..b (a TopKTargets or SampledTargets slice)."""
    return type(t)(**{f.name: (v[a:b] if torch.is_tensor(v) else v) for f in fields(t) for v in [getattr(t, f.name)]})


def chat_loss(logits: torch.Tensor | AtTargets, batch: dict[str, Any], loss: Any, lm: dict[str, Any],
              chunk: int = 0) -> tuple[torch.Tensor, dict[str, float]]:
    """α·CE + (1-α)·KD per response position, mean over them (α = 1: the SFT twin on the same positions). The
    student's log-softmax runs over its full vocabulary (losses.py); temperature and T² are applied there. Given
    `AtTargets`, the logits are made `chunk` positions at a time (0: lmhead.CHUNK_BYTES of float32 logits) under
    activation checkpointing: the same loss and gradients as the dense [N, V] path, with memory bounded by a chunk."""
    dense = not isinstance(logits, AtTargets)
    flat, labels = response_logits(logits if dense else logits.hidden, batch)
    t = lm_targets(batch, loss, lm).to(flat.device) if loss.alpha < 1.0 else None

    def per_row(z: torch.Tensor, labels: torch.Tensor, t: Any) -> torch.Tensor:  # [2, n]: CE and KD per row
        ce = token_ce_per_row(z, labels, loss.chunk)
        return torch.stack([ce, _kd_rows(z, t, loss) if t is not None else torch.zeros_like(ce)])

    if dense:
        both = per_row(flat, labels, t)
    else:
        head, n = logits.head, len(labels)
        size = chunk_positions(chunk, head.linear.weight.shape[0], flat.device)
        run = lambda h, y, tt: per_row(head.logits(h), y, tt)  # noqa: E731  ([chunk, V] made, reduced, dropped)
        parts = []
        for a in range(0, n, size):
            args = (flat[a:a + size], labels[a:a + size], None if t is None else _rows(t, a, a + size))
            parts.append(checkpoint(run, *args, use_reentrant=False) if torch.is_grad_enabled() else run(*args))
        both = torch.cat(parts, 1)
    ce, kd = both[0], both[1]
    if loss.alpha >= 1.0:
        return ce.mean(), {"ce": float(ce.detach().mean()), "kd": 0.0}
    return (loss.alpha * ce + (1.0 - loss.alpha) * kd).mean(), {"ce": float(ce.detach().mean()),
                                                                 "kd": float(kd.detach().mean())}
