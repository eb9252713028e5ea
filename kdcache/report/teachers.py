"""The teacher's row of each head's table (and the baseline any model must beat), from its cache: test metrics
from the cached outputs or the manifest's statistics, size and speed from the manifest."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..cache.reader import open_manifest, read_column
from ..metrics import classification_metrics


def teacher_fields(m: dict[str, Any]) -> dict[str, Any]:
    t = m["fingerprint_inputs"]["teacher"]
    return {"run": f"teacher ({t['name']})", "task": m["task"], "arch": t["class"], "kd": None,
            "parameters": t.get("parameters"), "device": m.get("device")}


def teacher_row_classification(cache: str, test_split: str) -> dict[str, Any]:
    """Test metrics from the cached logits, size and speed from the manifest."""
    m = open_manifest(cache)[2]
    logits = np.stack(read_column(str(cache), test_split, "logits"))
    labels = np.array([-1 if y is None else y for y in read_column(str(cache), test_split, "label")])
    pred = logits.argmax(1)
    stats = m["splits"][test_split]["stats"]
    return {**teacher_fields(m), "test": classification_metrics(pred, labels, pred, len(m["label_names"])),
            "inference_examples_per_s_cpu": stats.get("teacher_rows_per_s"), "size_bytes": None,
            "train_seconds": None, "baseline": majority_baseline(cache, m, labels)}


def majority_baseline(cache: str, m: dict[str, Any], test_labels: np.ndarray) -> dict[str, Any] | None:
    """The training split's most frequent label predicted for every test row: what any model must beat."""
    if "train" not in m["splits"]:
        return None
    train = [y for y in read_column(str(cache), "train", "label") if y is not None and y >= 0]
    if not train:
        return None
    label = int(np.bincount(train).argmax())
    pred = np.full(len(test_labels), label)
    return {"run": f"majority class ({m['label_names'][label]})",
            "test": classification_metrics(pred, test_labels, pred, len(m["label_names"]))}


def teacher_row_tokens(cache: str, test_split: str) -> dict[str, Any]:
    m = open_manifest(cache)[2]
    st = m["splits"][test_split]["stats"]
    return {**teacher_fields(m), "test": {"f1": st["teacher_entity_f1"]}, "uncovered_words": st.get("uncovered_words"),
            # tagging every word `O` finds no entity: F1 0, the floor a tagger must rise from
            "baseline": {"run": "all-`O` baseline", "test": {"f1": 0.0, "precision": 0.0, "recall": 0.0}}}


def teacher_row_lm(cache: str, test_split: str) -> dict[str, Any]:
    m = open_manifest(cache)[2]
    st = m["splits"][test_split]["stats"]
    answers = {"answer_accuracy": st["teacher_answer_accuracy"],
               "generated_accuracy": st.get("teacher_generated_accuracy")} if "teacher_answer_accuracy" in st else {}
    return {**teacher_fields(m), "test": {"perplexity": st["teacher_perplexity"], "kl_to_teacher": 0.0,
                                    "bits_per_byte": st.get("teacher_bits_per_byte"), **answers},
            "tokens_per_s": st.get("teacher_tokens_per_s"), "mean_tail_mass": st.get("mean_tail_mass"),
            "top_k": m["lm"]["top_k"]}




def majority_accuracy(cache: str, language: str, test_split: str) -> float | None:
    """Test accuracy of predicting the most frequent training label of `language` for each of its test rows."""
    train = [y for y in read_column(cache, "train", "label", (language,)) if y is not None and y >= 0]
    test = np.array([-1 if y is None else y for y in read_column(cache, test_split, "label", (language,))])
    if not train or not (test >= 0).any():
        return None
    return float((test[test >= 0] == np.bincount(train).argmax()).mean())

