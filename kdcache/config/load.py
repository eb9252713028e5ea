"""Loading a pipeline: finding its YAML by name or path, `--set` overrides, validation, `--limit` runs."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import yaml

from ..typedconfig import ConfigError, apply_override, build
from .schema import PipelineConfig

def find_pipeline(name_or_path: str) -> Path:
    """Resolve a pipeline name (pipelines/<name>/pipeline.yaml) or a path to a YAML file or folder."""
    p = Path(name_or_path)
    candidates = [p, p / "pipeline.yaml"]
    for root in (Path.cwd(), Path(__file__).resolve().parent.parent):
        candidates += [root / "pipelines" / name_or_path / "pipeline.yaml"]
    for c in candidates:
        if c.is_file():
            return c
    known = sorted(d.name for root in (Path.cwd(), Path(__file__).resolve().parent.parent)
                   for d in (root / "pipelines").glob("*") if (d / "pipeline.yaml").is_file())
    raise ConfigError(f"no pipeline {name_or_path!r}: not a YAML file, nor pipelines/{name_or_path}/pipeline.yaml; "
                      f"known pipelines: {', '.join(sorted(set(known))) or 'none'}")


def load_pipeline(name_or_path: str, overrides: typing.Sequence[str] = ()) -> PipelineConfig:
    """Load a pipeline YAML (by name or path), apply `--set` overrides and validate every key."""
    path = find_pipeline(name_or_path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    for o in overrides:
        key = o.split("=", 1)[0].strip().split(".")
        tasks = raw.get("tasks") if key[0] == "tasks" else None  # (a student may be added key by key; a task not)
        if isinstance(tasks, dict) and len(key) > 2 and key[1] not in tasks:
            raise ConfigError(f"--set {o.split('=', 1)[0]}: {path} has no task {key[1]!r} (tasks: "
                              f"{', '.join(tasks) or 'none'})")
        apply_override(raw, o)
    return build(PipelineConfig, raw, "", str(path) + (" (with --set overrides)" if overrides else ""))


def with_limit(pipeline: PipelineConfig, limit: int | None) -> PipelineConfig:
    """The pipeline with `data.limit` set on every task (for `--limit N` quick runs)."""
    if limit is None:
        return pipeline
    tasks = {n: dataclasses.replace(t, data=dataclasses.replace(t.data, limit=limit)) for n, t in pipeline.tasks.items()}
    return dataclasses.replace(pipeline, tasks=tasks)

