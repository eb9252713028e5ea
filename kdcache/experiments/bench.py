"""`kdcache bench` (`make bench`): speed and storage of the cache, every figure a ratio measured side by side in
one run on this machine, each ratio in REPEATS repetitions (min / median / max; a goal is judged on the minimum,
so it holds in every repetition, not on a quiet moment), with the machine's load recorded. Writes
data/bench/bench-<mode>.json and a dated section of docs/benchmarks.md."""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from .. import config as C
from ..cache.format import FORMAT_VERSION, parquet_schema, read_manifest
from ..cache.reader import CacheDataset, collate
from ..cache.writer import CacheWriter
from ..capture.build import build_teacher_cache
from ..capture.runner import probe_batches
from ..data import load_task_data
from ..train.live import live_targets
from ..train.loop import make_runs, step
from ..train.sources import open_source
from .docsections import write_section
from .machine import machine

REPEATS = 3
STUDENTS = {"bow": C.StudentConfig(arch="bow"),
            "bilstm": C.StudentConfig(arch="bilstm", params={"embed_dim": 100, "hidden": 64, "mlp": 128})}


def synthetic_cache(root: Path, rows: int, shard_rows: int = 4096, row_group_rows: int = 2048, text_len: int = 150,
                    num_labels: int = 2, seed: int = 0) -> Path:
    """A cache of `rows` random rows (about `text_len` characters of text each) written by the real CacheWriter,
    for measuring and testing the reader without a teacher. Some labels are null (unlabelled rows)."""
    rng = np.random.default_rng(seed)
    names = [chr(ord("a") + i) for i in range(num_labels)]
    header = {"pipeline": "synthetic", "task": "t", "head": "sequence-classification", "label_names": names,
              "text_fields": ["text"], "fingerprint": f"synthetic-{rows}", "fingerprint_inputs": {"rows": rows},
              "features": None, "config": {"data": {"source": "synthetic"}}}
    schema = parquet_schema(("text",), num_labels,
                            {"format_version": FORMAT_VERSION, "task": "t", "fingerprint": header["fingerprint"]})
    with CacheWriter(root, header, overwrite=True, row_group_rows=row_group_rows) as w:
        for i, start in enumerate(range(0, rows, shard_rows)):
            n = min(shard_rows, rows - start)
            words = rng.integers(0, 5000, size=(n, max(1, text_len // 6)))
            labels = rng.integers(-1, num_labels, n).astype(np.int32)
            table = pa.Table.from_pydict({
                "row_id": np.arange(start, start + n), "id": [f"r{start + k}" for k in range(n)],
                "text": [" ".join(f"w{x:04d}" for x in row) for row in words],
                "label": pa.array(labels, mask=labels < 0),
                "logits": pa.FixedSizeListArray.from_arrays(
                    pa.array(rng.normal(size=num_labels * n).astype(np.float32)), num_labels),
                "input_hash": np.zeros(n, np.int64), "num_tokens": np.ones(n, np.int32),
                "truncated": np.zeros(n, bool)}, schema=schema)
            w.submit("train", i, start, table, None, {"rows": n})
        w.commit({"train": {"rows": rows}}, lambda stats: {"rows": sum(s["rows"] for s in stats)})
    return root


def _reader_peak_rss_mb(cache: Path) -> float:
    """Peak RSS of a fresh process that streams the whole cache with shuffling."""
    code = ("import resource, sys; from kdcache.cache.reader import CacheDataset\n"
            f"n = sum(1 for _ in CacheDataset({str(cache)!r}, 'train', shuffle=True, shuffle_buffer=2048))\n"
            "print(n, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    return float(out[1])


class _BareForward:
    """The teacher alone on each batch the capture is about to run (logits only, nothing kept or written), timed."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def __call__(self, runner, input_ids: torch.Tensor, mask: torch.Tensor) -> None:
        if runner.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.inference_mode(), runner.autocast():
            runner.model(input_ids=input_ids, attention_mask=mask).logits.cpu()
        self.seconds += time.perf_counter() - t0


def stage_one_overhead(pipeline: C.PipelineConfig, task_name: str, cache: Path, teachers: Path) -> tuple[float, float]:
    """(capture, bare teacher forward) rows/s from one capture into an empty `cache`, the two taking turns batch by
    batch: before each of the capture's batches the bare forward runs on the same tensors, and its time is taken
    out of the capture's, so the machine's drift (10% between two half-minute runs here) falls on both alike."""
    shutil.rmtree(cache, ignore_errors=True)
    bare = _BareForward()
    with probe_batches(bare):
        m = build_teacher_cache(pipeline, task_name, cache, teachers)
    rows = m["capture"]["rows"]
    return rows / (m["capture"]["seconds"] - bare.seconds), rows / bare.seconds


def _epochs(jobs, source, train, acc) -> list[tuple[float, float, float]]:
    """Train each (run, batches, teacher) job for one pass, the jobs taking turns batch by batch, so that a shared
    machine's drift (7% between runs here) falls on all of them alike. Reading a batch counts to its job; `teacher`
    (the live teacher) replaces the cached logits. Per job: (total, student, teacher) seconds."""
    its = [iter(batches) for _, batches, _ in jobs]
    times = [[0.0, 0.0, 0.0] for _ in jobs]
    pending = list(range(len(jobs)))
    while pending:
        for k in list(pending):
            run, _, teacher = jobs[k]
            t0 = time.perf_counter()
            b = next(its[k], None)
            if b is None:
                pending.remove(k)
                continue
            if teacher is not None:
                t1 = time.perf_counter()
                b = teacher(b)
                times[k][2] += time.perf_counter() - t1
            t1 = time.perf_counter()
            step(run, source, b, source.head.targets(b, source, acc.device), train, acc)
            times[k][1] += time.perf_counter() - t1
            times[k][0] += time.perf_counter() - t0
    return [tuple(t) for t in times]


def spread(values: list[float]) -> dict[str, Any]:
    """min / median / max of a ratio's repetitions (the minimum is what a goal is judged on)."""
    return {"min": min(values), "median": float(np.median(values)), "max": max(values), "values": values}


def load() -> dict[str, Any]:
    """The machine's load averages (1, 5, 15 min) and its core count, to read the figures against."""
    return {"loadavg": [round(x, 2) for x in os.getloadavg()], "cpus": os.cpu_count()}


def bench_settings(pipeline_name: str, quick: bool) -> tuple[int, str, list[str]]:
    """(rows per split, the task measured, the overrides that size it): speed only, so the teacher gets a few
    fine-tuning steps and no quality gate (its quality is not what is measured)."""
    rows = 512 if quick else 4096
    base = C.load_pipeline(pipeline_name)
    task_name = next(iter(base.tasks))
    over = [f"tasks.{task_name}.data.limit={rows}"]
    if base.tasks[task_name].teacher.finetune is not None:
        over += [f"tasks.{task_name}.teacher.finetune.limit=64", f"tasks.{task_name}.teacher.finetune.epochs=1",
                 f"tasks.{task_name}.teacher.finetune.min_steps=0", f"tasks.{task_name}.teacher.sanity.enabled=false"]
    return rows, task_name, over


def run_lifecycle(pipeline_name: str, quick: bool, out_dir: Path, doc: Path | None,
                  teachers: Path | None = None, repeats: int = REPEATS) -> dict[str, Any]:
    """`kdcache bench --lifecycle`: the two figures of caches that live, alone, as their own doc section: an
    incremental capture of 10% new rows against a full recapture, and the reader from object storage."""
    rows, task_name, over = bench_settings(pipeline_name, quick)
    res = {"date": _dt.date.today().isoformat(), "machine": machine(), "pipeline": pipeline_name,
           "command": f"kdcache bench {pipeline_name} --lifecycle{' --quick' if quick else ''}", "load_before": load(),
           "incremental": _incremental(pipeline_name, over, task_name, rows if quick else None,
                                       teachers or out_dir / "teachers", out_dir, repeats),
           "remote": _remote_reader(out_dir, 5_000 if quick else 200_000, repeats)}
    res["load_after"] = load()
    text = "\n".join([f"### {res['date']} — `{res['command']}`", "",
                      f"Machine: {res['machine']}. Load average before {res['load_before']['loadavg']}, after "
                      f"{res['load_after']['loadavg']}; min / median / max of {repeats} repetitions.", "",
                      "| figure | measured | goal |", "|---|---|---|", *_lifecycle_rows(res), ""])
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "bench-lifecycle.json").write_text(json.dumps(res, indent=1))
    print(text)
    if doc is not None:
        write_section(doc, "bench:lifecycle", text, "## Caches that live: growing and reading from object storage",
                      "# Benchmarks\n")
    return res


def run_bench(pipeline_name: str, quick: bool, out_dir: Path, doc: Path | None,
              repeats: int = REPEATS) -> dict[str, Any]:
    from accelerate import Accelerator
    rows, task_name, over = bench_settings(pipeline_name, quick)
    pipeline = C.load_pipeline(pipeline_name, over)
    teachers, cache = out_dir / "teachers", out_dir / "cache" / task_name
    res: dict[str, Any] = {"date": _dt.date.today().isoformat(), "machine": machine(), "mode": "quick" if quick else "full",
                           "pipeline": pipeline_name, "rows_per_split": rows, "repeats": repeats,
                           "command": f"kdcache bench {pipeline_name}{' --quick' if quick else ''}",
                           "load_before": load()}

    # 1. stage-one overhead: a capture from an empty folder (a finished cache would be reused, not re-measured),
    #    the bare forward taking turns with it batch by batch, REPEATS times
    capture_rps, raw_rps = [], []
    for _ in range(repeats):
        c, r = stage_one_overhead(pipeline, task_name, cache, teachers)
        capture_rps.append(c)
        raw_rps.append(r)
    res["stage_one"] = {"capture_rows_per_s": spread(capture_rps), "raw_forward_rows_per_s": spread(raw_rps),
                        "ratio": spread([c / r for c, r in zip(capture_rps, raw_rps)]), "goal": 0.95}
    m = read_manifest(cache)

    # Training figures use whole epochs over the cached train split (the reader's start-up is part of an epoch).
    acc = Accelerator(cpu=not torch.cuda.is_available())
    train = pipeline.train
    source = open_source(pipeline, task_name, str(cache), acc)
    loader = source.loader
    memory = [dict(b, logits=torch.zeros_like(b["logits"])) for b in loader]  # hard labels, already in memory
    epoch_rows = sum(len(b["id"]) for b in memory)

    def fresh(name: str, loss: C.LossConfig):
        students = {name: dataclasses.replace(STUDENTS[name], loss=loss, twin=False)}
        (r,) = make_runs(dataclasses.replace(pipeline, students=students), [name], {task_name: source}, out_dir, acc)
        _epochs([(r, memory[:1], None)], source, train, acc)  # warm-up step
        return r

    # 2. loader headroom: a full pass of the reader vs what a BiLSTM consumes (its steps on in-memory batches)
    t0 = time.perf_counter()
    n_read = sum(len(b["id"]) for b in loader)
    reader_rps = n_read / (time.perf_counter() - t0)
    [(_, t_student, _)] = _epochs([(fresh("bilstm", train.loss), memory, None)], source, train, acc)
    consume_rps = epoch_rows / t_student
    sizes = [20_000, 80_000, 320_000] if not quick else [5_000, 20_000, 80_000]
    rss = {f"{n // sizes[0]}x ({n} rows)": _reader_peak_rss_mb(synthetic_cache(out_dir / f"syn-{n}", n)) for n in sizes}
    res["loader"] = {"reader_rows_per_s": reader_rps, "bilstm_consumes_rows_per_s": consume_rps,
                     "headroom": reader_rps / consume_rps, "goal": 5.0, "reader_peak_rss_mb": rss}

    # 3. stage-two overhead: KD reading the cache vs hard labels from memory, same student, one epoch each, the two
    #    runs taking turns batch by batch, REPEATS times
    ratios = []
    for _ in range(repeats):
        (t_mem, _, _), (t_cache, _, _) = _epochs([(fresh("bilstm", C.LossConfig(alpha=1.0)), memory, None),
                                                 (fresh("bilstm", train.loss), loader, None)], source, train, acc)
        ratios.append(t_mem / t_cache)
    res["stage_two"] = {"ratio": spread(ratios), "goal": 0.95}

    # 4. speed-up against online KD, per student: one epoch from the cache vs one with the live teacher, REPEATS times
    live = live_targets(pipeline, task_name, teachers, ())
    capture = epoch_rows / float(np.median(capture_rps))  # stage one, paid once for every epoch and every student
    res["online_kd"] = {}
    for name in STUDENTS:
        reps = []
        for _ in range(repeats):
            (t_c, _, _), (t_l, t_s, t_t) = _epochs([(fresh(name, train.loss), loader, None),
                                                    (fresh(name, train.loss), loader, live)], source, train, acc)
            reps.append((t_c, t_l, t_s, t_t))
        t_c, t_l, t_s, t_t = (float(np.median(x)) for x in zip(*reps))
        res["online_kd"][name] = {
            "speedup_per_epoch": spread([l_ / c for c, l_, _, _ in reps]),
            "ideal": spread([(t + s) / s for _, _, s, t in reps]),
            "fraction_of_ideal": spread([(l_ / c) / ((t + s) / s) for c, l_, s, t in reps]),
            "speedup_1_epoch_incl_capture": t_l / (t_c + capture),
            f"speedup_{train.epochs}_epochs_incl_capture": train.epochs * t_l / (train.epochs * t_c + capture),
            "teacher_ms_per_batch": 1000 * t_t / len(memory), "student_ms_per_step": 1000 * t_s / len(memory)}

    # 5. storage: kdcache vs one torch.save file per sample vs pyarrow defaults
    train_shards = m["splits"]["train"]["shards"]
    n = m["splits"]["train"]["rows"]
    ours_pq = sum(s["bytes"] for s in train_shards)
    ours_feat = sum(s.get("features", {}).get("bytes", 0) for s in train_shards)
    table = pa.concat_tables([pq.read_table(cache / s["parquet"]) for s in train_shards])
    t0 = time.perf_counter()
    rows_read = sum(len(b["id"]) for b in torch.utils.data.DataLoader(
        CacheDataset(cache, "train", feature_layers=tuple(m["features"]["layers"]) if m.get("features") else ()),
        batch_size=64, collate_fn=collate))
    ours_read = rows_read / (time.perf_counter() - t0)
    default = out_dir / "pyarrow-default.parquet"
    pq.write_table(table, default)
    t0 = time.perf_counter()
    pq.read_table(default).to_pylist()
    default_read = n / (time.perf_counter() - t0)
    per_sample = out_dir / "per-sample"
    shutil.rmtree(per_sample, ignore_errors=True)
    per_sample.mkdir(parents=True)
    feats = {}
    if m.get("features"):
        import zarr
        for j in m["features"]["layers"]:
            feats[j] = np.concatenate([zarr.open_group(str(cache / s["features"]["path"]), mode="r")[f"layer_{j}"][:]
                                       for s in train_shards])
    rowsd = table.to_pylist()
    for i, r in enumerate(rowsd):
        torch.save({"text": r["text"], "label": r["label"], "logits": torch.tensor(r["logits"]),
                    **{f"layer_{j}": torch.from_numpy(f[i]) for j, f in feats.items()}}, per_sample / f"{i}.pt")
    ps_bytes = sum(p.stat().st_size for p in per_sample.iterdir())
    t0 = time.perf_counter()
    for i in range(n):
        torch.load(per_sample / f"{i}.pt")
    ps_read = n / (time.perf_counter() - t0)
    res["storage"] = {"rows": n, "kdcache_bytes_per_example": (ours_pq + ours_feat) / n,
                      "kdcache_parquet_only_bytes_per_example": ours_pq / n, "kdcache_read_rows_per_s": ours_read,
                      "pyarrow_default_bytes_per_example_parquet_only": default.stat().st_size / n,
                      "pyarrow_default_read_rows_per_s_parquet_only": default_read,
                      "torch_save_per_sample_bytes_per_example": ps_bytes / n, "torch_save_read_rows_per_s": ps_read}

    res["incremental"] = _incremental(pipeline_name, over, task_name, rows if quick else None, teachers, out_dir,
                                      repeats)
    res["remote"] = _remote_reader(out_dir, 5_000 if quick else 200_000, repeats)
    res["load_after"] = load()
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"bench-{res['mode']}.json").write_text(json.dumps(res, indent=1))
    text = render(res)
    print(text)
    if doc is not None:
        write_section(doc, f"bench:{res['mode']}", text, f"## `make bench` ({res['mode']} mode)", "# Benchmarks\n")
    return res


def _incremental(pipeline_name: str, over: list[str], task_name: str, rows: int | None, teachers: Path,
                 out_dir: Path, repeats: int) -> dict[str, Any]:
    """A cache of 90% of a training split grown by the last 10% (capture/grow.py) against capturing all of it from
    an empty folder: whole `kdcache cache` calls (data, teacher, fingerprint, capture, commit), taking turns. Full
    mode takes the whole training split (rows=None; quick mode `rows` of it): a command's fixed costs (reading the
    data, hashing the teacher's weights) weigh on a small cache's ratio more than on a real one's."""
    limit = f"tasks.{task_name}.data.limit"
    # the training split alone (no validation carved from it), so the new rows are exactly a tenth of the cache
    only_train = [f"tasks.{task_name}.data.splits={{train: train}}", f"tasks.{task_name}.data.validation_fraction=0",
                  f"tasks.{task_name}.teacher.finetune.eval_split=null"]
    whole = C.load_pipeline(pipeline_name, [*over, *only_train, f"{limit}=null"])
    rows = rows or len(load_task_data(whole.tasks[task_name].data).splits["train"])
    small = C.load_pipeline(pipeline_name, [*over, *only_train, f"{limit}={rows * 9 // 10}"])
    full = C.load_pipeline(pipeline_name, [*over, *only_train, f"{limit}={rows}"])
    base, grown, fresh = (out_dir / "incremental" / x / task_name for x in ("base", "grown", "full"))
    shutil.rmtree(base.parent, ignore_errors=True)
    build_teacher_cache(small, task_name, base, teachers)
    t_grow, t_full, new_rows = [], [], 0
    for _ in range(repeats):
        shutil.rmtree(grown, ignore_errors=True)
        shutil.copytree(base, grown)
        t0 = time.perf_counter()
        m = build_teacher_cache(full, task_name, grown, teachers)
        t_grow.append(time.perf_counter() - t0)
        new_rows = m["capture"]["rows"]
        shutil.rmtree(fresh, ignore_errors=True)
        t0 = time.perf_counter()
        build_teacher_cache(full, task_name, fresh, teachers)
        t_full.append(time.perf_counter() - t0)
    return {"new_rows": new_rows, "total_rows": m["totals"]["rows"], "grow_seconds": spread(t_grow),
            "full_seconds": spread(t_full), "ratio": spread([g / f for g, f in zip(t_grow, t_full)]), "goal": 0.15}


def _remote_reader(out_dir: Path, rows: int, repeats: int) -> dict[str, Any]:
    """The reader over a local S3-compatible server (moto in its own process, on loopback, as a store is not in the
    reader's process) against local disk: full passes of the same synthetic cache, taking turns, after one untimed
    pass of each (a training job pays the client's start and first connections once, not per epoch). Needs
    `pip install -e '.[dev]'` (moto, s3fs)."""
    try:
        import boto3
        import fsspec
        import moto.server  # noqa: F401 (started below as a process)
        import s3fs
    except ImportError as e:
        return {"skipped": f"{e.name} is not installed (pip install -e '.[dev]')"}
    import socket
    import urllib.request
    cache = synthetic_cache(out_dir / "remote-src", rows)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    saved = fsspec.config.conf.get("s3")
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(100):  # up within a few seconds
            try:
                urllib.request.urlopen(url, timeout=1)
                break
            except OSError:
                time.sleep(0.1)
        opts = {"endpoint_url": url, "key": "bench", "secret": "bench", "client_kwargs": {"region_name": "us-east-1"}}
        boto3.client("s3", endpoint_url=url, region_name="us-east-1", aws_access_key_id="bench",
                     aws_secret_access_key="bench").create_bucket(Bucket="bench")
        s3fs.S3FileSystem(**opts, skip_instance_cache=True).put(str(cache), "bench/cache", recursive=True)
        fsspec.config.conf["s3"] = opts

        def rate(where: str) -> float:
            t0 = time.perf_counter()
            n = sum(len(b["id"]) for b in torch.utils.data.DataLoader(CacheDataset(where, "train", shuffle=True),
                                                                       batch_size=64, collate_fn=collate))
            return n / (time.perf_counter() - t0)
        rate(str(cache)), rate("s3://bench/cache")  # untimed: page cache, client start and first connections
        pairs = [(rate(str(cache)), rate("s3://bench/cache")) for _ in range(repeats)]
    finally:
        if saved is None:
            fsspec.config.conf.pop("s3", None)
        else:
            fsspec.config.conf["s3"] = saved
        s3fs.S3FileSystem.clear_instance_cache()
        server.terminate()
        server.wait(timeout=30)
    return {"rows": rows, "disk_rows_per_s": spread([d for d, _ in pairs]),
            "s3_rows_per_s": spread([r for _, r in pairs]), "ratio": spread([r / d for d, r in pairs]), "goal": 0.8}


def _lifecycle_rows(r: dict[str, Any]) -> list[str]:
    """The incremental-capture row (a goal at most: judged on the maximum, so it holds in every repetition) and the
    object-storage reader row, where the run has them."""
    rows = []
    inc, rem = r.get("incremental"), r.get("remote") or {}
    if inc:
        rows.append(f"| incremental capture: {inc['new_rows']} new of {inc['total_rows']} rows ÷ full recapture "
                    f"(whole commands) | {_range(inc['ratio'])} (median {inc['grow_seconds']['median']:.1f} s vs "
                    f"{inc['full_seconds']['median']:.1f} s) | ≤ {inc['goal']}: "
                    f"{'meets' if inc['ratio']['max'] <= inc['goal'] else 'MISSES'} |")
    if rem.get("skipped"):
        rows.append(f"| reader from a local S3 server ÷ from disk | skipped: {rem['skipped']} | ≥ 0.8 |")
    elif rem:
        rows.append(f"| reader from a local S3 server (moto, loopback) ÷ from disk, {rem['rows']} rows | "
                    f"{_range(rem['ratio'])} (median {rem['s3_rows_per_s']['median']:.0f} vs "
                    f"{rem['disk_rows_per_s']['median']:.0f} rows/s) | ≥ 0.8: "
                    f"{'meets' if rem['ratio']['min'] >= rem['goal'] else 'MISSES'} |")
    return rows


# the speed-up a student must reach against online KD (besides 0.95 of its ideal), where a goal is set
SPEEDUP_GOALS = {"bilstm": 10.0}


def _range(x: dict[str, Any], fmt: str = ".3f", unit: str = "") -> str:
    return f"{x['min']:{fmt}}{unit} / {x['median']:{fmt}}{unit} / {x['max']:{fmt}}{unit}"


def render(r: dict[str, Any]) -> str:
    s1, ld, s2, st = r["stage_one"], r["loader"], r["stage_two"], r["storage"]
    ok = lambda v, goal: "meets" if v >= goal else "MISSES"  # noqa: E731
    la, lb = r["load_before"], r["load_after"]
    lines = [f"### {r['date']} — `{r['command']}` ({r['mode']} mode, {r['rows_per_split']} rows per split)", "",
             f"Machine: {r['machine']}. Load average (1/5/15 min) before {la['loadavg']}, after {lb['loadavg']} on "
             f"{la['cpus']} cores. Ratios: min / median / max of {r['repeats']} repetitions, each measured side by "
             "side; a goal is judged on the minimum.", "",
             "| figure | measured | goal (on the minimum) |", "|---|---|---|",
             "| stage-one overhead: capture ÷ raw teacher forward (batch by batch in turn) | "
             f"{_range(s1['ratio'])} (median "
             f"{s1['capture_rows_per_s']['median']:.0f} vs {s1['raw_forward_rows_per_s']['median']:.0f} rows/s) | "
             f"≥ 0.95: {ok(s1['ratio']['min'], 0.95)} |",
             f"| loader headroom: reader ÷ BiLSTM consumption | {ld['headroom']:.1f}× ({ld['reader_rows_per_s']:.0f} vs "
             f"{ld['bilstm_consumes_rows_per_s']:.0f} rows/s) | ≥ 5×: {ok(ld['headroom'], 5)} |",
             "| reader peak RSS | " + ", ".join(f"{k}: {v:.0f} MB" for k, v in ld["reader_peak_rss_mb"].items())
             + " | flat |",
             f"| stage-two overhead: KD from cache ÷ hard labels from memory | {_range(s2['ratio'])} | ≥ 0.95: "
             f"{ok(s2['ratio']['min'], 0.95)} |"]
    for name, o in r["online_kd"].items():
        ep = next(k for k in o if k.startswith("speedup_") and k.endswith("_epochs_incl_capture"))
        goal = SPEEDUP_GOALS.get(name)
        verdict = f"≥ 0.95 of ideal: {ok(o['fraction_of_ideal']['min'], 0.95)}" + (
            f"; ≥ {goal:g}×: {ok(o['speedup_per_epoch']['min'], goal)}" if goal else "")
        lines.append(f"| online KD ÷ cache, {name}: one epoch | {_range(o['speedup_per_epoch'], '.1f', '×')} (ideal "
                     f"{_range(o['ideal'], '.1f', '×')}, {_range(o['fraction_of_ideal'], '.2f')} of it; teacher "
                     f"{o['teacher_ms_per_batch']:.0f} ms, student {o['student_ms_per_step']:.0f} ms per batch, "
                     f"medians) | {verdict} |")
        lines.append(f"| online KD ÷ cache, {name}: with stage one paid | 1 epoch {o['speedup_1_epoch_incl_capture']:.1f}×, "
                     f"{ep.split('_')[1]} epochs {o[ep]:.1f}× | |")
    lines += [f"| storage, kdcache (Parquet + Zarr features) | {st['kdcache_bytes_per_example']:.0f} B/example; "
              f"reads {st['kdcache_read_rows_per_s']:.0f} rows/s | |",
              f"| storage, kdcache Parquet only vs pyarrow defaults | {st['kdcache_parquet_only_bytes_per_example']:.0f} vs "
              f"{st['pyarrow_default_bytes_per_example_parquet_only']:.0f} B/example (defaults read "
              f"{st['pyarrow_default_read_rows_per_s_parquet_only']:.0f} rows/s to Python) | |",
              f"| storage, one torch.save file per sample | {st['torch_save_per_sample_bytes_per_example']:.0f} B/example; "
              f"reads {st['torch_save_read_rows_per_s']:.0f} rows/s | |"]
    lines += [*_lifecycle_rows(r), ""]
    return "\n".join(lines)
