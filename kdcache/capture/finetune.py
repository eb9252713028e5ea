"""Teacher preparation: fine-tune a pretrained encoder for the task when its checkpoint has no trained head.

The result is saved to data/teachers/<pipeline>/<task>/ with `kdcache-teacher.json`, and reused while the base
weights, the training data and the settings are unchanged. The head supplies its examples, loss and evaluation.
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

from ..config import TaskConfig
from ..data import TaskData
from ..fingerprint import hash_obj, hash_table
from ..progress import progress
from ..optim import adamw, warmup_linear
from .head import CaptureHead
from .heads import HEADS
from .models import TeacherError, build_model, load_tokenizer
from .runner import pad_rows
from .sanity import check_teacher

log = logging.getLogger(__name__)
RECORD = "kdcache-teacher.json"


def finetune_key(task: TaskConfig, data: TaskData) -> dict[str, Any]:
    """Everything that decides the fine-tuned weights."""
    ft = task.teacher.finetune
    assert ft is not None
    train = data.splits.get(ft.train_split)
    if train is None:
        raise TeacherError(f"teacher.finetune.train_split {ft.train_split!r} is not a split of the data "
                           f"({', '.join(data.splits)})")
    rows = HEADS[task.teacher.head].count_labelled(_limited(train, ft.limit))
    return {"base": task.teacher.model, "from_config": task.teacher.from_config, "revision": task.teacher.revision,
            "tokenizer": task.teacher.tokenizer, "labels": list(data.label_names),
            "train_data": hash_table(train.data.table), "text_fields": list(task.data.text_fields),
            "max_length": task.cache.max_length,
            # min_steps only where it lengthens the run, so teachers fine-tuned before it existed keep their key;
            # `folds` never changes this teacher (the fold teachers differ by their training rows)
            "settings": {k: getattr(ft, k) for k in ft.__dataclass_fields__ if k != "folds" and
                         (k != "min_steps" or finetune_steps(ft, rows) > _epoch_steps(ft, rows))},
            # (only for other heads, so existing sequence-classification teachers keep their key)
            **({"head": task.teacher.head} if task.teacher.head != "sequence-classification" else {})}


def _epoch_steps(ft: Any, rows: int) -> int:
    return max(1, int(round(ft.epochs * math.ceil(rows / ft.batch_size))))


def finetune_steps(ft: Any, rows: int) -> int:
    """Optimisation steps over `rows` labelled rows: `epochs` passes, but never fewer than `min_steps` (small data
    sets need more passes than one epoch gives)."""
    return max(_epoch_steps(ft, rows), ft.min_steps)


def _limited(ds: Any, limit: int | None) -> Any:
    return ds.select(range(min(limit, len(ds)))) if limit is not None else ds


def finetune_teacher(task_name: str, task: TaskConfig, data: TaskData, head: CaptureHead, out_dir: Path) -> Path:
    """Fine-tune the task's teacher into `out_dir` unless an identical one is there; returns `out_dir`."""
    ft = task.teacher.finetune
    assert ft is not None
    key = finetune_key(task, data)
    record = out_dir / RECORD
    if record.is_file():
        old = json.loads(record.read_text())
        if old.get("key_sha256") == hash_obj(key):
            log.info("teacher for task %s already fine-tuned: %s", task_name, out_dir)
            _gate(task_name, task, head, data, old.get("metrics", {}))
            return out_dir
        log.warning("teacher for task %s: base, data or settings changed; fine-tuning again", task_name)

    tokenizer = load_tokenizer(task.teacher)
    model, _ = build_model(task.teacher, head.auto_class, data.label_names, seed=ft.seed)
    train = _limited(data.splits[ft.train_split], ft.limit)
    ids, targets = head.finetune_examples(tokenizer, train, task)
    if not ids:
        raise TeacherError(f"task {task_name}: split {ft.train_split!r} has no labelled rows to fine-tune on")
    rng = np.random.default_rng(ft.seed)
    total = finetune_steps(ft, len(ids))
    opt = adamw(model.parameters(), ft.learning_rate, ft.weight_decay)
    sched = warmup_linear(opt, total, ft.warmup_ratio)
    pad_id = tokenizer.pad_token_id or 0
    model.train()
    t0, step = time.time(), 0
    with progress(total=total * ft.batch_size, desc=f"fine-tune teacher [{task_name}]", unit="rows") as bar:
        while step < total:
            perm = rng.permutation(len(ids))
            for rows in (perm[i:i + ft.batch_size] for i in range(0, len(ids), ft.batch_size)):
                if step >= total:
                    break
                input_ids, mask = pad_rows(ids, rows, pad_id)
                loss = head.finetune_loss(model(input_ids=input_ids, attention_mask=mask).logits,
                                          [targets[i] for i in rows])
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step(), sched.step(), opt.zero_grad(set_to_none=True)
                step += 1
                bar.update(len(rows))
                bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    metrics: dict[str, Any] = {"train_rows": len(ids), "steps": total, "seconds": round(time.time() - t0, 1)}
    if ft.eval_split and ft.eval_split in data.splits:
        metrics["eval"] = {"split": ft.eval_split, **head.finetune_eval(model, tokenizer, data.splits[ft.eval_split],
                                                                         task, data.label_names)}
    elif ft.eval_split:
        log.warning("task %s: the data has no split %r to evaluate the fine-tuned teacher on (splits: %s); set "
                    "tasks.%s.teacher.finetune.eval_split", task_name, ft.eval_split, ", ".join(data.splits),
                    task_name)
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
    _gate(task_name, task, head, data, metrics)
    return out_dir


def _gate(task_name: str, task: TaskConfig, head: CaptureHead, data: TaskData, metrics: dict[str, Any]) -> None:
    """The quality gate on the fine-tuned teacher's evaluation (kept in its record, so a reuse is judged too)."""
    if "eval" in metrics:
        where = f"fine-tuned for {metrics['steps']} steps (split `{metrics['eval']['split']}`)"
        check_teacher(task_name, task, head, metrics["eval"], len(data.label_names), where)
