"""Transfer sets (data.augment, students' `transfer`): each augmentation operation does what it says on real SST-2
phrases, draws are reproducible per seed, augmented rows stay with their parent's split and fold, the fingerprint
covers the settings, and a KD student reads the unlabelled variants while its hard-label twin does not."""

from __future__ import annotations

import random
from dataclasses import replace

import pyarrow.parquet as pq
import pytest
import torch

from conftest import REPO, build, require_shared_data, tiny_pipeline
from kdcache.data.augment import AugmentError, Sampler, augment_split, pos_lexicon, tokens, variant
from kdcache.capture.folds import fold_of
from kdcache.config import AugmentConfig, ConfigError, load_pipeline
from kdcache.data import DataError, load_task_data
from kdcache.train.loop import train_students

AUG = ["tasks.topic.data.augment.n_iter=3", "tasks.topic.data.augment.p_ng=0.5"]


@pytest.fixture(scope="module")
def lexicon() -> str:
    return str(require_shared_data("conll2003") / "train.txt.gz")


@pytest.fixture(scope="module")
def phrases(lexicon):
    """500 real SST-2 training phrases, normalised as a task's split."""
    require_shared_data("sst2")
    data = load_task_data(load_pipeline(str(REPO / "pipelines" / "sst2" / "pipeline.yaml"),
                                        ["tasks.sst2.data.limit=500"]).tasks["sst2"].data)
    return data.splits["train"]


def _draws(phrases, lexicon, settings, repeats=4):
    lex = pos_lexicon(lexicon)
    texts = [tokens(t) for t in phrases["text"][:]]
    sampler = Sampler.build(texts, lex)
    rng = random.Random(0)
    return lex, [(t, variant(t, rng, settings, lex, sampler)) for t in texts for _ in range(repeats)]


def test_masking_hits_about_p_mask_of_the_words(phrases, lexicon):
    settings = AugmentConfig(p_mask=0.2, p_pos=0.0, p_ng=0.0)
    _, pairs = _draws(phrases, lexicon, settings)
    words = [(a, b) for t, v in pairs for a, b in zip(t, v) if a[0].isalnum()]
    masked = sum(b == "[MASK]" for _, b in words) / len(words)
    assert len(words) > 10_000 and abs(masked - 0.2) < 0.015, masked
    assert all(a == b for t, v in pairs for a, b in zip(t, v) if not a[0].isalnum()), "punctuation is never masked"


def test_replacements_keep_the_part_of_speech(phrases, lexicon):
    lex, pairs = _draws(phrases, lexicon, AugmentConfig(p_mask=0.0, p_pos=1.0, p_ng=0.0))
    changed = tagged = 0
    for t, v in pairs:
        assert len(t) == len(v)
        for a, b in zip(t, v):
            if a.lower() in lex:
                tagged += 1
                assert lex[b.lower()] == lex[a.lower()], (a, b)
                changed += a != b
            else:
                assert a == b, "a word the lexicon does not tag is kept"
    assert tagged > 5_000 and changed / tagged > 0.5


def test_ngrams_are_contiguous_spans_of_the_parent(phrases, lexicon):
    _, pairs = _draws(phrases, lexicon, AugmentConfig(p_mask=0.0, p_pos=0.0, p_ng=1.0, max_ngram=5))
    for t, v in pairs:
        n = len(v)
        assert 1 <= n <= 5 and any(t[i:i + n] == v for i in range(len(t) - n + 1)), (t, v)


def test_augmentation_is_reproducible_per_seed_and_drops_duplicates(phrases, lexicon):
    small = phrases.select(range(100))
    a, stats = augment_split(small, "text", AugmentConfig(n_iter=5), lexicon)
    b, _ = augment_split(small, "text", AugmentConfig(n_iter=5), lexicon)
    c, _ = augment_split(small, "text", AugmentConfig(n_iter=5, seed=1), lexicon)
    assert a["text"][:] == b["text"][:] and a["id"][:] == b["id"][:]
    assert a["text"][:] != c["text"][:]
    assert stats.parents == 100 and 0 < stats.variants == len(a) <= 500 and stats.pos_coverage > 0.5
    assert set(a["label"][:]) == {-1}, "variants are unlabelled"
    parents = dict(zip(small["id"][:], small["text"][:]))
    seen = {}
    for i, p, text in zip(a["id"][:], a["parent"][:], a["text"][:]):
        assert i.startswith(f"{p}~") and p in parents
        assert text != " ".join(tokens(parents[p])) and text not in seen.setdefault(p, set())
        seen[p].add(text)
    # a row's variants depend on its own id and the seed only, not on what else the split holds
    alone, _ = augment_split(small.select([7]), "text", AugmentConfig(n_iter=5), lexicon)
    assert alone["text"][:] == [t for t, p in zip(a["text"][:], a["parent"][:]) if p == small["id"][7]]


