"""A refreshed teacher (`kdcache refresh`): its cache is built where the old one was, the old one kept readable in
`<cache root>.archive/<task>@<old fingerprint>`, the new manifest naming it as its `parent`, and the drift between
their targets measured and kept (cache/drift.py), so runs trained on the old targets are reported stale with how far
their targets moved."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from .. import config as C, heads
from ..cache.drift import compare_caches, write_drift
from ..cache.format import MANIFEST, read_manifest
from ..cache.writer import CacheConflictError
from .build import build_teacher_cache

log = logging.getLogger(__name__)


def archive_name(root: Path, fingerprint: str) -> Path:
    """Where an old cache is kept: `<cache root>.archive/<task>@<fingerprint>`, outside the pipeline's cache folder
    (whose task caches readers and trainers list)."""
    return root.parent.with_name(f"{root.parent.name}.archive") / f"{root.name}@{fingerprint[:12]}"


def refresh_teacher_cache(pipeline: C.PipelineConfig, task_name: str, out_dir: Path,
                          teachers_dir: Path) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(the task's current manifest, the drift from the old cache or None when nothing needed refreshing). A cache
    that still matches the pipeline is only completed (or grown by new rows); one built with other settings is
    archived and rebuilt."""
    try:
        return build_teacher_cache(pipeline, task_name, out_dir, teachers_dir), None
    except CacheConflictError:
        if not (out_dir / MANIFEST).is_file():
            raise  # an unfinished build with other settings, or a lock: nothing to keep
    old = read_manifest(out_dir)
    archive = archive_name(out_dir, old["fingerprint"])
    if archive.exists():
        raise CacheConflictError(f"{archive}: an archived cache is already there; move it away, then rerun")
    archive.parent.mkdir(parents=True, exist_ok=True)
    os.replace(out_dir, archive)
    log.info("%s: the teacher or its settings changed; the old cache is kept at %s", out_dir, archive)
    manifest = build_teacher_cache(pipeline, task_name, out_dir, teachers_dir,
                                   parent={"fingerprint": old["fingerprint"], "cache": str(archive)})
    if not (heads.has(manifest["head"], heads.DRIFT) and heads.has(old["head"], heads.DRIFT)):
        return manifest, None
    drift = compare_caches(str(archive), str(out_dir))
    write_drift(drift)
    return manifest, drift
