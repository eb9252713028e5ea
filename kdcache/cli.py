"""`kdcache` command line. `kdcache --help` lists the commands; `kdcache <command> --help` explains each."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from . import __version__, layout

DESCRIPTION = """\
kdcache: offline soft-label caching for knowledge distillation.

Stage one runs a Hugging Face teacher ONCE over each task's data and writes a compact, fingerprinted cache
(Parquet shards for logits and inputs, Zarr for hidden features, manifest.json written last). Stage two trains
many cheap students from that cache without loading the teacher again.

Three teacher heads: sequence classification (exact logits per example), token classification (exact tag logits
per WORD, e.g. NER) and causal LM (top-k ids + raw logits per position, with the full log-sum-exp and the exact
tail mass at each configured temperature, optionally sampled targets).

A PIPELINE is a name under pipelines/ (default, tiny, sst2, sib200-en, ner, ner-tiny, lm, lm-tiny, cross) or a
path to a YAML file. A pipeline may hold several tasks with their own teachers; a cross-task student (arch
bilstm-multitask) learns several of them at once, with a weight per task. Your own data: source `files` (csv,
tsv, json, jsonl, parquet, compressed or not); your own student or trainer: the Python API (docs/api.md).
"""

EPILOG = """\
examples:
  kdcache cache default                       # fine-tune the teacher if needed, cache every task
  kdcache cache tiny --out /tmp/c --limit 100 # quick run on 100 rows per split
  kdcache cache default --set tasks.sentiment.cache.batch_size=32
  kdcache train default                       # stage two: every student + hard-label twins, then the report
  kdcache train default --students bilstm --teacher live   # online KD with the live teacher, for comparison
  kdcache verify data/cache/default           # re-check every checksum; exit 1 naming the bad shard
  kdcache info data/cache/default --json
  kdcache push data/cache/default/sentiment s3://team/default/sentiment   # share it (manifest last)
  kdcache pull s3://team/default/sentiment data/cache/default/sentiment   # fetch it, every checksum checked
  kdcache cache ner && kdcache train ner      # CoNLL-2003 NER: word-level taggers, entity F1
  kdcache bench lm                            # LM targets: bytes/token against fidelity for k = 8..128
  kdcache fidelity default --sweep bilstm     # temperature / alpha / feature-loss sweep for one student
  kdcache cache multilingual-topic-tiny       # five languages, one cache partitioned by language
  kdcache fidelity multilingual-topic --zero-shot en --students bow-lang   # labels in English only, per language
  kdcache lifelong lifelong                   # BBC topics arriving in rounds: scratch vs continual students
  kdcache export data/cache/chat/topic --out kd/   # axolotl's top-k logprob layout, at T = 1
  kdcache import train=kd/train.parquet test=kd/test.parquet --tokenizer <teacher> --pipeline chat --task topic
