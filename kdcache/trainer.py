"""Stage two: train students from a cache (`kdcache train`). One pass over the cache feeds every student of a
task (one read, N optimisers), each with its hard-label twin when asked. The teacher is never loaded, except in
`teacher="live"` mode (online KD, for comparison), which computes the targets with the teacher every step."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import yaml
from torch import nn
from torch.distributed.algorithms.join import Join

from . import config as C
from .cache.format import CacheFormatError
from .losses import distillation_loss, feature_loss
from .optim import adamw, warmup_linear
from .progress import progress
from .reader import CacheDataset, collate, read_column, training_split
from .students import HFTokenizer, Student, WordTokenizer, build_student

log = logging.getLogger(__name__)


class WithProjections(nn.Module):
    """A student plus the learned projections of its feature-loss terms, as one module (one DDP wrapper)."""

    def __init__(self, student: Student, terms: tuple[C.FeatureLossConfig, ...], feature_dims: dict[int, int]) -> None:
        super().__init__()
        self.student = student
        self.terms = terms
        self.projections = nn.ModuleList(nn.Linear(student.hidden_sizes[f.student_layer], feature_dims[f.teacher_layer])
                                         for f in terms)

    def forward(self, input_ids, attention_mask):
        logits, hidden = self.student(input_ids, attention_mask)
        return logits, [proj(hidden[f.student_layer]) for proj, f in zip(self.projections, self.terms)]


@dataclass
class StudentRun:
    """One student being trained: its model, tokenizer, loss, optimiser and results."""

    name: str
    student: str
    cfg: C.StudentConfig
    loss: C.LossConfig
    tokenizer: Any
    model: nn.Module  # WithProjections (wrapped by accelerate)
    optimizer: torch.optim.Optimizer
    scheduler: Any
    run_dir: Path
    history: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] | None = None
    best_state: dict[str, Any] | None = None
    seconds: float = 0.0


def texts_of(batch: dict[str, Any], fields: tuple[str, ...]) -> list[str]:
    """Input text per row; text pairs are joined with ' | '."""
    return [" | ".join(p) for p in zip(*(batch[f] for f in fields))]


def classification_metrics(pred: np.ndarray, labels: np.ndarray, teacher_pred: np.ndarray, num_labels: int) -> dict:
    """accuracy and macro-F1 on labelled rows; agreement with the teacher's argmax on all rows."""
    lab = labels >= 0
    p, y = pred[lab], labels[lab]
    f1s = []
    for c in range(num_labels):
        tp, fp, fn = np.sum((p == c) & (y == c)), np.sum((p == c) & (y != c)), np.sum((p != c) & (y == c))
        f1s.append(2 * tp / (2 * tp + fp + fn) if (tp + fp + fn) else 0.0)
    return {"accuracy": float((p == y).mean()) if lab.any() else None,
            "macro_f1": float(np.mean(f1s)) if lab.any() else None,
            "agreement": float((pred == teacher_pred).mean()), "rows": int(len(pred))}


def make_tokenizer(st: C.StudentConfig, cache: str, split: str, fields: tuple[str, ...]):
    if st.tokenizer == "words":
        texts = read_column(cache, split, fields[0]) + (read_column(cache, split, fields[1]) if len(fields) > 1 else [])
        return WordTokenizer.build(texts, st.vocab_size)
    return HFTokenizer(st.tokenizer)


def make_run(name: str, student: str, st: C.StudentConfig, loss: C.LossConfig, train: C.TrainConfig,
             tokenizer: Any, num_labels: int, feature_dims: dict[int, int], steps: int, run_dir: Path) -> StudentRun:
    torch.manual_seed(train.seed)  # a KD student and its hard-label twin start from the same weights
    student_model = build_student(st.arch, st.params, tokenizer.vocab_size, num_labels, tokenizer.pad_id,
                                  where=f"students.{student}")
    model = WithProjections(student_model, loss.features, feature_dims)
    opt = adamw([p for p in model.parameters() if p.requires_grad], st.learning_rate or train.learning_rate,
                train.weight_decay)
    sched = warmup_linear(opt, steps, train.warmup_ratio)
    return StudentRun(name, student, st, loss, tokenizer, model, opt, sched, run_dir)


