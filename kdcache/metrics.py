"""The metrics of every head, shared by training, the report and the experiments: classification accuracy and
macro-F1, entity-level F1 (conlleval rules), whether greedy decoding reproduces a chat response, and which metric
ranks each head's students."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Iterator, Sequence

import numpy as np

from .heads import HEADS, HeadMetric, get


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """log softmax(logits) per row [N, C], computed stably in float64 (T = 1)."""
    z = logits.astype(np.float64) - logits.max(1, keepdims=True)
    return z - np.log(np.exp(z).sum(1, keepdims=True))


def classification_metrics(pred: np.ndarray, labels: np.ndarray, teacher_pred: np.ndarray,
                           num_labels: int) -> dict[str, Any]:
    """accuracy and macro-F1 on labelled rows (label >= 0); agreement with the teacher's argmax on all rows; rows and
    correct predictions per gold class (accuracy on any group of classes, e.g. a lifelong round's old ones)."""
    lab = labels >= 0
    p, y = pred[lab], labels[lab]
    f1s = []
    for c in range(num_labels):
        tp, fp, fn = np.sum((p == c) & (y == c)), np.sum((p == c) & (y != c)), np.sum((p != c) & (y == c))
        f1s.append(2 * tp / (2 * tp + fp + fn) if (tp + fp + fn) else 0.0)
    return {"accuracy": float((p == y).mean()) if lab.any() else None,
            "macro_f1": float(np.mean(f1s)) if lab.any() else None,
            "agreement": float((pred == teacher_pred).mean()), "rows": int(len(pred)),
            "class_rows": np.bincount(y, minlength=num_labels).tolist(),
            "class_correct": np.bincount(y[p == y], minlength=num_labels).tolist()}


def answer_right(hits: np.ndarray, nxt: np.ndarray, positions: np.ndarray, stop: int) -> bool:
    """Whether greedy decoding reproduces a conversation's responses exactly, each given the conversation before it:
    the model's top-1 is the next token at every target position (hits [n], next tokens nxt [n], positions [n]) of
    each response — a run of consecutive positions — up to its first end of turn `stop` (what a template adds after
    it, e.g. a newline, is never generated). Teacher-forced: one forward, and exact for greedy decoding."""
    runs = np.split(np.arange(len(positions)), np.flatnonzero(np.diff(positions) != 1) + 1)
    for run in runs:
        end = np.flatnonzero(nxt[run] == stop)
        if not hits[run[:end[0] + 1 if len(end) else len(run)]].all():
            return False
    return True


def answer_matches(text: str, reference: str) -> bool:
    """Whether a generated answer gives the reference answer: after trimming, case-folding and collapsing
    whitespace, the answer starts with the reference ("Positive." gives "positive"; "It is positive" does not)."""
    norm = lambda x: " ".join(x.split()).casefold()  # noqa: E731
    return bool(norm(reference)) and norm(text).startswith(norm(reference))


def entity_spans(tags: Sequence[str]) -> set[tuple[str, int, int]]:
    """(type, first word, last word) of every entity in an IOB2/IOB1 tag sequence, by conlleval's rules: an entity
    starts at B-X, or at I-X not continuing an X entity, and runs while I-X follows."""
    spans, start, kind = set(), None, None
    for i, tag in enumerate(list(tags) + ["O"]):
        prefix, _, t = tag.partition("-")
        continues = prefix == "I" and kind == t
        if start is not None and not continues:
            spans.add((kind, start, i - 1))
            start = kind = None
        if prefix in ("B", "I") and not continues:
            start, kind = i, t
    return spans


def entity_f1(gold: Sequence[Sequence[str]], pred: Sequence[Sequence[str]]) -> dict[str, float]:
    """Micro precision/recall/F1 over exact entity matches (type and boundaries), summed over sentences."""
    tp = n_gold = n_pred = 0
    for g, p in zip(gold, pred):
        gs, ps = entity_spans(g), entity_spans(p)
        tp += len(gs & ps)
        n_gold += len(gs)
        n_pred += len(ps)
    prec = tp / n_pred if n_pred else 0.0
    rec = tp / n_gold if n_gold else 0.0
    return {"precision": prec, "recall": rec, "f1": 2 * prec * rec / (prec + rec) if prec + rec else 0.0,
            "entities": n_gold}


class _Metrics(Mapping):
    """head name -> its `HeadMetric`, read from the head registry (kdcache/heads.py) at each lookup."""

    def __getitem__(self, head: str) -> HeadMetric:
        return get(head).metric

    def __iter__(self) -> Iterator[str]:
        return iter(HEADS)

    def __len__(self) -> int:
        return len(HEADS)


METRICS = _Metrics()
__all__ = ["METRICS", "HeadMetric", "classification_metrics", "entity_f1", "entity_spans", "log_softmax"]
