"""Teacher preparation: fine-tune a pretrained encoder for the task when its checkpoint has no trained head.

The result is saved to data/teachers/<pipeline>/<task>/ with `kdcache-teacher.json`, and reused while the base
weights, the training data and the settings are unchanged.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import TaskConfig
from .data import TaskData
from .fingerprint import hash_obj, hash_table
from .optim import adamw, warmup_linear
from .progress import progress
from .teacher import TeacherError, build_model, load_tokenizer

log = logging.getLogger(__name__)
RECORD = "kdcache-teacher.json"


def _batches(n: int, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    perm = rng.permutation(n)
    return [perm[i:i + batch_size] for i in range(0, n, batch_size)]


def _collate(enc_ids: list[list[int]], rows: np.ndarray, pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(enc_ids[i]) for i in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, i in enumerate(rows):
        ids[r, : len(enc_ids[i])] = torch.as_tensor(enc_ids[i])
        mask[r, : len(enc_ids[i])] = 1
    return {"input_ids": ids, "attention_mask": mask}


def _encode(tokenizer: Any, ds, text_fields: tuple[str, ...], max_length: int) -> list[list[int]]:
    pairs = ds[text_fields[1]][:] if len(text_fields) > 1 else None
    return tokenizer(ds[text_fields[0]][:], pairs, truncation=True, max_length=max_length)["input_ids"]


@torch.inference_mode()
def accuracy(model: torch.nn.Module, tokenizer: Any, ds, text_fields: tuple[str, ...], max_length: int,
             batch_size: int = 64) -> float:
    """Accuracy of a sequence classifier on the labelled rows of `ds`."""
    model.eval()
    ids = _encode(tokenizer, ds, text_fields, max_length)
    labels = np.array(ds["label"][:])
    preds = []
    for b in range(0, len(ids), batch_size):
        rows = np.arange(b, min(b + batch_size, len(ids)))
        preds.append(model(**_collate(ids, rows, tokenizer.pad_token_id or 0)).logits.argmax(-1).numpy())
    pred = np.concatenate(preds)
    mask = labels >= 0
    return float((pred[mask] == labels[mask]).mean()) if mask.any() else float("nan")


@torch.inference_mode()
def word_predictions(model: torch.nn.Module, tokenizer: Any, sentences, tags, names, max_length: int,
                     batch_size: int = 64) -> tuple[list[list[str]], list[list[str]]]:
    """(gold, predicted) tag names per word for a token classifier; words beyond max_length predicted `O`."""
    from .ner import align_words
    model.eval()
    ids, first, _ = align_words(tokenizer, sentences, max_length)
    gold, pred = [], []
    for b in range(0, len(ids), batch_size):
        rows = np.arange(b, min(b + batch_size, len(ids)))
        z = model(**_collate(ids, rows, tokenizer.pad_token_id or 0)).logits
        for r, i in enumerate(rows):
            p = z[r, first[i]].argmax(-1).tolist() if first[i] else []
            pred.append([names[t] for t in p] + ["O"] * (len(tags[i]) - len(p)))
            gold.append([names[t] for t in tags[i]])
    return gold, pred


def finetune_key(task: TaskConfig, data: TaskData) -> dict[str, Any]:
    """Everything that decides the fine-tuned weights."""
    ft = task.teacher.finetune
    assert ft is not None
    train = data.splits.get(ft.train_split)
    if train is None:
        raise TeacherError(f"teacher.finetune.train_split {ft.train_split!r} is not a split of the data "
                           f"({', '.join(data.splits)})")
    return {"base": task.teacher.model, "from_config": task.teacher.from_config, "revision": task.teacher.revision,
            "tokenizer": task.teacher.tokenizer, "labels": list(data.label_names),
            "train_data": hash_table(train.data.table), "text_fields": list(task.data.text_fields),
            "max_length": task.cache.max_length, "settings": {k: getattr(ft, k) for k in ft.__dataclass_fields__},
            # (only for other heads, so existing sequence-classification teachers keep their key)
            **({"head": task.teacher.head} if task.teacher.head != "sequence-classification" else {})}


def finetune_teacher(task_name: str, task: TaskConfig, data: TaskData, out_dir: Path) -> Path:
    """Fine-tune the task's teacher into `out_dir` unless an identical one is there; returns `out_dir`."""
    ft = task.teacher.finetune
    assert ft is not None
    key = finetune_key(task, data)
    record = out_dir / RECORD
    if record.is_file():
        old = json.loads(record.read_text())
        if old.get("key_sha256") == hash_obj(key):
            log.info("teacher for task %s already fine-tuned: %s", task_name, out_dir)
            return out_dir
        log.warning("teacher for task %s: base, data or settings changed; fine-tuning again", task_name)

    tokenizer = load_tokenizer(task.teacher)
    model, _ = build_model(task.teacher, data.label_names, seed=ft.seed)
    train = data.splits[ft.train_split]
    if ft.limit is not None:
        train = train.select(range(min(ft.limit, len(train))))
    words = task.teacher.head == "token-classification"
    if words:  # per sub-token labels: each word's tag on its first sub-token, -100 elsewhere
        from .ner import align_words, token_labels
        train = train.select([i for i, t in enumerate(train["tags"][:]) if t and min(t) >= 0])  # gold-tagged only
        ids, first, _ = align_words(tokenizer, train["words"][:], task.cache.max_length)
        tok_labels = [token_labels(f, t, len(x)) for f, t, x in zip(first, train["tags"][:], ids)]
    else:
        labelled = [i for i, y in enumerate(train["label"][:]) if y >= 0]
        if not labelled:
            raise TeacherError(f"task {task_name}: split {ft.train_split!r} has no labelled rows to fine-tune on")
        train = train.select(labelled)
        ids = _encode(tokenizer, train, task.data.text_fields, task.cache.max_length)
        labels = torch.as_tensor(train["label"][:])
    rng = np.random.default_rng(ft.seed)
    steps_per_epoch = math.ceil(len(ids) / ft.batch_size)
    total = max(1, int(round(ft.epochs * steps_per_epoch)))
    opt = adamw(model.parameters(), ft.learning_rate, ft.weight_decay)
    sched = warmup_linear(opt, total, ft.warmup_ratio)
    model.train()
    t0, step = time.time(), 0
    with progress(total=total * ft.batch_size, desc=f"fine-tune teacher [{task_name}]", unit="rows") as bar:
        while step < total:
            for rows in _batches(len(ids), ft.batch_size, rng):
                if step >= total:
                    break
                logits = model(**_collate(ids, rows, tokenizer.pad_token_id or 0)).logits
                if words:
                    target = torch.full(logits.shape[:2], -100, dtype=torch.long)
                    for r, i in enumerate(rows):
                        target[r, :len(tok_labels[i])] = torch.as_tensor(tok_labels[i])
                    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=-100)
                else:
                    loss = torch.nn.functional.cross_entropy(logits, labels[rows])
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step(), sched.step(), opt.zero_grad(set_to_none=True)
                step += 1
                bar.update(len(rows))
                bar.set_postfix(loss=f"{loss.item():.3f}")
    metrics: dict[str, Any] = {"train_rows": len(ids), "steps": total, "seconds": round(time.time() - t0, 1)}
    if ft.eval_split and ft.eval_split in data.splits and words:
        from .ner import entity_f1
        ev = data.splits[ft.eval_split]
        metrics[f"{ft.eval_split}_entity_f1"] = entity_f1(*word_predictions(model, tokenizer, ev["words"][:], ev["tags"][:],
                                                                            data.label_names, task.cache.max_length))["f1"]
    elif ft.eval_split and ft.eval_split in data.splits:
        metrics[f"{ft.eval_split}_accuracy"] = accuracy(model, tokenizer, data.splits[ft.eval_split],
                                                        task.data.text_fields, task.cache.max_length)
    log.info("teacher for task %s fine-tuned: %s", task_name, metrics)

    tmp = out_dir.with_name(out_dir.name + ".incomplete")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / RECORD).write_text(json.dumps({"key": key, "key_sha256": hash_obj(key), "metrics": metrics},
                                         indent=1, sort_keys=True))
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return out_dir

