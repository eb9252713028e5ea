"""Stage two for token-classification caches: word-level taggers trained on the cached per-word teacher logits
(α·CE on gold tags + (1-α)·KD, dense over the tag set, T² scaled) next to their hard-label twins. Words the teacher
never saw (beyond its max_length) get the hard-label loss only. Metric: entity-level F1 (conlleval rules)."""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import config as C
from .cache.format import CacheFormatError
from .config import ConfigError
from .losses import dense_kd_loss_per_row, feature_loss
from .ner import entity_f1
from .optim import adamw, warmup_linear
from .progress import progress
from .reader import CacheDataset, collate, read_column, training_split
from .students.tagger import build_tagger
from .students.tokenizers import WordTokenizer

log = logging.getLogger(__name__)


def pad_targets(batch: dict[str, Any], width: int, num_labels: int) -> tuple[torch.Tensor, ...]:
    """Gold tags [B, W] (-1 = padding or a word without a gold tag), teacher logits [B, W, C] and covered-word
    mask [B, W] from ragged rows."""
    B = len(batch["tags"])
    tags = torch.full((B, width), -1, dtype=torch.long)
    teacher = torch.zeros((B, width, num_labels))
    covered = torch.zeros((B, width), dtype=torch.bool)
    for i, (t, lg, c) in enumerate(zip(batch["tags"], batch["logits"], batch["covered_words"])):
        tags[i, :len(t)] = torch.as_tensor(t)
        teacher[i, :int(c)] = torch.as_tensor(lg)
        covered[i, :int(c)] = True
    return tags, teacher, covered


class TaggerWithProjections(nn.Module):
    """A tagger plus one learned projection (student width -> teacher width) per feature-loss term, as one module."""

    def __init__(self, tagger: nn.Module, terms: tuple[C.FeatureLossConfig, ...], feature_dims: dict[int, int],
                 where: str) -> None:
        super().__init__()
        for f in terms:
            if f.student_layer not in (0, -1):
                raise ConfigError(f"{where}.loss.features: student_layer {f.student_layer}: a tagger exposes one "
                                  "per-word representation (its last layer); use student_layer: -1 (or 0)")
        self.tagger, self.terms = tagger, terms
        self.projections = nn.ModuleList(nn.Linear(tagger.hidden_size, feature_dims[f.teacher_layer]) for f in terms)

    def forward(self, ids, shapes, mask):
        if not self.terms:
            return self.tagger(ids, shapes, mask), []
        h = self.tagger.encode(ids, shapes, mask)
        return self.tagger.head(h), [proj(h) for proj in self.projections]


def pad_features(batch: dict[str, Any], layer: int, width: int, dim: int) -> torch.Tensor:
    """Cached per-word teacher features of one layer, zero-padded to [B, width, dim] (covered words filled)."""
    out = torch.zeros((len(batch["tags"]), width, dim))
    for i, f in enumerate(batch["features"]):
        x = f[f"layer_{layer}"]
        out[i, :len(x)] = torch.as_tensor(x)
    return out


def tagger_loss(logits: torch.Tensor, tags: torch.Tensor, teacher: torch.Tensor, covered: torch.Tensor,
                loss: C.LossConfig) -> tuple[torch.Tensor, dict[str, float]]:
    """Per word: α·CE + (1-α)·KD where it has a gold tag and teacher logits; CE alone where the teacher did not
    cover it; KD alone where it has no gold tag (label-scarce data); mean over the words that have a term.
    α = 1 (the hard-label twin) uses gold-tagged words only."""
    labelled = tags >= 0
    use = labelled | covered if loss.alpha < 1.0 else labelled
    if not use.any():  # e.g. a hard-label twin on a batch of untagged sentences: nothing to learn, no NaN
        return logits.sum() * 0.0, {"ce": 0.0, "kd": 0.0}
    s, y, t, cov, lab = logits[use].float(), tags[use], teacher[use], covered[use], labelled[use]
    ce = F.cross_entropy(s, y.clamp_min(0), reduction="none")
    if loss.alpha >= 1.0:
        return ce.mean(), {"ce": float(ce.detach().mean()), "kd": 0.0}
    kd = dense_kd_loss_per_row(s, t, loss.kind, loss.temperature, loss.beta)
    per = torch.where(lab, torch.where(cov, loss.alpha * ce + (1.0 - loss.alpha) * kd, ce), kd)
    return per.mean(), {"ce": float(ce.detach()[lab].mean()) if lab.any() else 0.0,
                        "kd": float(kd.detach()[cov].mean()) if cov.any() else 0.0}


