"""The teacher: load any `transformers` model for a head, and run it once over rows.

`TeacherRunner.run` batches by length (sorting inside windows, keeping row order on output), runs under
`torch.inference_mode()` in eval mode, does pooling on the device, and uses autocast on GPU (fp32 on CPU).
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from .config import FeaturesConfig, TeacherConfig
from .errors import KdcacheError
from .failpoints import failpoint
from .fingerprint import FingerprintError, hash_ids, hash_state_dict, hash_weight_files
from .resolve import resolve_model_name

log = logging.getLogger(__name__)


class TeacherError(KdcacheError):
    """The teacher cannot be loaded or produced bad outputs; the message says which and what to do."""



def auto_class(head: str):
    import transformers
    try:
        return {"sequence-classification": transformers.AutoModelForSequenceClassification,
                "token-classification": transformers.AutoModelForTokenClassification,
                "causal-lm": transformers.AutoModelForCausalLM}[head]
    except KeyError:
        raise TeacherError(f"unknown teacher head {head!r}; supported: sequence-classification, "
                           "token-classification, causal-lm") from None


def load_tokenizer(cfg: TeacherConfig):
    from transformers import AutoTokenizer
    name = cfg.tokenizer or cfg.model
    if not name:
        raise TeacherError("teacher.tokenizer (or teacher.model) is required to tokenize inputs")
    return AutoTokenizer.from_pretrained(resolve_model_name(name), revision=cfg.revision if not cfg.tokenizer else None)


def build_model(cfg: TeacherConfig, label_names: Sequence[str], seed: int = 0) -> tuple[torch.nn.Module, bool]:
    """The teacher model with a head for `label_names`; returns (model, head_is_trained)."""
    import transformers
    cls = auto_class(cfg.head)
    labels = {"num_labels": len(label_names), "id2label": dict(enumerate(label_names)),
              "label2id": {n: i for i, n in enumerate(label_names)}}
    torch.manual_seed(seed)
    if cfg.from_config:
        conf = dict(cfg.from_config)
        model_type = conf.pop("model_type", None)
        if not model_type:
            raise TeacherError("teacher.from_config needs `model_type` (e.g. bert)")
        return cls.from_config(transformers.AutoConfig.for_model(model_type, **conf, **labels)), False
    if not cfg.model:
        raise TeacherError("teacher.model or teacher.from_config is required")
    path = resolve_model_name(cfg.model)
    model, info = cls.from_pretrained(path, revision=cfg.revision, output_loading_info=True,
                                      dtype=torch.float32, **labels)
    return model, not info["missing_keys"]


def model_identity(model: torch.nn.Module, name: str, revision: str | None) -> dict[str, Any]:
    """What identifies the teacher's weights for the fingerprint: a hash of its weight files, else of its tensors."""
    folder = getattr(model, "name_or_path", "") or getattr(model.config, "_name_or_path", "")
    try:
        weights = hash_weight_files(folder) if folder and Path(folder).is_dir() else hash_state_dict(model.state_dict())
    except FingerprintError:
        weights = hash_state_dict(model.state_dict())
    commit = getattr(model.config, "_commit_hash", None)
    return {"name": name, "revision": revision or commit, "weights_sha256": weights,
            "class": type(model).__name__, "num_labels": getattr(model.config, "num_labels", None),
            "parameters": sum(p.numel() for p in model.parameters())}


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def pick_dtype(precision: str, device: torch.device) -> torch.dtype:
    """fp32 on CPU unless asked otherwise (bf16 is ~5x slower on CPUs without AVX-512); bf16/fp16 autocast on GPU."""
    table = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    if precision == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if precision not in table:
        raise TeacherError(f"teacher.precision {precision!r}: use auto, fp32, fp16 or bf16")
    return table[precision]


@dataclass
class TeacherOutputs:
    """One shard's teacher outputs, in input row order.

    logits: [rows, C] float32; features: name -> [rows, H] (pooled) or [tokens, H] plus "offsets" [rows+1] int64
    (pooling `tokens`); input_hash: [rows] int64; num_tokens: [rows] int32; truncated: [rows] bool.
    """

    logits: np.ndarray
    features: dict[str, np.ndarray]
    input_hash: np.ndarray
    num_tokens: np.ndarray
    truncated: np.ndarray


