"""`kdcache` command line. `kdcache --help` lists the commands; `kdcache <command> --help` explains each."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from . import __version__

DESCRIPTION = """\
kdcache: offline soft-label caching for knowledge distillation.

Stage one runs a Hugging Face teacher ONCE over each task's data and writes a compact, fingerprinted cache
(Parquet shards for logits and inputs, Zarr for hidden features, manifest.json written last). Stage two trains
many cheap students from that cache without loading the teacher again.

Three teacher heads: sequence classification (exact logits per example), token classification (exact tag logits
per WORD, e.g. NER) and causal LM (top-k ids + raw logits per position, with the full log-sum-exp and the exact
tail mass at each configured temperature, optionally sampled targets).

A PIPELINE is a name under pipelines/ (default, tiny, sst2, ner, ner-tiny, lm, lm-tiny, cross) or a path to a
YAML file. A pipeline may hold several tasks with their own teachers; a cross-task student (arch bilstm-multitask)
learns several of them at once, with a weight per task.
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
  kdcache cache ner && kdcache train ner      # CoNLL-2003 NER: word-level taggers, entity F1
  kdcache bench lm                            # LM targets: bytes/token against fidelity for k = 8..128
  kdcache fidelity default --sweep bilstm     # temperature / alpha / feature-loss sweep for one student
