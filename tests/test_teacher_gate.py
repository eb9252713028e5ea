"""The teacher quality gate and the fine-tuning step floor: a near-uniform teacher stops stage one with what to
change (after fine-tuning, on a rerun, and on the cached split of a teacher kdcache did not train); a good one
passes; `min_steps` lengthens short runs without changing the key of teachers it does not affect."""

from __future__ import annotations

import json
import math

import pytest

from conftest import build, tiny_pipeline
from kdcache.capture.finetune import RECORD, finetune_key
from kdcache.capture.heads import HEADS
from kdcache.capture.sanity import TeacherQualityError, check_teacher
from kdcache.data import load_task_data

GATE_ON = "tasks.topic.teacher.sanity.enabled=true"


def test_the_gate_compares_with_the_majority_class_and_the_uniform_distribution():
    task = tiny_pipeline(GATE_ON).tasks["topic"]
    head = HEADS["sequence-classification"]
    good = {"teacher_accuracy": 0.70, "majority_accuracy": 0.30, "mean_entropy_nats": 0.5 * math.log(5)}
    check_teacher("topic", task, head, good, 5, "here")
    with pytest.raises(TeacherQualityError,
                       match=r"accuracy 0\.310 does not beat the majority-class baseline 0\.300"):
        check_teacher("topic", task, head, dict(good, teacher_accuracy=0.31), 5, "here")
    with pytest.raises(TeacherQualityError,
                       match=r"mean entropy .* 95% of the uniform .*teacher\.sanity\.enabled=false"):
        check_teacher("topic", task, head, dict(good, mean_entropy_nats=0.95 * math.log(5)), 5, "here")
    check_teacher("topic", task, head, {"teacher_accuracy": None, "majority_accuracy": None}, 5, "unlabelled")
    off = tiny_pipeline("tasks.topic.teacher.sanity.enabled=false").tasks["topic"]
    check_teacher("topic", off, head, dict(good, teacher_accuracy=0.1), 5, "gate off: a warning only")
    tokens = HEADS["token-classification"]
    with pytest.raises(TeacherQualityError, match=r"entity F1 0\.010 does not beat the all-`O` baseline"):
        check_teacher("conll", task, tokens, {"teacher_entity_f1": 0.01, "gold_entities": 40}, 9, "here")


def test_a_near_uniform_fine_tuned_teacher_stops_stage_one_and_again_on_a_rerun(tmp_path):
    untrained = [GATE_ON, "tasks.topic.teacher.finetune.learning_rate=1e-9"]
    for attempt in ("fine-tuned", "reused"):
        with pytest.raises(TeacherQualityError,
                           match=r"fine-tuned for \d+ steps \(split `validation`\).*finetune\.epochs or \.min_steps"):
            build(tmp_path, *untrained)
        assert not (tmp_path / "cache" / "manifest.json").exists(), attempt
    record = json.loads((tmp_path / "teachers" / "tiny" / "topic" / RECORD).read_text())
    assert record["metrics"]["eval"]["split"] == "validation"
    # overridden, the same teacher is cached (with a warning), and the cached split's check warns too
    _, manifest = build(tmp_path, *untrained[1:], "tasks.topic.teacher.sanity.enabled=false")
    assert manifest["splits"]["validation"]["stats"]["majority_accuracy"] > 0


def test_a_trained_teacher_passes_and_an_untrained_one_is_caught_on_its_cached_split(tmp_path):
    _, manifest = build(tmp_path / "good", GATE_ON, "tasks.topic.data.limit=300",
                        "tasks.topic.teacher.finetune.epochs=12")
    stats = manifest["splits"]["validation"]["stats"]
    assert stats["teacher_accuracy"] > stats["majority_accuracy"] + 0.02
    labels = load_task_data(tiny_pipeline("tasks.topic.data.limit=300").tasks["topic"].data).splits["validation"]
    counts = [labels["label"][:].count(c) for c in range(5)]
    assert stats["majority_accuracy"] == pytest.approx(max(counts) / len(labels)), "majority equals a dense count"
    # a teacher kdcache did not fine-tune (random weights from a config): only the cached split can judge it
    with pytest.raises(TeacherQualityError, match=r"cached in .*split `validation`"):
        build(tmp_path / "random", GATE_ON, "tasks.topic.teacher.finetune=null")
    assert (tmp_path / "random" / "cache" / "manifest.json").is_file(), "the cache itself is complete and honest"


def test_min_steps_lengthens_short_runs_and_leaves_other_teachers_keys_alone(tmp_path):
    _, manifest = build(tmp_path, "tasks.topic.teacher.finetune.min_steps=40")
    record = json.loads((tmp_path / "teachers" / "tiny" / "topic" / RECORD).read_text())
    assert record["metrics"]["steps"] == 40, "60 rows / 16 x 2 epochs = 8 steps, raised to the floor"
    pipeline = lambda *s: tiny_pipeline(*s).tasks["topic"]  # noqa: E731
    data = load_task_data(pipeline().data)
    key = lambda *s: finetune_key(pipeline(*s), data)  # noqa: E731
    assert key("tasks.topic.teacher.finetune.min_steps=0") == key("tasks.topic.teacher.finetune.min_steps=8"), \
        "a floor at or below the epochs' steps changes nothing, so it is not in the key"
    assert key("tasks.topic.teacher.finetune.min_steps=9") != key("tasks.topic.teacher.finetune.min_steps=10")