@torch.inference_mode()
def evaluate_tagger(model: torch.nn.Module, tok: WordTokenizer, ds: CacheDataset, names: list[str],
                    device: torch.device) -> dict[str, Any]:
    """Entity-level precision/recall/F1 on gold tags, and word-level agreement with the teacher's tags."""
    model.eval()
    gold, pred, agree, covered_total = [], [], 0, 0
    for batch in torch.utils.data.DataLoader(ds, batch_size=128, collate_fn=collate):
        ids, shapes, mask = tok.encode_words(batch["words"])
        out = model(ids.to(device), shapes.to(device), mask.to(device)).argmax(-1).cpu().numpy()
        for i, (t, lg, c) in enumerate(zip(batch["tags"], batch["logits"], batch["covered_words"])):
            p = out[i, :len(t)]
            gold.append([names[x] for x in t])
            pred.append([names[x] for x in p])
            agree += int((p[:int(c)] == lg.argmax(-1)).sum())
            covered_total += int(c)
    return {**entity_f1(gold, pred), "teacher_agreement": agree / max(covered_total, 1), "rows": len(gold)}


def ner_train_task(pipeline: C.PipelineConfig, task: str, students: list[str], cache: str,
                   runs_dir: Path) -> list[dict[str, Any]]:
    """Train word-level taggers (and their hard-label twins) from a token-classification cache; returns metrics."""
    from accelerate import Accelerator
    train = pipeline.train
    accelerator = Accelerator(mixed_precision=train.mixed_precision, cpu=not torch.cuda.is_available())
    losses = {s: pipeline.students[s].loss or train.loss for s in students}
    layers = tuple(sorted({f.teacher_layer for lo in losses.values() for f in lo.features}))
    train_ds = training_split(cache, pipeline, task, accelerator, layers)
    m = train_ds.manifest
    feature_dims = {j: m["features"]["hidden_size"] for j in layers}
    if m["head"] != "token-classification":
        raise CacheFormatError(f"{cache}: head {m['head']!r}; taggers need a token-classification cache")
    names = list(m["label_names"])
    eval_ds = CacheDataset(cache, train.eval_split, rank=0, world_size=1)
    test_ds = CacheDataset(cache, train.test_split, rank=0, world_size=1) if train.test_split else None
    steps = train.epochs * math.ceil(train_ds.num_rows / accelerator.num_processes / train.batch_size)
    train_words = read_column(cache, train.train_split, "words")

    runs = []
    for s in students:
        st = pipeline.students[s]
        tok = WordTokenizer.build_from_words(train_words, st.vocab_size)
        for name, lo in [(s, losses[s])] + ([(f"{s}-hard", C.LossConfig(alpha=1.0))] if st.twin else []):
            torch.manual_seed(train.seed)  # a KD student and its hard-label twin start from the same weights
            model = TaggerWithProjections(build_tagger(st.arch, st.params, tok.vocab_size, len(names),
                                                       f"students.{s}"), lo.features, feature_dims, f"students.{s}")
            opt = adamw(model.parameters(), st.learning_rate or train.learning_rate, train.weight_decay)
            sched = warmup_linear(opt, steps, train.warmup_ratio)
            model, opt = accelerator.prepare(model, opt)
            runs.append({"name": name, "student": s, "cfg": st, "loss": lo, "tok": tok, "model": model, "opt": opt,
                         "sched": sched, "history": [], "best": None, "best_state": None, "seconds": 0.0})

    loader = torch.utils.data.DataLoader(train_ds, batch_size=train.batch_size, collate_fn=collate,
                                         num_workers=train.num_workers)
    dev = accelerator.device
    for epoch in range(train.epochs):
        train_ds.set_epoch(epoch)
        sums = {r["name"]: 0.0 for r in runs}
        feat_sums = {r["name"]: 0.0 for r in runs}
        n_batches = 0
        with progress(math.ceil(train_ds.num_rows / accelerator.num_processes),
                      desc=f"train {task} epoch {epoch + 1}/{train.epochs} ({len(runs)} students)",
                      disable=not accelerator.is_local_main_process) as bar:
            for batch in loader:
                # targets padded once per batch: every student's word ids have the batch's longest sentence width
                width = max(1, max(len(w) for w in batch["words"]))
                tags, teacher, covered = (x.to(dev) for x in pad_targets(batch, width, len(names)))
                wanted = {j: pad_features(batch, j, width, d).to(dev)[covered] for j, d in feature_dims.items()} \
                    if covered.any() else {}
                for r in runs:
                    t0 = time.perf_counter()
                    r["model"].train()
                    ids, shapes, mask = r["tok"].encode_words(batch["words"])
                    logits, projected = r["model"](ids.to(dev), shapes.to(dev), mask.to(dev))
                    loss, _ = tagger_loss(logits, tags, teacher, covered, r["loss"])
                    for f, pred in zip(r["loss"].features, projected):  # on the words the teacher saw
                        if wanted:
                            term = f.weight * feature_loss(pred[covered], wanted[f.teacher_layer], f.kind)
                            loss = loss + term
                            feat_sums[r["name"]] += float(term.detach())
                    accelerator.backward(loss)
                    if train.grad_clip:
                        accelerator.clip_grad_norm_(r["model"].parameters(), train.grad_clip)
                    r["opt"].step()
                    r["sched"].step()
                    r["opt"].zero_grad(set_to_none=True)
                    sums[r["name"]] += float(loss.detach())
                    r["seconds"] += time.perf_counter() - t0
                n_batches += 1
                bar.update(len(batch["id"]))
        for r in runs:
            t0 = time.perf_counter()
            model = accelerator.unwrap_model(r["model"]).tagger
            ev = evaluate_tagger(model, r["tok"], eval_ds, names, accelerator.device)
            r["history"].append({"epoch": epoch + 1, "train_loss": sums[r["name"]] / max(1, n_batches),
                                 **({"feature_loss": feat_sums[r["name"]] / max(1, n_batches)}
                                    if r["loss"].features else {}), "eval": ev})
            if r["best"] is None or ev["f1"] > r["best"]["eval"]["f1"]:
                r["best"], r["best_state"] = r["history"][-1], copy.deepcopy(model.state_dict())
            r["seconds"] += time.perf_counter() - t0
            log.info("%s epoch %d: train loss %.4f, %s entity F1 %.4f", r["name"], epoch + 1,
                     r["history"][-1]["train_loss"], train.eval_split, ev["f1"])

    results = []
    for r in runs:
        model = accelerator.unwrap_model(r["model"]).tagger  # the projections serve training only
        model.load_state_dict(r["best_state"])
        metrics = {"run": r["name"], "student": r["student"], "arch": r["cfg"].arch, "task": task,
                   "head": "token-classification", "kd": r["loss"].alpha < 1.0, "loss": C.to_dict(r["loss"]),
                   "parameters": sum(p.numel() for p in model.parameters()), "epochs": r["history"],
                   "best_epoch": r["best"]["epoch"], "eval": r["best"]["eval"], "train_seconds": round(r["seconds"], 2),
                   "cache": str(cache), "cache_fingerprint": m["fingerprint"]}
        if test_ds is not None:
            metrics["test"] = evaluate_tagger(model, r["tok"], test_ds, names, accelerator.device)
        if accelerator.is_main_process:
            save_word_run(runs_dir / r["name"], r["best_state"], r["tok"], metrics)
        results.append(metrics)
    return results


