"""Stage one (`kdcache cache`): run each task's teacher once over its data and write the cache. One build loop for
every head: data -> teacher -> head -> shard loop -> commit; one fingerprint and manifest-header builder."""

from __future__ import annotations

import hashlib
import logging
import sys
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from .. import config as C
from . import distributed
from ..cache.codecs import shard_schema
from ..cache.format import FORMAT_VERSION, CacheFormatError, read_manifest
from ..cache.share import fetch_shared, push, shared_location
from ..cache.writer import CacheWriter
from ..data import TaskData, load_task_data, portable_origin
from ..fingerprint import hash_obj, hash_table, hash_tokenizer, only_data_changed
from ..progress import progress
from .devices import placed
from .models import tp_size
from .head import CaptureHead
from .folds import prepare_fold_teachers, run_out_of_fold
from .grow import Growth, growth_segments, plan_growth
from .heads import HEADS
from .sanity import check_teacher
from .teacher import prepare_teacher

log = logging.getLogger(__name__)


def fingerprint_inputs(task_name: str, task: C.TaskConfig, data: TaskData, head: CaptureHead, identity: dict,
                       tokenizer: Any, runner: Any, model: Any) -> dict[str, Any]:
    """Everything that changes the targets (not batch size or sort window, which only reorder work)."""
    return {
        "format_version": FORMAT_VERSION, "task": task_name, "head": head.name, "teacher": identity,
        "tokenizer_sha256": hash_tokenizer(tokenizer), "compute_dtype": str(runner.dtype).replace("torch.", ""),
        "shard_rows": task.cache.shard_rows,
        "data": {"source": task.data.source, "text_fields": list(task.data.text_fields),
                 "label_names": list(data.label_names),
                 "splits": {s: hash_table(ds.data.table) for s, ds in data.splits.items()},
                 **({"languages": list(data.languages)} if data.languages else {}),
                 **({"augment": C.to_dict(task.data.augment)} if task.data.augment else {})},
        "features": head.features(task, runner),
        **head.settings(task, runner, model, tokenizer),
    }


def manifest_header(pipeline: str, task_name: str, task: C.TaskConfig, data: TaskData, head: CaptureHead,
                    inputs: dict[str, Any], runner: Any, model: Any, processes: int) -> dict[str, Any]:
    """The manifest fields known before any shard is written."""
    features = inputs["features"]
    return {"pipeline": pipeline, "task": task_name, "head": head.name, "label_names": list(data.label_names),
            "text_fields": head.text_columns(task), "fingerprint": hash_obj(inputs), "fingerprint_inputs": inputs,
            "data_origin": portable_origin(data.origin),
            "features": dict(features, hidden_size=getattr(model.config, "hidden_size", None)) if features else None,
            "config": C.to_dict(task), "device": str(runner.device), "processes": processes,
            **_placement(model, processes), **head.manifest_extras(inputs)}


