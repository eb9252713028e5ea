"""Caches that grow (capture/grow.py): new rows in the data (same teacher, same settings) are captured alone, as a
new generation after the old shards, which stay byte-identical; no row is cached twice, a kill -9 during the append
leaves the old cache readable and a rerun finishes it; readers see the union or the cache as of a generation; a
changed or removed row is refused."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import FAST, REPO, build, tiny_pipeline
from kdcache.cache.format import MANIFEST, read_manifest
from kdcache.cache.reader import CacheDataset
from kdcache.cache.verify import verify_cache
from kdcache.capture.grow import GrowError, plan_growth
from kdcache.data import TaskData, load_task_data

# 40 labelled training rows: the teacher is fine-tuned on those alone, so rows added later (unlabelled in train,
# labelled in validation and test) leave it unchanged and the cache can grow
OLD = ["tasks.topic.data.labelled_limit=40"]
NEW = [*OLD, "tasks.topic.data.limit=66"]
TINY = str(REPO / "pipelines" / "tiny" / "pipeline.yaml")


def files(cache):
    """sha256 of every shard file (Parquet and Zarr) of a cache."""
    return {str(p.relative_to(cache)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in cache.rglob("*") if p.is_file() and "shard-" in str(p) and "_records" not in p.parts}


def rows(cache, split, **kw):
    return {r["id"]: r["logits"] for r in CacheDataset(cache, split, **kw)}


def cli_grow(out, teachers, env=None):
    sets = [a for o in [*FAST, *NEW] for a in ("--set", o)]
    cmd = [sys.executable, "-m", "kdcache.cli", "cache", TINY, "--out", str(out), "--teachers-dir", str(teachers),
           *sets]
    return subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})}, cwd=REPO,
                          timeout=600)


@pytest.fixture(scope="module")
def grown(tmp_path_factory):
    """(the cache before, its shard files, the cache after growing, a from-scratch cache of the grown data)."""
    tmp = tmp_path_factory.mktemp("grow")
    old, _ = build(tmp, *OLD, out=tmp / "cache" / "topic")
    import shutil
    before = tmp / "before"
    shutil.copytree(old, before)
    build(tmp, *NEW, out=old)
    fresh, _ = build(tmp, *NEW, out=tmp / "fresh")
    return before, files(before), old, fresh, tmp


def test_growing_keeps_old_shards_and_caches_each_row_once(grown):
    before, old_files, cache, fresh, _ = grown
    after = files(cache)
    assert all(after.get(p) == h for p, h in old_files.items()), "every old shard file byte-identical"
    assert set(after) > set(old_files), "new shards beside them"
    m0, m = read_manifest(before), read_manifest(cache)
    assert [g["generation"] for g in m["generations"]] == [0, 1]
    assert {s: g["rows"] for s, g in m["generations"][0]["splits"].items()} == {s: 60 for s in m0["splits"]}
    assert {s: v["rows"] for s, v in m["splits"].items()} == {s: 66 for s in m0["splits"]}
    for split in m["splits"]:
        ids = [r["id"] for r in CacheDataset(cache, split)]
        assert len(ids) == len(set(ids)) == 66, "no row twice"
        table = pq.read_table([str(cache / sh["parquet"]) for sh in m["splits"][split]["shards"]])
        assert table.column("row_id").to_pylist() == list(range(66))
        # the new rows' targets are the teacher's, as a from-scratch build of the grown data has them: to float
        # rounding, since there the teacher saw them in other batches (other padding), and on some CPUs (an AMD
        # EPYC here; not the Intel Xeon) a row's logits then differ in the last bit
        want = rows(fresh, split)
        assert set(want) == set(ids)
        for i, z in rows(cache, split).items():
            np.testing.assert_allclose(z, want[i], rtol=1e-5, atol=1e-6)
    assert verify_cache(cache).ok
    assert m["fingerprint"] != m0["fingerprint"] and m["capture"]["rows"] == 3 * 6, "only the new rows captured"


def test_readers_see_the_union_or_a_generation(grown):
    before, _, cache, _, _ = grown
    assert rows(cache, "train", generation=0).keys() == rows(before, "train").keys()
    assert len(CacheDataset(cache, "train", generation=1)) == len(CacheDataset(cache, "train")) == 66
    with pytest.raises(Exception, match="no generation 5"):
        CacheDataset(cache, "train", generation=5)


def test_a_rerun_on_the_same_data_changes_nothing(grown):
    _, _, cache, _, tmp = grown
    m = read_manifest(cache)
    again, _ = build(tmp, *NEW, out=cache)
    assert read_manifest(cache) == m


def test_kill_9_during_the_append_leaves_the_old_cache_and_a_rerun_finishes(grown, tmp_path):
    before, old_files, cache, _, tmp = grown
    import shutil
    out = tmp_path / "c"
    shutil.copytree(before, out / "topic")
    killed = cli_grow(out, tmp / "teachers", {"KDCACHE_FAILPOINT": "before-shard-record@2"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    task = out / "topic"
    assert read_manifest(task)["fingerprint"] == read_manifest(before)["fingerprint"], "the old manifest still rules"
    assert rows(task, "train").keys() == rows(before, "train").keys(), "readers see the old cache, whole"
    report = verify_cache(task)
    assert report.ok, report.problems
    assert any("append of new rows was started and not finished" in n for n in report.notes)
    assert "kdcache cache" in report.notes[0], "the note says how to finish it"
    sets = [x for s in [*FAST, *OLD, "train.epochs=1"] for x in ("--set", s)]
    trained = subprocess.run([sys.executable, "-m", "kdcache.cli", "train", TINY, *sets, "--students", "bow",
                              "--cache", str(out), "--runs", str(tmp_path / "runs")], capture_output=True, text=True)
    assert trained.returncode == 0, trained.stderr[-2000:]
    rerun = cli_grow(out, tmp / "teachers")
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert files(task) == files(cache), "the same bytes as an uninterrupted append"
    assert verify_cache(task).ok and not list(task.rglob(".*.tmp-*"))


def test_a_changed_or_removed_row_is_refused(grown, tmp_path):
    before, _, _, _, tmp = grown
    import shutil
    out = tmp_path / "c"
    shutil.copytree(before, out)
    with pytest.raises(GrowError, match="no longer in the data"):  # fewer rows: 60 -> 50
        build(tmp, *OLD, "tasks.topic.data.limit=50", out=out)
    assert read_manifest(out) == read_manifest(before)
    data = load_task_data(tiny_pipeline(*NEW).tasks["topic"].data)
    test = data.splits["test"]
    edited = test.map(lambda r, i: {"text": r["text"] + " (edited)" if i == 7 else r["text"]}, with_indices=True)
    changed = TaskData({**data.splits, "test": edited}, data.label_names, data.origin, data.id_field)
    with pytest.raises(GrowError, match=f"row {test['id'][7]!r} changed its `text`"):
        plan_growth(out, changed, "sequence-classification", ["text"])


def test_drift_is_zero_for_the_same_teacher_and_positive_for_a_refreshed_one(grown, tmp_path):
    """`kdcache drift`: the grown cache against its own past (same teacher, same rows) moved by exactly 0; a teacher
    fine-tuned with another seed moved; the report's stale-runs note names how far."""
    from kdcache.cache.drift import compare_caches, write_drift
    from kdcache.report import stale_lines
    before, _, cache, _, tmp = grown
    same = compare_caches(str(before), str(cache))
    for split, s in same["splits"].items():
        assert s["rows_compared"] == 60 and s["rows_only_new"] == 6
        assert s["mean_kl"] == 0.0 and s["changed_predictions"] == 0 and s["agreement"] == 1.0
    other, _ = build(tmp_path, *NEW, "tasks.topic.teacher.finetune.seed=7", out=tmp_path / "other")
    moved = compare_caches(str(cache), str(other), top=3)
    assert "teacher.finetune_sha256" in moved["changed_inputs"]
    for s in moved["splits"].values():
        assert s["rows_compared"] == 66 and s["mean_kl"] > 0 and len(s["moved_most"]) == 3
        kls = [r["kl"] for r in s["moved_most"]]
        assert kls == sorted(kls, reverse=True) and kls[0] == pytest.approx(s["max_kl"])
        assert sum(c["rows"] for c in s["per_class"].values()) == 66
    write_drift(moved)
    run = {"run": "bow", "cache": str(other), "cache_fingerprint": read_manifest(cache)["fingerprint"]}
    note = "\n".join(stale_lines([run]))
    assert "Stale runs" in note and f"test mean KL {moved['splits']['test']['mean_kl']:.4f} nats" in note