"""


def _rows(value: str) -> int:
    """A `--limit` value: a whole number of rows, at least 1."""
    n = int(value)
    if n < 1:
        raise argparse.ArgumentTypeError(f"{value}: a number of rows, at least 1")
    return n


def _set_arg(p: argparse.ArgumentParser, example: str = "tasks.sentiment.cache.batch_size=32") -> None:
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help=f"override a config value by dotted key (repeatable), e.g. {example}")


def _pipeline_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("pipeline", help="pipeline name under pipelines/ or path to a pipeline YAML file")
    _set_arg(p)
    p.add_argument("--task", dest="tasks", action="append", default=None, metavar="NAME",
                   help="only this task (repeatable); default: every task of the pipeline")
    _teachers_arg(p)


def _teachers_arg(p: argparse.ArgumentParser, default: str = "$KDCACHE_HOME/teachers") -> None:
    p.add_argument("--teachers-dir", type=Path, default=None,
                   help=f"where fine-tuned teachers are kept, as <dir>/<pipeline>/<task>/ (default: {default})")


def _pipeline_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("pipeline", help="pipeline name or YAML path")
    _set_arg(p)


def _cache_out_arg(p: argparse.ArgumentParser, more: str = "") -> None:
    p.add_argument("--out", type=Path, default=None,
                   help=f"cache root{more} (default: $KDCACHE_HOME/cache/<pipeline>)")


def _limit_arg(p: argparse.ArgumentParser, help: str) -> None:
    p.add_argument("--limit", type=_rows, default=None, metavar="N", help=help)


def _caches_arg(p: argparse.ArgumentParser, json_help: str = "machine-readable output") -> None:
    p.add_argument("path", type=Path, help="a cache folder, or a folder of task caches")
    _json_arg(p, json_help)


def _json_arg(p: argparse.ArgumentParser, help: str = "machine-readable output") -> None:
    p.add_argument("--json", action="store_true", help=help)


def _seeds_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default: 0,1,2)")


def _runs_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cache", default=None,
                   help="cache root, a folder or an fsspec URL such as s3://bucket/caches/default "
                        "(default: $KDCACHE_HOME/cache/<pipeline>); set FSSPEC_S3_ENDPOINT_URL for S3-compatible servers")
    p.add_argument("--runs", type=Path, default=None, help="runs root (default: $KDCACHE_HOME/runs/<pipeline>)")


def _experiment_args(p: argparse.ArgumentParser, folder: str, doc: str) -> None:
    p.add_argument("pipeline", nargs="?", default="default", help="pipeline (default: default)")
    p.add_argument("--out", type=Path, default=None, help=f"scratch and JSON folder (default: $KDCACHE_HOME/{folder})")
    p.set_defaults(scratch=folder)
    p.add_argument("--doc", type=Path, default=Path("docs") / f"{doc}.md", help=f"markdown file to write (docs/{doc}.md)")
    p.add_argument("--no-doc", action="store_true", help="leave the markdown file alone")


def _defaults(args, pipeline: str | None = None) -> None:
    """Fill the folder options left unset from the one layout rule (layout.py)."""
    if getattr(args, "teachers_dir", "") is None:
        args.teachers_dir = layout.teachers_dir()
    if getattr(args, "out", "") is None and getattr(args, "scratch", None):
        args.out = layout.scratch(args.scratch)
    if pipeline is not None:
        for key, where in (("cache", layout.cache_root), ("runs", layout.runs_root)):
            if getattr(args, key, "") is None:
                setattr(args, key, where(pipeline))


def _load(args):
    from .config import load_pipeline, with_limit
    pipeline = with_limit(load_pipeline(args.pipeline, args.overrides), getattr(args, "limit", None))
    _defaults(args, pipeline.name)
    tasks = args.tasks or list(pipeline.tasks)
    for t in tasks:
        if t not in pipeline.tasks:
            raise SystemExit(f"kdcache: error: pipeline {pipeline.name!r} has no task {t!r} "
                             f"(tasks: {', '.join(pipeline.tasks)})")
    return pipeline, tasks


def cmd_cache(args) -> int:
    from .capture.build import build_teacher_cache
    from .report import cache_summary
    pipeline, tasks = _load(args)
    out = args.out or layout.cache_root(pipeline.name)
    for t in tasks:
        m = build_teacher_cache(pipeline, t, out / t, args.teachers_dir, overwrite=args.overwrite, shared=args.shared,
                                source=[args.pipeline, *(x for o in args.overrides for x in ("--set", o)),
                                        *(["--limit", str(args.limit)] if args.limit else [])])
        print("\n".join(cache_summary(out / t, m)))
    return 0


def cmd_finetune(args) -> int:
    from .capture.finetune import finetune_teacher
    from .capture.heads import HEADS
    from .data import load_task_data
    from .hub import quiet_transformers
    pipeline, tasks = _load(args)
    quiet_transformers()
    for t in tasks:
        task = pipeline.tasks[t]
        if task.teacher.finetune is None:
            print(f"task {t}: teacher has no `finetune:` section; nothing to do")
            continue
        folder = finetune_teacher(t, task, load_task_data(task.data), HEADS[task.teacher.head],
                                  args.teachers_dir / pipeline.name / t)
        print(f"task {t}: teacher ready in {folder}")
    return 0


def cmd_train(args) -> int:
    from .config import student_families
    from .report import build_report, run_summary
    from .train.loop import TrainingError, train_students
    pipeline, _ = _load(args)
    if not pipeline.students:
        raise SystemExit(f"kdcache: error: pipeline {pipeline.name!r} has no students: add a `students:` section")
    # a per_language student's name stands for all its <name>@<code> students
    students = [n for runs in student_families(pipeline, args.students.split(",")).values() for n in runs] \
        if args.students else list(pipeline.students)
    cache_root, runs_dir = str(args.cache).rstrip("/"), args.runs  # the cache: a folder or an fsspec URL
    failure = None
    try:
        results = train_students(pipeline, students, cache_root, runs_dir, teacher=args.teacher,
                                 teachers_dir=args.teachers_dir)
    except TrainingError as e:  # the runs that finished are saved: report them, then the failure
        results, failure = e.results, e
    if int(os.environ.get("RANK", "0")) == 0 and results:  # under `accelerate launch`, rank 0 reports
        for r in results:
            print(run_summary(r))
        print(f"report: {build_report(runs_dir, cache_root, pipeline.train.test_split or 'test')}")
    if failure is not None:
        raise failure
    return 0


def cmd_report(args) -> int:
    from .config import load_pipeline
    from .report import build_report
    pipeline = load_pipeline(args.pipeline, args.overrides)
    _defaults(args, pipeline.name)
    print(f"report: {build_report(args.runs, args.cache, pipeline.train.test_split or 'test')}")
    return 0


def cmd_bench(args) -> int:
    from . import heads
    from .config import load_pipeline
    _defaults(args)
    if args.id_layouts:
        from .experiments.lm_bench import id_layouts
        id_layouts(str(args.id_layouts), None if args.no_doc else args.doc, args.out)
        return 0
    if args.lifecycle:
        from .experiments.bench import run_lifecycle
        run_lifecycle(args.pipeline, args.quick, args.out, None if args.no_doc else args.doc, args.out / "teachers")
        return 0
    if args.capture_memory:
        from .experiments.lm_memory import run_capture_memory
        run_capture_memory(args.out, None if args.no_doc else args.doc)
        return 0
    if args.train_memory:
        from .experiments.lm_memory import run_train_memory
        run_train_memory(args.out, None if args.no_doc else args.doc)
        return 0
    if args.columns:
        from .experiments.lm_bench import column_costs
        column_costs(str(args.columns), None if args.no_doc else args.doc, args.out)
        return 0
    tasks = load_pipeline(args.pipeline).tasks.values()
    if any(heads.has(t.teacher.head, heads.CHAT_ROWS) for t in tasks):
        from .experiments.chat_bench import run_chat_bench
        run_chat_bench(args.pipeline, args.quick, args.out, None if args.no_doc else args.doc, args.teachers_dir)
        return 0
    if any(heads.has(t.teacher.head, heads.TOPK_TARGETS) for t in tasks):
        from .experiments.lm_bench import run_lm_bench
        run_lm_bench(args.pipeline, args.quick, args.out, None if args.no_doc else args.doc, args.teachers_dir)
        return 0
    from .experiments.bench import run_bench
    run_bench(args.pipeline, args.quick, args.out, None if args.no_doc else args.doc)
    return 0


def cmd_fidelity(args) -> int:
    from .experiments.fidelity import run_fidelity, run_sweep, run_zero_shot
    _defaults(args)
    if args.zero_shot:
        run_zero_shot(args.pipeline, args.zero_shot, args.students.split(",")[0], [int(x) for x in args.seeds.split(",")],
                      args.out, None if args.no_doc else args.doc, args.teachers_dir, overrides=args.overrides)
        return 0
    if args.sweep:
        run_sweep(args.pipeline, args.sweep, [int(x) for x in args.seeds.split(",")], args.out,
                  None if args.no_doc else args.doc, args.teachers_dir, overrides=args.overrides)
        return 0
    from .config import load_pipeline
    if len(load_pipeline(args.pipeline, args.overrides).tasks) > 1:  # several tasks: multi-task students
        from .experiments.crosstask import run_cross_task
        run_cross_task(args.pipeline, [int(x) for x in args.seeds.split(",")], args.out,
                       None if args.no_doc else args.doc, args.teachers_dir, overrides=args.overrides)
        return 0
    run_fidelity(args.pipeline, [int(x) for x in args.seeds.split(",")], args.students.split(","), args.scarce,
                 args.out, None if args.no_doc else args.doc, args.teachers_dir, overrides=args.overrides,
                 folds=args.folds, all_labels=not args.only_scarce)
    return 0


def cmd_lifelong(args) -> int:
    from .experiments.lifelong import run_lifelong
    teachers = args.teachers_dir  # None: <out>/teachers, the rounds' own
    _defaults(args)
    run_lifelong(args.pipeline, [int(x) for x in args.seeds.split(",")], args.out, None if args.no_doc else args.doc,
                 teachers, overrides=args.overrides)
    return 0


def cmd_export(args) -> int:
    from .cache.logprob_layout import export_cache
    side = export_cache(str(args.cache), args.out, args.temperature, args.format, args.splits)
    print(f"{args.out}: {', '.join(f'{s} {n} rows' for s, n in side['rows'].items())} at T = {side['temperature']} "
          f"(top-{side['top_k']}; {args.out}/kdcache_export.json)")
    return 0


def cmd_import(args) -> int:
    from .capture.imported import import_logprobs
    sources = dict(s.split("=", 1) if "=" in s else ("train", s) for s in args.splits)
    out = args.out or layout.cache_root(args.pipeline) / args.task
    m = import_logprobs(sources, out, args.tokenizer, args.temperature, args.top_k, args.teacher, args.pipeline,
                        args.task, overwrite=args.overwrite)
    for split, s in m["splits"].items():
        st = s["stats"]
        print(f"{out}: {split}: {s['rows']} rows, {st['response_tokens']} target positions, tail "
              f"{m['imported']['tail'][split]}, next token outside the top-k {st['next_outside_topk']} times")
    return 0


def cmd_verify(args) -> int:
    from .cache.format import find_caches
    from .cache.verify import verify_cache
    reports = [verify_cache(c) for c in find_caches(args.path)]
    if args.json:
        print(json.dumps([r.as_dict() for r in reports], indent=1))
    else:
        for r in reports:
            d = r.as_dict()
            if r.ok:
                print(f"OK  {r.root}: {d['bytes_checked'] / 1e6:.1f} MB checked in {d['seconds']:.2f} s"
                      + (f" ({d['mb_per_s']} MB/s)" if d["mb_per_s"] else ""))
                for note in r.notes:
                    print(f"  note: {note}")
            else:
                print(f"BAD {r.root}: {len(r.problems)} problem(s)")
                for p in r.problems[:20]:
                    print(f"  - {p}")
                if len(r.problems) > 20:
                    print(f"  ... and {len(r.problems) - 20} more (--json lists them all)")
                print(f"  fix: {r.fix}")
    return 0 if all(r.ok for r in reports) else 1


def cmd_push(args) -> int:
    from .cache.share import push
    r = push(args.cache, args.url)
    print(f"pushed {args.cache} -> {r['url']}: {r['files']} files, {r['bytes'] / 1e6:.1f} MB checked first")
    return 0


def cmd_pull(args) -> int:
    from .cache.share import pull
    r = pull(args.url, args.out)
    print(f"pulled {r['url']} -> {r['out']}: {r['fetched']} files fetched, every listed checksum checked")
    return 0


def cmd_info(args) -> int:
    from .cache.format import find_caches
    from .cache.verify import cache_info
    from .report import info_lines
    infos = [cache_info(c) for c in find_caches(args.path)]
    if args.json:
        print(json.dumps(infos, indent=1))
        return 0
    for i in infos:
        print("\n".join(info_lines(i)))
    return 0


def cmd_refresh(args) -> int:
    from .capture.refresh import refresh_teacher_cache
    from .report import cache_summary, drift_lines
    pipeline, tasks = _load(args)
    out = args.out or layout.cache_root(pipeline.name)
    for t in tasks:
        m, drift = refresh_teacher_cache(pipeline, t, out / t, args.teachers_dir)
        print("\n".join(cache_summary(out / t, m)))
        if drift is None:
            print(f"{out / t}: the cache matches the pipeline; nothing to refresh")
        else:
            print("\n".join(drift_lines(drift)[:6 + len(drift["splits"])]))
            print(f"the old cache is kept at {drift['old']['cache']}; `kdcache drift` on the two shows every table")
    return 0


def cmd_drift(args) -> int:
    from .cache.drift import compare_caches, write_drift
    from .report import drift_lines
    d = compare_caches(str(args.old), str(args.new), args.top)
    path = write_drift(d)
    print(json.dumps(d, indent=1) if args.json else "\n".join(drift_lines(d)))
    print(f"kept in {path} (the report's stale-runs note reads it)", file=sys.stderr)
    return 0


def cmd_where(args) -> int:
    from .config import load_pipeline
    name = load_pipeline(args.pipeline, args.overrides).name
    folders = {"cache": layout.cache_root(name), "teachers": layout.teachers_dir() / name, "runs": layout.runs_root(name)}
    wanted = [k for k in folders if getattr(args, k)]
    for k in wanted or folders:
        print(folders[k] if wanted else f"{k}\t{folders[k]}")
    return 0


def cmd_config(args) -> int:
    import yaml

    from .config import config_reference, load_pipeline, to_dict
    if args.reference:
        print("# Pipeline configuration reference\n\nGenerated by `kdcache config --reference` from the config "
              "dataclasses in `kdcache/config/schema.py`; every key of a pipeline YAML is listed here.\n")
        print(config_reference())
        return 0
    if not args.pipeline:
        raise SystemExit("kdcache: error: config needs a PIPELINE, or --reference")
    print(yaml.safe_dump(to_dict(load_pipeline(args.pipeline, args.overrides)), sort_keys=False), end="")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kdcache", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"kdcache {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("cache", help="stage one: run each task's teacher once and write its cache",
                       description="Run each task's teacher once over its data and write data/cache/<pipeline>/<task>/ "
                                   "(fine-tuning the teacher first when the pipeline says so). A rerun resumes: "
                                   "finished shards are kept, the rest are redone. When the data only gained rows "
                                   "(same teacher and settings), only the new rows are captured, as a new "
                                   "generation (docs/lifecycle.md). A folder holding a cache built with other "
                                   "settings is refused unless --overwrite.")
    _pipeline_args(p)
    _cache_out_arg(p, "; each task goes to <out>/<task>/")
    _limit_arg(p, "at most N rows per split (quick runs)")
    p.add_argument("--overwrite", action="store_true", help="replace a cache built with other settings")
    p.add_argument("--shared", default=None, metavar="URL",
                   help="a team's cache store (fsspec URL, e.g. s3://team/kdcache): when a cache with exactly this "
                        "fingerprint (teacher, tokenizer, data, settings) is already there, pull it instead of "
                        "running the teacher over the data; otherwise build it and push it there (docs/sharing.md)")
    p.set_defaults(func=cmd_cache)

    p = sub.add_parser("teacher-finetune", help="fine-tune the teachers that need it (kept under data/teachers/)",
                       description="Fine-tune every task teacher that has a `teacher.finetune:` section, saving it "
                                   "to <teachers-dir>/<pipeline>/<task>/. Reused while base weights, data and "
                                   "settings are unchanged. `kdcache cache` runs this step itself when needed.")
    _pipeline_args(p)
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("train", help="stage two: train the pipeline's students from the cache, then report",
                       description="Train every student the pipeline lists (or --students a,b) from "
                                   "$KDCACHE_HOME/cache/<pipeline>/<task>/, one pass over the cache per epoch "
                                   "feeding all students of a task (and their hard-label twins). Runs go to "
                                   "$KDCACHE_HOME/runs/<pipeline>/<run>/ (config, cache fingerprint, metrics.json, "
                                   "checkpoint); "
                                   "report.md and report.png compare them with the teacher. The teacher is never "
                                   "loaded, unless --teacher live (online KD, for comparison). Multi-GPU/multi-node: "
                                   "`accelerate launch -m kdcache.cli train ...`.")
    _pipeline_args(p)
    _runs_args(p)
    p.add_argument("--students", default=None, metavar="A,B",
                   help="comma-separated student names (default: all); a `per_language` student's name trains all "
                        "its <name>@<code> students")
    _limit_arg(p, "for a cache built with `kdcache cache --limit N`: the same N (the cache records it)")
    p.add_argument("--teacher", choices=("cache", "live"), default="cache",
                   help="targets from the cache (default) or from the live teacher every step (online KD)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("report", help="rebuild report.md and report.png from the run directories",
                       description="Rebuild data/runs/<pipeline>/report.md and report.png from every run's "
                                   "metrics.json and the teacher's cached test logits.")
    _pipeline_arg(p)
    _runs_args(p)
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("bench", help="measure stage-one/stage-two overheads, loader headroom, speed-up and storage",
                       description="Measure, side by side in one run: capture vs raw teacher forward, reader vs "
                                   "student consumption (and reader RSS for caches 1x/4x/16x), KD-from-cache vs "
                                   "hard-labels-from-memory training, cache vs live-teacher training next to the "
                                   "ideal speed-up, bytes per example vs naive layouts, an incremental capture of "
                                   "10% new rows vs a full recapture, and the reader from a local S3 server vs "
                                   "disk. Writes "
                                   "data/bench/bench-<mode>.json and a section of docs/benchmarks.md. For a "
                                   "causal-LM pipeline (e.g. `kdcache bench lm`): bytes per token, reconstruction "
                                   "KL and student perplexity for top-k in {8..128}, sampled targets and naive "
                                   "top-128 (data/bench/bench-lm-<mode>.json).")
    _experiment_args(p, "bench", "benchmarks")
    p.add_argument("--quick", action="store_true", help="smoke-check sizes (512 rows per split)")
    p.add_argument("--id-layouts", type=Path, default=None, metavar="CACHE",
                   help="instead: a causal-LM cache's top-k ids as int32 against packed to the bits its vocabulary "
                        "needs (bytes per token, read + decode speed); the pipeline argument is then ignored")
    p.add_argument("--lifecycle", action="store_true",
                   help="only the figures of caches that live, as their own section of docs/benchmarks.md: 10%% new "
                        "rows captured alone against a full recapture (goal <= 0.15), and the reader from a local "
                        "S3 server against local disk (goal >= 0.8)")
    p.add_argument("--columns", type=Path, default=None, metavar="CACHE",
                   help="instead: what each column of a causal-LM cache costs in bytes per token, per language, "
                        "from its shards' footers (the byte offsets of cross-tokenizer students included)")
    p.add_argument("--capture-memory", action="store_true",
                   help="instead: peak memory of causal-LM capture at a 262,144-id vocabulary, 512 / 2,048 / 8,192 "
                        "positions, chunked (cache.logit_chunk) against the full logits reduced in one piece")
    p.add_argument("--train-memory", action="store_true",
                   help="instead: one chat training step at a 262,144-id vocabulary over 512 / 2,048 / 8,192 response "
                        "positions: peak memory and tokens/s, dense logits against chunked (docs/benchmarks.md)")
    _teachers_arg(p)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("fidelity", help="KD students vs hard-label twins over seeds, with all labels and label-scarce",
                       description="Train each listed student and its hard-label twin for every seed, (1) with all "
                                   "labels and (2) with only --scarce labelled training rows (the teacher is "
                                   "fine-tuned on those; the cache covers the rest, which only KD can use). "
                                   "Works on any head (test accuracy, entity F1 or perplexity). Writes "
                                   "data/fidelity/fidelity-<pipeline>.json and the pipeline's section of "
                                   "docs/fidelity.md (mean ± std). A rerun of the same command resumes: each "
                                   "(setting, seed) cell finished with the same settings and cache is read back "
                                   "from data/fidelity/runs/<pipeline>/, not retrained. On a pipeline of several "
                                   "tasks (pipelines/cross): its multi-task students with their twins per seed, "
                                   "each task's metric and the paired gain of sharing one encoder.")
    _experiment_args(p, "fidelity", "fidelity")
    _seeds_arg(p)
    p.add_argument("--students", default="bow,bilstm",
                   help="comma-separated students of the pipeline; a `per_language` student stands for all its "
                        "<name>@<code> students, and on a multilingual cache every setting gets a per-language table")
    p.add_argument("--scarce", type=int, default=1000, help="labelled training rows in the label-scarce setting (0: all-labels setting only)")
    p.add_argument("--only-scarce", action="store_true", help="run the label-scarce setting only")
    p.add_argument("--folds", type=int, default=0, metavar="K",
                   help="also run every setting with out-of-fold training targets from K fold teachers "
                        "(teacher.finetune.folds=K) and compare them with the in-sample targets")
    _set_arg(p, "tasks.sst2.data.limit=null for the full set")
    p.add_argument("--sweep", metavar="STUDENT", default=None,
                   help="instead: temperature (1/2/4), α (0/0.5/0.9/1) and feature loss on/off for this student, "
                        "all variants in one pass over the cache, over --seeds (classification and NER "
                        "pipelines; the feature row appears when the cache holds features)")
    p.add_argument("--zero-shot", metavar="LANG", default=None,
                   help="instead, for a multilingual pipeline: only LANG's training rows labelled; per language the "
                        "teacher (zero-shot), the first --students student trained per language on the cached soft "
                        "labels alone, and the same student on that language's gold labels (the ceiling)")
    _teachers_arg(p)
    p.set_defaults(func=cmd_fidelity)

    p = sub.add_parser("lifelong", help="classes arriving in rounds: scratch vs continual students, with forgetting",
                       description="Run the pipeline's `lifelong:` rounds: each round the task's data gains the "
                                   "round's classes; the teacher is fine-tuned again (cache rebuilt, old one "
                                   "archived) or kept (cache grown by the new rows); then, per seed, the student is "
                                   "retrained from scratch, continued from its last run on the new classes' rows, and "
                                   "continued with a memory term (its last run's outputs cached as a second "
                                   "teacher). Writes data/lifelong/lifelong-<pipeline>.json and the pipeline's "
                                   "section of docs/fidelity.md: per round, accuracy on all classes so far, the old "
                                   "ones (forgetting) and the new ones, with each strategy's time and the teacher's "
                                   "rows (docs/lifecycle.md).")
    _experiment_args(p, "lifelong", "fidelity")
    _seeds_arg(p)
    _set_arg(p, "train.epochs=2")
    p.add_argument("--teachers-dir", type=Path, default=None,
                   help="where the round teachers are fine-tuned (default: <out>/teachers)")
    p.set_defaults(func=cmd_lifelong)

    p = sub.add_parser("verify", help="re-check every checksum, row count and schema of a cache",
                       description="Re-check a cache (or every task cache under a pipeline's folder) against its "
                                   "manifest: sizes, sha256 checksums, row counts, Parquet schema, Zarr arrays, and "
                                   "files the manifest does not list. Exit 0 when sound, 1 naming each problem.")
    _caches_arg(p, "machine-readable report")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("export", help="write a chat cache as axolotl's per-position top-k logprob dataset",
                       description="Write each split of a chat-lm cache as <out>/<split>.parquet (or .jsonl) in the "
                                   "layout axolotl's KD trainer reads (input_ids, labels, attention_mask, "
                                   "target_token_ids / target_logprobs / target_mask [L][k]; row j is the "
                                   "distribution over input_ids[j+1]), log-probabilities over the full vocabulary at "
                                   "one cached temperature, plus the tail's log-mass per position "
                                   "(docs/cache-format.md, \"Exchange with axolotl\").")
    p.add_argument("cache", type=Path, help="a chat-lm task cache, e.g. data/cache/chat/topic")
    p.add_argument("--out", type=Path, required=True, help="folder for <split>.<format> and kdcache_export.json")
    p.add_argument("--temperature", type=float, default=1.0, help="a temperature the cache holds (default 1.0)")
    p.add_argument("--format", choices=("parquet", "jsonl"), default="parquet")
    p.add_argument("--split", dest="splits", action="append", default=None, help="only this split (repeatable)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("import", help="make a verified chat cache from a top-k logprob dataset (axolotl layout)",
                       description="Read per-position top-k logprob rows (the `kdcache export` / axolotl KD "
                                   "layout: a .parquet, .jsonl or `save_to_disk` folder such as `axolotl "
                                   "preprocess` writes) into a chat-lm cache with a manifest, which stage two "
                                   "trains from. The logprobs hold one temperature: the cache holds that one only "
                                   "(stage two refuses others). The tail is the dataset's target_tail_logmass "
                                   "where present, else log(1 - sum p). A malformed row is refused naming it; a "
                                   "rerun resumes.")
    p.add_argument("splits", nargs="+", metavar="[SPLIT=]PATH", help="a dataset per split, e.g. train=kd.parquet "
                   "test=heldout.parquet (a bare PATH is the train split)")
    p.add_argument("--tokenizer", required=True, help="the tokenizer of the ids (hub name, folder, pkg:, .gguf)")
    p.add_argument("--temperature", type=float, default=1.0, help="the temperature the logprobs were taken at")
    p.add_argument("--top-k", type=int, default=None, help="slots kept per position (default: the data's)")
    p.add_argument("--teacher", default="imported", help="the model that wrote the logprobs (for the report)")
    p.add_argument("--pipeline", default="imported", help="pipeline name the cache stands for (default imported)")
    p.add_argument("--task", default="chat", help="task name (default chat)")
    p.add_argument("--out", type=Path, default=None,
                   help="cache folder (default $KDCACHE_HOME/cache/<pipeline>/<task>)")
    p.add_argument("--overwrite", action="store_true", help="replace a cache of other settings in --out")
    p.set_defaults(func=cmd_import)

    p = sub.add_parser("push", help="copy a finished cache to object storage or a shared folder, manifest last",
                       description="Copy a finished task cache (it must verify) to an fsspec URL (s3://bucket/prefix "
                                   "with FSSPEC_S3_ENDPOINT_URL for S3-compatible servers, or a folder): every file, "
                                   "then the manifest last, so an interrupted push is never seen as a finished "
                                   "cache; a manifest already there is removed first (docs/sharing.md).")
    p.add_argument("cache", type=Path, help="a task cache folder, e.g. data/cache/default/sentiment")
    p.add_argument("url", help="destination, e.g. s3://team-caches/default/sentiment")
    p.set_defaults(func=cmd_push)

    p = sub.add_parser("pull", help="copy a shared cache into a local folder, every file checked, manifest last",
                       description="Copy the cache at an fsspec URL into a local folder: every file the manifest "
                                   "lists is checked against its sha256 before the manifest is written last, and "
                                   "the copy is verified; rerun to resume (intact files are not fetched again).")
    p.add_argument("url", help="the shared cache, e.g. s3://team-caches/default/sentiment")
    p.add_argument("out", type=Path, help="local folder to hold it")
    p.set_defaults(func=cmd_pull)

    p = sub.add_parser("info", help="rows, bytes, bytes per example, fingerprint and statistics of a cache",
                       description="Summarise a cache (or every task cache under a folder) from its manifest.")
    _caches_arg(p)
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("refresh", help="rebuild caches whose teacher changed, keeping the old one and its drift",
                       description="For each task: a cache that still matches the pipeline is completed (or grown "
                                   "by new rows); one built with another teacher or settings is kept readable at "
                                   "<cache root>.archive/<task>@<old fingerprint>, rebuilt in its place (its "
                                   "manifest names the old one as `parent`), and the drift between their targets is "
                                   "measured and kept, so the report says how far each stale run's targets moved "
                                   "(docs/lifecycle.md).")
    _pipeline_args(p)
    _cache_out_arg(p)
    p.set_defaults(func=cmd_refresh)

    p = sub.add_parser("drift", help="how far a refreshed teacher's targets moved from an old cache's",
                       description="Compare two classification caches of the same task (an old teacher's and a "
                                   "refreshed one's) on the rows both hold: per split the mean KL(old || new) at "
                                   "T = 1, agreement, changed predictions, per class, and the rows that moved most. "
                                   "Kept beside the new cache, where the report's stale-runs note finds it "
                                   "(docs/lifecycle.md).")
    p.add_argument("old", type=Path, help="the earlier cache, e.g. data/cache/default-v1/sentiment")
    p.add_argument("new", type=Path, help="the refreshed cache, e.g. data/cache/default/sentiment")
    p.add_argument("--top", type=int, default=10, help="rows that moved most to list per split (default 10)")
    _json_arg(p)
    p.set_defaults(func=cmd_drift)

    p = sub.add_parser("where", help="print where a pipeline's cache, teachers and runs live",
                       description="Print the folders kdcache uses for a pipeline (given by name or YAML path; its "
                                   "`name:` decides): $KDCACHE_HOME/cache/<name>/, $KDCACHE_HOME/teachers/<name>/ "
                                   "and $KDCACHE_HOME/runs/<name>/, KDCACHE_HOME defaulting to `data`. Every "
                                   "command's defaults and the Makefile's targets follow this one rule.")
    _pipeline_arg(p)
    for k in ("cache", "teachers", "runs"):
        p.add_argument(f"--{k}", action="store_true", help=f"print only the {k} folder")
    p.set_defaults(func=cmd_where)

    p = sub.add_parser("config", help="print a pipeline's resolved config, or the reference of every key",
                       description="Print the pipeline's config with defaults filled in and --set applied "
                                   "(validating every key), or with --reference the documentation of every key.")
    p.add_argument("pipeline", nargs="?", help="pipeline name or YAML path")
    _set_arg(p)
    p.add_argument("--reference", action="store_true", help="print the reference of every config key (markdown)")
    p.set_defaults(func=cmd_config)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    from .errors import KdcacheError
    try:
        return args.func(args)
    except KdcacheError as e:
        print(f"kdcache: error: {e}", file=sys.stderr)
        return 2
    finally:
        _close_process_group()


def _close_process_group() -> None:
    """Tear the process group down before exit (under `accelerate launch`): a group left to the interpreter's
    exit can abort a process whose collectives still hold threads (seen with tensor-parallel teachers)."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()  # (no barrier: after a failure the others may never come)


if __name__ == "__main__":
    sys.exit(main())