def _placement(model: Any, processes: int) -> dict[str, Any]:
    """Where a teacher over several devices sat: {device: modules placed there} (GPUs, cpu, disk) for
    `teacher.device_map`, {tensor_parallel: processes per replica, replicas: R} for `teacher.tp_plan`."""
    if not placed(model):
        return {}
    if getattr(model, "tp_size", None):
        return {"placement": {"tensor_parallel": int(model.tp_size), "replicas": processes // int(model.tp_size)}}
    where = model.hf_device_map
    counts: dict[str, int] = {}
    for device in where.values():
        counts[str(device)] = counts.get(str(device), 0) + 1
    return {"placement": counts}


def build_teacher_cache(pipeline: C.PipelineConfig, task_name: str, out_dir: Path, teachers_dir: Path,
                        overwrite: bool = False, shared: str | None = None,
                        parent: dict[str, Any] | None = None, source: list[str] | None = None) -> dict[str, Any]:
    """Cache one task: load data, load the teacher, write every shard not already written, commit.

    Under `accelerate launch` each process takes the shards dealt to it (the n-th missing shard goes to
    process n mod N); process 0 prepares the teacher and opens the cache first, and commits the manifest last.
    With `shared` (a URL), a cache with the same fingerprint already there is pulled instead of running the
    teacher over the data, and a cache built here is pushed there (cache/share.py). `parent`: the cache this one
    refreshes (refresh.py), named in the manifest. `source`: the `kdcache cache` arguments that name the pipeline and
    its settings (a name or YAML path, then any --set and --limit), for the repair command `verify` prints.
    """
    task = pipeline.tasks[task_name]
    head = HEADS[task.teacher.head]
    dist = distributed.state()
    data = load_task_data(task.data)
    load = lambda: prepare_teacher(pipeline.name, task_name, task, data, teachers_dir)  # noqa: E731
    # a tensor-parallel teacher is loaded by every process at once (its shards are exchanged while loading)
    model, tokenizer, identity = load() if task.teacher.tp_plan else distributed.main_first(load)
    device = task.teacher.device if task.teacher.device != "auto" or dist.num_processes == 1 else str(dist.device)
    runner = head.runner(model, tokenizer, task, device)
    ft = task.teacher.finetune
    folds = ft.folds if ft is not None and ft.folds >= 2 else 0
    fold_runners = []
    if folds:  # out-of-fold targets on the training split (folds.py)
        fold_models, identity["fold_teachers_sha256"] = distributed.main_first(
            lambda: prepare_fold_teachers(pipeline.name, task_name, task, data, teachers_dir))
        fold_runners = [head.runner(m, tokenizer, task, device) for m in fold_models]
    inputs = fingerprint_inputs(task_name, task, data, head, identity, tokenizer, runner, model)
    growth = None if overwrite else _growth(out_dir, inputs, data, head, task)
    if growth is not None:  # the data grew: the cached rows first in cache order, then the new ones
        data = growth.data
        split_sha = {s: hash_table(ds.data.table) for s, ds in data.splits.items()}
        inputs = {**inputs, "data": {**inputs["data"], "splits": split_sha}}  # (nothing else changed)
    header = manifest_header(pipeline.name, task_name, task, data, head, inputs, runner, model, dist.num_processes)
    if growth is not None:
        header["generations"] = growth.generations_after(inputs["data"]["splits"], header["fingerprint"])
    if shared and dist.num_processes > 1:
        raise C.ConfigError("--shared works with one process: pull or build the cache first, then launch")
    if shared and not overwrite:  # before any tokenising: an identical shared cache needs none of it
        found = fetch_shared(shared, task_name, header["fingerprint"], out_dir)
        if found is not None:
            return found
    units, segments, text = language_units(head, data, tokenizer, task)
    if growth is not None:
        segments = growth_segments(growth)
    if folds:
        header["teacher_folds"] = folds
    if parent:
        header["parent"] = parent
    if data.languages:
        header["languages"] = list(data.languages)
    augment = task.data.augment
    if augment is not None:  # its split's rows carry a `parent` id (augment.py)
        header["augment"] = C.to_dict(augment)
    if text:  # per split (and language): words, tokens, tokens per word
        header["text"] = text
    files = head.files(task, tokenizer)
    if files:
        header["files"] = {rel: {"sha256": hashlib.sha256(b).hexdigest(), "bytes": len(b)} for rel, b in files.items()}
    meta = {"format_version": FORMAT_VERSION, "task": task_name, "fingerprint": header["fingerprint"]}
    schema, head_schema = shard_schema(header, meta), shard_schema(header, meta, head_only=True)

    def produce(split: str, start: int, stop: int, bar, language: str | None) -> tuple[Any, dict | None, dict]:
        rows = units[split][start:stop]
        t0 = time.perf_counter()
        # any sampling is seeded per shard: a resumed or re-dealt shard draws the same samples
        seed = zlib.crc32(f"{header['fingerprint']}/{split}/{start}".encode())
        # augmented rows go to the fold teacher that never saw their parent
        if folds and (split == ft.train_split or augment is not None and split == augment.into):
            out, fold = run_out_of_fold(head, fold_runners, rows, task, seed, bar.update)
        else:
            out, fold = head.run(runner, rows, task, seed, bar.update), np.full(stop - start, -1, np.int8)
        stats = dict(head.stats(rows, out, data.label_names), seconds=time.perf_counter() - t0)
        table = head.table(rows, out, start, split, head_schema, task)
        if folds:
            table = table.append_column(schema.field("teacher_fold"), pa.array(fold, pa.int8()))
        if augment is not None:
            parents = rows["parent"] if "parent" in rows else [None] * table.num_rows
            table = table.append_column(schema.field("parent"), pa.array(parents, pa.string()))
        if language is not None:
            table = table.append_column(schema.field("language"), pa.array([language] * table.num_rows, pa.string()))
        return table, head.shard_features(out), stats

    manifest = write_shards(out_dir, header, task, task_name, segments, inputs["data"]["splits"], produce,
                            head.summarise, overwrite, files, source or [pipeline.name])
    judged = next((s for s in ("validation", "test") if s in manifest["splits"]), None)
    if judged:
        check_teacher(task_name, task, head, manifest["splits"][judged].get("stats") or {},
                      len(manifest["label_names"]), f"cached in {out_dir} (split `{judged}`)")
    if shared:
        push(out_dir, shared_location(shared, task_name, manifest["fingerprint"]))
    return manifest


def _growth(out_dir: Path, inputs: dict[str, Any], data: TaskData, head: CaptureHead,
            task: C.TaskConfig) -> Growth | None:
    """How the data grew since the finished cache in `out_dir` was built (None: no such cache, the same data, or
    other settings too, which the writer refuses). Growing is automatic: same teacher and settings, new rows."""
    try:
        old = read_manifest(out_dir)
    except (FileNotFoundError, CacheFormatError):
        return None  # nothing there, or damaged: the writer decides
    if old["fingerprint"] == hash_obj(inputs) or not only_data_changed(old["fingerprint_inputs"], inputs):
        return None
    growth = plan_growth(out_dir, data, head.name, head.text_columns(task))
    if growth.new_rows:
        log.info("%s: the data has %d new row(s); capturing only them, as generation %d", out_dir, growth.new_rows,
                 growth.generations[-1]["generation"] + 1)
    return growth


def language_units(head: CaptureHead, data: TaskData, tokenizer: Any,
                   task: C.TaskConfig) -> tuple[dict, dict, dict | None]:
    """(per split, the head's units; per split, its (language, start, stop) segments; the head's text statistics
    per split, and per language within it, or None). Multilingual data gets its units language by language (so
    packed LM sequences never mix two languages), concatenated in language order."""
    if not data.languages:
        units = head.units(data, tokenizer, task)
        return units, {split: [(None, 0, len(u))] for split, u in units.items()}, head.text_stats(data, tokenizer, task)
    parts: dict[str, list] = {}
    segments: dict[str, list] = {}
    text: dict[str, dict] = {}
    for code in data.languages:
        mine = data.only(code)
        for split, u in head.units(mine, tokenizer, task).items():
            start = sum(len(x) for x in parts.get(split, []))
            parts.setdefault(split, []).append(u)
            segments.setdefault(split, []).append((code, start, start + len(u)))
        for split, t in (head.text_stats(mine, tokenizer, task) or {}).items():
            text.setdefault(split, {})[code] = t
    return {split: _concat(p) for split, p in parts.items()}, segments, text or None


def _concat(parts: list) -> Any:
    if isinstance(parts[0], np.ndarray):
        return np.concatenate(parts)
    if hasattr(parts[0], "concat"):
        return parts[0].concat(parts)
    import datasets
    return datasets.concatenate_datasets(parts)


def write_shards(out_dir: Path, header: dict[str, Any], task: C.TaskConfig, task_name: str,
                 segments: dict[str, list[tuple[str | None, int, int]]], dataset_sha: dict[str, str], produce,
                 summarise, overwrite: bool = False, files: dict[str, bytes] | None = None,
                 source: list[str] | None = None) -> dict[str, Any]:
    """The shard loop: open the writer (process 0 first), write this process's missing shards with
    `produce(split, start, stop, progress_bar, language) -> (table, features, stats)`, then commit. `segments`:
    per split, its (language or None, start, stop) ranges; a shard never spans two languages.

    Under `accelerate launch` the n-th missing shard goes to process n mod N; process 0 commits the manifest.
    """
    dist = distributed.state()
    # tensor parallelism: each replica's processes run its shards together; its first process writes
    tp = tp_size(task.teacher, dist.num_processes)
    replica = distributed.Replica(dist, tp)
    if tp > 1 and dist.is_main_process:
        log.info("tensor-parallel teacher: %d replica(s) × %d processes each", replica.num_processes, tp)

    def open_writer() -> CacheWriter:
        return CacheWriter(out_dir, header, overwrite=overwrite, row_group_rows=task.cache.row_group_rows,
                           role="owner" if dist.is_main_process else "worker", files=files,
                           source=source).__enter__()

    writer = distributed.main_first(open_writer)
    try:
        manifest = shard_loop(writer, segments, dataset_sha, task.cache.shard_rows, produce, summarise, task_name,
                              replica, out_dir)
    except BaseException:
        writer.__exit__(*sys.exc_info())
        raise
    writer.__exit__(None, None, None)
    return manifest


def shard_loop(writer: CacheWriter, segments: dict[str, list], dataset_sha: dict[str, str], shard_rows: int,
               produce, summarise, task_name: str, dist: Any, out_dir: Path) -> dict[str, Any]:
    """This replica's missing shards (computed by every process of a tensor-parallel replica, submitted by its
    writer), then the commit."""
    if distributed.share(writer.complete):
        log.info("%s: already complete with this fingerprint; nothing to do", out_dir)
        return read_manifest(out_dir)
    plan = []  # (split, shard index, start, stop, language): indices run on across a split's languages
    for split, segs in segments.items():
        starts = [(code, s, min(s + shard_rows, b)) for code, a, b in segs for s in range(a, b, shard_rows)]
        plan += [(split, i, s, e, code) for i, (code, s, e) in enumerate(starts)]
    todo = [p for p in plan if not writer.shard_done(p[0], p[1], p[2], p[3] - p[2])]
    if len(todo) < len(plan):
        log.info("%s: %d of %d shards already written; resuming", out_dir, len(plan) - len(todo), len(plan))
    mine = todo[dist.process_index::dist.num_processes]
    t_loop = time.perf_counter()
    with progress(sum(b - a for _, _, a, b, _ in mine), desc=f"cache {task_name}",
                  disable=not dist.is_local_main_process) as bar:
        for split, index, start, stop, code in mine:
            table, features, stats = produce(split, start, stop, bar, code)
            if dist.writes:
                writer.submit(split, index, start, table, features, stats, code)
    writer.flush()
    # this run's wall clock for everything (tokenise, forward, pooling, Parquet + Zarr writes), per process
    rows_now = sum(b - a for _, _, a, b, _ in mine)
    capture = {"rows": rows_now, "seconds": round(time.perf_counter() - t_loop, 3)}
    distributed.barrier()
    splits = {s: {"rows": segs[-1][2], "dataset_sha256": dataset_sha[s]} for s, segs in segments.items()}
    return distributed.main_first(
        lambda: writer.commit(splits, summarise, extra={"capture": capture}) if dist.is_main_process
        else read_manifest(out_dir))