def train_step(run: StudentRun, batch: dict[str, Any], fields: tuple[str, ...], train: C.TrainConfig,
               accelerator) -> dict[str, float]:
    run.model.train()
    ids, mask = run.tokenizer(texts_of(batch, fields), train.max_length)
    ids, mask = ids.to(accelerator.device), mask.to(accelerator.device)
    logits, projected = run.model(ids, mask)
    L = run.loss
    loss, parts = distillation_loss(logits, batch["logits"].to(logits.device), batch["label"].to(logits.device),
                                    L.kind, L.temperature, L.alpha, L.beta)
    for i, (f, pred) in enumerate(zip(L.features, projected)):
        term = feature_loss(pred, batch["features"][f"layer_{f.teacher_layer}"].to(logits.device), f.kind)
        loss = loss + f.weight * term
        parts[f"feat{i}"] = float(term.detach())
    accelerator.backward(loss)
    if train.grad_clip:
        accelerator.clip_grad_norm_(run.model.parameters(), train.grad_clip)
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    parts["loss"] = float(loss.detach())
    return parts


@torch.inference_mode()
def evaluate(model: Student, tokenizer: Any, dataset: CacheDataset, batch_size: int, max_length: int,
             device: torch.device) -> dict[str, Any]:
    model.eval()
    preds, labels, teacher = [], [], []
    for batch in torch.utils.data.DataLoader(dataset, batch_size=batch_size, collate_fn=collate):
        ids, mask = tokenizer(texts_of(batch, dataset.text_fields), max_length)
        logits, _ = model(ids.to(device), mask.to(device))
        preds.append(logits.argmax(-1).cpu().numpy())
        labels.append(batch["label"].numpy())
        teacher.append(batch["logits"].argmax(-1).numpy())
    return classification_metrics(np.concatenate(preds), np.concatenate(labels), np.concatenate(teacher),
                                  len(dataset.manifest["label_names"]))


@torch.inference_mode()
def inference_speed(model: Student, tokenizer: Any, texts: list[str], max_length: int, batch_size: int = 64) -> float:
    """Examples/s on this machine's CPU, tokenisation included."""
    model = copy.deepcopy(model).cpu().eval()
    texts = texts[:512]
    model(*tokenizer(texts[:batch_size], max_length))  # warm-up
    t0 = time.perf_counter()
    for b in range(0, len(texts), batch_size):
        model(*tokenizer(texts[b:b + batch_size], max_length))
    return len(texts) / (time.perf_counter() - t0)


def _save(run: StudentRun, state: dict[str, Any]) -> Path:
    ckpt = run.run_dir / "checkpoint"
    tmp = run.run_dir / ".checkpoint.tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    torch.save(state, tmp / "student.pt")
    run.tokenizer.save(tmp)
    if ckpt.exists():
        shutil.rmtree(ckpt)
    os.replace(tmp, ckpt)
    return ckpt / "student.pt"


