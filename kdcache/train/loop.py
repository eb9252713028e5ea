"""Stage two (`kdcache train`): the one training loop of every head. Each pass over the cache feeds every student
of its tasks (one read, N optimisers), each with its hard-label twin when asked; a cross-task student takes the
batches of each of its tasks in turn. What differs per head (targets, loss, evaluation) is in its TrainHead."""

from __future__ import annotations

import contextlib
import copy
import fcntl
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
from torch.distributed.algorithms.join import Join

from .. import config as C, heads, layout
from ..cache.format import write_text_atomic
from ..cache.reader import CacheDataset
from ..errors import KdcacheError
from ..optim import clip_grad_norm_, optimizer_for, sparse_params, warmup_linear
from ..progress import progress
from ..students import REGISTRY
from .continual import init_tokenizer, init_weights
from .head import Source, StudentModel, at_chance
from .multitask import build_multitask, multitask_tokenizer
from .sources import open_source

log = logging.getLogger(__name__)


class TrainingError(KdcacheError):
    """Some runs stopped (a non-finite loss); `results` holds the metrics of the runs that finished."""

    def __init__(self, message: str, results: list[dict[str, Any]]) -> None:
        super().__init__(message)
        self.results = results


@dataclass
class Run:
    """One student being trained: its model (wrapped by accelerate), optimiser and results."""

    name: str
    student: str
    cfg: C.StudentConfig
    loss: C.LossConfig
    tasks: dict[str, float]  # task -> loss weight (0: evaluated, never trained)
    model: Any
    optimizer: torch.optim.Optimizer
    scheduler: Any
    run_dir: Path
    history: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] | None = None
    best_score: float = float("-inf")
    best_state: dict[str, Any] | None = None
    seconds: float = 0.0
    rng: torch.Tensor | None = None        # the run's own random stream (dropout), CPU state
    cuda_rng: list[torch.Tensor] | None = None
    steps: int = 0
    failed: str | None = None
    sparse: bool = False  # has embeddings with sparse (row) gradients

    @property
    def cross(self) -> bool:
        """A cross-task student (it lists `tasks:`): its metrics are kept per task."""
        return bool(self.cfg.tasks)


def variants(pipeline: C.PipelineConfig, student: str) -> list[tuple[str, C.LossConfig]]:
    """The student's run and, when `twin`, its hard-label twin `<name>-hard`."""
    st, loss = pipeline.students[student], pipeline.student_loss(student)
    return [(student, loss)] + ([(f"{student}-hard", C.LossConfig(alpha=1.0, chunk=loss.chunk))] if st.twin else [])


def steps_per_epoch(pipeline: C.PipelineConfig, student: str, sources: dict[str, Source], processes: int) -> int:
    """Optimiser steps one epoch gives `student` in each process: a batch per step over each of its weighted tasks."""
    return sum(math.ceil(sources[t].train.num_rows / processes / pipeline.train.batch_size)
               for t, w in pipeline.student_tasks(student).items() if w)


def pass_epochs(pipeline: C.PipelineConfig, students: list[str], sources: dict[str, Source], processes: int) -> int:
    """`train.epochs`, raised so that every student of the pass takes at least `train.min_steps` steps (a few hundred
    rows give a few dozen steps an epoch: too few to learn anything); the raise is logged."""
    train = pipeline.train
    fewest = min(steps_per_epoch(pipeline, s, sources, processes) for s in students)
    epochs = max(train.epochs, math.ceil(train.min_steps / max(1, fewest)))
    if epochs > train.epochs:
        log.info("%s: %d steps an epoch, so %d epochs instead of train.epochs=%d to reach train.min_steps=%d (set "
                 "train.min_steps=0 to turn this off)", "+".join(sources), fewest, epochs, train.epochs,
                 train.min_steps)
    return epochs


