"""Out-of-fold targets (teacher.finetune.folds): no training row's target comes from a teacher that saw it
(checked by fold ids against each fold teacher's own training rows), each equals that fold teacher's plain
forward, validation and test come from the full teacher, and the setting is in the fingerprint."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from conftest import build, tiny_pipeline
from kdcache.cache.format import read_manifest
from kdcache.cache.verify import verify_cache
from kdcache.capture.finetune import RECORD
from kdcache.capture.folds import fold_folder, fold_of, without_fold
from kdcache.config import ConfigError
from kdcache.data import load_task_data
from test_capture import reference_forward

K = 3


def _split(cache, m, split):
    return pq.read_table([str(cache / s["parquet"]) for s in m["splits"][split]["shards"]])


def test_no_training_row_is_labelled_by_a_teacher_that_saw_it(tmp_path):
    cache, m = build(tmp_path, f"tasks.topic.teacher.finetune.folds={K}")
    assert m["teacher_folds"] == K and verify_cache(cache).ok
    teachers = tmp_path / "teachers"
    data = load_task_data(tiny_pipeline().tasks["topic"].data)
    train = _split(cache, m, "train")
    ids, folds = train.column("id").to_pylist(), np.array(train.column("teacher_fold").to_pylist())
    assert np.array_equal(folds, fold_of(ids, K)) and set(folds) == set(range(K))
    logits = np.stack(train.column("logits").to_numpy(zero_copy_only=False))
    for f in range(K):
        folder = fold_folder(teachers, "tiny", "topic", f, K)
        seen = set(without_fold(data, "train", f, K).splits["train"]["id"][:])
        mine = [i for i, x in enumerate(ids) if folds[i] == f]
        assert mine and not any(ids[i] in seen for i in mine), f"fold {f}: a row its teacher trained on"
        assert len(seen) == len(ids) - len(mine), "each fold teacher trains on every other row"
        assert (folder / RECORD).is_file()
        model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
        tok = AutoTokenizer.from_pretrained(folder)
        for i in mine:
            np.testing.assert_allclose(logits[i], reference_forward(model, tok, train.column("text")[i].as_py())[1],
                                       atol=1e-5, rtol=1e-5)
    full = AutoModelForSequenceClassification.from_pretrained(teachers / "tiny" / "topic").eval()
    tok = AutoTokenizer.from_pretrained(teachers / "tiny" / "topic")
    test = _split(cache, m, "test")
    assert set(test.column("teacher_fold").to_pylist()) == {-1}
    np.testing.assert_allclose(np.stack(test.column("logits").to_numpy(zero_copy_only=False))[0],
                               reference_forward(full, tok, test.column("text")[0].as_py())[1], atol=1e-5, rtol=1e-5)
    _, plain = build(tmp_path / "plain", teachers=teachers)
    assert plain["fingerprint"] != m["fingerprint"] and "teacher_folds" not in plain
    assert read_manifest(cache)["fingerprint_inputs"]["teacher"]["fold_teachers_sha256"]


def test_folds_are_refused_where_they_cannot_work():
    with pytest.raises(ConfigError, match=r"finetune\.folds` = 1: out-of-fold targets need k >= 2"):
        tiny_pipeline("tasks.topic.teacher.finetune.folds=1")
    with pytest.raises(ConfigError, match=r"pooled features"):
        tiny_pipeline("tasks.topic.teacher.finetune.folds=2", "tasks.topic.cache.features.pooling=tokens")


def test_fidelity_compares_out_of_fold_with_in_sample_targets(tmp_path):
    """`kdcache fidelity --folds 2 --only-scarce`: the label-scarce setting twice, its own doc section, paired gains."""
    from conftest import FAST, REPO
    from kdcache.experiments.fidelity import OOF, run_fidelity
    doc = tmp_path / "f.md"
    res = run_fidelity(str(REPO / "pipelines" / "tiny" / "pipeline.yaml"), [0], ["bow"], 30, tmp_path / "fid", doc,
                       teachers_dir=tmp_path / "teachers", cache_root=tmp_path / "caches",
                       overrides=[*FAST, "train.epochs=1"], folds=2, all_labels=False)
    ins, oof = res["settings"]["30 labelled training rows"], res["settings"][f"30 labelled training rows, {OOF} (k=2)"]
    assert (ins["teacher_folds"], oof["teacher_folds"]) == (0, 2) and "all labels" not in res["settings"]
    assert oof["labelled_train_rows"] == ins["labelled_train_rows"] == 30
    table = pq.read_table(tmp_path / "fid" / "cache-scarce-oof" / "topic" / "train")
    assert table["teacher_fold"].to_numpy().tolist() == fold_of(table["id"].to_pylist(), 2).tolist()
    text = doc.read_text()
    assert "<!-- fidelity:tiny-oof -->" in text and "--folds 2" in text
    gain = oof["students"]["bow"]["kd"][0] - ins["students"]["bow"]["kd"][0]
    assert f"| 30 labelled training rows | bow | {ins['students']['bow']['kd'][0]:.4f}" in text
    assert f"{gain:.4f} ± 0.0000" in text
