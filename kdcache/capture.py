"""Stage one: run each task's teacher once over its data and write the cache (`kdcache cache`)."""

from __future__ import annotations

import dataclasses
import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from . import config as C
from . import distributed
from .cache.format import FORMAT_VERSION, parquet_schema, read_manifest
from .cache.writer import CacheWriter
from .data import TaskData, load_task_data
from .finetune import finetune_key, finetune_teacher
from .fingerprint import hash_obj, hash_table, hash_tokenizer
from .progress import progress
from .teacher import (TeacherError, TeacherOutputs, TeacherRunner, auto_class, build_model, load_tokenizer,
                      model_identity, teacher_log_level)

log = logging.getLogger(__name__)


def prepare_teacher(pipeline: str, task_name: str, task: C.TaskConfig, data: TaskData, teachers_dir: Path):
    """Load (fine-tuning first if configured) the task's teacher; returns (model, tokenizer, identity)."""
    teacher_log_level()
    if task.teacher.finetune is not None:
        folder = finetune_teacher(task_name, task, data, teachers_dir / pipeline / task_name)
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = auto_class(task.teacher.head).from_pretrained(folder)
        identity = model_identity(model, task.teacher.model or "from_config", task.teacher.revision)
        identity["finetune_sha256"] = hash_obj(finetune_key(task, data))
        return model, tokenizer, identity
    tokenizer = load_tokenizer(task.teacher)
    model, head_trained = build_model(task.teacher, data.label_names)
    if not head_trained and not task.teacher.from_config:
        raise TeacherError(f"task {task_name}: teacher {task.teacher.model!r} has no trained {task.teacher.head} "
                           "head for this task; add a `teacher.finetune:` section so kdcache fine-tunes it first")
    return model, tokenizer, model_identity(model, task.teacher.model or "from_config", task.teacher.revision)


def shard_table(rows: dict[str, list], out: TeacherOutputs, row_start: int, schema: pa.Schema,
                text_fields: tuple[str, ...]) -> pa.Table:
    n = len(rows["id"])
    labels = np.asarray(rows["label"], dtype=np.int32)
    num_labels = out.logits.shape[1]
    cols = {
        "row_id": pa.array(np.arange(row_start, row_start + n, dtype=np.int64)),
        "id": pa.array(rows["id"], pa.string()),
        **{c: pa.array(rows[c], pa.string()) for c in text_fields},
        "label": pa.array(labels, pa.int32(), mask=labels < 0),
        "logits": pa.FixedSizeListArray.from_arrays(pa.array(out.logits.reshape(-1), pa.float32()), num_labels),
        "input_hash": pa.array(out.input_hash, pa.int64()),
        "num_tokens": pa.array(out.num_tokens, pa.int32()),
        "truncated": pa.array(out.truncated, pa.bool_()),
    }
    return pa.Table.from_pydict(cols, schema=schema)


def shard_stats(labels: np.ndarray, out: TeacherOutputs, seconds: float) -> dict[str, Any]:
    """Sums that add up across shards (so stats survive resumes)."""
    z = out.logits - out.logits.max(1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(1, keepdims=True))
    entropy = -(np.exp(logp) * logp).sum(1)
    labelled = labels >= 0
    return {"rows": int(len(labels)), "labelled": int(labelled.sum()), "seconds": float(seconds),
            "correct": int((out.logits.argmax(1)[labelled] == labels[labelled]).sum()),
            "entropy_sum": float(entropy.sum()), "truncated": int(out.truncated.sum()),
            "tokens_sum": int(out.num_tokens.sum()), "max_tokens": int(out.num_tokens.max(initial=0))}


