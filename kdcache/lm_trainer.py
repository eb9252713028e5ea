"""Stage two for causal-LM caches: train small Llama-style students on the cached next-token targets (sparse KD:
top-k + exact tail, or sampled targets) against their next-token-CE twins, never loading the teacher.
Metrics: held-out perplexity and KL(teacher || student) on the cached top-k + tail buckets at T = 1."""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch

from . import config as C
from .cache.format import CacheFormatError
from .losses import (_LOG_TINY, SampledTargets, TopKTargets, kd_loss_per_row, sampled_kd_loss_per_row,
                     token_ce_per_row)
from .optim import adamw, warmup_linear
from .progress import progress
from .reader import CacheDataset, collate, training_split
from .students.llama import build_lm_student

log = logging.getLogger(__name__)
TARGETS = ("topk", "sampled", "topk-renorm")


class TokenizerMismatchError(CacheFormatError):
    """A student names a tokenizer other than the one the cache's token ids come from."""


def check_student_tokenizer(st: C.StudentConfig, lm: dict[str, Any], where: str) -> None:
    """LM students read the cache's token ids, so they must use the teacher's tokenizer: refuse another one."""
    if st.tokenizer == "words":  # the default: the cache's own (teacher) tokenizer
        return
    from transformers import AutoTokenizer

    from .fingerprint import hash_tokenizer
    from .resolve import resolve_model_name
    got = hash_tokenizer(AutoTokenizer.from_pretrained(resolve_model_name(st.tokenizer)))
    if got != lm["tokenizer_sha256"]:
        raise TokenizerMismatchError(
            f"{where}: tokenizer {st.tokenizer!r} (sha256 {got[:12]}) is not the tokenizer the cache's token ids and "
            f"top-k targets were made with (sha256 {lm['tokenizer_sha256'][:12]}); an LM student must share the "
            "teacher's vocabulary: remove `tokenizer:` from the student, or rebuild the cache with a teacher that "
            "uses this tokenizer")


def lm_targets(batch: dict[str, Any], loss: C.LossConfig, lm: dict[str, Any], where: str):
    """The KD targets of a batch, flattened to one row per position, at the loss's temperature."""
    T = loss.temperature
    if loss.targets == "sampled":
        if not lm.get("samples"):
            raise CacheFormatError(f"{where}: loss.targets is `sampled` but the cache has no samples; rebuild it "
                                   "with cache.samples > 0, or use targets `topk`")
        if T != lm["sample_temperature"]:
            raise CacheFormatError(f"{where}: sampled targets were drawn at T={lm['sample_temperature']}; set "
                                   f"loss.temperature to it (got {T})")
        return padded_samples(batch["sample_ids"], batch["sample_counts"], batch["sample_lengths"].reshape(-1))
    if T not in lm["temperatures"]:
        raise CacheFormatError(f"{where}: loss.temperature {T} is not one the cache stores the log-sum-exp and tail "
                               f"for ({lm['temperatures']}); pick one of them, or rebuild the cache with "
                               "cache.temperatures including it")
    j = lm["temperatures"].index(T)
    k = batch["topk_ids"].shape[-1]
    t = TopKTargets.from_cached(batch["topk_ids"].reshape(-1, k), batch["topk_logits"].reshape(-1, k),
                                batch["lse"][..., j].reshape(-1), batch["tail"][..., j].reshape(-1), T)
    if loss.targets == "topk-renorm":  # the naive baseline: tail dropped, top-k renormalised to sum to 1
        t = TopKTargets(t.ids, torch.log_softmax(t.logprobs, -1), torch.full_like(t.tail, _LOG_TINY))
    return t


def padded_samples(ids: torch.Tensor, counts: torch.Tensor, lengths: torch.Tensor) -> SampledTargets:
    """Flat position-major sampled ids/counts with per-position lengths [N] -> padded [N, max length]."""
    n, m = lengths.shape[0], int(lengths.max())
    pos = torch.repeat_interleave(torch.arange(n), lengths)
    start = torch.cumsum(lengths, 0) - lengths
    within = torch.arange(ids.shape[0]) - torch.repeat_interleave(start, lengths)
    out_ids = torch.zeros(n, m, dtype=torch.long)
    out_counts = torch.zeros(n, m, dtype=torch.long)
    out_ids[pos, within] = ids
    out_counts[pos, within] = counts
    return SampledTargets(out_ids, out_counts)


def lm_loss(logits: torch.Tensor, batch: dict[str, Any], loss: C.LossConfig, lm: dict[str, Any],
            where: str) -> tuple[torch.Tensor, dict[str, float]]:
    """α·next-token CE + (1-α)·KD per position, mean over positions; α = 1 is the CE-only twin."""
    ids = batch["input_ids"]
    V = logits.shape[-1]
    flat = logits.reshape(-1, V)
    labels = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], 1).reshape(-1).to(flat.device)
    ce = token_ce_per_row(flat, labels, loss.chunk)
    has = labels >= 0
    ce_mean = ce[has].mean()
    if loss.alpha >= 1.0:
        return ce_mean, {"ce": float(ce_mean.detach()), "kd": 0.0}
    t = lm_targets(batch, loss, lm, where)
    t = t.to(flat.device)
    if isinstance(t, SampledTargets):
        kd = sampled_kd_loss_per_row(flat, t, loss.temperature, loss.chunk)
    else:
        kd = kd_loss_per_row(flat, t, loss.kind, loss.temperature, loss.beta, loss.chunk)
    per = torch.where(has, loss.alpha * ce, torch.zeros_like(ce)) + (1.0 - loss.alpha) * kd
    return per.mean(), {"ce": float(ce_mean.detach()), "kd": float(kd.detach().mean())}


