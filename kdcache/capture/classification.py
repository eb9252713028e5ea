"""Sequence classification in stage one: the teacher's full logits per example (exact float32) and, optionally,
hidden states of chosen layers pooled per example (cls / mean) or kept per token."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import pyarrow as pa
import torch

from ..heads import SEQUENCE
from ..config import TaskConfig
from ..failpoints import failpoint
from ..fingerprint import hash_ids
from ..metrics import classification_metrics, log_softmax
from .head import CaptureHead
from .runner import TextRunner, pad_rows, refuse_non_finite


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


class SequenceRunner(TextRunner):
    """Runs a sequence classifier over rows of text, length-batched, returning `TeacherOutputs`; pooling happens
    on the device, under `torch.inference_mode()`."""

    def tokenize(self, texts: Sequence[str], pairs: Sequence[str] | None = None) -> tuple[list[list[int]], np.ndarray]:
        """Token ids per row (truncated to max_length) and whether each row was truncated."""
        return tokenize_bounded(self.tokenizer, texts, pairs, self.max_length)

    @torch.inference_mode()
    def run(self, texts: Sequence[str], pairs: Sequence[str] | None = None,
            on_batch: Callable[[int], None] | None = None, row_ids: Sequence[str] | None = None) -> TeacherOutputs:
        ids, truncated = self.tokenize(texts, pairs)
        lengths = np.array([len(x) for x in ids], dtype=np.int32)
        n = len(ids)
        logits_dev: list[tuple[np.ndarray, torch.Tensor]] = []
        feats_dev: dict[str, list[torch.Tensor]] = {f"layer_{j}": [] for j in self.feature_layers}
        want_hidden = bool(self.feature_layers)
        for batch in self.batches(lengths):
            input_ids, mask = self.padded(ids, batch, self.pad_id)
            with self.autocast():
                out = self.model(input_ids=input_ids, attention_mask=mask, output_hidden_states=want_hidden)
            logits = out.logits.float()
            refuse_non_finite(logits, [row_ids[i] if row_ids is not None else int(i) for i in batch])
            logits_dev.append((batch, logits))
            failpoint("teacher-batch")
            for j in self.feature_layers:
                feats_dev[f"layer_{j}"].append(self._pool(out.hidden_states[j], mask))
            if on_batch:
                on_batch(len(batch))
        order = np.concatenate([b for b, _ in logits_dev])
        inverse = np.empty(n, dtype=np.int64)
        inverse[order] = np.arange(n)
        logits = torch.cat([t for _, t in logits_dev]).cpu().numpy()[inverse]
        features = {name: self._unsort(parts, order, inverse) for name, parts in feats_dev.items()}
        if self.features.pooling == "tokens" and self.feature_layers:
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

    def _unsort(self, parts: list, order: np.ndarray, inverse: np.ndarray) -> np.ndarray:
        if self.features.pooling != "tokens":
            return torch.cat(parts).cpu().numpy()[inverse].astype(self.feature_dtype)
        flat = [t for p in parts for t in p]  # in batch order; put rows back in input order
        rows = [None] * len(flat)
        for pos, row in enumerate(order):
            rows[row] = flat[pos]
        return torch.cat(rows).cpu().numpy().astype(self.feature_dtype)


class SequenceClassification(CaptureHead):
    name = SEQUENCE
    auto_class = "AutoModelForSequenceClassification"

    def runner(self, model, tokenizer, task, device):
        return SequenceRunner.for_task(model, tokenizer, task, device)

    def run(self, runner, rows, task, seed, on_batch):
        fields = task.data.text_fields
        return runner.run(rows[fields[0]], rows[fields[1]] if len(fields) > 1 else None, on_batch=on_batch,
                          row_ids=rows["id"])

    def merge_rows(self, parts, rows):
        def gather(get):
            first = get(parts[0][1])
            out = np.empty((rows, *first.shape[1:]), first.dtype)
            for idx, o in parts:
                out[idx] = get(o)
            return out
        return TeacherOutputs(gather(lambda o: o.logits),
                              {k: gather(lambda o, k=k: o.features[k]) for k in parts[0][1].features},
                              gather(lambda o: o.input_hash), gather(lambda o: o.num_tokens),
                              gather(lambda o: o.truncated))

    def table(self, rows, out, row_start, split, schema, task):
        n = len(rows["id"])
        labels = np.asarray(rows["label"], dtype=np.int32)
        num_labels = out.logits.shape[1]
        return pa.Table.from_pydict({
            "row_id": pa.array(np.arange(row_start, row_start + n, dtype=np.int64)),
            "id": pa.array(rows["id"], pa.string()),
            **{c: pa.array(rows[c], pa.string()) for c in task.data.text_fields},
            "label": pa.array(labels, pa.int32(), mask=labels < 0),
            "logits": pa.FixedSizeListArray.from_arrays(pa.array(out.logits.reshape(-1), pa.float32()), num_labels),
            "input_hash": pa.array(out.input_hash, pa.int64()),
            "num_tokens": pa.array(out.num_tokens, pa.int32()),
            "truncated": pa.array(out.truncated, pa.bool_()),
        }, schema=schema)

    def shard_features(self, out):
        return out.features or None

    def stats(self, rows, out, label_names):
        labels = np.asarray(rows["label"])
        logp = log_softmax(out.logits)
        labelled = labels >= 0
        return {"rows": int(len(labels)), "labelled": int(labelled.sum()),
                "label_counts": np.bincount(labels[labelled], minlength=len(label_names)).tolist(),
                "correct": int((out.logits.argmax(1)[labelled] == labels[labelled]).sum()),
                "entropy_sum": float(_entropy(logp).sum()), "confidence_sum": float(np.exp(logp.max(1)).sum()),
                "truncated": int(out.truncated.sum()),
                "tokens_sum": int(out.num_tokens.sum()), "max_tokens": int(out.num_tokens.max(initial=0))}

    def summarise(self, stats):
        tot = {k: sum(s[k] for s in stats)
               for k in ("rows", "labelled", "correct", "entropy_sum", "truncated", "tokens_sum", "seconds")}
        rows = max(tot["rows"], 1)
        # (shards written by kdcache before label counts were kept have none: no baseline then)
        counts = np.sum([s["label_counts"] for s in stats], axis=0) if all("label_counts" in s for s in stats) else []
        return {"rows": tot["rows"], "labelled_rows": tot["labelled"],
                "teacher_accuracy": tot["correct"] / tot["labelled"] if tot["labelled"] else None,
                # the best constant guess on this split: what a teacher must beat (sanity.py)
                "majority_accuracy": float(np.max(counts)) / tot["labelled"] if tot["labelled"] and np.size(counts)
                else None,
                "mean_entropy_nats": tot["entropy_sum"] / rows, "truncated_rows": tot["truncated"],
                # the teacher's mean top probability: how sure it is where no label says whether it is right
                "mean_confidence": sum(s["confidence_sum"] for s in stats) / rows
                if all("confidence_sum" in s for s in stats) else None,
                "mean_tokens": tot["tokens_sum"] / rows,
                "max_tokens": max((s["max_tokens"] for s in stats), default=0),
                # teacher forward + tokenisation only (not I/O); resumed shards count their original time
                "teacher_rows_per_s": tot["rows"] / tot["seconds"] if tot["seconds"] else None}

    def labelled_rows(self, ds):
        return _labelled(ds)

    def finetune_examples(self, tokenizer, ds, task):
        ds = ds.select(_labelled(ds))
        if len(ds) == 0:
            return [], []
        return _encode(tokenizer, ds, task), list(ds["label"][:])

    def finetune_loss(self, logits, targets):
        return torch.nn.functional.cross_entropy(logits, torch.as_tensor(targets))

    def quality(self, summary):
        if summary.get("teacher_accuracy") is None or summary.get("majority_accuracy") is None:
            return None
        return ("accuracy", summary["teacher_accuracy"], "majority-class", summary["majority_accuracy"],
                summary["mean_entropy_nats"])

    @torch.inference_mode()
    def finetune_eval(self, model, tokenizer, ds, task, label_names, batch_size: int = 64):
        """Accuracy, majority-class accuracy and mean entropy of the classifier on the labelled rows of `ds`."""
        model.eval()
        ds = ds.select(_labelled(ds))
        ids = _encode(tokenizer, ds, task)
        labels = np.array(ds["label"][:])
        logits = []
        for b in range(0, len(ids), batch_size):
            input_ids, mask = pad_rows(ids, range(b, min(b + batch_size, len(ids))), tokenizer.pad_token_id or 0)
            logits.append(model(input_ids=input_ids, attention_mask=mask).logits.float().numpy())
        if not logits:
            return {}
        logits = np.concatenate(logits)
        pred = logits.argmax(1)
        return {"teacher_accuracy": classification_metrics(pred, labels, pred, len(label_names))["accuracy"],
                "majority_accuracy": float(np.bincount(labels, minlength=len(label_names)).max() / len(labels)),
                "mean_entropy_nats": float(_entropy(log_softmax(logits)).mean())}


def _entropy(logp: np.ndarray) -> np.ndarray:
    """Entropy in nats per row [N] of log-probabilities [N, C]."""
    return -(np.exp(logp) * logp).sum(1)


def _labelled(ds: Any) -> list[int]:
    """Rows with a gold label (what the teacher fine-tunes and is evaluated on)."""
    return [i for i, y in enumerate(ds["label"][:]) if y >= 0]


def _encode(tokenizer: Any, ds: Any, task: TaskConfig) -> list[list[int]]:
    fields = task.data.text_fields
    pairs = ds[fields[1]][:] if len(fields) > 1 else None
    return tokenize_bounded(tokenizer, ds[fields[0]][:], pairs, task.cache.max_length)[0]


CHARS_PER_TOKEN = 64  # a text is cut to max_length · 64 characters before tokenising: no more than the teacher reads


def tokenize_bounded(tokenizer: Any, texts: Sequence[str], pairs: Sequence[str] | None,
                     max_length: int) -> tuple[list[list[int]], np.ndarray]:
    """Token ids per row, truncated to `max_length`, and whether each row was truncated, tokenising at most
    max_length · CHARS_PER_TOKEN characters of a text (a 50 MB text costs what a long paragraph does). Equal to
    tokenising the whole text: a cut text whose tokens do not run past max_length by 2 (the cut can only change
    the last one) is tokenised whole instead."""
    cap = max_length * CHARS_PER_TOKEN
    cut_texts = [t[:cap] for t in texts]
    cut_pairs = [t[:cap] for t in pairs] if pairs is not None else None
    was_cut = [len(t) > cap or (pairs is not None and len(pairs[i]) > cap) for i, t in enumerate(texts)]

    def encode(rows: list[int], whole: bool, truncation: bool) -> list[list[int]]:
        a, b = (texts, pairs) if whole else (cut_texts, cut_pairs)
        return tokenizer([a[i] for i in rows], [b[i] for i in rows] if b is not None else None, verbose=False,
                         truncation=truncation, max_length=max_length if truncation else None,
                         return_attention_mask=False, return_token_type_ids=False)["input_ids"]
    ids = encode(list(range(len(texts))), False, True)
    truncated = np.zeros(len(ids), dtype=bool)
    check = [i for i, x in enumerate(ids) if len(x) >= max_length or was_cut[i]]  # only these can have been cut
    redo = []
    for i, x in zip(check, encode(check, False, False) if check else []):
        if was_cut[i] and len(x) <= max_length + 1:
            redo.append(i)
        truncated[i] = len(x) > max_length
    if redo:  # tokens of over CHARS_PER_TOKEN characters on average: tokenise those texts whole
        for i, x, y in zip(redo, encode(redo, True, True), encode(redo, True, False)):
            ids[i], truncated[i] = x, len(y) > max_length
    return ids, truncated
