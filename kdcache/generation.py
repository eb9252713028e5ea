"""Continuing chat prompts with a causal LM (`transformers` generate), shared by both stages: the teacher writing
responses in capture (sequence-level KD, capture/chat.py) and students answering held-out prompts in evaluation
(train/chat.py). Prompts are batched longest first, left-padded with an attention mask, and each continuation is
cut after its first end-of-turn token."""

from __future__ import annotations

import contextlib
from typing import Any, Callable

import numpy as np
import torch


@torch.no_grad()
def continue_prompts(model: torch.nn.Module, prompts: list[np.ndarray], stop: int, max_new_tokens: int,
                     batch_size: int, device: torch.device, do_sample: bool = False, temperature: float = 1.0,
                     top_p: float = 1.0, max_length: int | None = None,
                     autocast: Callable[[], Any] = contextlib.nullcontext) -> tuple[list[np.ndarray], np.ndarray]:
    """(per prompt, the token ids the model wrote — through its first `stop`, or `max_new_tokens` of them, fewer
    where `max_length` leaves less room —, and per prompt whether it ended without `stop` [n] bool), in prompt
    order. Sampling draws from torch's global generator: seed it first for reproducible responses."""
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    out: list[np.ndarray] = [np.zeros(0, np.int64)] * len(prompts)
    cut = np.zeros(len(prompts), bool)
    for b in range(0, len(order), batch_size):
        members = order[b:b + batch_size]
        P = max(len(prompts[i]) for i in members)
        x = np.full((len(members), P), stop, np.int64)
        attention = np.zeros((len(members), P), np.int64)
        for j, i in enumerate(members):
            x[j, P - len(prompts[i]):], attention[j, P - len(prompts[i]):] = prompts[i], 1
        budget = max_new_tokens if max_length is None else min(max_new_tokens, max_length - P)
        with autocast():
            new = model.generate(input_ids=torch.as_tensor(x, device=device),
                                 attention_mask=torch.as_tensor(attention, device=device), max_new_tokens=budget,
                                 do_sample=do_sample, eos_token_id=stop, pad_token_id=stop,
                                 **({"temperature": temperature, "top_p": top_p} if do_sample else {}))[:, P:]
        for j, i in enumerate(members):
            r = new[j].cpu().numpy()
            end = np.flatnonzero(r == stop)
            out[i], cut[i] = (r[:end[0] + 1], False) if len(end) else (r, True)
    return out, cut