@torch.inference_mode()
def evaluate_lm(model: torch.nn.Module, ds: CacheDataset, lm: dict[str, Any], batch_size: int,
                device: torch.device) -> dict[str, Any]:
    """Perplexity on next tokens, and KL(teacher || student) over the cached top-k + tail buckets at T=1."""
    model.eval()
    nll, tokens, kl, positions = 0.0, 0, 0.0, 0
    at1 = C.LossConfig(kind="kl", temperature=1.0, alpha=0.0, targets="topk", chunk=32)
    for batch in torch.utils.data.DataLoader(ds, batch_size=batch_size, collate_fn=collate):
        logits = model(input_ids=batch["input_ids"].to(device)).logits.float()
        flat = logits.reshape(-1, logits.shape[-1])
        ids = batch["input_ids"]
        labels = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], 1).reshape(-1).to(device)
        ce = token_ce_per_row(flat, labels, 32)
        nll += float(ce[labels >= 0].sum())
        tokens += int((labels >= 0).sum())
        if 1.0 in lm["temperatures"]:
            t = lm_targets(batch, at1, lm, ds.url)
            kl += float(kd_loss_per_row(flat, t.to(device), "kl", 1.0, chunk=32).sum())
            positions += flat.shape[0]
    return {"perplexity": math.exp(nll / max(tokens, 1)), "nll": nll / max(tokens, 1), "tokens": tokens,
            "kl_to_teacher": kl / positions if positions else None}


def lm_train_task(pipeline: C.PipelineConfig, task: str, students: list[str], cache: str,
                  runs_dir: Path) -> list[dict[str, Any]]:
    """Train LM `students` (and their CE twins) from a causal-LM cache in one pass per epoch; returns metrics."""
    from accelerate import Accelerator

    from .teacher import teacher_log_level
    teacher_log_level()
    train = pipeline.train
    accelerator = Accelerator(mixed_precision=train.mixed_precision, cpu=not torch.cuda.is_available())
    train_ds = training_split(cache, pipeline, task, accelerator)
    m = train_ds.manifest
    if m["head"] != "causal-lm":
        raise CacheFormatError(f"{cache}: head {m['head']!r}; LM students (arch llama) need a causal-lm cache")
    lm = m["lm"]
    eval_ds = CacheDataset(cache, train.eval_split, rank=0, world_size=1)
    test_ds = CacheDataset(cache, train.test_split, rank=0, world_size=1) if train.test_split else None
    steps = train.epochs * math.ceil(train_ds.num_rows / accelerator.num_processes / train.batch_size)

    runs = []
    for s in students:
        st = pipeline.students[s]
        if st.arch != "llama":
            raise CacheFormatError(f"students.{s}.arch: {st.arch!r} cannot learn from a causal-lm cache; use `llama`")
        check_student_tokenizer(st, lm, f"students.{s}")
        loss = st.loss or train.loss
        if loss.targets not in TARGETS:
            raise CacheFormatError(f"students.{s}.loss.targets: {loss.targets!r}; one of {', '.join(TARGETS)}")
        for name, lo in [(s, loss)] + ([(f"{s}-hard", C.LossConfig(alpha=1.0, chunk=loss.chunk))] if st.twin else []):
            torch.manual_seed(train.seed)  # a KD student and its CE twin start from the same weights
            model = build_lm_student(st.params, lm["vocab_size"], lm["seq_len"], f"students.{s}")
            opt = adamw(model.parameters(), st.learning_rate or train.learning_rate, train.weight_decay)
            sched = warmup_linear(opt, steps, train.warmup_ratio)
            model, opt = accelerator.prepare(model, opt)
            runs.append({"name": name, "student": s, "cfg": st, "loss": lo, "model": model, "opt": opt,
                         "sched": sched, "history": [], "best": None, "best_state": None, "seconds": 0.0})

    loader = torch.utils.data.DataLoader(train_ds, batch_size=train.batch_size, collate_fn=collate,
                                         num_workers=train.num_workers)
    for epoch in range(train.epochs):
        train_ds.set_epoch(epoch)
        sums = {r["name"]: 0.0 for r in runs}
        n_batches = 0
        with progress(train_ds.num_rows * lm["seq_len"], desc=f"train {task} epoch {epoch + 1}/{train.epochs} "
                      f"({len(runs)} students), tokens", disable=not accelerator.is_local_main_process) as bar:
            for batch in loader:
                for r in runs:
                    t0 = time.perf_counter()
                    r["model"].train()
                    logits = r["model"](input_ids=batch["input_ids"].to(accelerator.device)).logits
                    loss, _ = lm_loss(logits, batch, r["loss"], lm, f"students.{r['student']}")
                    accelerator.backward(loss)
                    if train.grad_clip:
                        accelerator.clip_grad_norm_(r["model"].parameters(), train.grad_clip)
                    r["opt"].step()
                    r["sched"].step()
                    r["opt"].zero_grad(set_to_none=True)
                    sums[r["name"]] += float(loss.detach())
                    r["seconds"] += time.perf_counter() - t0
                n_batches += 1
                bar.update(batch["input_ids"].numel())
        for r in runs:
            t0 = time.perf_counter()
            model = accelerator.unwrap_model(r["model"])
            ev = evaluate_lm(model, eval_ds, lm, 16, accelerator.device)
            r["history"].append({"epoch": epoch + 1, "train_loss": sums[r["name"]] / max(1, n_batches), "eval": ev})
            if r["best"] is None or ev["perplexity"] < r["best"]["eval"]["perplexity"]:
                r["best"], r["best_state"] = r["history"][-1], copy.deepcopy(model.state_dict())
            r["seconds"] += time.perf_counter() - t0
            log.info("%s epoch %d: train loss %.4f, %s perplexity %.2f", r["name"], epoch + 1,
                     r["history"][-1]["train_loss"], train.eval_split, ev["perplexity"])

    results = []
    for r in runs:
        model = accelerator.unwrap_model(r["model"])
        model.load_state_dict(r["best_state"])
        metrics = {"run": r["name"], "student": r["student"], "arch": "llama", "task": task, "head": "causal-lm",
                   "kd": r["loss"].alpha < 1.0, "loss": C.to_dict(r["loss"]),
                   "parameters": sum(p.numel() for p in model.parameters()), "epochs": r["history"],
                   "best_epoch": r["best"]["epoch"], "eval": r["best"]["eval"], "train_seconds": round(r["seconds"], 2),
                   "cache": str(cache), "cache_fingerprint": m["fingerprint"],
                   "tokenizer_sha256": lm["tokenizer_sha256"]}
        if test_ds is not None:
            metrics["test"] = evaluate_lm(model, test_ds, lm, 16, accelerator.device)
        if accelerator.is_main_process:
            run_dir = runs_dir / r["name"]
            (run_dir / "checkpoint").mkdir(parents=True, exist_ok=True)
            model.save_pretrained(run_dir / "checkpoint")  # loads with AutoModelForCausalLM; teacher's tokenizer
            metrics["size_bytes"] = sum(p.stat().st_size for p in (run_dir / "checkpoint").glob("*.safetensors"))
            (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=1))
        results.append(metrics)
    return results


