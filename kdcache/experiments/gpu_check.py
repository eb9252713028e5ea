"""`make gpu-check` (`python -m kdcache.experiments.gpu_check`): the GPU paths of stage one checked against the CPU
result, and the stage-one overhead measured on the device, in one prepared run for the day a GPU is lent.

Checks: (1) a sequence classifier under autocast (bf16/fp16) on the device gives the CPU fp32 logits and pooled
features within stated tolerances, and the same prediction on every row whose CPU margin exceeds the tolerance;
(2) the causal-LM targets taken on the device (top-k ids, raw logits, log-sum-exp, exact tail) equal the CPU ones,
top-k ids exactly except at ties within tolerance — reduced in one chunk, in chunks of 37 positions, and with the
teacher placed by `device_map` (balanced over every GPU; without a GPU, offloaded to disk), and for a chat cache at
the response positions of conversations, with the share of greedy responses the device writes as the CPU does;
(3) with two or more
GPUs, a two-process capture equals a one-process capture; (4) capture ÷ raw teacher forward on the device; (5) the
CUDA peak of the LM reduction at 512 / 2,048 / 8,192 positions and a 262,144-id vocabulary, chunked and unchunked. Without
a GPU it says so, runs checks 1-2 between two CPU runs (fp32 and bf16 autocast against fp32, so the comparison
logic itself is exercised), and exits 0. Writes data/bench/gpu-check.json and, on a GPU, a section of docs/benchmarks.md."""

from __future__ import annotations

import copy
import dataclasses
import datetime as _dt
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import config as C, layout
from ..capture.chat import ChatRunner, chat_rows
from ..capture.classification import SequenceRunner
from ..capture.lm import LMRunner, pack
from ..capture.models import build_model, load_tokenizer
from ..data import load_task_data
from .docsections import write_section
from .lm_memory import cuda_peaks
from .machine import machine

# what "equal" means per compute precision: |Δ| <= atol + rtol·|reference| (logits, features, lse, tail)
TOLERANCE = {"fp32": {"atol": 1e-4, "rtol": 1e-4}, "bf16": {"atol": 0.05, "rtol": 0.05},
             "fp16": {"atol": 0.02, "rtol": 0.02}}


def close(ref: np.ndarray, got: np.ndarray, tol: dict[str, float]) -> dict[str, Any]:
    """Elementwise |got - ref| <= atol + rtol·|ref|; the worst excess and whether every element passes."""
    ref, got = np.asarray(ref, np.float64), np.asarray(got, np.float64)
    diff = np.abs(got - ref)
    bound = tol["atol"] + tol["rtol"] * np.abs(ref)
    return {"ok": bool(ref.shape == got.shape and (diff <= bound).all()), "max_abs_diff": float(diff.max(initial=0)),
            "worst_ratio_to_bound": float((diff / bound).max(initial=0))}


def compare_classifier(ref, got, tol: dict[str, float]) -> dict[str, Any]:
    """Logits and pooled features within tolerance; the same argmax wherever the reference's top-2 margin exceeds
    the tolerance (a flip there is an error, not rounding)."""
    out = {"logits": close(ref.logits, got.logits, tol),
           "features": {k: close(v, got.features[k], tol) for k, v in ref.features.items()}}
    top2 = np.sort(ref.logits, -1)[:, -2:]
    decisive = (top2[:, 1] - top2[:, 0]) > 2 * (tol["atol"] + tol["rtol"] * np.abs(top2[:, 1]))
    same = ref.logits.argmax(-1) == got.logits.argmax(-1)
    out["argmax_agreement_on_decisive_rows"] = float(same[decisive].mean()) if decisive.any() else 1.0
    out["ok"] = out["logits"]["ok"] and all(f["ok"] for f in out["features"].values()) and bool(same[decisive].all())
    return out


