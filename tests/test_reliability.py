"""Trust the cache: kill -9 anywhere, disk full, two writers, mismatched resumes, bad input, damaged caches
refused by the trainer, and multi-process capture with `accelerate launch`. Real processes and real files."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import FAST, REPO, build, tiny_pipeline
from kdcache.cache.format import LOCK_FILE, MANIFEST, read_manifest
from kdcache.cache.verify import verify_cache
from kdcache.cache.writer import CacheConflictError, CacheWriteError, acquire_lock
from kdcache.config import DataConfig
from kdcache.data import DataError, load_task_data

SETS = [a for o in FAST for a in ("--set", o)]
TINY = str(REPO / "pipelines" / "tiny" / "pipeline.yaml")


def cli_cache(out, teachers, env=None, launcher=()):
    env = {**os.environ, **(env or {})}
    cmd = [*launcher, "-m", "kdcache.cli", "cache", TINY, "--out", str(out), "--teachers-dir", str(teachers), *SETS]
    return subprocess.run([sys.executable, *cmd] if not launcher else cmd, capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=600)


def shard_sums(cache):
    m = read_manifest(cache)
    return {s: [(x["parquet"], x["rows"], x["sha256"], x["features"]["sha256"]) for x in v["shards"]]
            for s, v in m["splits"].items()}


@pytest.mark.parametrize("point, shards_kept", [
    ("teacher-batch@3", 0),          # mid-shard, inside the teacher loop
    ("parquet-written@2", 1),        # a complete temporary Parquet file, not yet renamed
    ("zarr-written@3", 2),           # Zarr chunks written under a temporary group name
    ("before-shard-record@4", 3),    # both files renamed, commit record not yet written
    ("before-manifest", 9),          # every shard committed, manifest not yet written
    ("after-manifest", None),        # manifest written, its folder not yet synced
])
def test_kill_9_anywhere_then_rerun_gives_the_uninterrupted_cache(tmp_path, tiny_cache, teachers_dir, point,
                                                                  shards_kept):
    out = tmp_path / "c"
    killed = cli_cache(out, teachers_dir, {"KDCACHE_FAILPOINT": point})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    task = out / "topic"
    if shards_kept is not None:
        assert not (task / MANIFEST).exists()
        assert not verify_cache(task).ok  # nothing a reader would trust
    rerun = cli_cache(out, teachers_dir)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    if shards_kept:
        assert f"{shards_kept} of 9 shards already written; resuming" in rerun.stderr
    assert shard_sums(task) == shard_sums(tiny_cache), "same rows, same bytes as the uninterrupted run"
    assert verify_cache(task).ok and not list(task.rglob(".*.tmp-*"))


def test_disk_full_leaves_nothing_trusted_and_a_rerun_completes(tmp_path, tiny_cache, teachers_dir, monkeypatch):
    import kdcache.cache.writer as writer
    real = writer._write_features
    calls = {"n": 0}

    def full(path, features, attrs):
        calls["n"] += 1
        if calls["n"] == 4:
            tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
            tmp.mkdir(parents=True)
            (tmp / "c").write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, features, attrs)

    monkeypatch.setattr(writer, "_write_features", full)
    with pytest.raises(CacheWriteError, match=r"No space left on device.*rerun the same command to resume"):
        build(tmp_path, teachers=teachers_dir)
    out = tmp_path / "cache"
    assert not (out / MANIFEST).exists() and not list(out.rglob(".*.tmp-*"))
    monkeypatch.setattr(writer, "_write_features", real)
    build(tmp_path, teachers=teachers_dir)
    assert shard_sums(out) == shard_sums(tiny_cache) and verify_cache(out).ok


def test_a_second_writer_is_refused_and_a_stale_lock_is_taken_over(tmp_path, teachers_dir):
    out = tmp_path / "cache"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / LOCK_FILE).write_text(json.dumps({"pid": holder.pid, "host": os.uname().nodename}))
        with pytest.raises(CacheConflictError, match=rf"another kdcache process \(pid {holder.pid}"):
            build(tmp_path, teachers=teachers_dir)
    finally:
        holder.kill()
        holder.wait()
    build(tmp_path, teachers=teachers_dir)  # the holder is dead: its lock is stale
    assert (out / MANIFEST).is_file() and not (out / LOCK_FILE).exists()
    lock = acquire_lock(out)
    with pytest.raises(CacheConflictError, match="another kdcache process"):
        acquire_lock(out)  # our own live pid holds it
    lock.unlink()


@pytest.mark.parametrize("change, field", [
    ("tasks.topic.cache.max_length=48", "max_length"),
    ("tasks.topic.data.limit=59", "data.splits"),
    ("tasks.topic.cache.features.pooling=cls", "features.pooling"),
    ("tasks.topic.teacher.finetune.learning_rate=0.01", "teacher.finetune_sha256"),
])
def test_resuming_with_other_settings_is_refused_with_the_field(tmp_path, teachers_dir, change, field):
    out = tmp_path / "c"
    killed = cli_cache(out, teachers_dir, {"KDCACHE_FAILPOINT": "before-shard-record@2"})
    assert killed.returncode == -signal.SIGKILL
    with pytest.raises(CacheConflictError, match=rf"unfinished build built with other settings \(changed: .*{field}"):
        build(tmp_path, change, teachers=tmp_path / "t2" if "finetune" in change or "max_length" in change
              or "limit" in change else teachers_dir, out=out / "topic")


def test_trainer_refuses_a_damaged_cache_with_verifys_message(tmp_path, tiny_cache):
    from kdcache.train.loop import train_students
    cache = tmp_path / "c"
    shutil.copytree(tiny_cache, cache)
    shard = read_manifest(cache)["splits"]["train"]["shards"][0]
    data = bytearray((cache / shard["parquet"]).read_bytes())
    data[100] ^= 0xFF
    (cache / shard["parquet"]).write_bytes(bytes(data))
    with pytest.raises(Exception, match=r"damaged cache: .*shard-00000\.parquet.*checksum mismatch"):
        train_students(tiny_pipeline("train.epochs=1"), ["bow"], {"topic": str(cache)}, tmp_path / "runs")


def test_bad_input_files_are_named(tmp_path):
    latin = tmp_path / "train.csv"
    latin.write_bytes("text,label\ncaf\xe9 ok,pos\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"train\.csv: line 2 is not valid UTF-8"):
        load_task_data(DataConfig(source="files", files={"train": str(latin)}, label_names=("neg", "pos")))
    empty = tmp_path / "empty.csv"
    empty.write_text("text,label\n")
    with pytest.raises(DataError, match=r"empty\.csv split `train`: no rows could be read"):
        load_task_data(DataConfig(source="files", files={"train": str(empty)}, label_names=("neg", "pos")))
    zero = tmp_path / "zero.csv"
    zero.write_bytes(b"")
    with pytest.raises(DataError, match=r"zero\.csv: file for split `train` is empty \(0 bytes; data\.files\.train\)"):
        load_task_data(DataConfig(source="files", files={"train": str(zero)}, label_names=("neg", "pos")))
    with pytest.raises(DataError, match=r"nope\.csv: file for split `train` not found"):
        load_task_data(DataConfig(source="files", files={"train": str(tmp_path / "nope.csv")}, label_names=("a",)))


ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0"]


def assert_same_rows_and_values(a, b):
    """Rows, ids, hashes and features identical; logits equal to float rounding (kernels differ by thread layout)."""
    ma, mb = read_manifest(a), read_manifest(b)
    assert ma["fingerprint"] == mb["fingerprint"]
    for split, s in ma["splits"].items():
        t = mb["splits"][split]
        assert [(x["rows"], x["row_groups"], x["features"]["sha256"]) for x in s["shards"]] == \
               [(x["rows"], x["row_groups"], x["features"]["sha256"]) for x in t["shards"]]
        for x, y in zip(s["shards"], t["shards"]):
            ta, tb = pq.read_table(a / x["parquet"]), pq.read_table(b / y["parquet"])
            assert ta.drop(["logits"]).equals(tb.drop(["logits"]))
            np.testing.assert_allclose(np.stack(ta.column("logits").to_numpy(zero_copy_only=False)),
                                       np.stack(tb.column("logits").to_numpy(zero_copy_only=False)), atol=1e-6)


def test_two_process_capture_equals_single_process_and_resumes_after_a_rank_dies(tmp_path, tiny_cache, teachers_dir):
    out = tmp_path / "mp"
    proc = cli_cache(out, teachers_dir, launcher=ACCELERATE)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert read_manifest(out / "topic")["processes"] == 2
    assert_same_rows_and_values(tiny_cache, out / "topic")
    assert verify_cache(out / "topic").ok

    out2 = tmp_path / "mp2"
    died = cli_cache(out2, teachers_dir, {"KDCACHE_FAILPOINT": "before-shard-record@2", "KDCACHE_FAILPOINT_RANK": "1"},
                     launcher=ACCELERATE)
    assert died.returncode != 0 and not (out2 / "topic" / MANIFEST).exists()
    resumed = cli_cache(out2, teachers_dir, launcher=ACCELERATE)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "shards already written; resuming" in resumed.stderr
    assert_same_rows_and_values(tiny_cache, out2 / "topic")


def _mount_tmpfs(path, size):
    path.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


def test_a_real_full_disk_then_more_space_completes_the_cache(tmp_path, tiny_cache, teachers_dir):
    """A real ENOSPC: the cache folder is a 128 KiB tmpfs; after growing it, the same command finishes."""
    disk = tmp_path / "disk"
    if os.geteuid() != 0 or not _mount_tmpfs(disk, "128k"):
        pytest.skip("mounting a tmpfs needs root")
    try:
        out = disk / "cache"
        with pytest.raises(CacheWriteError, match=r"No space left on device.*rerun the same command to resume"):
            build(tmp_path, teachers=teachers_dir, out=out)
        assert not (out / MANIFEST).exists() and not list(out.rglob(".*.tmp-*"))
        subprocess.run(["mount", "-o", "remount,size=8m", str(disk)], check=True)
        build(tmp_path, teachers=teachers_dir, out=out)
        assert shard_sums(out) == shard_sums(tiny_cache) and verify_cache(out).ok
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)