def teacher_lm_row(cache: str, test_split: str) -> dict[str, Any]:
    """The teacher's line of an LM report, from the manifest's capture statistics."""
    from .reader import open_manifest
    m = open_manifest(cache)[2]
    st = m["splits"][test_split]["stats"]
    t = m["fingerprint_inputs"]["teacher"]
    return {"run": f"teacher ({t['name']})", "task": m["task"], "parameters": t.get("parameters"),
            "test": {"perplexity": st["teacher_perplexity"], "kl_to_teacher": 0.0},
            "tokens_per_s": st.get("teacher_tokens_per_s"), "device": m.get("device"),
            "mean_tail_mass": st.get("mean_tail_mass"), "top_k": m["lm"]["top_k"]}


def lm_report_lines(runs: list[dict[str, Any]], teachers: dict[str, dict[str, Any]]) -> list[str]:
    """Markdown table comparing LM students with the teacher and with their CE twins."""
    by_run = {r["run"]: r for r in runs}
    lines = ["Causal-LM students: test perplexity on next tokens and KL(teacher ‖ student) over the cached top-k "
             "ids plus the exact tail bucket (T = 1). Gain = CE twin's perplexity minus the KD student's.", "",
             "| model | task | params | targets | test ppl | KL to teacher | train s | ppl gain vs CE twin |",
             "|---|---|---:|---|---:|---:|---:|---:|"]
    for task, t in teachers.items():
        lines.append(f"| **{t['run']}** | {task} | {t['parameters'] or 0:,} | – | {t['test']['perplexity']:.2f} | 0 | – "
                     f"| – |")
    for r in sorted(runs, key=lambda r: (r["task"], r["student"], not r["kd"])):
        test = r.get("test", {})
        twin = by_run.get(f"{r['run']}-hard")
        gain = twin["test"]["perplexity"] - test["perplexity"] if r["kd"] and twin and test else None
        kl = test.get("kl_to_teacher")
        targets = r["loss"].get("targets", "topk") if r["kd"] else "next-token CE"
        lines.append(f"| {r['run']} | {r['task']} | {r['parameters']:,} | {targets} | "
                     f"{test.get('perplexity', float('nan')):.2f} | {'–' if kl is None else f'{kl:.4f}'} | "
                     f"{r['train_seconds']:.1f} | {'–' if gain is None else f'{gain:+.2f}'} |")
    return lines

