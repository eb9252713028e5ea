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
