"""A cache shared on object storage: a real S3-compatible server (moto, on 127.0.0.1) serves the cache, and
the reader and the trainer stream from s3:// exactly what they read from disk."""

from __future__ import annotations

import pickle
import socket

import fsspec
import numpy as np
import pytest

from conftest import tiny_pipeline
from kdcache.cache.format import CacheFormatError
from kdcache.cache.read import remote as reader_module
from kdcache.cache.reader import CacheDataset
from kdcache.train.loop import train_students

moto_server = pytest.importorskip("moto.server")
s3fs = pytest.importorskip("s3fs")


@pytest.fixture(scope="module")
def s3(tiny_cache):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    options = {"endpoint_url": f"http://127.0.0.1:{port}", "key": "test", "secret": "test",
               "client_kwargs": {"region_name": "us-east-1"}}
    saved = fsspec.config.conf.get("s3")
    fsspec.config.conf["s3"] = options  # how a user points fsspec at a server: FSSPEC_S3_ENDPOINT_URL etc.
    import boto3
    boto3.client("s3", endpoint_url=options["endpoint_url"], region_name="us-east-1", aws_access_key_id="test",
                 aws_secret_access_key="test").create_bucket(Bucket="kd-team")
    fs = s3fs.S3FileSystem(**options, skip_instance_cache=True)
    fs.put(str(tiny_cache), "kd-team/caches/topic", recursive=True)
    yield "s3://kd-team/caches/topic"
    if saved is None:
        fsspec.config.conf.pop("s3", None)
    else:
        fsspec.config.conf["s3"] = saved
    s3fs.S3FileSystem.clear_instance_cache()  # no cached client keeps talking to the stopped server
    server.stop()


@pytest.mark.parametrize("hold", [True, False], ids=["shards-held", "row-group-ranges"])
def test_reader_streams_the_same_rows_and_features_from_s3(s3, tiny_cache, hold, monkeypatch):
    if not hold:  # a split too large to hold: each row group's column chunks in one ranged request
        monkeypatch.setattr(reader_module, "HOLD_BYTES", 0)
    local = list(CacheDataset(tiny_cache, "train", feature_layers=(2,)))
    remote = list(CacheDataset(s3, "train", feature_layers=(2,)))
    assert [r["id"] for r in remote] == [r["id"] for r in local]
    for a, b in zip(local, remote):
        np.testing.assert_array_equal(a["logits"], b["logits"])
        np.testing.assert_array_equal(a["features"]["layer_2"], b["features"]["layer_2"])
    shuffled = [r["row_id"] for r in CacheDataset(s3, "train", shuffle=True, seed=3, rank=1, world_size=2)]
    assert len(shuffled) < len(local) and len(set(shuffled)) == len(shuffled)
    # a column subset (one ranged request per row group) and a class filter read the same as from disk
    some = CacheDataset(s3, "train", labels=("tech", "sports"))
    assert [r["id"] for r in some] == [r["id"] for r in CacheDataset(tiny_cache, "train", labels=("tech", "sports"))]
    assert len(some) == sum(r["label"] in (3, 4) for r in local) > 0
    ds = CacheDataset(s3, "train")
    assert ds.files.hold is hold and len(pickle.loads(pickle.dumps(ds))) == len(local), "picklable for spawned workers"


def test_a_student_trains_from_s3_as_from_disk(s3, tiny_cache, tmp_path):
    pipeline = tiny_pipeline("train.epochs=1", "students.bow.twin=false")
    remote = train_students(pipeline, ["bow"], {"topic": s3}, tmp_path / "s3")[0]
    local = train_students(pipeline, ["bow"], {"topic": str(tiny_cache)}, tmp_path / "disk")[0]
    assert remote["epochs"] == local["epochs"] and remote["test"] == local["test"]


def test_missing_remote_cache_is_named(s3):
    with pytest.raises(CacheFormatError, match=r"s3://kd-team/nothing-here: no manifest\.json"):
        CacheDataset("s3://kd-team/nothing-here", "train")


def _fs():
    return s3fs.S3FileSystem(**fsspec.config.conf["s3"], skip_instance_cache=True)


def test_push_then_pull_round_trips_byte_for_byte_and_verifies(s3, tiny_cache, tmp_path):
    from kdcache.cache.share import pull, push
    from kdcache.cache.verify import verify_cache
    url = "s3://kd-team/shared/round-trip"
    r = push(tiny_cache, url)
    assert r["files"] == sum(1 for p in tiny_cache.rglob("*") if p.is_file() and p.name != ".kdcache.lock")
    got = pull(url, tmp_path / "copy")
    assert verify_cache(tmp_path / "copy").ok and got["fetched"] == r["files"] - 1
    for p in tiny_cache.rglob("*"):
        if p.is_file():
            assert (tmp_path / "copy" / p.relative_to(tiny_cache)).read_bytes() == p.read_bytes(), p
    assert pull(url, tmp_path / "copy")["fetched"] == 0, "an intact copy is not fetched again"
    assert [x["id"] for x in CacheDataset(url, "validation")] == [x["id"] for x in CacheDataset(tiny_cache, "validation")]