"""


def _pipeline_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("pipeline", help="pipeline name under pipelines/ or path to a pipeline YAML file")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value by dotted key (repeatable), e.g. tasks.sentiment.cache.batch_size=32")
    p.add_argument("--task", dest="tasks", action="append", default=None, metavar="NAME",
                   help="only this task (repeatable); default: every task of the pipeline")
    p.add_argument("--teachers-dir", type=Path, default=Path("data/teachers"),
                   help="where fine-tuned teachers are kept, as <dir>/<pipeline>/<task>/ (default: data/teachers)")


def _runs_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cache", default=None,
                   help="cache root, a folder or an fsspec URL such as s3://bucket/caches/default "
                        "(default: data/cache/<pipeline>); set FSSPEC_S3_ENDPOINT_URL for S3-compatible servers")
    p.add_argument("--runs", type=Path, default=None, help="runs root (default: data/runs/<pipeline>)")


def _experiment_args(p: argparse.ArgumentParser, folder: str, doc: str) -> None:
    p.add_argument("pipeline", nargs="?", default="default", help="pipeline (default: default)")
    p.add_argument("--out", type=Path, default=Path("data") / folder, help=f"scratch and JSON folder (default: data/{folder})")
    p.add_argument("--doc", type=Path, default=Path("docs") / f"{doc}.md", help=f"markdown file to write (docs/{doc}.md)")
    p.add_argument("--no-doc", action="store_true", help="leave the markdown file alone")


def _load(args):
    from .capture import with_limit
    from .config import load_pipeline
    pipeline = with_limit(load_pipeline(args.pipeline, args.overrides), getattr(args, "limit", None))
    tasks = args.tasks or list(pipeline.tasks)
    for t in tasks:
        if t not in pipeline.tasks:
            raise SystemExit(f"kdcache: error: pipeline {pipeline.name!r} has no task {t!r} "
                             f"(tasks: {', '.join(pipeline.tasks)})")
    return pipeline, tasks


def cmd_cache(args) -> int:
    from .capture import build_teacher_cache
    pipeline, tasks = _load(args)
    out = args.out or Path("data/cache") / pipeline.name
    for t in tasks:
        m = build_teacher_cache(pipeline, t, out / t, args.teachers_dir, overwrite=args.overwrite)
        for split, s in m["splits"].items():
            st = s["stats"]
            if "teacher_perplexity" in st:
                what = f", {st['tokens']} tokens, teacher perplexity {st['teacher_perplexity']:.2f}"
            elif "teacher_entity_f1" in st:
                what = (f", {st['words']} words ({st['uncovered_words']} beyond max_length), teacher entity F1 "
                        f"{st['teacher_entity_f1']:.4f}")
            else:
                what = f", teacher accuracy {st['teacher_accuracy']:.4f}" if st["teacher_accuracy"] is not None else ""
            print(f"{out / t}: {split}: {s['rows']} rows in {len(s['shards'])} shard(s){what}")
    return 0


def cmd_finetune(args) -> int:
    from .data import load_task_data
    from .finetune import finetune_teacher
    from .teacher import teacher_log_level
    pipeline, tasks = _load(args)
    teacher_log_level()
    for t in tasks:
        task = pipeline.tasks[t]
        if task.teacher.finetune is None:
            print(f"task {t}: teacher has no `finetune:` section; nothing to do")
            continue
        folder = finetune_teacher(t, task, load_task_data(task.data), args.teachers_dir / pipeline.name / t)
        print(f"task {t}: teacher ready in {folder}")
    return 0


def cmd_train(args) -> int:
    from .report import build_report
    from .trainer import train_students
    pipeline, _ = _load(args)
    students = args.students.split(",") if args.students else list(pipeline.students)
    unknown = [s for s in students if s not in pipeline.students]
    if unknown or not students:
        raise SystemExit(f"kdcache: error: pipeline {pipeline.name!r} has no student(s) {unknown or ''} "
                         f"(students: {', '.join(pipeline.students) or 'none: add a `students:` section'})")
    cache_root = str(args.cache or Path("data/cache") / pipeline.name).rstrip("/")  # a folder or an fsspec URL
    runs_dir = args.runs or Path("data/runs") / pipeline.name
    by_task: dict[str, list[str]] = {}
    cross = [s for s in students if pipeline.students[s].tasks]
    for s in students:
        if s not in cross:
            by_task.setdefault(pipeline.student_task(s), []).append(s)
    main_process = int(os.environ.get("RANK", "0")) == 0  # under `accelerate launch`, rank 0 reports
    batches = [train_students(pipeline, task, names, f"{cache_root}/{task}", runs_dir, teacher=args.teacher,
                              teachers_dir=args.teachers_dir) for task, names in by_task.items()]
    if cross:
        from .cross_trainer import cross_train
        batches.append(cross_train(pipeline, cross, cache_root, runs_dir))
    for results in batches:
        for r in results:
            if not main_process:
                continue
            t = r.get("test", {})
            if r.get("head") == "cross-task":
                print(f"{r['run']:<24} " + "  ".join(
                    f"{task} {'entity F1' if 'f1' in m else 'test acc'} {m.get('f1', m.get('accuracy')) or 0:.4f}"
                    for task, m in t.items()) + f"  {r['parameters']:,} params  {r['train_seconds']:.1f} s")
                continue
            if r.get("head") == "token-classification":
                print(f"{r['run']:<24} test entity F1 {t.get('f1', float('nan')):.4f}  precision "
                      f"{t.get('precision', float('nan')):.4f}  recall {t.get('recall', float('nan')):.4f}  "
                      f"{r['parameters']:,} params  {r['train_seconds']:.1f} s")
                continue
            if r.get("head") == "causal-lm":
                print(f"{r['run']:<24} test perplexity {t.get('perplexity', float('nan')):.2f}  KL to teacher "
                      f"{t.get('kl_to_teacher') or float('nan'):.4f}  {r['parameters']:,} params  "
                      f"{r['train_seconds']:.1f} s")
                continue
            print(f"{r['run']:<24} test acc {t.get('accuracy', float('nan')):.4f}  macro-F1 "
                  f"{t.get('macro_f1', float('nan')):.4f}  agreement {t.get('agreement', float('nan')):.4f}  "
                  f"{r['parameters']:,} params  {r['train_seconds']:.1f} s")
    if main_process:
        print(f"report: {build_report(runs_dir, cache_root, pipeline.train.test_split or 'test')}")
    return 0


def cmd_report(args) -> int:
    from .config import load_pipeline
    from .report import build_report
    pipeline = load_pipeline(args.pipeline, args.overrides)
    runs_dir = args.runs or Path("data/runs") / pipeline.name
    cache_root = args.cache or Path("data/cache") / pipeline.name
    print(f"report: {build_report(runs_dir, cache_root, pipeline.train.test_split or 'test')}")
    return 0


def cmd_bench(args) -> int:
    from .config import load_pipeline
    if any(t.teacher.head == "causal-lm" for t in load_pipeline(args.pipeline).tasks.values()):
        from .lm_bench import run_lm_bench
        run_lm_bench(args.pipeline, args.quick, args.out, None if args.no_doc else args.doc, args.teachers_dir)
        return 0
    from .bench import run_bench
    run_bench(args.pipeline, args.quick, args.out, None if args.no_doc else args.doc)
    return 0


def cmd_fidelity(args) -> int:
    from .fidelity import run_fidelity, run_sweep
    if args.sweep:
        run_sweep(args.pipeline, args.sweep, [int(x) for x in args.seeds.split(",")], args.out,
                  None if args.no_doc else args.doc, args.teachers_dir, overrides=args.overrides)
        return 0
    run_fidelity(args.pipeline, [int(x) for x in args.seeds.split(",")], args.students.split(","), args.scarce,
                 args.out, None if args.no_doc else args.doc, args.teachers_dir, overrides=args.overrides)
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
            else:
                print(f"BAD {r.root}: {len(r.problems)} problem(s)")
                for p in r.problems[:20]:
                    print(f"  - {p}")
                if len(r.problems) > 20:
                    print(f"  ... and {len(r.problems) - 20} more (--json lists them all)")
    return 0 if all(r.ok for r in reports) else 1


def cmd_info(args) -> int:
    from .cache.format import find_caches
    from .cache.verify import cache_info
    infos = [cache_info(c) for c in find_caches(args.path)]
    if args.json:
        print(json.dumps(infos, indent=1))
        return 0
    for i in infos:
        t = i["teacher"]
        print(f"{i['cache']}  task={i['task']}  head={i['head']}  format v{i['format_version']}")
        print(f"  teacher      {t['name']} ({t['class']}, weights {t['weights_sha256'][:12]})")
        print(f"  fingerprint  {i['fingerprint']}")
        if i.get("lm"):
            lm = i["lm"]
            print(f"  targets      top-{lm['top_k']} of {lm['vocab_size']} ({lm['id_dtype']} ids, float16 logits), "
                  f"lse + exact tail at T={lm['temperatures']}, {lm['samples']} samples/position, "
                  f"{lm['seq_len']} tokens/row")
        else:
            print(f"  labels       {', '.join(i['labels'])}")
        if i["features"]:
            f = i["features"]
            print(f"  features     layers {f['layers']} pooled {f['pooling']} as {f['dtype']} (hidden {f['hidden_size']})")
        print(f"  total        {i['rows']} rows, {i['bytes'] / 1e6:.2f} MB, {i['bytes_per_example']} B/example")
        c = i.get("capture")
        if c and c.get("seconds"):
            print(f"  capture      {c['rows']} rows in {c['seconds']:.1f} s ({c['rows'] / c['seconds']:.0f} rows/s, "
                  f"everything included) on {i['device']} x {i['processes']} process(es), last run")
        for split, s in i["splits"].items():
            if "teacher_entity_f1" in s:
                print(f"  {split:<12} {s['rows']:>8} rows {s['shards']:>3} shards {s['bytes_per_example']:>8} B/ex  "
                      f"teacher entity F1 {s['teacher_entity_f1']:.4f}  words {s['words']}  truncated "
                      f"{s['truncated_rows']} ({s['uncovered_words']} words)")
                continue
            if "teacher_perplexity" in s:
                print(f"  {split:<12} {s['rows']:>8} rows {s['shards']:>3} shards {s['bytes_per_token']:>8} B/token  "
                      f"teacher ppl {s['teacher_perplexity']:.2f}  top-1 {s['teacher_top1_accuracy']:.3f}  "
                      f"tail mass {s['mean_tail_mass']:.4f}")
                continue
            acc = f"{s['teacher_accuracy']:.4f}" if s["teacher_accuracy"] is not None else "n/a"
            print(f"  {split:<12} {s['rows']:>8} rows {s['shards']:>3} shards {s['bytes_per_example']:>8} B/ex  "
                  f"teacher acc {acc}  entropy {s['mean_entropy_nats']:.3f}  truncated {s['truncated_rows']}")
    return 0


def cmd_config(args) -> int:
    import yaml

    from .config import config_reference, load_pipeline, to_dict
    if args.reference:
        print("# Pipeline configuration reference\n\nGenerated by `kdcache config --reference` from the config "
              "dataclasses in `kdcache/config.py`; every key of a pipeline YAML is listed here.\n")
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
                                   "finished shards are kept, the rest are redone. A folder holding a cache built "
                                   "with other settings is refused unless --overwrite.")
    _pipeline_args(p)
    p.add_argument("--out", type=Path, default=None,
                   help="cache root; each task goes to <out>/<task>/ (default: data/cache/<pipeline>)")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="at most N rows per split (quick runs)")
    p.add_argument("--overwrite", action="store_true", help="replace a cache built with other settings")
    p.set_defaults(func=cmd_cache)

    p = sub.add_parser("teacher-finetune", help="fine-tune the teachers that need it (kept under data/teachers/)",
                       description="Fine-tune every task teacher that has a `teacher.finetune:` section, saving it "
                                   "to <teachers-dir>/<pipeline>/<task>/. Reused while base weights, data and "
                                   "settings are unchanged. `kdcache cache` runs this step itself when needed.")
    _pipeline_args(p)
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("train", help="stage two: train the pipeline's students from the cache, then report",
                       description="Train every student the pipeline lists (or --students a,b) from "
                                   "data/cache/<pipeline>/<task>/, one pass over the cache per epoch feeding all "
                                   "students of a task (and their hard-label twins). Runs go to "
                                   "data/runs/<pipeline>/<run>/ (config, cache fingerprint, metrics.json, checkpoint); "
                                   "report.md and report.png compare them with the teacher. The teacher is never "
                                   "loaded, unless --teacher live (online KD, for comparison). Multi-GPU/multi-node: "
                                   "`accelerate launch -m kdcache.cli train ...`.")
    _pipeline_args(p)
    _runs_args(p)
    p.add_argument("--students", default=None, metavar="A,B", help="comma-separated student names (default: all)")
    p.add_argument("--teacher", choices=("cache", "live"), default="cache",
                   help="targets from the cache (default) or from the live teacher every step (online KD)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("report", help="rebuild report.md and report.png from the run directories",
                       description="Rebuild data/runs/<pipeline>/report.md and report.png from every run's "
                                   "metrics.json and the teacher's cached test logits.")
    p.add_argument("pipeline", help="pipeline name or YAML path")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value by dotted key (repeatable)")
    _runs_args(p)
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("bench", help="measure stage-one/stage-two overheads, loader headroom, speed-up and storage",
                       description="Measure, side by side in one run: capture vs raw teacher forward, reader vs "
                                   "student consumption (and reader RSS for caches 1x/4x/16x), KD-from-cache vs "
                                   "hard-labels-from-memory training, cache vs live-teacher training next to the "
                                   "ideal speed-up, and bytes per example vs naive layouts. Writes "
                                   "data/bench/bench-<mode>.json and a section of docs/benchmarks.md. For a "
                                   "causal-LM pipeline (e.g. `kdcache bench lm`): bytes per token, reconstruction "
                                   "KL and student perplexity for top-k in {8..128}, sampled targets and naive "
                                   "top-128 (data/bench/bench-lm-<mode>.json).")
    _experiment_args(p, "bench", "benchmarks")
    p.add_argument("--quick", action="store_true", help="smoke-check sizes (512 rows per split)")
    p.add_argument("--teachers-dir", type=Path, default=Path("data/teachers"),
                   help="where converted/fine-tuned teachers are kept (default: data/teachers)")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("fidelity", help="KD students vs hard-label twins over seeds, with all labels and label-scarce",
                       description="Train each listed student and its hard-label twin for every seed, (1) with all "
                                   "labels and (2) with only --scarce labelled training rows (the teacher is "
                                   "fine-tuned on those; the cache covers the rest, which only KD can use). "
                                   "Works on any head (test accuracy, entity F1 or perplexity). Writes "
                                   "data/fidelity/fidelity-<pipeline>.json and the pipeline's section of "
                                   "docs/fidelity.md (mean ± std).")
    _experiment_args(p, "fidelity", "fidelity")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default: 0,1,2)")
    p.add_argument("--students", default="bow,bilstm", help="comma-separated students of the pipeline")
    p.add_argument("--scarce", type=int, default=1000, help="labelled training rows in the label-scarce setting (0: all-labels setting only)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a pipeline value (repeatable), e.g. tasks.sst2.data.limit=null for the full set")
    p.add_argument("--sweep", metavar="STUDENT", default=None,
                   help="instead: temperature (1/2/4), α (0/0.5/0.9/1) and feature loss on/off for this student, "
                        "all variants in one pass over the cache, over --seeds (classification and NER "
                        "pipelines; the feature row appears when the cache holds features)")
    p.add_argument("--teachers-dir", type=Path, default=Path("data/teachers"), help="fine-tuned teachers")
    p.set_defaults(func=cmd_fidelity)

    p = sub.add_parser("verify", help="re-check every checksum, row count and schema of a cache",
                       description="Re-check a cache (or every task cache under a pipeline's folder) against its "
                                   "manifest: sizes, sha256 checksums, row counts, Parquet schema, Zarr arrays, and "
                                   "files the manifest does not list. Exit 0 when sound, 1 naming each problem.")
    p.add_argument("path", type=Path, help="a cache folder, or a folder of task caches")
    p.add_argument("--json", action="store_true", help="machine-readable report")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("info", help="rows, bytes, bytes per example, fingerprint and statistics of a cache",
                       description="Summarise a cache (or every task cache under a folder) from its manifest.")
    p.add_argument("path", type=Path, help="a cache folder, or a folder of task caches")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("config", help="print a pipeline's resolved config, or the reference of every key",
                       description="Print the pipeline's config with defaults filled in and --set applied "
                                   "(validating every key), or with --reference the documentation of every key.")
    p.add_argument("pipeline", nargs="?", help="pipeline name or YAML path")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value by dotted key (repeatable)")
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


if __name__ == "__main__":
    sys.exit(main())
