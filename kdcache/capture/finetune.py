"""Teacher preparation: fine-tune a pretrained encoder for the task when its checkpoint has no trained head.

The result is saved to data/teachers/<pipeline>/<task>/ with `kdcache-teacher.json`, and reused while the base
weights, the training data and the settings are unchanged. The head supplies its examples, loss and evaluation.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
import time
from itertools import zip_longest
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import heads
from ..config import TaskConfig
from ..data import TaskData, of_classes, take_rows
from ..fingerprint import hash_obj, hash_table
from ..progress import progress
from ..optim import adamw, warmup_linear
from .head import CaptureHead
from .heads import HEADS
from .models import TeacherError, build_model, convert_gguf, load_tokenizer, shareable
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
    chosen = _training_rows(train, ft, data)
    labelled = HEADS[task.teacher.head].labelled_rows(chosen)
    rows = len(labelled)
    used = take_rows(chosen, labelled) if rows < len(chosen) else chosen
    return {"base": task.teacher.model, "from_config": task.teacher.from_config, "revision": task.teacher.revision,
            "tokenizer": task.teacher.tokenizer, "labels": list(data.label_names),
            # only the rows it trains on decide the teacher (unlabelled rows may be added freely); all of them
            # labelled: the whole split, as teachers fine-tuned before caches could grow were keyed
            "train_data": hash_table(used.data.table),
            "text_fields": list(task.data.text_fields),
            "max_length": task.cache.max_length,
            # min_steps only where it lengthens the run, so teachers fine-tuned before it existed keep their key;
            # `folds` never changes this teacher (the fold teachers differ by their training rows)
            # `train` only when not the default, for the same reason
            "settings": {k: getattr(ft, k) for k in ft.__dataclass_fields__ if k != "folds" and
                         (k != "labels" or ft.labels) and
                         (k != "min_steps" or finetune_steps(ft, rows) > _epoch_steps(ft, rows)) and
                         (k != "train" or ft.train != "all")},
            **({"gguf_file": task.teacher.gguf_file} if task.teacher.gguf_file else {}),
            # (only for other heads, so existing sequence-classification teachers keep their key)
            **({"head": task.teacher.head} if task.teacher.head != heads.DEFAULT_HEAD else {})}


def _epoch_steps(ft: Any, rows: int) -> int:
    return max(1, int(round(ft.epochs * math.ceil(rows / ft.batch_size))))


def finetune_steps(ft: Any, rows: int) -> int:
    """Optimisation steps over `rows` labelled rows: `epochs` passes, but never fewer than `min_steps` (small data
    sets need more passes than one epoch gives)."""
    return max(_epoch_steps(ft, rows), ft.min_steps)


def _training_rows(ds: Any, ft: Any, data: TaskData) -> Any:
    """The rows of the fine-tuning split the teacher may learn from: the first `limit` (of every language in turn,
    so that a multilingual teacher sees each language), of the classes in `labels` (rows of other classes are left
    out, not unlabelled)."""
    if ft.limit is not None and ft.limit < len(ds):
        rows = _first_of_each_language(ds["language"] if "language" in ds.column_names else [None] * len(ds), ft.limit)
        # the first rows: a slice of the table, as teachers keyed before languages existed were hashed
        ds = ds.select(range(ft.limit)) if rows[-1] == ft.limit - 1 else take_rows(ds, rows)
    return of_classes(ds, ft.labels, data.label_names, f"{data.origin}: teacher.finetune.labels") if ft.labels else ds


def _first_of_each_language(languages: list[str | None], limit: int) -> list[int]:
    """`limit` row indices, the languages taking turns (a language with fewer rows leaves its turns to the others),
    in the rows' own order."""
    rows: dict[str | None, list[int]] = {}
    for i, code in enumerate(languages):
        rows.setdefault(code, []).append(i)
    taken: list[int] = []
    for turn in zip_longest(*rows.values()):
        taken += [i for i in turn if i is not None][:limit - len(taken)]
        if len(taken) == limit:
            break
    return sorted(taken)


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

    teacher = task.teacher
    if teacher.gguf_file:  # the base weights: the GGUF converted once, shared by the task's (fold) teachers
        base = out_dir.parent / f"gguf-{Path(teacher.gguf_file).stem}"
        if not (base / "config.json").is_file():
            convert_gguf(teacher, "AutoModelForCausalLM", base)
        teacher = dataclasses.replace(teacher, model=str(base), tokenizer=None, gguf_file=None, revision=None)
    tokenizer = load_tokenizer(teacher)
    model, _ = build_model(teacher, head.auto_class, data.label_names, seed=ft.seed)
    if model.config.pad_token_id is None and tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id  # decoder classifiers find each row's last token by it
    train = _training_rows(data.splits[ft.train_split], ft, data)
    ids, targets = head.finetune_examples(tokenizer, train, task)
    if not ids:
        raise TeacherError(f"task {task_name}: split {ft.train_split!r} has no labelled rows to fine-tune on")
    total = finetune_steps(ft, len(ids))
    t0 = time.time()
    if ft.train == "head":
        _train_head(task_name, model, ids, targets, head, ft, total, tokenizer.pad_token_id or 0)
    else:
        _train_all(task_name, model, ids, targets, head, ft, total, tokenizer.pad_token_id or 0)
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
    shareable(tmp)
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    _gate(task_name, task, head, data, metrics)
    return out_dir


