"""Stage two for cross-task students: one shared encoder learns several tasks' caches at once (e.g. sentiment and
CoNLL NER), batches of the tasks taking turns, each task's loss (its KD loss on its own teacher's cached logits,
α-mixed with its gold labels) scaled by the student's per-task weight. Each student gets a hard-label twin."""

from __future__ import annotations

import copy
import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import config as C
from .cache.format import CacheFormatError
from .losses import distillation_loss
from .ner_trainer import evaluate_tagger, pad_targets, save_word_run, tagger_loss
from .optim import adamw, warmup_linear
from .progress import progress
from .reader import CacheDataset, collate, open_manifest, read_column, training_split
from .students.multitask import HEADS, build_multitask
from .students.tokenizers import _WORD, WordTokenizer
from .trainer import classification_metrics

log = logging.getLogger(__name__)


def sentence_words(batch: dict[str, Any], fields: list[str]) -> list[list[str]]:
    """A classification batch's texts as word lists (case kept for the word shapes), text pairs joined."""
    return [[w for f in fields for w in _WORD.findall(batch[f][i])] for i in range(len(batch["id"]))]


class _TaskView(torch.nn.Module):
    """The student seen through one task's head, with a tagger's call signature (for evaluate_tagger)."""

    def __init__(self, model: torch.nn.Module, task: str) -> None:
        super().__init__()
        self.model, self.task = model, task

    def forward(self, ids, shapes, mask):
        return self.model(self.task, ids, shapes, mask)


@torch.inference_mode()
def evaluate_task(model, tok: WordTokenizer, info: dict[str, Any], split: str, device) -> dict[str, Any]:
    """Accuracy (classification) or entity F1 (token classification) of one task's head on a cached split."""
    ds = info["eval" if split == "eval" else "test"]
    if info["head"] == "token-classification":
        return evaluate_tagger(_TaskView(model, info["task"]), tok, ds, info["labels"], device)
    model.eval()
    pred, labels, teacher = [], [], []
    for b in torch.utils.data.DataLoader(ds, batch_size=128, collate_fn=collate):
        ids, shapes, mask = tok.encode_words(sentence_words(b, info["fields"]))
        pred.append(model(info["task"], ids.to(device), shapes.to(device), mask.to(device)).argmax(-1).cpu().numpy())
        labels.append(b["label"].numpy())
        teacher.append(b["logits"].argmax(-1).numpy())
    return classification_metrics(np.concatenate(pred), np.concatenate(labels), np.concatenate(teacher),
                                  len(info["labels"]))


def task_score(info: dict[str, Any], metrics: dict[str, Any]) -> float:
    return metrics["f1"] if info["head"] == "token-classification" else (metrics["accuracy"] or 0.0)