def test_lexicon_reads_conll_pos_and_names_a_bad_line(tmp_path):
    f = tmp_path / "pos.txt"
    f.write_text("-DOCSTART- -X- -X- O\n\nRuns VBZ B-VP O\nruns NNS B-NP O\nruns VBZ B-VP O\n. . O O\n")
    assert pos_lexicon(str(f)) == {"runs": "VBZ"}, "most frequent tag, lowercased, punctuation left out"
    bad = tmp_path / "bad.txt"
    bad.write_text("word NN\nlonely\n")
    with pytest.raises(AugmentError, match=r"bad.txt:2"):
        pos_lexicon(str(bad))
    with pytest.raises(AugmentError, match="not found"):
        pos_lexicon(str(tmp_path / "missing.txt"))


def test_settings_are_checked_at_load():
    with pytest.raises(ConfigError, match="p_mask \\+ p_pos"):
        tiny_pipeline("tasks.topic.data.augment.p_mask=0.6", "tasks.topic.data.augment.p_pos=0.6")
    with pytest.raises(ConfigError, match="augment.into"):
        tiny_pipeline("tasks.topic.data.augment.into=train")
    with pytest.raises(ConfigError, match="transfer"):
        tiny_pipeline("students.bow.transfer=[train]")
    ner = str(REPO / "pipelines" / "ner-tiny" / "pipeline.yaml")
    with pytest.raises(ConfigError, match="sequence-classification"):
        load_pipeline(ner, ["tasks.conll.data.augment.n_iter=2"])
    with pytest.raises(DataError, match="augment.split"):
        cfg = tiny_pipeline().tasks["topic"].data
        load_task_data(replace(cfg, augment=AugmentConfig(split="nope")))


def _split(cache, m, split):
    return pq.read_table([str(cache / s["parquet"]) for s in m["splits"][split]["shards"]])


def test_augmented_rows_stay_with_their_parent_split_and_fold(tmp_path, lexicon):
    cache, m = build(tmp_path, *AUG, "tasks.topic.teacher.finetune.folds=2")
    train, transfer = _split(cache, m, "train"), _split(cache, m, "transfer")
    assert m["augment"]["n_iter"] == 3 and m["fingerprint_inputs"]["data"]["augment"]["p_ng"] == 0.5
    assert transfer.num_rows > 0 and set(transfer.column("label").to_pylist()) == {None}
    parents = transfer.column("parent").to_pylist()
    others = {i for s in ("validation", "test") for i in _split(cache, m, s).column("id").to_pylist()}
    assert set(parents) <= set(train.column("id").to_pylist()) and not set(parents) & others
    assert set(train.column("parent").to_pylist()) == {None}
    # each variant is labelled by the fold teacher that never saw its parent
    assert transfer.column("teacher_fold").to_pylist() == fold_of(parents, 2).tolist()
    # the fingerprint covers the augmentation: another seed, another cache
    _, other = build(tmp_path / "seed1", *AUG, "tasks.topic.data.augment.seed=1", teachers=tmp_path / "teachers")
    assert other["fingerprint"] != m["fingerprint"]


def test_kd_students_read_the_transfer_split_and_their_twins_do_not(tmp_path, teachers_dir):
    over = [*AUG, "students.bow.transfer=[transfer]", "train.epochs=1"]
    cache, m = build(tmp_path, *over, teachers=teachers_dir)
    results = {r["run"]: r for r in train_students(tiny_pipeline(*over), ["bow", "bilstm"], {"topic": str(cache)},
                                                   tmp_path / "runs")}
    train_rows, transfer_rows = m["splits"]["train"]["rows"], m["splits"]["transfer"]["rows"]
    kd, hard = results["bow"], results["bow-hard"]
    assert kd["transfer"] == {"transfer": transfer_rows}
    assert kd["epochs"][0]["train_rows_per_process"] == [train_rows + transfer_rows]
    assert "transfer" not in hard and hard["epochs"][0]["train_rows_per_process"] == [train_rows]
    assert results["bilstm"]["epochs"][0]["train_rows_per_process"] == [train_rows], "students without transfer"
    with pytest.raises(ConfigError, match="no cached split 'extra'"):
        train_students(tiny_pipeline(*AUG, "students.bow.transfer=[extra]"), ["bow"], {"topic": str(cache)},
                       tmp_path / "runs2")