def _only_ties(ids_a, vals_a, ids_b, vals_b, tol) -> bool:
    """At one position: every id in one top-k but not the other sits at the other's k-th logit, within tolerance
    (a tie at the boundary, which either side may break)."""
    kth_a, kth_b = float(vals_a[-1]), float(vals_b[-1])
    bound = lambda x: tol["atol"] + tol["rtol"] * abs(x)  # noqa: E731
    return all(abs(float(v) - kth_b) <= bound(kth_b) for i, v in zip(ids_a, vals_a) if i not in set(ids_b)) and \
        all(abs(float(v) - kth_a) <= bound(kth_a) for i, v in zip(ids_b, vals_b) if i not in set(ids_a))


def compare_lm(ref: dict[str, np.ndarray], got: dict[str, np.ndarray], tol: dict[str, float]) -> dict[str, Any]:
    """lse and tail within tolerance; top-k raw logits within tolerance; the top-k id sets equal at every position
    but where the sets differ only by ids tied at the k-th logit."""
    out = {k: close(ref[k], got[k], tol) for k in ("lse", "tail")}
    out["topk_logits"] = close(ref["topk_logits"].astype(np.float32), got["topk_logits"].astype(np.float32), tol)
    k = ref["topk_ids"].shape[-1]
    ids_r, ids_g = ref["topk_ids"].reshape(-1, k), got["topk_ids"].reshape(-1, k)
    val_r, val_g = ref["topk_logits"].reshape(-1, k), got["topk_logits"].reshape(-1, k)
    same_set = (np.sort(ids_r, -1) == np.sort(ids_g, -1)).all(-1)
    beyond = [p for p in np.flatnonzero(~same_set)
              if not _only_ties(ids_r[p].tolist(), val_r[p], ids_g[p].tolist(), val_g[p], tol)]
    out["topk_sets_equal"] = float(same_set.mean())
    out["topk_differs_beyond_ties"] = len(beyond)
    out["ok"] = all(out[k]["ok"] for k in ("lse", "tail", "topk_logits")) and not beyond
    return out


def _tiny(name: str, overrides: list[str]) -> C.PipelineConfig:
    return C.load_pipeline(str(Path(__file__).resolve().parents[2] / "pipelines" / name / "pipeline.yaml"), overrides)


def classifier_check(device: str, precision: str, rows: int = 256) -> dict[str, Any]:
    """The tiny pipeline's teacher architecture (seeded weights) over BBC News rows: CPU fp32 against `device`."""
    task = _tiny("tiny", [f"tasks.topic.data.limit={rows}"]).tasks["topic"]
    data = load_task_data(task.data)
    model, _ = build_model(task.teacher, "AutoModelForSequenceClassification", data.label_names, seed=0)
    tok = load_tokenizer(task.teacher)
    texts = data.splits["train"]["text"][:]
    feats = C.FeaturesConfig(layers=(1, -1), pooling="mean", dtype="float32")
    ref = SequenceRunner(copy.deepcopy(model), tok, 64, 32, 4, feats, "fp32", "cpu").run(texts)
    got = SequenceRunner(model, tok, 64, 32, 4, feats, precision, device).run(texts)
    return compare_classifier(ref, got, TOLERANCE[precision])


def lm_check(device: str, precision: str, chunk: int = 0, placed: Path | None = None) -> dict[str, Any]:
    """The lm-tiny teacher (a seeded 2-layer Llama) over packed BBC text: targets on CPU fp32 (one chunk) against
    `device`, reduced `chunk` positions at a time (0: auto); with `placed` (a scratch folder), the teacher saved
    there and reloaded by `teacher.device_map` — balanced over every GPU, or on a CPU machine offloaded to disk."""
    task = _tiny("lm-tiny", []).tasks["news"]
    model, _ = build_model(task.teacher, "AutoModelForCausalLM", None, seed=0)
    tok = load_tokenizer(task.teacher)
    seqs = pack(tok, load_task_data(task.data).splits["train"]["text"][:], task.cache.max_length).ids[:16]
    ref = LMRunner(copy.deepcopy(model), task.cache, "fp32", "cpu").run(seqs)
    if placed is not None:
        model.save_pretrained(placed / "teacher")
        gpu = device != "cpu"
        cfg = dataclasses.replace(task.teacher, from_config={}, model=str(placed / "teacher"), precision=precision,
                                  device_map="balanced" if gpu else "auto",
                                  max_memory={} if gpu else {"cpu": "200KB"},
                                  offload_folder=None if gpu else str(placed / "offload"))
        model, _ = build_model(cfg, "AutoModelForCausalLM", None, seed=0)
    got = LMRunner(model, dataclasses.replace(task.cache, logit_chunk=chunk), precision, device).run(seqs)
    return compare_lm(ref, got, TOLERANCE[precision])


