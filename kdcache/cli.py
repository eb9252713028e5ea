"""`kdcache` command line. `kdcache --help` lists the commands; `kdcache <command> --help` explains each."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from . import __version__

DESCRIPTION = """\
kdcache: offline soft-label caching for knowledge distillation.

Stage one runs a Hugging Face teacher ONCE over each task's data and writes a compact, fingerprinted cache
(Parquet shards for logits and inputs, Zarr for hidden features, manifest.json written last). Stage two trains
many cheap students from that cache without loading the teacher again.

A PIPELINE is a name under pipelines/ (e.g. `default`, `tiny`) or a path to a pipeline YAML file.
"""

EPILOG = """\
examples:
  kdcache cache default                       # fine-tune the teacher if needed, cache every task
  kdcache cache tiny --out /tmp/c --limit 100 # quick run on 100 rows per split
  kdcache cache default --set tasks.sentiment.cache.batch_size=32
  kdcache verify data/cache/default           # re-check every checksum; exit 1 naming the bad shard
  kdcache info data/cache/default --json
"""


def _pipeline_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("pipeline", help="pipeline name under pipelines/ or path to a pipeline YAML file")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value by dotted key (repeatable), e.g. tasks.sentiment.cache.batch_size=32")
    p.add_argument("--task", dest="tasks", action="append", default=None, metavar="NAME",
                   help="only this task (repeatable); default: every task of the pipeline")
    p.add_argument("--teachers-dir", type=Path, default=Path("data/teachers"),
                   help="where fine-tuned teachers are kept, as <dir>/<pipeline>/<task>/ (default: data/teachers)")


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
            acc = s["stats"]["teacher_accuracy"]
            print(f"{out / t}: {split}: {s['rows']} rows in {len(s['shards'])} shard(s)"
                  + (f", teacher accuracy {acc:.4f}" if acc is not None else ""))
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
                for p in r.problems:
                    print(f"  - {p}")
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
        print(f"  labels       {', '.join(i['labels'])}")
        if i["features"]:
            f = i["features"]
            print(f"  features     layers {f['layers']} pooled {f['pooling']} as {f['dtype']} (hidden {f['hidden_size']})")
        print(f"  total        {i['rows']} rows, {i['bytes'] / 1e6:.2f} MB, {i['bytes_per_example']} B/example")
        for split, s in i["splits"].items():
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
    from .cache.format import CacheFormatError
    from .config import ConfigError
    from .data import DataError
    from .fingerprint import FingerprintError
    from .teacher import TeacherError
    try:
        return args.func(args)
    except (ConfigError, DataError, CacheFormatError, TeacherError, FingerprintError) as e:
        print(f"kdcache: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
