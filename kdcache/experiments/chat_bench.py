"""`kdcache bench <chat-lm pipeline>`: what capture costs over the teacher's bare forward on the same batches, and
what a stored response token costs on disk, measured side by side in one run.

The same length-sorted, right-padded batches of the training split's conversations go through (a) the teacher's
plain forward, its full logits materialised as a user's own loop would (`model(input_ids).logits`), and (b)
kdcache's capture (`ChatRunner.run_rows`: the body once, the output layer and the reduction at response positions
only), in alternating rounds; the ratio bare ÷ capture is the share of the teacher's own time capture keeps (≥ 0.95
is the goal, as for classification). Bytes per response token come from the real shard layout (zstd Parquet) of the
targets written; DistillKit's published 114–300 B/token is the reference."""

from __future__ import annotations

import datetime as _dt
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import config as C, layout
from ..cache.codecs import shard_schema
from ..capture.chat import ChatRows, ChatRunner, chat_rows, chat_shard_table, padded_batches
from ..capture.teacher import prepare_teacher
from ..data import load_task_data
from .lm_bench import _parquet_bytes, _publish
from .machine import machine

DISTILLKIT_BYTES_PER_TOKEN = (114, 300)  # published sizes of DistillKit's top-k logit datasets


def _bare(runner: ChatRunner, rows: ChatRows) -> float:
    """Seconds of the teacher's plain forward over the batches capture would run (full logits, nothing kept)."""
    t0 = time.perf_counter()
    with torch.inference_mode():
        for _, x in padded_batches(rows.ids, runner.cache.batch_size):
            with runner.autocast():
                runner.model(input_ids=torch.as_tensor(x, device=runner.device)).logits.float().sum()
    if runner.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def run_chat_bench(pipeline_name: str, quick: bool, out_dir: Path, doc: Path | None,
                   teachers_dir: Path | None = None, overrides: list[str] = ()) -> dict[str, Any]:
    pipeline = C.load_pipeline(pipeline_name, list(overrides))
    task_name = next(iter(pipeline.tasks))
    task = pipeline.tasks[task_name]
    data = load_task_data(task.data)
    model, tok, _ = prepare_teacher(pipeline.name, task_name, task, data, teachers_dir or layout.teachers_dir())
    n, rounds = (48, 2) if quick else (400, 3)
    rows = chat_rows(data.splits["train"].select(range(min(n, len(data.splits["train"])))), "train", tok, task,
                     data.label_names)
    runner = ChatRunner(model.eval(), task, tok, task.teacher.device)
    runner.run_rows(rows[:runner.cache.batch_size])  # the head check and warm-up, outside the timings
    bare, capture = [], []
    for _ in range(rounds):  # alternating, so that a machine slowing down hurts both alike
        bare.append(_bare(runner, rows))
        t0 = time.perf_counter()
        out = runner.run_rows(rows)
        capture.append(time.perf_counter() - t0)
    header = {"head": task.teacher.head, "lm": {"top_k": min(task.cache.top_k, len(tok)), "vocab_size":
                                                  int(model.get_output_embeddings().weight.shape[0]),
                                                  "temperatures": list(task.cache.temperatures),
                                                  "samples": task.cache.samples}}
    table = chat_shard_table(rows, out, 0, "train", shard_schema(header, head_only=True))
    tokens, response = int(sum(len(x) for x in rows.ids)), int(sum(len(rows.positions(i)) for i in range(len(rows))))
    ratios = [b / c for b, c in zip(bare, capture)]
    results = {"date": _dt.date.today().isoformat(), "machine": machine(), "pipeline": pipeline.name,
               "quick": quick, "rows": len(rows), "tokens": tokens, "response_tokens": response,
               "batch_size": runner.cache.batch_size, "top_k": task.cache.top_k, "samples": task.cache.samples,
               "temperatures": list(task.cache.temperatures), "bare_seconds": bare, "capture_seconds": capture,
               "ratios": ratios, "teacher_tokens_per_s": tokens / float(np.median(capture)),
               "bytes": _parquet_bytes(table), "bytes_per_response_token": _parquet_bytes(table) / response,
               "bytes_per_token": _parquet_bytes(table) / tokens}
    return _publish(results, out_dir, f"{pipeline.name}-chat", render, None if quick else doc)


def render(r: dict[str, Any]) -> str:
    lo, hi = DISTILLKIT_BYTES_PER_TOKEN
    return "\n".join([
        f"## Chat capture: `{r['pipeline']}`", "",
        f"`kdcache bench {r['pipeline']}` on {r['date']} ({r['machine']}): {r['rows']} training conversations "
        f"({r['tokens']:,} tokens, {r['response_tokens']:,} of them response tokens), batches of {r['batch_size']}, "
        f"top-{r['top_k']} + exact tail at T = {r['temperatures']}, {r['samples']} samples per position; the "
        "teacher's bare forward (full logits) and kdcache's capture on the same batches, alternating.", "",
        "| | seconds per round | tokens/s |", "|---|---|---:|",
        f"| bare forward | {', '.join(f'{s:.1f}' for s in r['bare_seconds'])} | "
        f"{r['tokens'] / float(np.median(r['bare_seconds'])):,.0f} |",
        f"| capture (targets at response positions) | {', '.join(f'{s:.1f}' for s in r['capture_seconds'])} | "
        f"{r['teacher_tokens_per_s']:,.0f} |", "",
        f"Bare ÷ capture per round: {', '.join(f'{x:.3f}' for x in r['ratios'])} (goal ≥ 0.95). Storage: "
        f"{r['bytes']:,} B of zstd Parquet = **{r['bytes_per_response_token']:.1f} B per response token** "
        f"({r['bytes_per_token']:.1f} B per token read, the prompt's ids included), against DistillKit's published "
        f"{lo}–{hi} B/token.", ""])