def chat_check(device: str, precision: str) -> dict[str, Any]:
    """The chat-tiny teacher (a seeded 2-layer Llama, SmolLM2's chat template) writes greedy responses to BBC topic
    prompts on CPU fp32 and on `device`; the targets at those response positions (the CPU's responses, for both)
    are compared as for `lm_check`, and the share of responses the device wrote token for token as the CPU did is
    reported (a near-tie may flip a greedy step under another precision: measured, not gated)."""
    task = _tiny("chat-tiny", ["tasks.topic.data.limit=8",
                               "tasks.topic.data.chat.generate={max_new_tokens: 6}"]).tasks["topic"]
    data = load_task_data(task.data)
    model, _ = build_model(task.teacher, "AutoModelForCausalLM", None, seed=0)
    tok = load_tokenizer(task.teacher)
    prompts = chat_rows(data.splits["train"], "train", tok, task, data.label_names)
    gen = task.data.chat.generate
    cpu = ChatRunner(copy.deepcopy(model), dataclasses.replace(task, teacher=dataclasses.replace(
        task.teacher, precision="fp32")), tok, "cpu")
    there = ChatRunner(model, dataclasses.replace(task, teacher=dataclasses.replace(task.teacher, precision=precision)),
                       tok, device)
    rows = cpu.write_responses(prompts, gen, 0)
    mine = there.write_responses(prompts, gen, 0)

    def joined(out):
        return {k: np.concatenate([o[k] for o in out]) for k in ("topk_ids", "topk_logits", "lse", "tail")}
    res = compare_lm(joined(cpu.run_rows(rows)), joined(there.run_rows(rows)), TOLERANCE[precision])
    res["greedy_responses_identical"] = float(np.mean([np.array_equal(a, b) for a, b in zip(rows.ids, mine.ids)]))
    return res


def multi_gpu_check(out: Path) -> dict[str, Any]:
    """A two-process capture of the tiny pipeline on two GPUs against a one-process capture."""
    from ..cache.format import read_manifest
    base = [sys.executable, "-m", "kdcache.cli", "cache", "tiny", "--teachers-dir", str(out / "teachers")]
    one = subprocess.run([*base, "--out", str(out / "one")], capture_output=True, text=True)
    two = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                          "--main_process_port", "0", "-m", "kdcache.cli", *base[3:], "--out", str(out / "two")],
                         capture_output=True, text=True)
    if one.returncode or two.returncode:
        return {"ok": False, "error": (one.stderr or two.stderr)[-2000:]}
    a, b = read_manifest(out / "one" / "topic"), read_manifest(out / "two" / "topic")
    same = [(x["rows"], x["row_groups"]) for s in a["splits"].values() for x in s["shards"]] == \
           [(x["rows"], x["row_groups"]) for s in b["splits"].values() for x in s["shards"]]
    return {"ok": bool(same and a["fingerprint"] == b["fingerprint"]), "processes": b.get("processes")}


def overhead_on_device(device: str, rows: int) -> dict[str, Any]:
    """Capture ÷ raw teacher forward for the default pipeline on `device` (as `kdcache bench` measures it)."""
    from .bench import stage_one_overhead
    over = [f"tasks.sentiment.data.limit={rows}", "tasks.sentiment.teacher.finetune.limit=64",
            "tasks.sentiment.teacher.finetune.epochs=1", "tasks.sentiment.teacher.finetune.min_steps=0",
            "tasks.sentiment.teacher.sanity.enabled=false", f"tasks.sentiment.teacher.device={device}"]
    with tempfile.TemporaryDirectory() as tmp:
        capture, raw = stage_one_overhead(C.load_pipeline("default", over), "sentiment", Path(tmp) / "cache",
                                          Path(tmp) / "teachers")
    return {"capture_rows_per_s": capture, "raw_forward_rows_per_s": raw, "ratio": capture / raw, "goal": 0.95}


