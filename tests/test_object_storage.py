"""A cache shared on object storage: a real S3-compatible server (moto, on 127.0.0.1) serves the cache, and
the reader and the trainer stream from s3:// exactly what they read from disk."""

from __future__ import annotations

import socket

import fsspec
import numpy as np
import pytest

from conftest import tiny_pipeline
from kdcache.cache.format import CacheFormatError
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


def test_reader_streams_the_same_rows_and_features_from_s3(s3, tiny_cache):
    local = list(CacheDataset(tiny_cache, "train", feature_layers=(2,)))
    remote = list(CacheDataset(s3, "train", feature_layers=(2,)))
    assert [r["id"] for r in remote] == [r["id"] for r in local]
    for a, b in zip(local, remote):
        np.testing.assert_array_equal(a["logits"], b["logits"])
        np.testing.assert_array_equal(a["features"]["layer_2"], b["features"]["layer_2"])
    shuffled = [r["row_id"] for r in CacheDataset(s3, "train", shuffle=True, seed=3, rank=1, world_size=2)]
    assert len(shuffled) < len(local) and len(set(shuffled)) == len(shuffled)


def test_a_student_trains_from_s3_as_from_disk(s3, tiny_cache, tmp_path):
    pipeline = tiny_pipeline("train.epochs=1", "students.bow.twin=false")
    remote = train_students(pipeline, ["bow"], {"topic": s3}, tmp_path / "s3")[0]
    local = train_students(pipeline, ["bow"], {"topic": str(tiny_cache)}, tmp_path / "disk")[0]
    assert remote["epochs"] == local["epochs"] and remote["test"] == local["test"]


def test_missing_remote_cache_is_named(s3):
    with pytest.raises(CacheFormatError, match=r"s3://kd-team/nothing-here: no manifest\.json"):
        CacheDataset("s3://kd-team/nothing-here", "train")