def test_an_interrupted_push_is_never_a_finished_cache(s3, tiny_cache, monkeypatch):
    from kdcache.cache import share
    url = "s3://kd-team/shared/interrupted"
    share.push(tiny_cache, url)

    def crash(*a):
        raise KeyboardInterrupt("killed before the manifest")
    monkeypatch.setattr(share, "_put_manifest", crash)
    with pytest.raises(KeyboardInterrupt):
        share.push(tiny_cache, url)  # a second push over a finished one hides the old manifest first
    with pytest.raises(CacheFormatError, match="no manifest.json; not a finished kdcache cache"):
        CacheDataset(url, "train")
    monkeypatch.undo()
    share.push(tiny_cache, url)
    assert len(list(CacheDataset(url, "validation"))) > 0


def test_a_corrupted_object_is_caught_on_pull_and_nothing_is_trusted(s3, tiny_cache, tmp_path):
    from kdcache.cache.format import read_manifest
    from kdcache.cache.share import ShareError, pull, push
    url = "s3://kd-team/shared/corrupted"
    push(tiny_cache, url)
    shard = read_manifest(tiny_cache)["splits"]["train"]["shards"][1]["parquet"]
    fs = _fs()
    raw = bytearray(fs.cat_file(f"kd-team/shared/corrupted/{shard}"))
    raw[100] ^= 0xFF
    fs.pipe_file(f"kd-team/shared/corrupted/{shard}", bytes(raw))
    with pytest.raises(ShareError, match=f"{shard}: checksum mismatch after the copy .* push the cache again"):
        pull(url, tmp_path / "copy")
    assert not (tmp_path / "copy" / "manifest.json").exists()
    push(tiny_cache, url)
    again = pull(url, tmp_path / "copy")  # resumes: only the damaged shard is fetched again
    assert again["fetched"] < sum(1 for p in tiny_cache.rglob("*") if p.is_file()) // 2


def test_push_refuses_a_cache_that_does_not_verify(s3, tiny_cache, tmp_path):
    import shutil

    from kdcache.cache.share import ShareError, push
    bad = tmp_path / "bad"
    shutil.copytree(tiny_cache, bad)
    (bad / "validation" / "stray.txt").write_text("x")
    with pytest.raises(ShareError, match="does not verify .*not listed in the manifest"):
        push(bad, "s3://kd-team/shared/bad")
    assert not _fs().exists("kd-team/shared/bad/manifest.json")


def test_a_shared_store_reuses_an_identical_cache_and_ignores_another(s3, teachers_dir, tmp_path, monkeypatch):
    """`kdcache cache --shared URL`: the first build pushes to a place named by its fingerprint; an identical build
    elsewhere pulls it without running the teacher over the data; other settings make another cache."""
    from kdcache.cache.format import read_manifest
    from kdcache.cache.share import fetch_shared, shared_location
    from kdcache.cache.verify import verify_cache
    from kdcache.capture.build import build_teacher_cache
    from kdcache.capture.classification import SequenceClassification
    store = "s3://kd-team/registry"
    teacher_passes = []
    real = SequenceClassification.run
    monkeypatch.setattr(SequenceClassification, "run", lambda *a, **k: teacher_passes.append(1) or real(*a, **k))
    m1 = build_teacher_cache(tiny_pipeline(), "topic", tmp_path / "a", teachers_dir, shared=store)
    ran = len(teacher_passes)
    assert ran > 0 and _fs().exists(shared_location(store, "topic", m1["fingerprint"])[5:] + "/manifest.json")
    m2 = build_teacher_cache(tiny_pipeline(), "topic", tmp_path / "b", teachers_dir, shared=store)
    assert len(teacher_passes) == ran, "an identical shared cache is pulled, the teacher does not run over the data"
    assert m2["fingerprint"] == m1["fingerprint"] and verify_cache(tmp_path / "b").ok
    assert read_manifest(tmp_path / "b") == read_manifest(tmp_path / "a")
    other = build_teacher_cache(tiny_pipeline("tasks.topic.cache.shard_rows=20"), "topic", tmp_path / "c",
                                teachers_dir, shared=store)
    assert other["fingerprint"] != m1["fingerprint"] and len(teacher_passes) > ran
    # a cache at the expected place whose fingerprint differs (hand-copied there) is ignored, not trusted
    _fs().put(str(tmp_path / "a"), shared_location(store, "topic", "f" * 64)[5:], recursive=True)
    assert fetch_shared(store, "topic", "f" * 64, tmp_path / "d") is None and not (tmp_path / "d").exists()
