"""What every head's teacher runner shares: the device and precision (autocast on GPU, fp32 on CPU), length-sorted
batching inside windows, padding onto the device, feature-layer resolution, and refusing NaN/inf outputs."""

from __future__ import annotations

import contextlib
from typing import Callable, Sequence

import numpy as np
import torch

from .devices import pick_device, pick_dtype, placed
from .models import TeacherError


_probes: list[Callable] = []  # see probe_batches


@contextlib.contextmanager
def probe_batches(fn: Callable[["BatchRunner", torch.Tensor, torch.Tensor], None]):
    """While open, fn(runner, input_ids, attention_mask) runs before every teacher batch of every head: the bench
    times the bare forward on the capture's own batches, each in turn with the capture's (experiments/bench.py)."""
    _probes.append(fn)
    try:
        yield
    finally:
        _probes.remove(fn)


class BatchRunner:
    """A loaded teacher on its device, in eval mode, with the batching every head's runner uses."""

    def __init__(self, model: torch.nn.Module, batch_size: int, sort_window: int = 1, precision: str = "auto",
                 device: str = "auto") -> None:
        self.device = pick_device(device)
        self.dtype = pick_dtype(precision, self.device)
        # a model placed by accelerate (`teacher.device_map`) or split by transformers (`teacher.tp_plan`) stays
        # where it is: hooks or the device mesh move inputs and outputs
        self.model = (model if placed(model) else model.to(self.device)).eval()
        self.batch_size = batch_size
        self.window = batch_size * max(1, sort_window)

    def autocast(self):
        if self.dtype != torch.float32:
            return torch.autocast(self.device.type, dtype=self.dtype)
        return contextlib.nullcontext()

    def batches(self, lengths: np.ndarray) -> list[np.ndarray]:
        """Row indices per batch: sorted by length (longest first) inside windows of `sort_window` batches."""
        out = []
        for w0 in range(0, len(lengths), self.window):
            idx = np.arange(w0, min(w0 + self.window, len(lengths)))
            idx = idx[np.argsort(-lengths[idx], kind="stable")]
            out += [idx[b:b + self.batch_size] for b in range(0, len(idx), self.batch_size)]
        return out

    def padded(self, ids: Sequence[Sequence[int]], batch: np.ndarray, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask) [len(batch), longest] of the batch's rows, on the device (pinned on GPU)."""
        input_ids, mask = pad_rows(ids, batch, pad_id)
        if self.device.type == "cuda":
            input_ids, mask = input_ids.pin_memory(), mask.pin_memory()
        input_ids, mask = input_ids.to(self.device, non_blocking=True), mask.to(self.device, non_blocking=True)
        for probe in _probes:
            probe(self, input_ids, mask)
        return input_ids, mask

    def layers(self, wanted: Sequence[int]) -> list[int]:
        """Feature layer indices resolved against the teacher's depth (0 = embeddings, -1 = last layer)."""
        n_hidden = getattr(self.model.config, "num_hidden_layers", None)
        out = []
        for i in wanted:
            j = i + n_hidden + 1 if n_hidden is not None and i < 0 else i
            if n_hidden is not None and not 0 <= j <= n_hidden:
                raise TeacherError(f"cache.features.layers: layer {i} does not exist (the teacher has hidden states "
                                   f"0..{n_hidden}, 0 = embeddings)")
            out.append(j)
        return out


def pad_rows(ids: Sequence[Sequence[int]], rows: Sequence[int], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) [len(rows), longest] int64 of the chosen rows' token ids, right-padded."""
    lengths = [len(ids[i]) for i in rows]
    input_ids = torch.full((len(rows), max(lengths)), pad_id, dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    for r, (i, n) in enumerate(zip(rows, lengths)):
        input_ids[r, :n] = torch.as_tensor(ids[i])
        mask[r, :n] = 1
    return input_ids, mask


class TextRunner(BatchRunner):
    """A teacher over tokenised text, with the hidden layers to keep (classification and token heads)."""

    def __init__(self, model: torch.nn.Module, tokenizer, max_length: int, batch_size: int, sort_window: int,
                 features, precision: str = "auto", device: str = "auto") -> None:
        super().__init__(model, batch_size, sort_window, precision, device)
        self.tokenizer, self.max_length, self.features = tokenizer, max_length, features
        self.feature_layers = self.layers(features.layers)
        self.feature_dtype = np.dtype(features.dtype)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    @classmethod
    def for_task(cls, model: torch.nn.Module, tokenizer, task, device: str) -> "TextRunner":
        c = task.cache
        return cls(model, tokenizer, c.max_length, c.batch_size, c.sort_window, c.features, task.teacher.precision,
                   device)


def refuse_non_finite(logits: torch.Tensor, rows: Sequence) -> None:
    """Raise naming the rows whose logits [B, ...] hold NaN/inf, before anything of theirs is written."""
    bad = ~torch.isfinite(logits.flatten(1)).all(dim=-1)
    if bad.any():
        where = sorted(rows[r] for r in bad.nonzero()[:, 0].tolist())
        raise TeacherError(f"teacher produced NaN/inf logits for rows {where[:10]}; nothing was written. "
                           "Check the teacher weights, or use precision fp32")