def _steps(task_name: str, params: Any, n: int, ft: Any, total: int, loss_of: Any) -> None:
    """`total` AdamW steps (warm-up, linear decay, clipping) over shuffled batches of `n` rows; `loss_of(rows)`."""
    params = list(params)
    rng = np.random.default_rng(ft.seed)
    opt = adamw(params, ft.learning_rate, ft.weight_decay)
    sched = warmup_linear(opt, total, ft.warmup_ratio)
    step = 0
    with progress(total=total * ft.batch_size, desc=f"fine-tune teacher [{task_name}]", unit="rows") as bar:
        while step < total:
            perm = rng.permutation(n)
            for rows in (perm[i:i + ft.batch_size] for i in range(0, n, ft.batch_size)):
                if step >= total:
                    break
                loss = loss_of(rows)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step(), sched.step(), opt.zero_grad(set_to_none=True)
                step += 1
                bar.update(len(rows))
                bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)


def _train_all(task_name: str, model: Any, ids: list, targets: list, head: CaptureHead, ft: Any, total: int,
               pad_id: int) -> None:
    """Every weight trained."""
    model.train()

    def loss_of(rows):
        input_ids, mask = pad_rows(ids, rows, pad_id)
        return head.finetune_loss(model(input_ids=input_ids, attention_mask=mask).logits, [targets[i] for i in rows])
    _steps(task_name, model.parameters(), len(ids), ft, total, loss_of)


CLASSIFIER_MODULES = ("score", "classifier")  # what transformers calls a sequence classifier's head


def _train_head(task_name: str, model: Any, ids: list, targets: list, head: CaptureHead, ft: Any, total: int,
                pad_id: int, batch_size: int = 32) -> None:
    """Only the classification head trained, on what it reads (captured by a hook) computed once by the frozen
    model: a decoder's head reads every position and the model keeps each row's last token, so that one is kept."""
    name = next((n for n in CLASSIFIER_MODULES if isinstance(getattr(model, n, None), torch.nn.Module)), None)
    if name is None:
        raise TeacherError(f"task {task_name}: teacher.finetune.train = head needs a model whose head is called "
                           f"{' or '.join(CLASSIFIER_MODULES)}; {type(model).__name__} has neither: use train: all")
    module = getattr(model, name)
    x = head_inputs(task_name, model, name, ids, pad_id, batch_size)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in module.parameters():
        p.requires_grad_(True)
    module.train()
    _steps(task_name, module.parameters(), len(ids), ft, total,
           lambda rows: head.finetune_loss(module(x[torch.as_tensor(rows)]), [targets[i] for i in rows]))
    for p in model.parameters():
        p.requires_grad_(True)


def head_inputs(task_name: str, model: Any, name: str, ids: list, pad_id: int, batch_size: int = 32) -> torch.Tensor:
    """[rows, H]: what the model's head `name` reads for each row, from one frozen forward pass per batch."""
    module, seen, feats = getattr(model, name), {}, []
    hook = module.register_forward_hook(lambda m, inp, out: seen.update(x=inp[0], y=out))
    model.eval()
    try:
        with torch.inference_mode(), progress(total=len(ids), desc=f"teacher features [{task_name}]",
                                              unit="rows") as bar:
            for b in range(0, len(ids), batch_size):
                rows = range(b, min(b + batch_size, len(ids)))
                input_ids, mask = pad_rows(ids, rows, pad_id)
                model(input_ids=input_ids, attention_mask=mask)
                x = seen["x"]
                if x.dim() == 3 and seen["y"].dim() == 3:  # per-position head, pooled at the last real token after
                    x = x[torch.arange(len(rows)), mask.sum(1) - 1]
                elif x.dim() != 2:
                    raise TeacherError(f"task {task_name}: the head `{name}` of {type(model).__name__} pools by "
                                       "itself; head-only fine-tuning cannot precompute its input: use train: all")
                feats.append(x.float().clone())
                bar.update(len(rows))
    finally:
        hook.remove()
    return torch.cat(feats)


def _gate(task_name: str, task: TaskConfig, head: CaptureHead, data: TaskData, metrics: dict[str, Any]) -> None:
    """The quality gate on the fine-tuned teacher's evaluation (kept in its record, so a reuse is judged too)."""
    if "eval" in metrics:
        where = f"fine-tuned for {metrics['steps']} steps (split `{metrics['eval']['split']}`)"
        check_teacher(task_name, task, head, metrics["eval"], len(data.label_names), where)