def make_runs(pipeline: C.PipelineConfig, students: list[str], sources: dict[str, Source], runs_dir: Path,
              accelerator: Any, only: set[str] | None = None, epochs: int | None = None) -> list[Run]:
    """Every student and twin (of the run names in `only`, when given): tokenizer once per student, then seed ->
    build -> AdamW -> warm-up and decay over `epochs` (default `train.epochs`) -> prepare."""
    train = pipeline.train
    epochs = epochs or train.epochs
    runs = []
    for s in students:
        st, tasks = pipeline.students[s], pipeline.student_tasks(s)
        where = f"students.{s}"
        multitask = REGISTRY[st.arch].multitask
        tok = multitask_tokenizer(st, sources) if multitask else init_tokenizer(st, where) if st.init_from else \
            sources[next(iter(tasks))].head.tokenizer(st, sources[next(iter(tasks))], where)
        steps = epochs * steps_per_epoch(pipeline, s, sources, accelerator.num_processes)
        for name, loss in variants(pipeline, s):
            if only is not None and name not in only:
                continue
            if loss.alpha >= 1.0 and not multitask and sources[next(iter(tasks))].labelled_train_rows() == 0:
                log.warning("%s: no gold labels in its training rows (languages %s): a hard-label run would learn "
                            "nothing, so it is skipped", name, ", ".join(st.languages) or "all")
                continue
            torch.manual_seed(train.seed)  # a KD student and its hard-label twin start from the same weights
            if multitask:
                model = build_multitask(st, sources, tok, where)
            else:
                src = sources[next(iter(tasks))]
                model = src.head.build_model(st, loss, src, tok, train.max_length, where)
                if st.init_from:  # a continual student: the earlier run's best weights
                    init_weights(model.core, st, where)
            opt = optimizer_for(model, st.learning_rate or train.learning_rate, train.weight_decay)
            sched = warmup_linear(opt, steps, train.warmup_ratio)
            sparse = bool(sparse_params(model))
            model, opt = accelerator.prepare(model, opt)
            runs.append(Run(name, s, st, loss, tasks, model, opt, sched, runs_dir / name, rng=torch.get_rng_state(),
                            cuda_rng=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                            sparse=sparse))
    return runs


@contextlib.contextmanager
def own_rng(run: Run):
    """Run the block on the run's own random stream (seeded like the run), so dropout and anything else random in a
    student's step never depends on which other students share the pass: alone or in company, the same result."""
    outer = torch.get_rng_state()
    outer_cuda = torch.cuda.get_rng_state_all() if run.cuda_rng is not None else None
    torch.set_rng_state(run.rng)
    if run.cuda_rng is not None:
        torch.cuda.set_rng_state_all(run.cuda_rng)
    try:
        yield
    finally:
        run.rng = torch.get_rng_state()
        torch.set_rng_state(outer)
        if outer_cuda is not None:
            run.cuda_rng = torch.cuda.get_rng_state_all()
            torch.cuda.set_rng_state_all(outer_cuda)


def step(run: Run, source: Source, batch: dict[str, Any], targets: Any, train: C.TrainConfig, accelerator: Any,
         epoch: int = 0) -> dict[str, float]:
    """One optimisation step of one student on one batch of one of its tasks, on the run's own random stream;
    a non-finite loss stops the run before it touches the weights."""
    with own_rng(run):
        run.model.train()
        logits, feats = run.model(source.task, batch)
        loss, parts = source.head.loss(logits, feats, targets, batch, run.loss, f"students.{run.student}")
        parts["loss"] = float(loss.detach())
        run.steps += 1
        if not math.isfinite(parts["loss"]):
            raise FloatingPointError(
                f"run {run.name}: the training loss is {parts['loss']} at epoch {epoch + 1}, step {run.steps} (task "
                f"{source.task}, {', '.join(f'{k} {v:.4g}' for k, v in parts.items() if k != 'loss')}); the run is "
                "stopped. Lower the learning rate or the temperature, or check the cached targets with "
                "`kdcache verify`")
        accelerator.backward(run.tasks[source.task] * loss)
        if train.grad_clip and run.sparse:  # torch's clipping refuses sparse gradients
            accelerator.unscale_gradients()
            clip_grad_norm_(run.model.parameters(), train.grad_clip)
        elif train.grad_clip:
            accelerator.clip_grad_norm_(run.model.parameters(), train.grad_clip)
        run.optimizer.step()
        run.scheduler.step()
        run.optimizer.zero_grad(set_to_none=True)
    return parts