class TeacherRunner:
    """Runs a loaded teacher over rows of text, length-batched, returning `TeacherOutputs`."""

    HEAD = "sequence-classification"
    POOLINGS = ("cls", "mean", "tokens")

    def __init__(self, model: torch.nn.Module, tokenizer: Any, max_length: int, batch_size: int,
                 sort_window: int, features: FeaturesConfig, precision: str = "auto", device: str = "auto") -> None:
        self.device = pick_device(device)
        self.dtype = pick_dtype(precision, self.device)
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.batch_size = batch_size
        self.window = batch_size * max(1, sort_window)
        self.features = features
        n_hidden = getattr(model.config, "num_hidden_layers", None)
        self.layers = [self._resolve_layer(i, n_hidden) for i in features.layers]
        if self.layers and features.pooling not in self.POOLINGS:
            raise TeacherError(f"cache.features.pooling {features.pooling!r}: a {self.HEAD} teacher keeps "
                               f"{' or '.join(self.POOLINGS)} features; set cache.features.pooling to one of them")
        self.feature_dtype = {"float16": np.float16, "float32": np.float32}.get(features.dtype)
        if self.feature_dtype is None:
            raise TeacherError(f"cache.features.dtype {features.dtype!r}: use float16 or float32")

    @staticmethod
    def _resolve_layer(i: int, n_hidden: int | None) -> int:
        if n_hidden is None:
            return i
        j = i + n_hidden + 1 if i < 0 else i
        if not 0 <= j <= n_hidden:
            raise TeacherError(f"cache.features.layers: layer {i} does not exist (the teacher has hidden states "
                               f"0..{n_hidden}, 0 = embeddings)")
        return j

    def _autocast(self):
        if self.device.type == "cuda" and self.dtype != torch.float32:
            return torch.autocast("cuda", dtype=self.dtype)
        if self.device.type == "cpu" and self.dtype != torch.float32:
            return torch.autocast("cpu", dtype=self.dtype)
        return contextlib.nullcontext()

    def tokenize(self, texts: Sequence[str], pairs: Sequence[str] | None = None) -> tuple[list[list[int]], np.ndarray]:
        """Token ids per row (truncated to max_length) and whether each row was truncated."""
        enc = self.tokenizer(list(texts), list(pairs) if pairs is not None else None, truncation=True,
                             max_length=self.max_length, return_attention_mask=False, return_token_type_ids=False)
        ids = enc["input_ids"]
        truncated = np.zeros(len(ids), dtype=bool)
        full = [i for i, x in enumerate(ids) if len(x) >= self.max_length]  # only these can have been cut
        if full:
            long = self.tokenizer([texts[i] for i in full], [pairs[i] for i in full] if pairs is not None else None,
                                  truncation=False, return_attention_mask=False, return_token_type_ids=False,
                                  verbose=False)["input_ids"]
            for i, x in zip(full, long):
                truncated[i] = len(x) > self.max_length
        return ids, truncated

    def _batches(self, lengths: np.ndarray) -> list[np.ndarray]:
        """Row indices per batch: sorted by length (longest first) inside windows of `sort_window` batches."""
        out = []
        for w0 in range(0, len(lengths), self.window):
            idx = np.arange(w0, min(w0 + self.window, len(lengths)))
            idx = idx[np.argsort(-lengths[idx], kind="stable")]
            out += [idx[b:b + self.batch_size] for b in range(0, len(idx), self.batch_size)]
        return out

    @torch.inference_mode()
    def run(self, texts: Sequence[str], pairs: Sequence[str] | None = None,
            on_batch: Callable[[int], None] | None = None, row_ids: Sequence[str] | None = None) -> TeacherOutputs:
        ids, truncated = self.tokenize(texts, pairs)
        lengths = np.array([len(x) for x in ids], dtype=np.int32)
        n = len(ids)
        logits_dev: list[tuple[np.ndarray, torch.Tensor]] = []
        feats_dev: dict[str, list[torch.Tensor]] = {f"layer_{j}": [] for j in self.layers}
        want_hidden = bool(self.layers)
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        for batch in self._batches(lengths):
            width = int(lengths[batch].max())
            input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for r, i in enumerate(batch):
                input_ids[r, :lengths[i]] = torch.as_tensor(ids[i])
                mask[r, :lengths[i]] = 1
            if self.device.type == "cuda":
                input_ids, mask = input_ids.pin_memory(), mask.pin_memory()
            input_ids = input_ids.to(self.device, non_blocking=True)
            mask = mask.to(self.device, non_blocking=True)
            with self._autocast():
                out = self.model(input_ids=input_ids, attention_mask=mask, output_hidden_states=want_hidden)
            logits = out.logits.float()
            bad = ~torch.isfinite(logits).all(dim=-1)
            if bad.any():
                where = sorted(int(batch[r]) for r in bad.nonzero()[:, 0].tolist())
                rows = [row_ids[i] for i in where] if row_ids is not None else where
                raise TeacherError(f"teacher produced NaN/inf logits for rows {rows[:10]}; nothing was written. "
                                   "Check the teacher weights, or use precision fp32")
            logits_dev.append((batch, logits))
            failpoint("teacher-batch")
            for j in self.layers:
                feats_dev[f"layer_{j}"].append(self._pool(out.hidden_states[j], mask))
            if on_batch:
                on_batch(len(batch))
        order = np.concatenate([b for b, _ in logits_dev])
        inverse = np.empty(n, dtype=np.int64)
        inverse[order] = np.arange(n)
        logits = torch.cat([t for _, t in logits_dev]).cpu().numpy()[inverse]
        features = {name: self._unsort(parts, order, inverse, lengths) for name, parts in feats_dev.items()}
        if self.features.pooling == "tokens" and self.layers:
            features["offsets"] = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
        input_hash = np.array([hash_ids(np.asarray(x)) for x in ids], dtype=np.int64)
        return TeacherOutputs(logits.astype(np.float32), features, input_hash, lengths, truncated)

    def _pool(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        """[batch, seq, H] -> [batch, H] (cls/mean), or a list of [len_i, H] (tokens); stays on the device."""
        hidden = hidden.float()
        if self.features.pooling == "cls":
            return hidden[:, 0]
        if self.features.pooling == "mean":
            m = mask.unsqueeze(-1).to(hidden.dtype)
            return (hidden * m).sum(1) / m.sum(1).clamp_min(1)
        return [hidden[r, : int(mask[r].sum())] for r in range(hidden.shape[0])]

    def _unsort(self, parts: list, order: np.ndarray, inverse: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        if self.features.pooling != "tokens":
            return torch.cat(parts).cpu().numpy()[inverse].astype(self.feature_dtype)
        flat = [t for p in parts for t in p]  # in batch order; put rows back in input order
        rows = [None] * len(flat)
        for pos, row in enumerate(order):
            rows[row] = flat[pos]
        return torch.cat(rows).cpu().numpy().astype(self.feature_dtype)


def teacher_log_level() -> None:
    """Keep transformers' load reports and per-file progress bars quiet unless the user asked for them."""
    import transformers
    if "TRANSFORMERS_VERBOSITY" not in os.environ:
        transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