def run_gpu_check(out_dir: Path | None = None, doc: Path | None = Path("docs/benchmarks.md"),
                  rows: int = 4096) -> dict[str, Any]:
    gpu = torch.cuda.is_available()
    device = "cuda" if gpu else "cpu"
    precisions = (["bf16"] if torch.cuda.is_bf16_supported() else ["fp16"]) + ["fp32"] if gpu else ["fp32", "bf16"]
    res: dict[str, Any] = {"date": _dt.date.today().isoformat(), "machine": machine(), "gpu": gpu,
                           "command": "make gpu-check", "checks": {}}
    if not gpu:
        print("no GPU here: comparing two CPU runs instead (fp32 and bf16 autocast against fp32), which exercises "
              "the comparison logic; run `make gpu-check` on a GPU machine for the real figures")
    t0 = time.perf_counter()
    for p in precisions:
        res["checks"][f"classifier {device} {p} vs cpu fp32"] = classifier_check(device, p)
        res["checks"][f"lm targets {device} {p} vs cpu fp32"] = lm_check(device, p)
        res["checks"][f"lm targets {device} {p}, chunks of 37 positions, vs cpu fp32"] = lm_check(device, p, 37)
        with tempfile.TemporaryDirectory() as tmp:
            where = "balanced over every GPU" if gpu else "offloaded to disk"
            res["checks"][f"lm targets {device} {p}, teacher {where}, vs cpu fp32"] = lm_check(device, p, 0,
                                                                                               Path(tmp))
        res["checks"][f"chat targets and greedy responses {device} {p} vs cpu fp32"] = chat_check(device, p)
    if gpu and torch.cuda.device_count() >= 2:
        with tempfile.TemporaryDirectory() as tmp:
            res["checks"]["two-GPU capture vs one"] = multi_gpu_check(Path(tmp))
    if gpu:
        res["stage_one_on_device"] = overhead_on_device(device, rows)
        res["capture_memory_gib"] = cuda_peaks(precision=precisions[0])
    res["seconds"] = round(time.perf_counter() - t0, 1)
    res["ok"] = all(c["ok"] for c in res["checks"].values())
    out_dir = out_dir or layout.scratch("bench")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "gpu-check.json").write_text(json.dumps(res, indent=1))
    text = render(res)
    print(text)
    if gpu and doc is not None:
        write_section(doc, "gpu-check", text, "## GPU check (`make gpu-check`)", "# Benchmarks\n")
    return res


def render(r: dict[str, Any]) -> str:
    lines = [f"### {r['date']} — `{r['command']}`", "", f"Machine: {r['machine']}.", "",
             "| check | result | worst |Δ| (ratio to tolerance) |", "|---|---|---|"]
    for name, c in r["checks"].items():
        parts = {k: v for k, v in c.items() if isinstance(v, dict) and "max_abs_diff" in v}
        worst = ", ".join(f"{k} {v['max_abs_diff']:.2e} ({v['worst_ratio_to_bound']:.2f})" for k, v in parts.items())
        lines.append(f"| {name} | {'pass' if c['ok'] else 'FAIL'} | {worst or '–'} |")
    if "stage_one_on_device" in r:
        s = r["stage_one_on_device"]
        lines.append(f"| stage-one overhead on the device | {s['ratio']:.3f} ({s['capture_rows_per_s']:.0f} vs "
                     f"{s['raw_forward_rows_per_s']:.0f} rows/s; goal ≥ 0.95) | |")
    for n, v in r.get("capture_memory_gib", {}).items():
        lines.append(f"| CUDA peak of the LM reduction at {int(n):,} positions, V = 262,144 (above the body) | chunked "
                     f"{v['chunked']:.2f} GiB" + (f", unchunked {v['unchunked']:.2f} GiB" if "unchunked" in v else "")
                     + " | |")
    return "\n".join(lines + [""])


if __name__ == "__main__":
    sys.exit(0 if run_gpu_check()["ok"] or not torch.cuda.is_available() else 1)
