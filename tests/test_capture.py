"""Stage one against simple references: cached logits and features equal a fresh, unbatched teacher forward."""

from __future__ import annotations

import hashlib
import json
import shutil

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import zarr
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from conftest import build
from kdcache.cache.format import DIGEST_KEY, MANIFEST, RECORDS_DIR, CacheFormatError, manifest_digest, read_manifest
from kdcache.cache.reader import CacheDataset
from kdcache.cache.verify import verify_cache
from kdcache.cache.writer import CacheConflictError, CacheWriteError
from kdcache.fingerprint import hash_ids, hash_obj, hash_weight_files


def read_split(cache, split):
    m = read_manifest(cache)
    return pq.read_table([str(cache / s["parquet"]) for s in m["splits"][split]["shards"]]), m


def load_teacher(teachers_dir):
    folder = teachers_dir / "tiny" / "topic"
    return AutoModelForSequenceClassification.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)


@torch.inference_mode()
def reference_forward(model, tok, text, max_length=64):
    """One example, no padding, no batching: the simplest possible teacher call."""
    enc = tok(text, truncation=True, max_length=max_length, return_tensors="pt")
    out = model(**enc, output_hidden_states=True)
    return enc["input_ids"][0].numpy(), out.logits[0].numpy(), [h[0].numpy() for h in out.hidden_states]