def _epoch(runs: list[Run], sources: dict[str, Source], epoch: int, epochs: int, train: C.TrainConfig,
           accelerator: Any, on_step: Callable[[str, dict], None] | None) -> dict[str, Any]:
    """One pass over every source, their batches taking turns; returns per-run loss sums and the rows seen."""
    iters = {}
    for t, src in sources.items():
        src.train.set_epoch(epoch)
        iters[t] = iter(src.loader)
    sums = {r.name: {t: 0.0 for t in sources} for r in runs}
    feature_sums = {r.name: 0.0 for r in runs}
    batches = {t: 0 for t in sources}
    seen: list[tuple[str, int]] = []
    # Processes may get unequal numbers of batches (row groups are dealt round-robin): DDP's Join lets the ones that
    # finish early shadow the others' all-reduces instead of hanging (accelerate's join_uneven_inputs is a no-op on
    # CPU processes, hence torch's Join directly).
    ddp = [r.model for r in runs if isinstance(r.model, torch.nn.parallel.DistributedDataParallel)]
    total = sum(math.ceil(s.train.num_rows / accelerator.num_processes) for s in sources.values())
    with Join(ddp) if ddp else contextlib.nullcontext(), progress(
            total, desc=f"train {'+'.join(sources)} epoch {epoch + 1}/{epochs} ({len(runs)} students)",
            disable=not accelerator.is_local_main_process) as bar:
        while iters:
            for t in list(iters):
                batch = next(iters[t], None)
                if batch is None:
                    del iters[t]
                    continue
                src = sources[t]
                batches[t] += 1
                seen += [(t, r) for r in batch["row_id"].tolist()]
                if src.transform is not None:
                    batch = src.transform(batch)
                targets = src.head.targets(batch, src, accelerator.device)
                for run in runs:
                    if not run.tasks.get(t) or run.failed:  # not its task, or weighted 0: its head stays untouched
                        continue
                    t0 = time.perf_counter()
                    try:
                        parts = step(run, src, batch, targets, train, accelerator, epoch)
                    except FloatingPointError as e:
                        run.failed = str(e)
                        log.error("%s", e)
                        continue
                    run.seconds += time.perf_counter() - t0
                    sums[run.name][t] += parts["loss"]
                    feature_sums[run.name] += parts.get("feature", 0.0)
                    if on_step:
                        on_step(run.name, parts)
                bar.update(len(batch["id"]))
    return {"sums": sums, "features": feature_sums, "batches": batches, "seen": seen}


def _evaluate_epoch(run: Run, sources: dict[str, Source], epoch: int, done: dict[str, Any], accelerator: Any,
                    rows_info: dict[str, Any], eval_split: str) -> None:
    """Validation metrics of every task of the run; keep the best epoch's weights."""
    t0 = time.perf_counter()
    model: StudentModel = accelerator.unwrap_model(run.model)
    ev = {t: sources[t].head.evaluate(model, t, sources[t].eval, sources[t]) for t in run.tasks}
    score = float(np.mean([sources[t].head.metric.score(ev[t]) for t in ev]))
    losses = {t: done["sums"][run.name][t] / max(1, done["batches"][t]) for t in run.tasks}
    n_batches = sum(done["batches"][t] for t in run.tasks if run.tasks[t])
    entry: dict[str, Any] = {"epoch": epoch + 1}
    if run.cross:
        entry.update(score=score, eval=ev, train_loss=losses)
    else:
        (task,) = run.tasks
        entry.update(train_loss=losses[task], eval=ev[task])
    if run.loss.features:
        entry["feature_loss"] = done["features"][run.name] / max(1, n_batches)
    entry.update(rows_info)
    run.history.append(entry)
    if run.best is None or score > run.best_score:
        run.best, run.best_score, run.best_state = entry, score, copy.deepcopy(model.core.state_dict())
    run.seconds += time.perf_counter() - t0
    log.info("%s epoch %d: train loss %s; %s %s", run.name, epoch + 1, ", ".join(f"{v:.4f}" for v in losses.values()),
             eval_split, ", ".join(f"{t} {sources[t].head.metric.key} {_num(ev[t].get(sources[t].head.metric.key))}"
                                   for t in ev))