def test_refresh_keeps_the_old_cache_names_it_and_measures_the_drift(tmp_path):
    """`kdcache refresh`: an unchanged pipeline refreshes nothing; a re-fine-tuned teacher's cache replaces the old
    one, which stays readable in the archive and is the new manifest's parent, with the drift kept beside."""
    from kdcache.capture.refresh import archive_name, refresh_teacher_cache
    from kdcache.cache.drift import read_drift
    from kdcache.report import stale_lines
    root = tmp_path / "cache" / "topic"
    build(tmp_path, out=root)
    old = read_manifest(root)
    same, drift = refresh_teacher_cache(tiny_pipeline(), "topic", root, tmp_path / "teachers")
    assert drift is None and same["fingerprint"] == old["fingerprint"]
    new, drift = refresh_teacher_cache(tiny_pipeline("tasks.topic.teacher.finetune.learning_rate=0.01"), "topic", root,
                                       tmp_path / "teachers")
    archive = archive_name(root, old["fingerprint"])
    assert read_manifest(archive) == old and verify_cache(archive).ok, "the old cache, whole and readable"
    assert new["parent"] == {"fingerprint": old["fingerprint"], "cache": str(archive)}
    assert drift["splits"]["test"]["mean_kl"] > 0 and read_drift(str(root), old["fingerprint"]) == drift
    assert not (root.parent / f"topic@{old['fingerprint'][:12]}").exists(), "the pipeline folder lists tasks only"
    note = "\n".join(stale_lines([{"run": "bow", "cache": str(root), "cache_fingerprint": old["fingerprint"]}]))
    assert "Their targets moved" in note
    # the old teacher's targets as a memory term beside the new ones (a teacher named by its cache's path)
    from kdcache.train.loop import train_students
    p = tiny_pipeline("tasks.topic.teacher.finetune.learning_rate=0.01", "train.epochs=1",
                      f"students.bow.teachers={{topic: 1.0, {archive}: 0.5}}", "students.bow.loss.ensemble=terms",
                      "students.bow.twin=false")
    (r,) = train_students(p, ["bow"], {"topic": str(root)}, tmp_path / "runs")
    assert r["teachers"] == pytest.approx({"topic": 2 / 3, str(archive): 1 / 3}) and r["ensemble"] == "terms"
    assert r["teacher_caches"] == {"topic": str(root), str(archive): str(archive)}
