"""Where kdcache keeps what it makes, in one rule for every command and the Makefile (via `kdcache where`):

    $KDCACHE_HOME/cache/<pipeline>/<task>/      stage one's caches
    $KDCACHE_HOME/teachers/<pipeline>/<task>/   fine-tuned or converted teachers
    $KDCACHE_HOME/runs/<pipeline>/<run>/        stage two's runs and the report

`<pipeline>` is the pipeline's `name:`, whether it was given by name or as a YAML path, so `make teacher-cache`
and `make train-student` with the same `PIPELINE=` always meet. KDCACHE_HOME defaults to `data` (relative to the
working directory, as the Makefile runs it: the repository's git-ignored data/)."""

from __future__ import annotations

import os
from pathlib import Path

HOME_ENV = "KDCACHE_HOME"


def home() -> Path:
    """The folder holding cache/, teachers/ and runs/ (KDCACHE_HOME, default `data`)."""
    return Path(os.environ.get(HOME_ENV) or "data")


def cache_root(pipeline: str, parent: Path | None = None) -> Path:
    """The pipeline's cache root (under `parent` in place of `$KDCACHE_HOME/cache` when given); each task's cache is
    `<root>/<task>/`."""
    return (parent or home() / "cache") / pipeline


def teachers_dir() -> Path:
    """Where derived teachers are kept, as `<dir>/<pipeline>/<task>/`."""
    return home() / "teachers"


def runs_root(pipeline: str) -> Path:
    """The pipeline's runs root: one folder per run, report.md and report.png."""
    return home() / "runs" / pipeline


def scratch(folder: str) -> Path:
    """An experiment's own scratch folder (`fidelity`, `bench`, `lifelong`, ...)."""
    return home() / folder
