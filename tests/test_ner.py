"""Token classification: CoNLL reading, word alignment against a plain unbatched teacher call (every covered word
gets exactly its first sub-token's logits; truncated words are counted), entity F1 by conlleval rules, taggers."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import zarr
from transformers import AutoModelForTokenClassification, AutoTokenizer

from conftest import REPO, require_shared_data, undocumented
from kdcache.cache.format import CacheFormatError, read_manifest
from kdcache.cache.verify import verify_cache
from kdcache.capture.build import build_teacher_cache
from kdcache.config import ConfigError, DataConfig, load_pipeline
from kdcache.data import CONLL_TAGS, DataError, load_task_data, read_conll
from kdcache.metrics import entity_f1, entity_spans
from kdcache.train.loop import train_students
from kdcache.cache.reader import CacheDataset, CacheMismatchError
from kdcache.report import build_report

NER_TINY = str(REPO / "pipelines" / "ner-tiny" / "pipeline.yaml")


@pytest.fixture(scope="module")
def ner_cache(tmp_path_factory):
    require_shared_data("conll2003")
    tmp = tmp_path_factory.mktemp("ner")
    pipeline = load_pipeline(NER_TINY)
    manifest = build_teacher_cache(pipeline, "conll", tmp / "cache", tmp / "teachers")
    return tmp, pipeline, manifest


def test_conll2003_reads_the_documented_counts():
    require_shared_data("conll2003")
    d = load_task_data(DataConfig(source="conll2003"))
    assert {k: len(v) for k, v in d.splits.items()} == {"train": 14041, "validation": 3250, "test": 3453}
    assert sum(len(w) for w in d.splits["test"]["words"][:]) == 46435, "-DOCSTART- lines are dropped"
    assert d.label_names == CONLL_TAGS


def test_conll_bad_tag_names_file_and_line(tmp_path):
    p = tmp_path / "bad.txt.gz"
    with gzip.open(p, "wt") as f:
        f.write("-DOCSTART- O\n\nEU B-ORG\nrejects O\nGerman B-MISCC\n\n")
    with pytest.raises(DataError, match=r"bad.txt.gz:5: tag 'B-MISCC'"):
        read_conll(p, "x")


@pytest.mark.parametrize("tags, spans", [
    (["B-PER", "I-PER", "O", "B-LOC"], {("PER", 0, 1), ("LOC", 3, 3)}),
    (["I-ORG", "I-ORG", "O"], {("ORG", 0, 1)}),                       # I- after O starts an entity (conlleval)
    (["B-PER", "I-LOC", "I-LOC"], {("PER", 0, 0), ("LOC", 1, 2)}),   # a type change ends one, starts another
    (["B-MISC", "B-MISC"], {("MISC", 0, 0), ("MISC", 1, 1)}),
    (["O", "O"], set()),
])
def test_entity_spans_follow_conlleval(tags, spans):
    assert entity_spans(tags) == spans


def test_entity_f1_counts_exact_matches_only():
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG"]]
    pred = [["B-PER", "O", "O", "B-LOC"], ["B-ORG"]]             # one boundary error
    r = entity_f1(gold, pred)
    assert r["precision"] == pytest.approx(2 / 3) and r["recall"] == pytest.approx(2 / 3)
    assert entity_f1(gold, gold)["f1"] == 1.0


def test_every_word_gets_its_first_subtoken_logits_and_truncation_is_counted(ner_cache):
    tmp, pipeline, manifest = ner_cache
    assert verify_cache(tmp / "cache").ok
    folder = tmp / "teachers" / "ner-tiny" / "conll"
    model = AutoModelForTokenClassification.from_pretrained(folder).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    m = read_manifest(tmp / "cache")
    assert not undocumented(m), "every manifest field of a token cache is in docs/cache-format.md"
    table = pq.read_table([str(tmp / "cache" / s["parquet"]) for s in m["splits"]["validation"]["shards"]])
    max_length, C = pipeline.tasks["conll"].cache.max_length, len(CONLL_TAGS)
    uncovered = truncated = 0
    for words, logits, covered in zip(table.column("words").to_pylist(), table.column("logits").to_pylist(),
                                      table.column("covered_words").to_pylist()):
        enc = tok(words, is_split_into_words=True, truncation=True, max_length=max_length, return_tensors="pt")
        with torch.inference_mode():
            ref = model(**enc).logits[0].numpy()            # one sentence, no padding, no batching
        word_ids = enc.word_ids(0)
        first = [word_ids.index(w) for w in range(len(words)) if w in word_ids]
        assert covered == len(first)
        np.testing.assert_allclose(np.asarray(logits).reshape(-1, C), ref[first], rtol=1e-4, atol=1e-5)
        uncovered += len(words) - covered
        truncated += covered < len(words)
    stats = m["splits"]["validation"]["stats"]
    assert truncated > 0, "max_length 24 must cut some sentences"
    assert stats["uncovered_words"] == uncovered and stats["truncated_rows"] == truncated


@pytest.fixture(scope="module")
def ner_feature_cache(ner_cache):
    """The same teacher (reused from ner_cache) cached again with per-word features of layers 1 and -1."""
    tmp, _, _ = ner_cache
    pipeline = load_pipeline(NER_TINY, ["tasks.conll.cache.features.layers=[1,-1]",
                                        "tasks.conll.cache.features.pooling=words",
                                        "tasks.conll.cache.features.dtype=float32"])
    manifest = build_teacher_cache(pipeline, "conll", tmp / "cache-feat", tmp / "teachers")
    return tmp, pipeline, manifest


def test_word_features_are_each_covered_words_first_subtoken_hidden_state(ner_feature_cache):
    tmp, pipeline, m = ner_feature_cache
    cache = tmp / "cache-feat"
    assert verify_cache(cache).ok
    assert m["features"]["layers"] == [1, 2] and m["features"]["pooling"] == "words" and m["features"]["hidden_size"] == 32
    assert m["fingerprint"] != read_manifest(tmp / "cache")["fingerprint"], "features change the fingerprint"
    folder = tmp / "teachers" / "ner-tiny" / "conll"
    model = AutoModelForTokenClassification.from_pretrained(folder).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    max_length = pipeline.tasks["conll"].cache.max_length
    split, r = m["splits"]["validation"], 0
    for shard in split["shards"]:
        table = pq.read_table(cache / shard["parquet"])
        g = zarr.open_group(str(cache / shard["features"]["path"]), mode="r")
        off = g["offsets"][:]
        assert off[0] == 0 and np.array_equal(np.diff(off), table.column("covered_words").to_numpy())
        for k, words in enumerate(table.column("words").to_pylist()):
            enc = tok(words, is_split_into_words=True, truncation=True, max_length=max_length, return_tensors="pt")
            with torch.inference_mode():
                hidden = model(**enc, output_hidden_states=True).hidden_states  # unbatched reference
            word_ids = enc.word_ids(0)
            first = [word_ids.index(w) for w in range(len(words)) if w in word_ids]
            for j in (1, 2):
                np.testing.assert_allclose(g[f"layer_{j}"][off[k]:off[k + 1]], hidden[j][0, first].numpy(),
                                           rtol=1e-4, atol=1e-5)
            r += 1
    assert r == split["rows"]
    # the streaming reader hands each sentence its own [covered_words, H] block
    ds = CacheDataset(str(cache), "validation", feature_layers=(2,))
    rows = list(ds)
    assert len(rows) == split["rows"]
    flat = np.concatenate([zarr.open_group(str(cache / s["features"]["path"]), mode="r")["layer_2"][:]
                           for s in split["shards"]])
    np.testing.assert_array_equal(np.concatenate([x["features"]["layer_2"] for x in rows]), flat)
    assert all(x["features"]["layer_2"].shape == (x["covered_words"], 32) for x in rows)


def test_word_features_need_words_pooling_at_load():
    with pytest.raises(ConfigError, match=r"`tasks.conll.cache.features.pooling` = 'cls': a token-classification "
                                          r"teacher keeps words"):
        load_pipeline(NER_TINY, ["tasks.conll.cache.features.layers=[-1]"])  # pooling left at cls


def test_a_tagger_learns_the_cached_word_features(ner_feature_cache):
    """A feature term (cosine to the teacher's last layer, through a learned projection) trains next to KD; its
    loss falls over epochs; the checkpoint holds the tagger alone; a layer that is not cached is refused."""
    tmp, pipeline, _ = ner_feature_cache
    pipeline = load_pipeline(NER_TINY, [
        "tasks.conll.cache.features.layers=[1,-1]", "tasks.conll.cache.features.pooling=words",
        "tasks.conll.cache.features.dtype=float32", "train.epochs=4",
        'students.bilstm-tagger.loss={"kind": "kl", "temperature": 2.0, "alpha": 0.5, '
        '"features": [{"teacher_layer": 2, "kind": "cosine", "weight": 1.0}]}'])
    res = {r["run"]: r for r in train_students(pipeline, ["bilstm-tagger"], {"conll": str(tmp / "cache-feat")},
                                               tmp / "runs-feat")}
    curve = [e["feature_loss"] for e in res["bilstm-tagger"]["epochs"]]
    assert curve[-1] < curve[0] * 0.8, curve
    assert "feature_loss" not in res["bilstm-tagger-hard"]["epochs"][0]
    state = torch.load(tmp / "runs-feat" / "bilstm-tagger" / "checkpoint" / "student.pt")
    assert not any(k.startswith("projections") for k in state)
    with pytest.raises(CacheFormatError, match=r"teacher layer\(s\) \[2\] are not cached"):
        train_students(pipeline, ["bilstm-tagger"], {"conll": str(tmp / "cache")}, tmp / "runs-nofeat")


def test_taggers_train_with_twins_and_the_report_shows_entity_f1(ner_cache):
    tmp, pipeline, _ = ner_cache
    runs = tmp / "runs"
    res = {r["run"]: r for r in train_students(pipeline, ["bilstm-tagger", "transformer-tagger"],
                                               {"conll": str(tmp / "cache")}, runs)}
    assert set(res) == {"bilstm-tagger", "bilstm-tagger-hard", "transformer-tagger", "transformer-tagger-hard"}
    for r in res.values():
        assert 0.0 <= r["test"]["f1"] <= 1.0 and r["test"]["rows"] == 80
        assert (runs / r["run"] / "checkpoint" / "student.pt").is_file()
    assert res["bilstm-tagger"]["kd"] and not res["bilstm-tagger-hard"]["kd"]
    text = build_report(runs, tmp / "cache", "test").read_text()
    assert "test entity F1" in text and "bilstm-tagger-hard" in text and "teacher (" in text
    assert (runs / "report.png").stat().st_size > 0


def test_tagger_loss_uses_each_word_for_what_it_has():
    """Gold tag + teacher: α·CE + (1-α)·KD; gold only (beyond max_length): CE; teacher only (label-scarce): KD;
    a hard-label twin on a batch without gold tags gets a zero loss, not NaN."""
    import torch.nn.functional as F

    from kdcache.config import LossConfig
    from kdcache.train.losses import dense_kd_loss_per_row
    from kdcache.train.tokens import tagger_loss
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(1, 4, 3, generator=g), torch.randn(1, 4, 3, generator=g)
    tags = torch.tensor([[2, 0, -1, -1]])                   # word 3 is padding (no tag, not covered)
    covered = torch.tensor([[True, False, True, False]])
    loss = LossConfig(kind="kl", temperature=2.0, alpha=0.3)
    ce = F.cross_entropy(s[0], tags[0].clamp_min(0), reduction="none")
    kd = dense_kd_loss_per_row(s[0], t[0], "kl", 2.0)
    want = ((0.3 * ce[0] + 0.7 * kd[0]) + ce[1] + kd[2]) / 3
    got, _ = tagger_loss(s, tags, t, covered, loss)
    torch.testing.assert_close(got, want)
    hard, _ = tagger_loss(s, tags, t, covered, LossConfig(alpha=1.0))
    torch.testing.assert_close(hard, (ce[0] + ce[1]) / 2)
    none, _ = tagger_loss(s, torch.full_like(tags, -1), t, covered, LossConfig(alpha=1.0))
    assert none.item() == 0.0


def test_labelled_limit_keeps_gold_tags_for_the_first_sentences_only():
    require_shared_data("conll2003")
    d = load_task_data(DataConfig(source="conll2003", limit=50, labelled_limit=20))
    tags = d.splits["train"]["tags"][:]
    assert all(min(t) >= 0 for t in tags[:20]) and all(set(t) == {-1} for t in tags[20:])
    assert all(min(t) >= 0 for t in d.splits["test"]["tags"][:]), "evaluation splits keep every tag"


def test_fidelity_on_a_token_task_compares_entity_f1_in_both_settings(tmp_path):
    require_shared_data("conll2003")
    from kdcache.experiments.fidelity import run_fidelity
    res = run_fidelity(NER_TINY, [0], ["bilstm-tagger"], 30, tmp_path / "fid", tmp_path / "f.md",
                       teachers_dir=tmp_path / "teachers", cache_root=tmp_path / "caches", overrides=["train.epochs=1"])
    assert res["metric"][0] == "f1"
    scarce = res["settings"]["30 labelled training rows"]
    assert scarce["labelled_train_rows"] == 30 < scarce["train_rows"]
    for s in res["settings"].values():
        v = s["students"]["bilstm-tagger"]
        assert len(v["kd"]) == len(v["hard"]) == 1 and 0.0 <= v["kd"][0] <= 1.0
    assert "test entity F1" in (tmp_path / "f.md").read_text()


def test_the_sweep_runs_on_a_token_task_with_a_per_word_feature_variant(ner_cache):
    """`kdcache fidelity ner-tiny --sweep bilstm-tagger` with word features cached: every variant, entity F1."""
    from kdcache.experiments.fidelity import SWEEP, run_sweep
    tmp, _, _ = ner_cache
    sets = ["tasks.conll.cache.features.layers=[-1]", "tasks.conll.cache.features.pooling=words", "train.epochs=1"]
    res = run_sweep(NER_TINY, "bilstm-tagger", [0], tmp / "sweep", tmp / "sweep.md", teachers_dir=tmp / "teachers",
                    cache_root=tmp / "sweep-caches", overrides=sets)
    assert list(res["rows"]) == list(SWEEP) and res["metric"][0] == "f1"
    runs = {p.parent.name: json.loads(p.read_text()) for p in (tmp / "sweep" / "runs" / "sweep" / "0").glob("*/metrics.json")}
    feat = [r for r in runs.values() if r["loss"]["features"]]
    assert len(feat) == 1 and "feature_loss" in feat[0]["epochs"][0]
    assert sorted(r["loss"]["alpha"] for r in runs.values()) == sorted(c["alpha"] for c in SWEEP.values())
    text = (tmp / "sweep.md").read_text()
    assert "| variant | test entity F1 |" in text and "--set tasks.conll.cache.features.pooling=words" in text


def test_two_process_capture_of_a_token_task_equals_the_single_process_cache(ner_feature_cache):
    """`accelerate launch --num_processes 2 kdcache cache ner-tiny`: shards dealt to two real processes give the
    same rows, tags, per-word logits and per-word features as one process."""
    tmp, _, _ = ner_feature_cache
    sets = ["--set", "tasks.conll.cache.features.layers=[1,-1]", "--set", "tasks.conll.cache.features.pooling=words",
            "--set", "tasks.conll.cache.features.dtype=float32"]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
           "-m", "kdcache.cli", "cache", NER_TINY, "--out", str(tmp / "mp"), "--teachers-dir", str(tmp / "teachers"),
           *sets]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ), cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = tmp / "cache-feat", tmp / "mp" / "conll"
    ma, mb = read_manifest(one), read_manifest(two)
    assert mb["processes"] == 2 and ma["fingerprint"] == mb["fingerprint"] and verify_cache(two).ok
    for split, s in ma["splits"].items():
        shards = mb["splits"][split]["shards"]
        assert [x["rows"] for x in s["shards"]] == [x["rows"] for x in shards]
        for x, y in zip(s["shards"], shards):
            ta, tb = pq.read_table(one / x["parquet"]), pq.read_table(two / y["parquet"])
            assert ta.drop(["logits"]).equals(tb.drop(["logits"]))
            np.testing.assert_allclose(np.concatenate(ta.column("logits").to_numpy(zero_copy_only=False)),
                                       np.concatenate(tb.column("logits").to_numpy(zero_copy_only=False)), atol=1e-5)
            ga, gb = (zarr.open_group(str(c / sh["features"]["path"]), mode="r") for c, sh in ((one, x), (two, y)))
            assert np.array_equal(ga["offsets"][:], gb["offsets"][:])
            np.testing.assert_allclose(ga["layer_2"][:], gb["layer_2"][:], atol=1e-5)


def test_the_report_flags_runs_trained_before_the_cache_was_refreshed(ner_cache):
    """Refresh a cache (here: rebuilt with word features, as after a teacher update) under runs trained on the old
    one: the report names them as stale until they are retrained."""
    import shutil
    tmp, pipeline, _ = ner_cache
    cache, runs = tmp / "refresh", tmp / "runs-refresh"
    shutil.copytree(tmp / "cache", cache)
    quick = load_pipeline(NER_TINY, ["train.epochs=1"])
    train_students(quick, ["bilstm-tagger"], {"conll": str(cache)}, runs)
    assert "Stale runs" not in build_report(runs, cache, "test").read_text()
    refreshed = load_pipeline(NER_TINY, ["tasks.conll.cache.features.layers=[-1]",
                                         "tasks.conll.cache.features.pooling=words"])
    build_teacher_cache(refreshed, "conll", cache, tmp / "teachers", overwrite=True)
    text = build_report(runs, cache, "test").read_text()
    assert "**Stale runs**: bilstm-tagger, bilstm-tagger-hard were trained on an earlier cache" in text
    assert read_manifest(cache)["fingerprint"][:12] in text
    train_students(quick, ["bilstm-tagger"], {"conll": str(cache)}, runs)
    assert "Stale runs" not in build_report(runs, cache, "test").read_text()


def test_a_tagger_refuses_a_cache_built_for_other_data(ner_cache):
    tmp, _, _ = ner_cache
    other = load_pipeline(NER_TINY, ["tasks.conll.data.limit=81", "train.epochs=1"])
    with pytest.raises(CacheMismatchError, match=r"data.limit: cache has 80, pipeline expects 81.*kdcache cache"):
        train_students(other, ["bilstm-tagger"], {"conll": str(tmp / "cache")}, tmp / "runs-other")
