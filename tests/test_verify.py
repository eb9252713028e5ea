"""`kdcache verify` names the damaged file and the problem; the CLI exits non-zero."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from kdcache.cache.format import DIGEST_KEY, MANIFEST, manifest_digest, read_manifest
from kdcache.cache.verify import cache_info, verify_cache


@pytest.fixture
def cache(tiny_cache, tmp_path):
    dst = tmp_path / "cache"
    shutil.copytree(tiny_cache, dst)
    return dst


def kdcache(*args):
    return subprocess.run([sys.executable, "-m", "kdcache.cli", *map(str, args)], capture_output=True, text=True)


def test_clean_cache_verifies(cache):
    r = verify_cache(cache)
    assert r.ok, r.problems
    assert r.bytes_checked == read_manifest(cache)["totals"]["bytes"]
    proc = kdcache("verify", cache)
    assert proc.returncode == 0 and "OK" in proc.stdout


def test_flipped_byte_names_the_shard(cache):
    shard = read_manifest(cache)["splits"]["train"]["shards"][1]
    path = cache / shard["parquet"]
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    r = verify_cache(cache)
    assert len(r.problems) == 1
    assert shard["parquet"] in r.problems[0] and "checksum mismatch" in r.problems[0]
    proc = kdcache("verify", cache.parent)  # a folder of caches works too
    assert proc.returncode == 1
    assert "shard-00001.parquet" in proc.stdout and "checksum mismatch" in proc.stdout
    assert "fix: `kdcache cache tiny" in proc.stdout


@pytest.mark.parametrize("damage, expect", [
    ("truncate", "truncated or replaced"),
    ("delete", "shard file missing"),
    ("stray", "not listed in the manifest"),
    ("zarr", "feature checksum mismatch"),
    ("version", "format version 99"),
    ("escape", "points outside the cache"),
])
def test_damage_is_reported(cache, damage, expect):
    m = read_manifest(cache)
    shard = m["splits"]["validation"]["shards"][0]
    if damage == "truncate":
        p = cache / shard["parquet"]
        p.write_bytes(p.read_bytes()[:-100])
    elif damage == "delete":
        (cache / shard["parquet"]).unlink()
    elif damage == "stray":
        (cache / "validation" / "notes.txt").write_text("hello")
    elif damage == "zarr":
        chunk = next(p for p in (cache / shard["features"]["path"]).rglob("*") if p.is_file() and p.name != "zarr.json")
        chunk.write_bytes(chunk.read_bytes()[::-1])
    else:
        raw = json.loads((cache / MANIFEST).read_text())
        if damage == "version":
            raw["format_version"] = 99
        else:  # a hand edit that even recomputes the digest
            raw["splits"]["validation"]["shards"][0]["parquet"] = "../../etc/passwd"
            raw[DIGEST_KEY] = manifest_digest(raw)
        (cache / MANIFEST).write_text(json.dumps(raw))
    r = verify_cache(cache)
    assert not r.ok
    assert any(expect in p for p in r.problems), r.problems


def test_info_reports_bytes_per_example(cache):
    info = cache_info(cache)
    assert info["rows"] == sum(s["rows"] for s in info["splits"].values())
    assert info["bytes_per_example"] == pytest.approx(info["bytes"] / info["rows"], abs=0.1)
    proc = kdcache("info", cache, "--json")
    assert proc.returncode == 0 and json.loads(proc.stdout)[0]["fingerprint"] == info["fingerprint"]