def save_word_run(run_dir: Path, state: dict[str, Any], tok: WordTokenizer, metrics: dict[str, Any]) -> None:
    """A word-level student's run folder: checkpoint/student.pt, its word vocabulary, and metrics.json."""
    ckpt = run_dir / "checkpoint"
    ckpt.mkdir(parents=True, exist_ok=True)
    torch.save(state, ckpt / "student.pt")
    tok.save(ckpt)
    metrics["size_bytes"] = (ckpt / "student.pt").stat().st_size
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=1))


def teacher_ner_row(cache: str, test_split: str) -> dict[str, Any]:
    from .reader import open_manifest
    m = open_manifest(cache)[2]
    st = m["splits"][test_split]["stats"]
    t = m["fingerprint_inputs"]["teacher"]
    return {"run": f"teacher ({t['name']})", "task": m["task"], "parameters": t.get("parameters"),
            "test": {"f1": st["teacher_entity_f1"]}, "uncovered_words": st.get("uncovered_words")}


def ner_report_lines(runs: list[dict[str, Any]], teachers: dict[str, dict[str, Any]]) -> list[str]:
    by_run = {r["run"]: r for r in runs}
    lines = ["Token classification: entity-level F1 on the test split (exact type and boundaries, conlleval "
             "rules); agreement = share of words tagged as the teacher tags them. KD gain = F1 of the KD student "
             "minus its hard-label twin (same architecture, seed and batches).", "",
             "| model | task | params | test entity F1 | precision | recall | teacher agreement | train s | KD gain |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for task, t in teachers.items():
        lines.append(f"| **{t['run']}** | {task} | {t['parameters'] or 0:,} | {t['test']['f1']:.4f} | – | – | 1.0000 | "
                     "– | – |")
    for r in sorted(runs, key=lambda r: (r["task"], r["student"], not r["kd"])):
        test = r.get("test", {})
        twin = by_run.get(f"{r['run']}-hard")
        gain = f"{test['f1'] - twin['test']['f1']:+.4f}" if r["kd"] and twin and test else "–"
        lines.append(f"| {r['run']} ({r['arch']}{', KD' if r['kd'] else ', hard labels'}) | {r['task']} | "
                     f"{r['parameters']:,} | {test.get('f1', float('nan')):.4f} | {test.get('precision', float('nan')):.4f} | "
                     f"{test.get('recall', float('nan')):.4f} | {test.get('teacher_agreement', float('nan')):.4f} | "
                     f"{r['train_seconds']:.1f} | {gain} |")
    return lines