def _num(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.4f}"


def _finish(run: Run, sources: dict[str, Source], pipeline: C.PipelineConfig, teacher: str) -> dict[str, Any]:
    """The run's metrics with its best weights restored (test split evaluated)."""
    model: StudentModel = run.model
    model.core.load_state_dict(run.best_state)
    single = None if run.cross else sources[next(iter(run.tasks))]
    metrics: dict[str, Any] = {
        "run": run.name, "student": run.student, "arch": run.cfg.arch, "task": "+".join(run.tasks),
        "head": "cross-task" if run.cross else single.head.name, "kd": run.loss.alpha < 1.0, "teacher_mode": teacher,
        "loss": C.to_dict(run.loss), "parameters": sum(p.numel() for p in model.core.parameters()),
        # fewer than `parameters` where only adapters learn (LoRA)
        "trainable_parameters": sum(p.numel() for p in model.core.parameters() if p.requires_grad),
        "epochs": run.history, "best_epoch": run.best["epoch"], "eval": run.best["eval"],
        "train_seconds": round(run.seconds, 2), **({"init_from": run.cfg.init_from} if run.cfg.init_from else {})}
    if run.cross:
        metrics.update(tasks=dict(run.tasks), cache={t: sources[t].cache for t in run.tasks},
                       cache_fingerprint={t: sources[t].manifest["fingerprint"] for t in run.tasks})
        if pipeline.train.test_split:
            metrics["test"] = {t: sources[t].head.evaluate(model, t, sources[t].test, sources[t]) for t in run.tasks}
    else:
        metrics.update(cache=single.cache, cache_fingerprint=single.manifest["fingerprint"])
        if single.train.split != pipeline.train.train_split:  # the student's own training split
            metrics["train_split"] = single.train.split
        if single.teachers:  # several teachers: their weights and how KD combined them
            metrics.update(teachers=single.teachers, ensemble=run.loss.ensemble,
                           teacher_caches=dict(zip(single.teachers, (single.cache, *single.train.companion_urls))))
        if len(single.train.splits) > 1:  # unlabelled transfer splits read with the training split
            metrics["transfer"] = {s: single.manifest["splits"][s]["rows"] for s in single.train.splits[1:]}
        if single.test is not None:
            metrics["test"] = single.head.evaluate(model, single.task, single.test, single)
            metrics["languages"] = single.test.languages
            if len(single.test.languages) > 1:  # a multilingual student: its metrics per language too
                metrics["test_by_language"] = {
                    code: single.head.evaluate(model, single.task, CacheDataset(
                        single.cache, single.test.split, rank=0, world_size=1, languages=(code,)), single)
                    for code in single.test.languages}
        metrics.update(single.head.run_extras(model, single, pipeline))
        flag = at_chance(run.best["eval"].get(single.head.metric.key), single.head.chance(single))
        if flag:
            metrics["at_chance"] = flag
            log.warning("%s: %s %s %.4f is no better than the %s (%.4f, ± %.4f over %d rows): it learned next to "
                        "nothing. Give it more steps (train.min_steps, train.epochs), another learning rate "
                        "(train.learning_rate or the student's own), or a smaller student", run.name,
                        pipeline.train.eval_split, single.head.metric.key, flag["score"], flag["baseline"],
                        flag["baseline_score"], flag["margin"], flag["rows"])
    return metrics


