"""Shared fixtures: a small real cache built once per session from the `tiny` pipeline (BBC News rows, a
2-layer BERT teacher built from a config, fine-tuned for a few steps), plus helpers to build variants."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from kdcache.capture.build import build_teacher_cache  # noqa: E402
from kdcache.config import load_pipeline  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
# the shared data sets (CoNLL, SST-2, ...), where kdcache's sources look for them (see data.shared_data_dir)
SHARED_DATA = Path(os.environ.get("KDCACHE_DATA", "../shared/data"))


def require_shared_data(name: str) -> Path:
    """The shared data set `name`, or skip the test saying where it was looked for. CI sets
    KDCACHE_REQUIRE_DATA=1 (.ci/run), which turns the skip into a failure: CI always runs these tests."""
    path = SHARED_DATA / name
    if not path.is_dir():
        msg = (f"needs the shared data set {path} (not found); set KDCACHE_DATA to the folder holding `{name}/` "
               "(../shared/data beside the checkout by default)")
        if os.environ.get("KDCACHE_REQUIRE_DATA"):
            pytest.fail(msg)
        pytest.skip(msg)
    return path
# Smaller than the shipped tiny pipeline so each build takes about a second.
FAST = ["tasks.topic.data.limit=60", "tasks.topic.teacher.finetune.epochs=2",
        "tasks.topic.teacher.sanity.enabled=false",  # a 60-row, 2-epoch teacher is near-random: the gate is tested alone
        "tasks.topic.cache.shard_rows=25", "tasks.topic.cache.batch_size=8", "tasks.topic.cache.sort_window=2"]


def tiny_pipeline(*overrides: str):
    return load_pipeline(str(REPO / "pipelines" / "tiny" / "pipeline.yaml"), [*FAST, *overrides])


def build(tmp: Path, *overrides: str, teachers: Path | None = None, overwrite: bool = False, out: Path | None = None):
    """Build the tiny cache under tmp/cache (teachers under `teachers` or tmp/teachers); returns (out, manifest)."""
    pipeline = tiny_pipeline(*overrides)
    out = out or tmp / "cache"
    manifest = build_teacher_cache(pipeline, "topic", out, teachers or tmp / "teachers", overwrite=overwrite)
    return out, manifest


@pytest.fixture(scope="session")
def teachers_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("teachers")


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory, teachers_dir) -> Path:
    """A finished tiny cache (do not modify it: copy it first)."""
    out, _ = build(tmp_path_factory.mktemp("tiny"), teachers=teachers_dir)
    return out


@pytest.fixture(scope="session")
def ml_lm_cache(tmp_path_factory) -> tuple[Path, object]:
    """The multilingual-lm-tiny cache (five SIB-200 languages, a random Llama with 262k outputs, byte offsets on)
    and its pipeline; do not modify it."""
    require_shared_data("sib200")
    from kdcache.capture.build import build_teacher_cache
    from kdcache.config import load_pipeline
    tmp = tmp_path_factory.mktemp("ml-lm")
    p = load_pipeline(str(REPO / "pipelines" / "multilingual-lm-tiny" / "pipeline.yaml"))
    build_teacher_cache(p, "sentences", tmp / "cache" / "sentences", tmp / "teachers")
    return tmp / "cache" / "sentences", p


def split_table(cache: Path, split: str):
    """(every shard of a cached split read as one Arrow table, in row order; the cache's manifest)."""
    import pyarrow.parquet as pq
    from kdcache.cache.format import read_manifest
    m = read_manifest(cache)
    return pq.read_table([str(cache / s["parquet"]) for s in m["splits"][split]["shards"]]), m


def undocumented(manifest: dict) -> set[str]:
    """Manifest field names (at any depth, list items and the free-form `config` aside) that docs/cache-format.md
    does not mention in backticks."""
    doc = re.sub(r"```.*?```", "", (REPO / "docs" / "cache-format.md").read_text(), flags=re.S)
    named = set(re.findall(r"`([A-Za-z_][\w.]*)`", doc)) | {w for n in re.findall(r"`([^`]+)`", doc)
                                                           for w in re.findall(r"[A-Za-z_]\w*", n)}
    fields = set()

    def walk(d, skip):
        for k, v in d.items():
            fields.add(k)
            if isinstance(v, dict) and k not in skip:
                walk(v, skip)
            if isinstance(v, list) and v and isinstance(v[0], dict):
                for item in v:
                    walk(item, skip)
    # keyed by split names (and language codes) below, or by device names (`placement`)
    walk(manifest, {"config", "splits", "arrays", "text", "files", "placement"})
    for s in manifest["splits"].values():
        walk(s, {"arrays", "languages"})
        for lang in (s.get("languages") or {}).values():
            walk(lang, {"arrays"})
    for f in (manifest.get("files") or {}).values():  # keyed by file name
        walk(f, set())
    for per_split in (manifest.get("text") or {}).values():
        for v in [per_split] if "words" in per_split else per_split.values():
            walk(v, set())
    return fields - named