def summarise(stats: list[dict[str, Any]]) -> dict[str, Any]:
    tot = {k: sum(s[k] for s in stats)
           for k in ("rows", "labelled", "correct", "entropy_sum", "truncated", "tokens_sum", "seconds")}
    rows = max(tot["rows"], 1)
    return {"rows": tot["rows"], "labelled_rows": tot["labelled"],
            "teacher_accuracy": tot["correct"] / tot["labelled"] if tot["labelled"] else None,
            "mean_entropy_nats": tot["entropy_sum"] / rows, "truncated_rows": tot["truncated"],
            "mean_tokens": tot["tokens_sum"] / rows, "max_tokens": max((s["max_tokens"] for s in stats), default=0),
            # teacher forward + tokenisation only (not I/O); resumed shards count their original time
            "teacher_rows_per_s": tot["rows"] / tot["seconds"] if tot["seconds"] else None}


def fingerprint_inputs(task_name: str, task: C.TaskConfig, data: TaskData, identity: dict, tokenizer: Any,
                       runner: TeacherRunner) -> dict[str, Any]:
    """Everything that changes the targets (not batch size or sort window, which only reorder work)."""
    return {
        "format_version": FORMAT_VERSION, "task": task_name, "head": task.teacher.head, "teacher": identity,
        "tokenizer_sha256": hash_tokenizer(tokenizer), "max_length": task.cache.max_length,
        "compute_dtype": str(runner.dtype).replace("torch.", ""), "shard_rows": task.cache.shard_rows,
        "data": {"source": task.data.source, "text_fields": list(task.data.text_fields),
                 "label_names": list(data.label_names),
                 "splits": {s: hash_table(ds.data.table) for s, ds in data.splits.items()}},
        "features": {"layers": runner.layers, "pooling": task.cache.features.pooling,
                     "dtype": task.cache.features.dtype} if runner.layers else None,
    }


def build_teacher_cache(pipeline: C.PipelineConfig, task_name: str, out_dir: Path, teachers_dir: Path,
                        overwrite: bool = False) -> dict[str, Any]:
    """Cache one task: load data, load the teacher, write every shard not already written, commit.

    Under `accelerate launch` each process takes the shards dealt to it (the n-th missing shard goes to
    process n mod N); process 0 prepares the teacher and opens the cache first, and commits the manifest last.
    """
    task = pipeline.tasks[task_name]
    if task.teacher.head == "causal-lm":
        from .lm_capture import build_lm_cache
        return build_lm_cache(pipeline, task_name, out_dir, teachers_dir, overwrite)
    if task.teacher.head == "token-classification":
        from .ner import build_ner_cache
        return build_ner_cache(pipeline, task_name, out_dir, teachers_dir, overwrite)
    dist = distributed.state()
    data = load_task_data(task.data)
    model, tokenizer, identity = distributed.main_first(
        lambda: prepare_teacher(pipeline.name, task_name, task, data, teachers_dir))
    device = task.teacher.device if task.teacher.device != "auto" or dist.num_processes == 1 else str(dist.device)
    runner = TeacherRunner(model, tokenizer, task.cache.max_length, task.cache.batch_size, task.cache.sort_window,
                           task.cache.features, task.teacher.precision, device)
    inputs = fingerprint_inputs(task_name, task, data, identity, tokenizer, runner)
    fields = task.data.text_fields
    meta = {"format_version": FORMAT_VERSION, "task": task_name, "fingerprint": hash_obj(inputs)}
    schema = parquet_schema(fields, len(data.label_names), meta)
    header = {"pipeline": pipeline.name, "task": task_name, "head": task.teacher.head,
              "label_names": list(data.label_names), "text_fields": list(fields),
              "fingerprint": meta["fingerprint"], "fingerprint_inputs": inputs, "data_origin": data.origin,
              "features": dict(inputs["features"] or {}, hidden_size=getattr(model.config, "hidden_size", None))
              if runner.layers else None,
              "config": C.to_dict(task), "device": str(runner.device), "processes": dist.num_processes}

    def produce(split: str, start: int, stop: int, bar) -> tuple[pa.Table, dict | None, dict]:
        rows = data.splits[split][start:stop]
        t0 = time.perf_counter()
        out = runner.run(rows[fields[0]], rows[fields[1]] if len(fields) > 1 else None,
                         on_batch=bar.update, row_ids=rows["id"])
        stats = shard_stats(np.asarray(rows["label"]), out, time.perf_counter() - t0)
        return shard_table(rows, out, start, schema, fields), out.features or None, stats

    sizes = {split: len(ds) for split, ds in data.splits.items()}
    return write_shards(out_dir, header, task, task_name, sizes, inputs["data"]["splits"], produce, summarise,
                        overwrite)