def save_run(run: Run, model: StudentModel, metrics: dict[str, Any], pipeline: C.PipelineConfig,
             sources: dict[str, Source]) -> None:
    """The run folder of every head: config.yaml, cache.json, metrics.json and checkpoint/ (the best weights with
    what reads their inputs). The checkpoint is written under a temporary name of this process's own and swapped in
    under the folder's lock, each file atomically: two trainers saving the same run leave one whole run, the last
    one's, never a mix or a crash."""
    run.run_dir.mkdir(parents=True, exist_ok=True)
    unique = f"{os.getpid()}-{os.urandom(4).hex()}"
    tmp, old, ckpt = (run.run_dir / f".checkpoint.tmp-{unique}", run.run_dir / f".checkpoint.old-{unique}",
                      run.run_dir / "checkpoint")
    tmp.mkdir()
    try:
        model.save(tmp, run.best_state)
        metrics["size_bytes"] = sum(p.stat().st_size for p in tmp.iterdir() if p.suffix in (".pt", ".safetensors"))
        caches = {t: {"cache": sources[t].cache, "fingerprint": sources[t].manifest["fingerprint"],
                      "teacher": sources[t].manifest["fingerprint_inputs"]["teacher"]} for t in run.tasks}
        with open(run.run_dir / ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
            if ckpt.exists():
                os.replace(ckpt, old)
            os.replace(tmp, ckpt)
            write_text_atomic(run.run_dir / "config.yaml", yaml.safe_dump(
                {"pipeline": pipeline.name, "student": run.student, "run": run.name,
                 "train": C.to_dict(pipeline.train), "student_config": C.to_dict(run.cfg),
                 "loss": C.to_dict(run.loss)}, sort_keys=False))
            write_text_atomic(run.run_dir / "cache.json",
                              json.dumps(caches if run.cross else next(iter(caches.values())), indent=1))
            write_text_atomic(run.run_dir / "metrics.json", json.dumps(metrics, indent=1))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def fit(pipeline: C.PipelineConfig, students: list[str], caches: dict[str, str], runs_dir: Path,
        teacher: str = "cache", teachers_dir: Path | None = None,
        on_step: Callable[[str, dict], None] | None = None, only: set[str] | None = None,
        transfer: tuple[str, ...] = (), split: str | None = None,
        teachers: dict[str, float] | None = None, labels: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """Train `students` (whose tasks, languages, training `split`, `transfer` splits, teachers and training classes
    `labels` together form one pass; of their runs, those named in `only`, when given) from `caches` (task ->
    cache); their metrics."""
    from accelerate import Accelerator
    train = pipeline.train
    # cpu=True on GPU-less machines: accelerate 1.x otherwise reports DistributedType.NO under a 2-process launch
    accelerator = Accelerator(mixed_precision=train.mixed_precision, cpu=not torch.cuda.is_available())
    tasks = sorted({t for s in students for t in pipeline.student_tasks(s)})
    sources = {}
    for t in tasks:
        layers = tuple(sorted({f.teacher_layer for s in students if t in pipeline.student_tasks(s)
                               for f in pipeline.student_loss(s).features}))
        sources[t] = open_source(pipeline, t, caches[t], accelerator, layers,
                                 pipeline.students[students[0]].languages or None, transfer, split,
                                 {k: (caches.get(k, k), w) for k, w in (teachers or {}).items()}, labels)
    epochs = pass_epochs(pipeline, students, sources, accelerator.num_processes)
    runs = make_runs(pipeline, students, sources, runs_dir, accelerator, only, epochs)
    if teacher == "live":
        from .live import live_targets
        for t, src in sources.items():
            src.transform = live_targets(pipeline, t, teachers_dir or layout.teachers_dir(), src.train.feature_layers)
    from accelerate.utils import gather_object
    for epoch in range(epochs):
        done = _epoch(runs, sources, epoch, epochs, train, accelerator, on_step)
        per_process = gather_object([done["seen"]])
        rows_info = {"train_rows_per_process": [len(x) for x in per_process],
                     "train_rows_distinct": len(set().union(*map(set, per_process)))}
        for run in runs:
            if not run.failed:
                _evaluate_epoch(run, sources, epoch, done, accelerator, rows_info, train.eval_split)
    results = []
    for run in runs:
        if run.failed:
            results.append({"run": run.name, "failed": run.failed})
            continue
        run.model = accelerator.unwrap_model(run.model)
        metrics = _finish(run, sources, pipeline, teacher)
        if accelerator.is_main_process:
            save_run(run, run.model, metrics, pipeline, sources)
        results.append(metrics)
    return results


def train_students(pipeline: C.PipelineConfig, students: list[str], caches: str | Path | dict[str, str],
                   runs_dir: Path, teacher: str = "cache", teachers_dir: Path | None = None,
                   on_step: Callable[[str, dict], None] | None = None) -> list[dict[str, Any]]:
    """Stage two for any heads: one pass per task for its single-task students, one pass over the union of their
    tasks for the cross-task students; returns every run's metrics. `caches`: a folder or fsspec URL holding one
    cache per task (`<caches>/<task>/`, as `kdcache cache` writes them), or {task: cache}."""
    if teacher == "live":
        for s in students:
            if pipeline.students[s].teachers or pipeline.students[s].transfer:
                raise C.ConfigError(f"--teacher live (online KD) runs the task's one teacher on its training split; "
                                    f"student {s} has several `teachers` or `transfer` splits: train it from the cache")
            for t in pipeline.student_tasks(s):
                if not heads.has(pipeline.tasks[t].teacher.head, heads.LIVE_TEACHER):
                    raise C.ConfigError(f"--teacher live (online KD) is for "
                                        f"{' or '.join(heads.with_capability(heads.LIVE_TEACHER))} tasks only; "
                                        f"task {t} has a {pipeline.tasks[t].teacher.head} teacher")
    # one pass per task, language selection, training split, transfer splits and teachers (a per-language student
    # reads its partition; a hard-label twin learns nothing from unlabelled transfer rows or other teachers' targets,
    # so it joins the pass of the training split alone; `train_labels` picks the rows of both)
    groups: dict[tuple[tuple[str, ...], str | None, tuple[str, ...], tuple, tuple], dict[str, set[str]]] = {}
    for s in students:
        st = pipeline.students[s]
        key = ("+cross",) if st.tasks else (*pipeline.student_tasks(s), "@", *st.languages)
        for name, loss in variants(pipeline, s):
            transfer = st.transfer if loss.alpha < 1.0 else ()
            teachers = tuple(st.teachers.items()) if loss.alpha < 1.0 else ()
            groups.setdefault((key, st.train_split, transfer, teachers, st.train_labels), {}).setdefault(
                s, set()).add(name)
    if not isinstance(caches, dict):
        root = str(caches).rstrip("/")
        caches = {t: f"{root}/{t}" for t in pipeline.tasks}
    missing = sorted({t for s in students for t in [*pipeline.student_tasks(s), *pipeline.students[s].teachers]
                      if "/" not in t} - set(caches))  # (a teacher named by its cache's path needs no entry)
    if missing:
        raise C.ConfigError(f"no cache given for task(s) {', '.join(missing)}")
    results = [r for (_, split, transfer, teachers, labels), members in groups.items()
               for r in fit(pipeline, list(members), {t: str(c) for t, c in caches.items()}, runs_dir, teacher,
                            teachers_dir, on_step, set().union(*members.values()), transfer, split, dict(teachers),
                            labels)]
    failed = [r["failed"] for r in results if "failed" in r]
    if failed:
        raise TrainingError("; ".join(failed), [r for r in results if "failed" not in r])
    return results
