"""Causal-LM targets reduced from the teacher's logits a chunk of positions at a time, so that capture memory is
bounded by the chunk, not by the batch: the model's body runs once per batch, its output layer (and whatever the
model applies after it, e.g. Gemma's final logit soft-capping) runs on `chunk` positions at a time, and each
float32 chunk [chunk, V] is reduced to the cached targets and dropped. The unchunked reference is
`reduce(model(x).logits)`; both give the same top-k ids, hits and draws, and values within one float32 ulp (a
chunk's matmul may round its last bit apart from the whole batch's; tested for Llama and Gemma 3 configs)."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from ..lmhead import CHUNK_BYTES, OutputHead, chunk_positions  # noqa: F401 (re-exported for capture)
from .runner import refuse_non_finite


def reduce(z: torch.Tensor, nxt: torch.Tensor, k: int, temperatures: Sequence[float]) -> dict[str, torch.Tensor]:
    """Targets of logits z [N, V] (float32) whose next tokens are nxt [N] (any id where there is none): top-k ids
    and raw logits, log-sum-exp and exact log-mass outside the top-k per temperature [N, T], the next-token loss
    (nats) and whether the top-1 is the next token."""
    vals, ids = z.topk(min(k, z.shape[-1]), dim=-1)
    lse, tail = [], []
    for T in temperatures:
        zt = z / T
        lse_t = torch.logsumexp(zt, -1)
        lse.append(lse_t)
        tail.append(torch.logsumexp(zt.scatter_(-1, ids, float("-inf")), -1) - lse_t)
    lse1 = lse[list(temperatures).index(1.0)] if 1.0 in temperatures else torch.logsumexp(z, -1)
    nxt = nxt.to(z.device)  # (a teacher over several devices ends on its last one)
    nll = lse1 - z.gather(-1, nxt[:, None])[:, 0]
    return {"topk_ids": ids, "topk_logits": vals.half(), "lse": torch.stack(lse, -1), "tail": torch.stack(tail, -1),
            "nll": nll, "top1": ids[:, 0] == nxt}


def next_ids(x: torch.Tensor) -> torch.Tensor:
    """Next token per position of x [B, L], flattened [B·L]; the last position of a row gets 0 (dropped later)."""
    return torch.cat([x[:, 1:], torch.zeros_like(x[:, :1])], 1).reshape(-1)


def shaped(parts: dict[str, list[torch.Tensor]], B: int, L: int) -> dict[str, torch.Tensor]:
    """Per-chunk targets [n, ...] joined and reshaped to [B, L, ...]; next-token loss and hit to [B, L - 1]."""
    out = {key: torch.cat(v).reshape(B, L, *v[0].shape[1:]) for key, v in parts.items()}
    out["nll"], out["top1"] = out["nll"][:, :-1], out["top1"][:, :-1]
    return out


def draw(z: torch.Tensor, n: int, T: float, gen: torch.Generator) -> torch.Tensor:
    """n draws per row from softmax(z / T) for logits z [N, V], sorted per row: [N, n]."""
    return torch.multinomial(torch.softmax(z / T, -1), n, replacement=True, generator=gen).sort(-1).values


def pack_draws(draws: np.ndarray, B: int, L: int, out: dict[str, list]) -> None:
    """Sorted draws [B·L, n] kept as distinct ids with counts (ascending id order) per row, and lengths [B, L]."""
    new = np.ones_like(draws, dtype=bool)
    new[:, 1:] = draws[:, 1:] != draws[:, :-1]
    starts = np.flatnonzero(new.ravel())                                      # runs never cross rows
    counts = np.diff(np.append(starts, draws.size))
    lengths = new.sum(-1).reshape(B, L)
    ids = draws.ravel()[starts]
    bounds = np.concatenate([[0], np.cumsum(lengths.sum(-1))])
    out.setdefault("sample_ids", []).extend(ids[bounds[i]:bounds[i + 1]] for i in range(B))
    out.setdefault("sample_counts", []).extend(counts[bounds[i]:bounds[i + 1]] for i in range(B))
    out.setdefault("sample_lengths", []).append(lengths)


def chunked_targets(logits_of: Any, nxt: torch.Tensor, rows: torch.Tensor, size: int, k: int,
                    temperatures: Sequence[float], samples: int = 0, sample_temperature: float = 1.0,
                    gen: torch.Generator | None = None) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """Targets [n, ...] of n positions whose next tokens are nxt [n] (from batch rows `rows` [n], named when a
    logit is not finite), their float32 logits [c, V] for a slice of them coming from `logits_of(slice)`, `size`
    positions at a time; plus the sorted draws [n, samples] (or None)."""
    n = len(nxt)
    parts: dict[str, list[torch.Tensor]] = {}
    draws = []
    for start in range(0, n, size):
        sl = slice(start, min(start + size, n))
        z = logits_of(sl)
        refuse_non_finite(z, rows[sl].tolist())
        for key, v in reduce(z, nxt[sl], k, temperatures).items():
            parts.setdefault(key, []).append(v)
        if samples:
            draws.append(draw(z, samples, sample_temperature, gen))
        del z
    return {key: torch.cat(v) for key, v in parts.items()}, (torch.cat(draws) if draws else None)