def write_shards(out_dir: Path, header: dict[str, Any], task: C.TaskConfig, task_name: str, sizes: dict[str, int],
                 dataset_sha: dict[str, str], produce, summarise, overwrite: bool = False) -> dict[str, Any]:
    """The shard loop of every cache head: open the writer (process 0 first), write this process's missing
    shards with `produce(split, start, stop, progress_bar) -> (table, features, stats)`, then commit.

    Under `accelerate launch` the n-th missing shard goes to process n mod N; process 0 commits the manifest.
    """
    dist = distributed.state()

    def open_writer() -> CacheWriter:
        return CacheWriter(out_dir, header, overwrite=overwrite, row_group_rows=task.cache.row_group_rows,
                           role="owner" if dist.is_main_process else "worker").__enter__()

    writer = distributed.main_first(open_writer)
    try:
        manifest = _shard_loop(writer, sizes, dataset_sha, task.cache.shard_rows, produce, summarise, task_name,
                               dist, out_dir)
    except BaseException:
        writer.__exit__(*sys.exc_info())
        raise
    writer.__exit__(None, None, None)
    return manifest


def _shard_loop(writer: CacheWriter, sizes: dict[str, int], dataset_sha: dict[str, str], shard_rows: int, produce,
                summarise, task_name: str, dist: Any, out_dir: Path) -> dict[str, Any]:
    """This process's missing shards, then the commit."""
    if distributed.share(writer.complete):
        log.info("%s: already complete with this fingerprint; nothing to do", out_dir)
        return read_manifest(out_dir)
    plan = [(split, i, s, min(s + shard_rows, n))
            for split, n in sizes.items() for i, s in enumerate(range(0, n, shard_rows))]
    todo = [p for p in plan if not writer.shard_done(p[0], p[1], p[2], p[3] - p[2])]
    if len(todo) < len(plan):
        log.info("%s: %d of %d shards already written; resuming", out_dir, len(plan) - len(todo), len(plan))
    mine = todo[dist.process_index::dist.num_processes]
    t_loop = time.perf_counter()
    with progress(sum(b - a for _, _, a, b in mine), desc=f"cache {task_name}",
                  disable=not dist.is_local_main_process) as bar:
        for split, index, start, stop in mine:
            table, features, stats = produce(split, start, stop, bar)
            writer.submit(split, index, start, table, features, stats)
    writer.flush()
    # this run's wall clock for everything (tokenise, forward, pooling, Parquet + Zarr writes), per process
    rows_now = sum(b - a for _, _, a, b in mine)
    capture = {"rows": rows_now, "seconds": round(time.perf_counter() - t_loop, 3)}
    distributed.barrier()
    splits = {s: {"rows": n, "dataset_sha256": dataset_sha[s]} for s, n in sizes.items()}
    return distributed.main_first(
        lambda: writer.commit(splits, summarise, extra={"capture": capture}) if dist.is_main_process
        else read_manifest(out_dir))


def with_limit(pipeline: C.PipelineConfig, limit: int | None) -> C.PipelineConfig:
    """The pipeline with `data.limit` set on every task (for `--limit N` quick runs)."""
    if limit is None:
        return pipeline
    tasks = {n: dataclasses.replace(t, data=dataclasses.replace(t.data, limit=limit)) for n, t in pipeline.tasks.items()}
    return dataclasses.replace(pipeline, tasks=tasks)
