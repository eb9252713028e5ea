"""Several tasks in one pipeline (a classification and a token task, each with its own teacher): caches, single-task
students and a cross-task student (one encoder, a head and a loss weight per task) trained and reported together."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from conftest import REPO, require_shared_data
from kdcache.cache.format import read_manifest
from kdcache.config import ConfigError, load_pipeline

NER_TINY = str(REPO / "pipelines" / "ner-tiny" / "pipeline.yaml")


def test_a_pipeline_of_a_classification_and_a_token_task_caches_trains_and_reports_both(tmp_path):
    """Several tasks with their own teachers and heads in one pipeline: `kdcache cache` builds a cache per task,
    `kdcache train` trains each student on its task, and one report holds both tables."""
    from kdcache.cli import main
    require_shared_data("conll2003")
    tiny = yaml.safe_load((REPO / "pipelines" / "tiny" / "pipeline.yaml").read_text())
    ner = yaml.safe_load((REPO / "pipelines" / "ner-tiny" / "pipeline.yaml").read_text())
    tiny["tasks"]["topic"]["data"]["limit"] = 60
    tiny["tasks"]["topic"]["teacher"]["finetune"]["epochs"] = 2
    tiny["tasks"]["topic"]["teacher"]["sanity"] = {"enabled": False}  # a 60-row, 2-epoch teacher: no gate here
    mixed = {"name": "mixed", "tasks": {**tiny["tasks"], **ner["tasks"]},
             "train": {**tiny["train"], "epochs": 2},
             "students": {"bow": {**tiny["students"]["bow"], "task": "topic"},
                          "bilstm-tagger": {**ner["students"]["bilstm-tagger"], "task": "conll"},
                          "both": {"arch": "bilstm-multitask", "tasks": {"topic": 1.0, "conll": 0.5},
                                   "params": {"embed_dim": 32, "hidden": 32}},
                          "topic-only": {"arch": "bilstm-multitask", "tasks": {"topic": 1.0, "conll": 0.0},
                                         "params": {"embed_dim": 32, "hidden": 32}, "twin": False}}}
    path = tmp_path / "mixed.yaml"
    path.write_text(yaml.safe_dump(mixed))
    common = ["--teachers-dir", str(tmp_path / "teachers")]
    assert main(["cache", str(path), "--out", str(tmp_path / "cache"), *common]) == 0
    assert {read_manifest(tmp_path / "cache" / t)["head"] for t in ("topic", "conll")} == \
        {"sequence-classification", "token-classification"}
    assert main(["train", str(path), "--cache", str(tmp_path / "cache"), "--runs", str(tmp_path / "runs"),
                 *common]) == 0
    text = (tmp_path / "runs" / "report.md").read_text()
    assert "| test acc |" in text and "test entity F1" in text
    assert "bow (bow, KD)" in text and "bilstm-tagger (bilstm-tagger, KD)" in text
    assert (tmp_path / "runs" / "report.png").is_file() and (tmp_path / "runs" / "report-tokens.png").is_file()
    # the cross-task student: one model, both tasks' test metrics, a hard-label twin, a row in the report
    both = json.loads((tmp_path / "runs" / "both" / "metrics.json").read_text())
    twin = json.loads((tmp_path / "runs" / "both-hard" / "metrics.json").read_text())
    assert both["kd"] and not twin["kd"] and both["tasks"] == {"topic": 1.0, "conll": 0.5}
    assert 0.0 <= both["test"]["topic"]["accuracy"] <= 1.0 and both["test"]["topic"]["rows"] == 60
    assert 0.0 <= both["test"]["conll"]["f1"] <= 1.0 and both["test"]["conll"]["rows"] == 80
    assert "| both (KD) | conll 0.5, topic 1 |" in text and "conll test | conll KD gain" in text
    assert "| **teachers** (one per task) | – | – |" in text
    # a task weighted 0 teaches nothing: its head is exactly as initialised, the shared encoder has moved
    from kdcache.students import WordTokenizer, build_student
    ckpt = tmp_path / "runs" / "topic-only" / "checkpoint"
    torch.manual_seed(0)
    init = build_student("bilstm-multitask", {"embed_dim": 32, "hidden": 32}, WordTokenizer.load(ckpt).vocab_size,
                         {"topic": ("sequence-classification", 5), "conll": ("token-classification", 9)}).state_dict()
    trained = torch.load(ckpt / "student.pt")
    assert torch.equal(trained["heads.conll.weight"], init["heads.conll.weight"])
    assert not torch.equal(trained["heads.topic.weight"], init["heads.topic.weight"])
    assert not torch.equal(trained["lstm.weight_ih_l0"], init["lstm.weight_ih_l0"])


def test_a_cross_task_student_must_name_known_tasks():
    with pytest.raises(ConfigError, match=r"students.both.*`tasks:` mapping each of the pipeline's tasks"):
        load_pipeline(NER_TINY, ['students.both={"arch": "bilstm-multitask", "tasks": {"conll": 1, "nope": 1}}'])


def test_cross_task_fidelity_pairs_each_shared_student_with_the_task_alone_over_seeds_and_resumes(tmp_path,
                                                                                                   monkeypatch):
    """`kdcache fidelity` on a pipeline of several tasks: every multi-task student and its twin per seed, each task's
    metric as the runs wrote it, the sharing gain paired by seed, and a rerun that retrains nothing."""
    from kdcache.experiments import crosstask, seeded
    require_shared_data("conll2003")
    tiny = yaml.safe_load((REPO / "pipelines" / "tiny" / "pipeline.yaml").read_text())
    ner = yaml.safe_load((REPO / "pipelines" / "ner-tiny" / "pipeline.yaml").read_text())
    tiny["tasks"]["topic"]["data"]["limit"] = 60
    tiny["tasks"]["topic"]["teacher"]["sanity"] = {"enabled": False}
    small = {"arch": "bilstm-multitask", "params": {"embed_dim": 16, "hidden": 16}}
    mixed = {"name": "mixed", "tasks": {**tiny["tasks"], **ner["tasks"]}, "train": {**tiny["train"], "epochs": 1},
             "students": {"both": {**small, "tasks": {"topic": 1.0, "conll": 1.0}},
                          "topic-only": {**small, "tasks": {"topic": 1.0}},
                          "conll-only": {**small, "tasks": {"conll": 1.0}}}}
    path = tmp_path / "mixed.yaml"
    path.write_text(yaml.safe_dump(mixed))
    doc = tmp_path / "fidelity.md"
    args = (str(path), [0, 1], tmp_path / "fid", doc, tmp_path / "teachers", tmp_path / "caches")
    r = crosstask.run_cross_task(*args)
    runs = tmp_path / "fid" / "runs" / "mixed" / "cross-task"

    def score(seed, run, task):
        m = json.loads((runs / str(seed) / run / "metrics.json").read_text())
        return m["test"][task]["accuracy" if task == "topic" else "f1"]
    for task, alone in (("topic", "topic-only"), ("conll", "conll-only")):
        for kind, suffix in (("kd", ""), ("hard", "-hard")):
            both = [score(s, "both" + suffix, task) for s in (0, 1)]
            assert r["students"]["both"][kind][task] == both
            assert crosstask.sharing_gains(r)["both"][kind][task] == pytest.approx(
                [b - score(s, alone + suffix, task) for s, b in zip((0, 1), both)])
    assert "conll" not in r["students"]["topic-only"]["kd"]
    text = doc.read_text()
    assert "## Pipeline `mixed`: one student of several tasks" in text and f"| both ({', '.join(r['weights']['both'])}) |" in text
    assert "Sharing one encoder, paired by seed" in text
    trained = []
    monkeypatch.setattr(seeded, "train_students", lambda *a, **k: trained.append(a) or [])
    assert crosstask.run_cross_task(*args)["students"] == r["students"] and trained == []
