"""The public API: importable from `kdcache`, opens a pipeline's or a task's cache folder, shuffles by default, and
the classification examples in docs/api.md run as written (on a small cache) and learn from the cached targets."""

from __future__ import annotations

import math
import re

import pytest
import torch

import kdcache
from conftest import REPO, build
from kdcache.cache.reader import CacheDataset

EXAMPLES = re.findall(r"```python\n(.*?)```", (REPO / "docs" / "api.md").read_text(), re.S)


@pytest.fixture(scope="module")
def topic300(tmp_path_factory):
    """A 300-rows-per-split tiny cache inside a pipeline folder (cache/tiny/topic), and its teacher folder."""
    tmp = tmp_path_factory.mktemp("api")
    teachers = tmp / "teachers"
    build(tmp, "tasks.topic.data.limit=300", "tasks.topic.teacher.finetune.epochs=6", teachers=teachers,
          out=tmp / "cache" / "topic")
    return tmp / "cache", teachers / "tiny" / "topic"


def test_the_api_is_importable_from_the_package_and_documented():
    for name in kdcache.__all__:
        assert getattr(kdcache, name) is not None
        assert f"`{name}" in (REPO / "docs" / "api.md").read_text(), f"{name} is not in docs/api.md"
    with pytest.raises(AttributeError):
        kdcache.no_such_thing  # noqa: B018


def test_a_pipeline_folder_or_a_task_folder_opens_and_the_train_split_is_shuffled(topic300, tmp_path):
    pipeline_dir, _ = topic300
    by_pipeline = kdcache.open_split(str(pipeline_dir), seed=1)
    by_task = kdcache.open_split(str(pipeline_dir / "topic"), seed=1)
    assert by_pipeline.url == by_task.url == str(pipeline_dir / "topic")
    order = [r["row_id"] for r in by_pipeline]
    assert sorted(order) == list(range(300)) and order != sorted(order), "shuffled by default"
    by_pipeline.set_epoch(1)
    assert [r["row_id"] for r in by_pipeline] != order, "set_epoch gives a new order"
    plain = [r["row_id"] for r in kdcache.open_split(str(pipeline_dir), "test", shuffle=False)]
    assert plain == sorted(plain)
    assert kdcache.read_column(str(pipeline_dir), "train", "id") == [r["id"] for r in CacheDataset(by_task.url, "train")]
    (tmp_path / "two" / "a").mkdir(parents=True)
    (tmp_path / "two" / "b").symlink_to(pipeline_dir / "topic")
    (tmp_path / "two" / "c").symlink_to(pipeline_dir / "topic")
    with pytest.raises(kdcache.CacheFormatError, match=r"several tasks \(b, c\); pass task="):
        kdcache.open_split(str(tmp_path / "two"))
    assert kdcache.find_cache(str(tmp_path / "two"), task="c").endswith("two/c")
    with pytest.raises(kdcache.CacheFormatError, match=r"no finished kdcache cache here"):
        kdcache.open_split(str(tmp_path / "two" / "a"))


def _run(example: str, **replace: str) -> dict:
    for old, new in replace.items():
        assert old in example, f"docs/api.md example no longer contains {old!r}"
        example = example.replace(old, new)
    namespace: dict = {"__name__": "docs_api_example"}
    exec(compile(example, "docs/api.md", "exec"), namespace)
    return namespace


def test_the_plain_pytorch_example_runs_and_learns(topic300, capsys):
    pipeline_dir, _ = topic300
    ns = _run(EXAMPLES[0], **{'CACHE = "data/cache/default"': f"CACHE = {str(pipeline_dir)!r}",
                              "range(3)": "range(8)"})
    assert ns["total"] == kdcache.manifest(str(pipeline_dir))["splits"]["test"]["rows"]
    accuracy = ns["correct"] / ns["total"]
    assert f"test accuracy {accuracy:.3f}" in capsys.readouterr().out
    assert accuracy > 0.4, "5 topics: chance is ~0.2"


def _validation_accuracy(model, tokenizer, cache: str) -> float:
    ds = kdcache.open_split(cache, "validation", shuffle=False)
    batch = ds.collate(list(ds))
    enc = tokenizer(batch["text"], truncation=True, max_length=64, padding=True, return_tensors="pt")
    with torch.no_grad():
        return float((model(**enc).logits.argmax(-1) == batch["label"]).float().mean())


def test_the_hugging_face_trainer_example_runs_and_learns(topic300, tmp_path, monkeypatch):
    pipeline_dir, teacher_dir = topic300
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)  # the example builds its student before the Trainer seeds: fix its initial weights
    ns = _run(EXAMPLES[1], **{'CACHE = "data/cache/default"': f"CACHE = {str(pipeline_dir)!r}",
                              'TOKENIZER = "data/teachers/default/sentiment"': f"TOKENIZER = {str(teacher_dir)!r}",
                              "max_length=128": "max_length=64"})
    assert ns["trainer"].state.global_step == 200
    losses = [h["loss"] for h in ns["trainer"].state.log_history if "loss" in h]
    assert losses and all(math.isfinite(x) for x in losses)
    accuracy = _validation_accuracy(ns["student"].eval(), ns["tokenizer"], str(pipeline_dir))
    majority = kdcache.manifest(str(pipeline_dir))["splits"]["validation"]["stats"]["majority_accuracy"]
    # a 2-layer BERT from scratch on 300 rows of 5 topics: its validation accuracy swings with the initial weights
    # (0.33-0.73 over torch seeds 0-3 here), its training loss halves with every one
    assert losses[-1] < 0.5 * losses[0], f"training loss {losses[0]:.3f} -> {losses[-1]:.3f}: learnt nothing"
    assert accuracy > majority + 0.03, f"accuracy {accuracy:.3f} vs majority class {majority:.3f}: learnt nothing"