def test_cached_logits_and_pooled_features_equal_fresh_forward(tiny_cache, teachers_dir):
    model, tok = load_teacher(teachers_dir)
    for split in ("train", "test"):
        table, m = read_split(tiny_cache, split)
        assert table.num_rows == m["splits"][split]["rows"] > 0
        cached = np.stack(table.column("logits").to_numpy(zero_copy_only=False))
        layers = m["features"]["layers"]
        assert layers == [1, 2]  # [1, -1] resolved against a 2-layer teacher
        feats = {j: np.concatenate([zarr.open_group(str(tiny_cache / s["features"]["path"]), mode="r")[f"layer_{j}"][:]
                                    for s in m["splits"][split]["shards"]]) for j in layers}
        for r, text in enumerate(table.column("text").to_pylist()):
            ids, logits, hidden = reference_forward(model, tok, text)
            np.testing.assert_allclose(cached[r], logits, atol=1e-5, rtol=1e-5)
            assert table.column("input_hash")[r].as_py() == hash_ids(ids)
            assert table.column("num_tokens")[r].as_py() == len(ids)
            for j in layers:
                assert feats[j].dtype == np.float16
                np.testing.assert_allclose(feats[j][r], hidden[j].mean(0), atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("pooling", ["cls", "tokens"])
def test_cls_and_per_token_features_equal_hidden_states(tmp_path, teachers_dir, pooling):
    cache, m = build(tmp_path, f"tasks.topic.cache.features.pooling={pooling}",
                     "tasks.topic.cache.features.dtype=float32", teachers=teachers_dir)
    model, tok = load_teacher(teachers_dir)
    split = m["splits"]["validation"]
    texts = pq.read_table([str(cache / s["parquet"]) for s in split["shards"]]).column("text").to_pylist()
    r = 0
    for shard in split["shards"]:
        g = zarr.open_group(str(cache / shard["features"]["path"]), mode="r")
        for k in range(shard["rows"]):
            _, _, hidden = reference_forward(model, tok, texts[r])
            for j in (1, 2):
                got = g[f"layer_{j}"]
                if pooling == "cls":
                    np.testing.assert_allclose(got[k], hidden[j][0], atol=1e-5)
                else:
                    off = g["offsets"][:]
                    assert off[-1] == got.shape[0]
                    np.testing.assert_allclose(got[off[k]:off[k + 1]], hidden[j], atol=1e-5)
            r += 1
    assert r == split["rows"]


def test_manifest_fields_and_checksums(tiny_cache, teachers_dir):
    m = read_manifest(tiny_cache)
    assert m["format"] == "kdcache-cache" and m["format_version"] == 2
    assert m["fingerprint"] == hash_obj(m["fingerprint_inputs"])
    fi = m["fingerprint_inputs"]
    assert fi["teacher"]["weights_sha256"] == hash_weight_files(teachers_dir / "tiny" / "topic")
    assert fi["max_length"] == 64 and fi["compute_dtype"] == "float32"
    assert m["label_names"] == ["business", "entertainment", "politics", "sports", "tech"]
    total_bytes = 0
    for split, s in m["splits"].items():
        start = 0
        for shard in s["shards"]:
            path = tiny_cache / shard["parquet"]
            assert shard["row_start"] == start
            assert shard["bytes"] == path.stat().st_size
            assert shard["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
            assert pq.ParquetFile(path).metadata.num_rows == shard["rows"]
            start += shard["rows"]
            total_bytes += shard["bytes"] + shard["features"]["bytes"]
        assert start == s["rows"]
        table, _ = read_split(tiny_cache, split)
        logits = np.stack(table.column("logits").to_numpy(zero_copy_only=False))
        labels = np.array(table.column("label").to_pylist())
        assert s["stats"]["teacher_accuracy"] == pytest.approx((logits.argmax(1) == labels).mean())
        p = torch.softmax(torch.from_numpy(logits), -1)
        assert s["stats"]["mean_entropy_nats"] == pytest.approx(float(-(p * p.log()).sum(1).mean()), rel=1e-5)
        assert table.column("row_id").to_pylist() == list(range(s["rows"]))
    assert m["totals"]["bytes"] == total_bytes
    records = sorted(p.name for p in (tiny_cache / RECORDS_DIR).rglob("*.json"))  # kept: repairs start from them
    assert records == sorted(["build.json"] + [f"{sh['name']}.json" for s in m["splits"].values() for sh in s["shards"]])


def test_datasets_reads_a_shard_without_kdcache(tiny_cache):
    m = read_manifest(tiny_cache)
    shard = m["splits"]["train"]["shards"][0]
    ds = datasets.load_dataset("parquet", data_files=str(tiny_cache / shard["parquet"]), split="train")
    assert len(ds) == shard["rows"]
    assert {"id", "text", "label", "logits", "input_hash"} <= set(ds.column_names)
    table = pq.read_table(tiny_cache / shard["parquet"])
    np.testing.assert_array_equal(np.array(ds["logits"][:], dtype=np.float32),
                                  np.stack(table.column("logits").to_numpy(zero_copy_only=False)))


def test_plain_engines_open_a_split_folder_as_it_is(tiny_cache):
    """A split folder holds Parquet only: pyarrow's and datasets' folder readers see exactly the split's rows."""
    import pyarrow.dataset as pads
    m = read_manifest(tiny_cache)
    for split, s in m["splits"].items():
        reference = pa.concat_tables(pq.read_table(tiny_cache / sh["parquet"]) for sh in s["shards"])
        folder = pads.dataset(tiny_cache / split, format="parquet").to_table().sort_by("row_id")
        assert folder.drop_columns([]).equals(reference.replace_schema_metadata(folder.schema.metadata)), split
        ds = datasets.load_dataset("parquet", data_dir=str(tiny_cache / split), split="train")
        assert sorted(ds["row_id"][:]) == list(range(s["rows"])) and sorted(ds["id"][:]) == sorted(
            reference.column("id").to_pylist())


def test_a_cache_of_the_earlier_layout_still_reads_and_verifies(tmp_path, tiny_cache):
    """Before 2026-11-27 the Zarr groups sat inside the split folders; the manifest's paths say where they are."""
    old = tmp_path / "old"
    shutil.copytree(tiny_cache, old)
    m = read_manifest(old)
    for split, s in m["splits"].items():
        (old / "features.zarr" / split).rename(old / split / "features.zarr")
        s["features_group"]["path"] = f"{split}/features.zarr/zarr.json"
        for sh in s["shards"]:
            sh["features"]["path"] = f"{split}/features.zarr/{sh['name']}"
            record = old / "_records" / split / f"{sh['name']}.json"  # as that layout wrote it: same path, no digest
            rec = json.loads(record.read_text())
            rec["features"]["path"] = sh["features"]["path"]
            rec.pop("record_sha256")
            record.write_text(json.dumps(rec))
    (old / "features.zarr").rmdir()
    m[DIGEST_KEY] = manifest_digest(m)
    (old / MANIFEST).write_text(json.dumps(m))
    assert verify_cache(old).ok, verify_cache(old).problems
    layers = tuple(m["features"]["layers"])
    new_rows = list(CacheDataset(str(tiny_cache), "train", feature_layers=layers))
    old_rows = list(CacheDataset(str(old), "train", feature_layers=layers))
    assert len(old_rows) == len(new_rows) == m["splits"]["train"]["rows"]
    for a, b in zip(old_rows, new_rows):
        assert a["features"].keys() == b["features"].keys() and len(a["features"]) == len(layers)
        for k in a["features"]:
            np.testing.assert_array_equal(a["features"][k], b["features"][k])


def test_interrupted_run_resumes_to_the_same_cache(tmp_path, teachers_dir, monkeypatch):
    reference, ref_m = build(tmp_path / "a", teachers=teachers_dir)

    import kdcache.cache.writer as writer
    real = writer._write_parquet
    calls = {"n": 0}

    def crash_on_third(path, table, row_group_rows):
        calls["n"] += 1
        if calls["n"] == 3:  # leave a half-written temporary file, as a crash mid-write would
            tmp = path.with_name(f".{path.name}.tmp-999")
            tmp.write_bytes(b"PAR1 half a shard")
            raise OSError("simulated crash while writing a shard")
        return real(path, table, row_group_rows)

    monkeypatch.setattr(writer, "_write_parquet", crash_on_third)
    out = tmp_path / "b"
    with pytest.raises(CacheWriteError, match=r"shard-00002 failed: simulated crash.*rerun the same command"):
        build(tmp_path / "b", teachers=teachers_dir, out=out)
    assert not (out / MANIFEST).exists()
    with pytest.raises(CacheFormatError, match="resume"):
        read_manifest(out)  # readers do not trust a cache without a manifest
    monkeypatch.setattr(writer, "_write_parquet", real)

    written = []
    monkeypatch.setattr(writer, "_write_parquet", lambda p, t, g: written.append(p.name) or real(p, t, g))
    _, m = build(tmp_path / "b", teachers=teachers_dir, out=out)
    assert len(written) == sum(len(s["shards"]) for s in m["splits"].values()) - 2  # the first two were kept
    assert not list(out.rglob(".*.tmp-*"))
    for split, s in ref_m["splits"].items():
        assert [(x["parquet"], x["sha256"], x["features"]["sha256"]) for x in s["shards"]] == \
               [(x["parquet"], x["sha256"], x["features"]["sha256"]) for x in m["splits"][split]["shards"]]
    assert m["fingerprint"] == ref_m["fingerprint"]


def test_rerun_of_a_finished_cache_writes_nothing(tmp_path, teachers_dir):
    out, m1 = build(tmp_path, teachers=teachers_dir)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    _, m2 = build(tmp_path, teachers=teachers_dir)
    assert m2 == m1
    assert before == {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}


def test_other_settings_are_refused_and_overwrite_replaces(tmp_path):
    teachers_dir = tmp_path / "teachers"  # max_length is part of the fine-tune key: keep the session teacher
    out, m1 = build(tmp_path, teachers=teachers_dir)
    with pytest.raises(CacheConflictError, match=r"max_length.*--overwrite"):
        build(tmp_path, "tasks.topic.cache.max_length=32", teachers=teachers_dir)
    with pytest.raises(CacheConflictError, match=r"features"):
        build(tmp_path, "tasks.topic.cache.features.layers=[1]", teachers=teachers_dir)
    assert json.loads((out / MANIFEST).read_text())["fingerprint"] == m1["fingerprint"]  # untouched
    _, m2 = build(tmp_path, "tasks.topic.cache.max_length=32", teachers=teachers_dir, overwrite=True)
    assert m2["fingerprint"] != m1["fingerprint"] and m2["fingerprint_inputs"]["max_length"] == 32
    table, _ = read_split(out, "train")
    assert max(table.column("num_tokens").to_pylist()) <= 32


def test_truncation_is_flagged_and_counted(tmp_path):
    teachers_dir = tmp_path / "teachers"
    _, m = build(tmp_path, "tasks.topic.cache.max_length=16", teachers=teachers_dir)
    table, _ = read_split(tmp_path / "cache", "train")
    tok = AutoTokenizer.from_pretrained(teachers_dir / "tiny" / "topic")
    full = [len(x) for x in tok(table.column("text").to_pylist())["input_ids"]]
    assert table.column("truncated").to_pylist() == [n > 16 for n in full]
    assert m["splits"]["train"]["stats"]["truncated_rows"] == sum(n > 16 for n in full)