def cross_train(pipeline: C.PipelineConfig, students: list[str], cache_root: str, runs_dir: Path) -> list[dict]:
    """Train cross-task students (and their hard-label twins) from the caches of the tasks each lists."""
    from accelerate import Accelerator
    train = pipeline.train
    accelerator = Accelerator(mixed_precision=train.mixed_precision, cpu=not torch.cuda.is_available())
    tasks = sorted({t for s in students for t in pipeline.students[s].tasks})
    infos: dict[str, dict[str, Any]] = {}
    for t in tasks:
        cache = f"{cache_root}/{t}"
        ds = training_split(cache, pipeline, t, accelerator)
        m = ds.manifest
        if m["head"] not in HEADS:
            raise CacheFormatError(f"{cache}: head {m['head']!r}; a cross-task student learns "
                                   f"{' and '.join(HEADS)} tasks")
        infos[t] = {"task": t, "cache": cache, "head": m["head"], "labels": list(m["label_names"]),
                    "fields": list(m["text_fields"]), "train": ds, "fingerprint": m["fingerprint"],
                    "eval": CacheDataset(cache, train.eval_split, rank=0, world_size=1),
                    "test": CacheDataset(cache, train.test_split, rank=0, world_size=1) if train.test_split else None}
    words: dict[str, list[list[str]]] = {}  # each task's cached training sentences, as words
    for t, info in infos.items():
        if info["head"] == "token-classification":
            words[t] = read_column(info["cache"], train.train_split, "words")
        else:
            cols = {f: read_column(info["cache"], train.train_split, f) for f in info["fields"]}
            words[t] = sentence_words({**cols, "id": cols[info["fields"][0]]}, info["fields"])
        info["steps"] = math.ceil(info["train"].num_rows / accelerator.num_processes / train.batch_size)

    runs = []
    for s in students:
        st = pipeline.students[s]
        tok = WordTokenizer.build_from_words([w for t in sorted(st.tasks) for w in words[t]], st.vocab_size)
        steps = train.epochs * sum(infos[t]["steps"] for t, w in st.tasks.items() if w)
        heads = {t: (infos[t]["head"], len(infos[t]["labels"])) for t in st.tasks}
        loss = st.loss or train.loss
        for name, lo in [(s, loss)] + ([(f"{s}-hard", C.LossConfig(alpha=1.0))] if st.twin else []):
            torch.manual_seed(train.seed)  # a KD student and its hard-label twin start from the same weights
            model = build_multitask(st.params, tok.vocab_size, heads, f"students.{s}")
            opt = adamw(model.parameters(), st.learning_rate or train.learning_rate, train.weight_decay)
            sched = warmup_linear(opt, steps, train.warmup_ratio)
            model, opt = accelerator.prepare(model, opt)
            runs.append({"name": name, "student": s, "cfg": st, "loss": lo, "tok": tok, "model": model, "opt": opt,
                         "sched": sched, "history": [], "best": None, "best_state": None, "seconds": 0.0})

    dev = accelerator.device
    for epoch in range(train.epochs):
        iters = {}
        for t, info in infos.items():
            info["train"].set_epoch(epoch)
            iters[t] = iter(torch.utils.data.DataLoader(info["train"], batch_size=train.batch_size,
                                                        collate_fn=collate, num_workers=train.num_workers))
        sums = {r["name"]: {t: 0.0 for t in tasks} for r in runs}
        counts = {t: 0 for t in tasks}
        with progress(sum(math.ceil(i["train"].num_rows / accelerator.num_processes) for i in infos.values()),
                      desc=f"train {'+'.join(tasks)} epoch {epoch + 1}/{train.epochs} ({len(runs)} students)",
                      disable=not accelerator.is_local_main_process) as bar:
            while iters:
                for t in list(iters):  # the tasks take turns, one batch each
                    batch = next(iters[t], None)
                    if batch is None:
                        del iters[t]
                        continue
                    counts[t] += 1
                    info = infos[t]
                    tagging = info["head"] == "token-classification"
                    # words and targets once per batch; only the word ids depend on the student's vocabulary
                    words = batch["words"] if tagging else sentence_words(batch, info["fields"])
                    if tagging:
                        targets = [x.to(dev) for x in pad_targets(batch, max(1, max(map(len, words))),
                                                                    len(info["labels"]))]
                    else:
                        targets = [batch["logits"].to(dev), batch["label"].to(dev)]
                    for r in runs:
                        weight = r["cfg"].tasks.get(t)
                        if not weight:  # not this student's task, or weighted 0: its head is left untouched
                            continue
                        t0 = time.perf_counter()
                        r["model"].train()
                        ids, shapes, mask = r["tok"].encode_words(words)
                        logits = r["model"](t, ids.to(dev), shapes.to(dev), mask.to(dev))
                        lo = r["loss"]
                        if tagging:
                            loss, _ = tagger_loss(logits, *targets, lo)
                        else:
                            loss, _ = distillation_loss(logits, *targets, lo.kind, lo.temperature, lo.alpha, lo.beta)
                        accelerator.backward(weight * loss)
                        if train.grad_clip:
                            accelerator.clip_grad_norm_(r["model"].parameters(), train.grad_clip)
                        r["opt"].step()
                        r["sched"].step()
                        r["opt"].zero_grad(set_to_none=True)
                        sums[r["name"]][t] += float(loss.detach())
                        r["seconds"] += time.perf_counter() - t0
                    bar.update(len(batch["id"]))
        for r in runs:
            t0 = time.perf_counter()
            model = accelerator.unwrap_model(r["model"])
            ev = {t: evaluate_task(model, r["tok"], infos[t], "eval", dev) for t in r["cfg"].tasks}
            score = float(np.mean([task_score(infos[t], ev[t]) for t in ev]))
            r["history"].append({"epoch": epoch + 1, "score": score, "eval": ev,
                                 "train_loss": {t: sums[r["name"]][t] / max(1, counts[t]) for t in ev}})
            if r["best"] is None or score > r["best"]["score"]:
                r["best"], r["best_state"] = r["history"][-1], copy.deepcopy(model.state_dict())
            r["seconds"] += time.perf_counter() - t0
            log.info("%s epoch %d: %s mean score %.4f", r["name"], epoch + 1, train.eval_split, score)

    results = []
    for r in runs:
        model = accelerator.unwrap_model(r["model"])
        model.load_state_dict(r["best_state"])
        metrics = {"run": r["name"], "student": r["student"], "arch": r["cfg"].arch, "task": "+".join(r["cfg"].tasks),
                   "tasks": dict(r["cfg"].tasks), "head": "cross-task", "kd": r["loss"].alpha < 1.0,
                   "loss": C.to_dict(r["loss"]), "parameters": sum(p.numel() for p in model.parameters()),
                   "epochs": r["history"], "best_epoch": r["best"]["epoch"], "eval": r["best"]["eval"],
                   "train_seconds": round(r["seconds"], 2),
                   "cache": {t: infos[t]["cache"] for t in r["cfg"].tasks},
                   "cache_fingerprint": {t: infos[t]["fingerprint"] for t in r["cfg"].tasks}}
        if train.test_split:
            metrics["test"] = {t: evaluate_task(model, r["tok"], infos[t], "test", dev) for t in r["cfg"].tasks}
        if accelerator.is_main_process:
            save_word_run(runs_dir / r["name"], r["best_state"], r["tok"], metrics)
        results.append(metrics)
    return results


