"""Continual students (`init_from:`): a student starts from an earlier run's best weights and vocabulary, and a run
of another architecture or other settings is refused by name before training."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_pipeline
from kdcache.config import ConfigError
from kdcache.train.loop import train_students


def test_a_student_continues_from_an_earlier_run(tmp_path, tiny_cache):
    first = tiny_pipeline("train.epochs=1")
    train_students(first, ["bow"], {"topic": str(tiny_cache)}, tmp_path / "runs")
    run = tmp_path / "runs" / "bow"
    # a learning rate of ~0: the continued run's best weights are the earlier run's, so it really started there
    later = tiny_pipeline("train.epochs=1", f"students.bow.init_from={run}", "students.bow.learning_rate=1e-12")
    (r, hard) = train_students(later, ["bow"], {"topic": str(tiny_cache)}, tmp_path / "later")
    assert r["init_from"] == str(run) and hard["init_from"] == str(run), "the twin starts there too"
    before = torch.load(run / "checkpoint" / "student.pt", weights_only=True)
    after = torch.load(tmp_path / "later" / "bow" / "checkpoint" / "student.pt", weights_only=True)
    assert before.keys() == after.keys()
    for k in before:
        torch.testing.assert_close(after[k], before[k], atol=1e-6, rtol=1e-5)
    assert (tmp_path / "later" / "bow" / "checkpoint" / "word_vocab.json").read_text() == \
        (run / "checkpoint" / "word_vocab.json").read_text(), "the earlier vocabulary, not one rebuilt from the cache"
    assert r["test"]["accuracy"] == pytest.approx(
        __import__("json").loads((run / "metrics.json").read_text())["test"]["accuracy"])


def test_another_architecture_or_a_missing_run_is_refused(tmp_path, tiny_cache):
    train_students(tiny_pipeline("train.epochs=1"), ["bow"], {"topic": str(tiny_cache)}, tmp_path / "runs")
    run = tmp_path / "runs" / "bow"
    with pytest.raises(ConfigError, match=r"is a `bow` student .* this one a `bilstm`"):
        train_students(tiny_pipeline(f"students.bilstm.init_from={run}"), ["bilstm"], {"topic": str(tiny_cache)},
                       tmp_path / "x")
    with pytest.raises(ConfigError, match="params"):
        train_students(tiny_pipeline(f"students.bow.init_from={run}", "students.bow.params={embed_dim: 16}"),
                       ["bow"], {"topic": str(tiny_cache)}, tmp_path / "y")
    with pytest.raises(ConfigError, match="not a finished kdcache run"):
        train_students(tiny_pipeline(f"students.bow.init_from={tmp_path / 'nope'}"), ["bow"],
                       {"topic": str(tiny_cache)}, tmp_path / "z")