EXTRA = "tasks.topic.data.extra={unl: {source: bbc_news, split: test, label_field: null}, " \
        "other: {source: bbc_news, split: validation, limit: 40}}"


def test_extra_splits_from_other_sources_fine_tune_the_teacher_and_train_students(tmp_path):
    """A teacher fine-tuned on another source's labelled rows (cached as split `other`) labels the task's text; a
    student can train on `other` (its own train_split) or read the unlabelled `unl` rows as a transfer set."""
    over = [EXTRA, "tasks.topic.teacher.finetune.train_split=other", "students.bow.train_split=other",
            "students.bilstm.transfer=[unl]", "train.epochs=1"]
    cache, m = build(tmp_path, *over)
    assert m["splits"]["unl"]["rows"] == 60 and m["splits"]["other"]["rows"] == 40
    unl, other = _split(cache, m, "unl"), _split(cache, m, "other")
    assert set(unl.column("label").to_pylist()) == {None} and m["splits"]["unl"]["stats"]["mean_confidence"] > 0
    assert all(i.startswith("unl/") for i in unl.column("id").to_pylist())
    assert None not in other.column("label").to_pylist() and m["splits"]["other"]["stats"]["teacher_accuracy"] is not None
    record = (tmp_path / "teachers" / "tiny" / "topic" / "kdcache-teacher.json").read_text()
    assert '"train_rows": 40' in record, "the teacher fine-tuned on the extra split's labelled rows"
    results = {r["run"]: r for r in train_students(tiny_pipeline(*over), ["bow", "bilstm"], {"topic": str(cache)},
                                                   tmp_path / "runs")}
    assert results["bow"]["train_split"] == "other" and results["bow-hard"]["train_split"] == "other"
    assert results["bow"]["epochs"][0]["train_rows_per_process"] == [40]
    assert results["bilstm"]["epochs"][0]["train_rows_per_process"] == [60 + 60]
    assert "train_split" not in results["bilstm"]


def test_extra_splits_must_use_the_task_labels():
    with pytest.raises(DataError, match="label_names"):
        load_task_data(tiny_pipeline("tasks.topic.data.extra={x: {source: rotten_tomatoes, limit: 5}}")
                       .tasks["topic"].data)
    with pytest.raises(DataError, match="not a split"):
        load_task_data(tiny_pipeline("tasks.topic.data.extra={x: {source: bbc_news, split: nope}}")
                       .tasks["topic"].data)
    with pytest.raises(ConfigError, match="must be a plain name"):
        tiny_pipeline("tasks.topic.data.extra={a/b: {source: bbc_news}}")


def test_unlabelled_rows_learn_from_kd_alone():
    """A transfer row (label -1) contributes its KD term only, whatever alpha: the same loss as alpha = 0."""
    from kdcache.train.losses import distillation_loss
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(8, 3, generator=g), torch.randn(8, 3, generator=g)
    unlabelled = torch.full((8,), -1)
    for alpha in (0.25, 0.5, 0.9):
        torch.testing.assert_close(distillation_loss(s, t, unlabelled, "kl", 2.0, alpha)[0],
                                   distillation_loss(s, t, torch.zeros(8, dtype=torch.long), "kl", 2.0, 0.0)[0])
    assert distillation_loss(s, t, unlabelled, "kl", 2.0, 1.0)[0] == 0, "a hard-label run learns nothing from them"


def test_label_map_reads_another_domains_topics_in_the_teachers_label_set():
    """BBC News -> SIB-200: science/technology read as tech, topics the teacher lacks dropped, nothing else lost."""
    import csv
    import gzip
    root = require_shared_data("sib200") / "eng_Latn"
    p = load_pipeline("bbc-to-sib200")
    data = load_task_data(p.tasks["topic"].data)
    names = data.label_names
    assert names == ("business", "entertainment", "politics", "sports", "tech")
    with gzip.open(root / "test.tsv.gz", "rt") as f:
        raw = {r["index_id"]: r["category"] for r in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)}
    test = data.splits["test"]
    expect = {i: {"science/technology": "tech"}.get(c, c) for i, c in raw.items()
              if c not in ("travel", "health", "geography")}
    assert dict(zip(test["id"][:], (names[y] for y in test["label"][:]))) == expect
    assert len(data.splits["news"]) > 1000 and set(data.splits["news"]["label"][:]) == set(range(5))
    everything_dropped = {c: None for c in set(raw.values())}
    with pytest.raises(DataError, match="label_map drops every row"):
        load_task_data(replace(p.tasks["topic"].data, label_map=everything_dropped, extra={}))