def cross_report_lines(runs: list[dict[str, Any]]) -> list[str]:
    """One row per cross-task run: each task's test metric (accuracy or entity F1) and its KD gain over the twin."""
    by_run = {r["run"]: r for r in runs}
    tasks = sorted({t for r in runs for t in r["tasks"]})

    def metric(r, t):
        m = (r.get("test") or {}).get(t)
        return None if m is None else (m["f1"] if "f1" in m else m.get("accuracy"))

    lines = ["Cross-task students: one shared encoder, a head per task, trained on every listed task's cache. "
             "Test accuracy (classification) or entity F1 (token classification) per task; KD gain against the "
             "hard-label twin.", "",
             "| model | task weights | params | " + " | ".join(f"{t} test | {t} KD gain" for t in tasks) + " |",
             "|---|---|---:|" + "---:|---:|" * len(tasks)]
    teacher = []
    for t in tasks:  # each task's own teacher, from its cache's statistics
        cache = next(r["cache"][t] for r in runs if t in r["cache"])
        try:
            st = open_manifest(cache)[2]["splits"]["test"]["stats"]
            v = st.get("teacher_entity_f1", st.get("teacher_accuracy"))
        except (KeyError, FileNotFoundError, CacheFormatError):
            v = None
        teacher += ["–" if v is None else f"{v:.4f}", "–"]
    lines.append("| **teachers** (one per task) | – | – | " + " | ".join(teacher) + " |")
    for r in sorted(runs, key=lambda r: (r["student"], not r["kd"])):
        twin = by_run.get(f"{r['run']}-hard")
        cells = []
        for t in tasks:
            v, w = metric(r, t), metric(twin, t) if r["kd"] and twin else None
            cells += ["–" if v is None else f"{v:.4f}", "–" if v is None or w is None else f"{v - w:+.4f}"]
        weights = ", ".join(f"{t} {w:g}" for t, w in sorted(r["tasks"].items()))
        lines.append(f"| {r['run']} ({'KD' if r['kd'] else 'hard labels'}) | {weights} | {r['parameters']:,} | "
                     + " | ".join(cells) + " |")
    return lines