def live_targets(pipeline: C.PipelineConfig, task: str, teachers_dir: Path, cache_layers: tuple[int, ...]):
    """Online KD: a function batch -> (logits, features) from the live teacher (the only teacher use in stage two)."""
    from .capture import prepare_teacher
    from .data import load_task_data
    from .teacher import TeacherRunner
    t = pipeline.tasks[task]
    model, tok, _ = prepare_teacher(pipeline.name, task, t, load_task_data(t.data), teachers_dir)
    feats = dataclasses.replace(t.cache.features, layers=cache_layers)
    runner = TeacherRunner(model, tok, t.cache.max_length, batch_size=1 << 30, sort_window=1, features=feats,
                           precision=t.teacher.precision, device=t.teacher.device)
    fields = t.data.text_fields

    def targets(batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        out = runner.run(batch[fields[0]], batch[fields[1]] if len(fields) > 1 else None)
        return torch.from_numpy(out.logits), {k: torch.from_numpy(v.astype(np.float32)) for k, v in out.features.items()}
    return targets


def train_task(pipeline: C.PipelineConfig, task: str, students: list[str], cache: str, runs_dir: Path,
               teacher: str = "cache", teachers_dir: Path = Path("data/teachers"),
               on_step: Callable[[str, dict], None] | None = None) -> list[dict[str, Any]]:
    """Train `students` (all of one task) from `cache` in one pass per epoch; returns each run's metrics."""
    from accelerate import Accelerator
    from accelerate.utils import gather_object
    train = pipeline.train
    # cpu=True on GPU-less machines: accelerate 1.x otherwise reports DistributedType.NO under a 2-process launch
    accelerator = Accelerator(mixed_precision=train.mixed_precision, cpu=not torch.cuda.is_available())
    losses = {s: pipeline.students[s].loss or train.loss for s in students}
    layers = tuple(sorted({f.teacher_layer for s in students for f in losses[s].features}))
    train_ds = training_split(cache, pipeline, task, accelerator, layers)
    eval_ds = CacheDataset(cache, train.eval_split, rank=0, world_size=1)
    test_ds = CacheDataset(cache, train.test_split, rank=0, world_size=1) if train.test_split else None
    m = train_ds.manifest
    fields, num_labels = train_ds.text_fields, len(m["label_names"])
    feature_dims = {j: m["features"]["hidden_size"] for j in layers}
    steps = train.epochs * math.ceil(train_ds.num_rows / accelerator.num_processes / train.batch_size)

    runs: list[StudentRun] = []
    for s in students:
        st = pipeline.students[s]
        tok = make_tokenizer(st, cache, train.train_split, fields)
        variants = [(s, losses[s])] + ([(f"{s}-hard", C.LossConfig(alpha=1.0))] if st.twin else [])
        for name, loss in variants:
            run = make_run(name, s, st, loss, train, tok, num_labels, feature_dims, steps, runs_dir / name)
            run.model, run.optimizer = accelerator.prepare(run.model, run.optimizer)
            runs.append(run)
    live = live_targets(pipeline, task, teachers_dir, layers) if teacher == "live" else None

    loader = torch.utils.data.DataLoader(train_ds, batch_size=train.batch_size, collate_fn=collate,
                                         num_workers=train.num_workers, persistent_workers=False)
    best_key = "accuracy"
    for epoch in range(train.epochs):
        train_ds.set_epoch(epoch)
        sums = {r.name: 0.0 for r in runs}
        n_batches, seen = 0, []
        # Processes may get unequal numbers of batches (row groups are dealt round-robin): DDP's Join lets the
        # ones that finish early shadow the others' all-reduces instead of hanging.
        # (torch's Join directly: accelerate's join_uneven_inputs is a no-op on CPU processes.)
        ddp = [r.model for r in runs if isinstance(r.model, torch.nn.parallel.DistributedDataParallel)]
        uneven = Join(ddp) if ddp else contextlib.nullcontext()
        with uneven, progress(math.ceil(train_ds.num_rows / accelerator.num_processes),
                              desc=f"train {task} epoch {epoch + 1}/{train.epochs} ({len(runs)} students)",
                              disable=not accelerator.is_local_main_process) as bar:
            for batch in loader:
                seen += batch["row_id"].tolist()
                if live is not None:
                    batch["logits"], feats = live(batch)
                    if layers:
                        batch["features"] = feats
                for run in runs:
                    t0 = time.perf_counter()
                    parts = train_step(run, batch, fields, train, accelerator)
                    run.seconds += time.perf_counter() - t0
                    sums[run.name] += parts["loss"]
                    if on_step:
                        on_step(run.name, parts)
                n_batches += 1
                bar.update(len(batch["id"]))
        per_process = gather_object([seen])
        rows_info = {"train_rows_per_process": [len(x) for x in per_process],
                     "train_rows_distinct": len(set().union(*map(set, per_process)))}
        for run in runs:
            t0 = time.perf_counter()
            model = accelerator.unwrap_model(run.model).student
            ev = evaluate(model, run.tokenizer, eval_ds, 256, train.max_length, accelerator.device)
            run.history.append({"epoch": epoch + 1, "train_loss": sums[run.name] / max(1, n_batches), "eval": ev,
                                **rows_info})
            if run.best is None or (ev[best_key] or 0) > (run.best["eval"][best_key] or 0):
                run.best = run.history[-1]
                run.best_state = copy.deepcopy(model.state_dict())
            run.seconds += time.perf_counter() - t0
            log.info("%s epoch %d: train loss %.4f, %s accuracy %.4f", run.name, epoch + 1,
                     run.history[-1]["train_loss"], train.eval_split, ev["accuracy"] or float("nan"))

    results = []
    for run in runs:
        model = accelerator.unwrap_model(run.model).student
        model.load_state_dict(run.best_state)
        metrics = {
            "run": run.name, "student": run.student, "arch": run.cfg.arch, "task": task, "kd": run.loss.alpha < 1.0,
            "teacher_mode": teacher, "loss": C.to_dict(run.loss), "parameters": sum(p.numel() for p in model.parameters()),
            "epochs": run.history, "best_epoch": run.best["epoch"], "eval": run.best["eval"],
            "train_seconds": round(run.seconds, 2), "cache": str(cache), "cache_fingerprint": m["fingerprint"],
        }
        if test_ds is not None:
            metrics["test"] = evaluate(model, run.tokenizer, test_ds, 256, train.max_length, accelerator.device)
            texts = texts_of({f: read_column(cache, train.test_split, f) for f in fields}, fields)
            metrics["inference_examples_per_s_cpu"] = round(inference_speed(model, run.tokenizer, texts,
                                                                            train.max_length), 1)
        if accelerator.is_main_process:
            run.run_dir.mkdir(parents=True, exist_ok=True)
            path = _save(run, run.best_state)
            metrics["size_bytes"] = path.stat().st_size
            (run.run_dir / "config.yaml").write_text(yaml.safe_dump(
                {"pipeline": pipeline.name, "student": run.student, "run": run.name, "train": C.to_dict(train),
                 "student_config": C.to_dict(run.cfg), "loss": C.to_dict(run.loss)}, sort_keys=False))
            (run.run_dir / "cache.json").write_text(json.dumps({"cache": str(cache), "fingerprint": m["fingerprint"],
                                                                "teacher": m["fingerprint_inputs"]["teacher"]}, indent=1))
            (run.run_dir / "metrics.json").write_text(json.dumps(metrics, indent=1))
        results.append(metrics)
    return results


def train_students(pipeline: C.PipelineConfig, task: str, students: list[str], cache: str, runs_dir: Path,
                   teacher: str = "cache", teachers_dir: Path = Path("data/teachers")) -> list[dict[str, Any]]:
    """Stage two for any head: the task's teacher head picks the trainer (classification, NER or causal LM)."""
    head = pipeline.tasks[task].teacher.head
    if head != "sequence-classification" and teacher == "live":
        raise CacheFormatError("--teacher live (online KD) is for sequence-classification tasks only")
    if head == "causal-lm":
        from .lm_trainer import lm_train_task
        return lm_train_task(pipeline, task, students, cache, runs_dir)
    if head == "token-classification":
        from .ner_trainer import ner_train_task
        return ner_train_task(pipeline, task, students, cache, runs_dir)
    return train_task(pipeline, task, students, cache, runs_dir, teacher=teacher, teachers_dir=teachers_dir)
