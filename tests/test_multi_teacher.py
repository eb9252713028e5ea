"""Several teachers for one task (students' `teachers:`): each teacher's cache is its own task with its own
fingerprint; the reader serves their logits row-aligned, refusing caches of other rows or another label set; the
ensemble target is the weighted mean of the teachers' distributions; students train and the report shows each
teacher, the ensemble and the students."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import yaml

from conftest import FAST, REPO
from kdcache.cache.reader import CacheDataset, CacheMismatchError, read_column
from kdcache.capture.build import build_teacher_cache
from kdcache.config import ConfigError, load_pipeline
from kdcache.report import build_report
from kdcache.train.loop import train_students
from kdcache.train.losses import distillation_loss, ensemble_logits, multi_teacher_loss


def two_teachers(tmp_path, *overrides: str):
    """The tiny pipeline with a second task `topic-b`: the same data, its teacher fine-tuned with another seed."""
    cfg = yaml.safe_load((REPO / "pipelines" / "tiny" / "pipeline.yaml").read_text())
    cfg["tasks"]["topic-b"] = yaml.safe_load(yaml.safe_dump(cfg["tasks"]["topic"]))
    cfg["tasks"]["topic-b"]["teacher"]["finetune"]["seed"] = 1
    for name in ("bilstm", "textcnn"):
        cfg["students"][name]["task"] = "topic"
    cfg["students"]["bow"]["teachers"] = {"topic": 2.0, "topic-b": 1.0}  # its task: the first teacher's
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(cfg))
    fast = [o.replace("tasks.topic.", f"tasks.{t}.") for t in ("topic", "topic-b") for o in FAST]
    return load_pipeline(str(path), [*fast, "train.epochs=1", *overrides])


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("multi")
    p = two_teachers(tmp)
    for t in p.tasks:
        build_teacher_cache(p, t, tmp / "cache" / t, tmp / "teachers")
    return tmp, p


def test_ensemble_target_is_the_weighted_mean_of_the_teachers_distributions():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(16, 3, 5, generator=g, dtype=torch.float64) * 3
    s = torch.randn(16, 5, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    labels = torch.tensor([0, 1, -1, 2] * 4)
    for T in (1.0, 2.0, 4.0):
        mean = (w[None, :, None] * F.softmax(z / T, -1)).sum(1)
        torch.testing.assert_close(F.softmax(ensemble_logits(z, w, T) / T, -1), mean)
        # the loss against that distribution, computed densely: KL(p̄ || q)·T² per row, CE on labelled rows
        q = F.log_softmax(s / T, -1)
        kd = (mean * (mean.log() - q)).sum(-1) * T * T
        ce = F.cross_entropy(s, labels.clamp_min(0), reduction="none")
        expected = torch.where(labels >= 0, 0.5 * ce + 0.5 * kd, kd).mean()
        got, _ = multi_teacher_loss(s, z, w, labels, "kl", T, 0.5, ensemble="mean")
        torch.testing.assert_close(got, expected)
        terms, _ = multi_teacher_loss(s, z, w, labels, "kl", T, 0.5, ensemble="terms")
        torch.testing.assert_close(terms, sum(w[t] * distillation_loss(s, z[:, t], labels, "kl", T, 0.5)[0]
                                              for t in range(3)))
    # forward KL: `terms` and `mean` differ by a constant (the teachers' entropies), so their gradients are equal;
    # reverse KL weighs the teachers differently
    def grad(kind, ensemble):
        x = s.detach().clone().requires_grad_(True)
        multi_teacher_loss(x, z, w, labels, kind, 2.0, 0.0, ensemble=ensemble)[0].backward()
        return x.grad
    torch.testing.assert_close(grad("kl", "terms"), grad("kl", "mean"))
    assert not torch.allclose(grad("reverse_kl", "terms"), grad("reverse_kl", "mean"))


def test_reader_serves_every_teacher_row_aligned(caches):
    tmp, p = caches
    ds = CacheDataset(tmp / "cache" / "topic", "train", shuffle=True, seed=3, companions=(str(tmp / "cache" / "topic-b"),))
    rows = list(ds)
    other = dict(zip(read_column(str(tmp / "cache" / "topic-b"), "train", "id"),
                     read_column(str(tmp / "cache" / "topic-b"), "train", "logits")))
    assert len(rows) == ds.num_rows and all(r["teacher_logits"].shape == (2, 5) for r in rows)
    for r in rows:
        assert (r["teacher_logits"][0] == r["logits"]).all()
        assert r["teacher_logits"][1].tolist() == pytest.approx(other[r["id"]])
    assert any((r["teacher_logits"][0] != r["teacher_logits"][1]).any() for r in rows), "two different teachers"
    batch = ds.collate(rows[:4])
    assert batch["teacher_logits"].shape == (4, 2, 5)


def test_a_teacher_of_other_labels_or_other_rows_is_refused(caches, tmp_path):
    tmp, _ = caches
    p = two_teachers(tmp_path, "tasks.topic-b.data.label_names=[a,b,c,d,e]")
    build_teacher_cache(p, "topic-b", tmp_path / "relabelled", tmp / "teachers")
    with pytest.raises(CacheMismatchError, match="label set"):
        CacheDataset(tmp / "cache" / "topic", "train", companions=(str(tmp_path / "relabelled"),))
    p = two_teachers(tmp_path, "tasks.topic-b.data.limit=50")
    build_teacher_cache(p, "topic-b", tmp_path / "fewer", tmp / "teachers")
    with pytest.raises(CacheMismatchError, match="same rows"):
        CacheDataset(tmp / "cache" / "topic", "train", companions=(str(tmp_path / "fewer"),))
    with pytest.raises(ConfigError, match="teachers"):
        two_teachers(tmp_path, "students.bow.teachers={topic-b: 1.0, nope: 1.0}")


def test_students_learn_from_several_teachers_and_the_report_shows_them(caches):
    tmp, p = caches
    results = {r["run"]: r for r in train_students(p, ["bow", "bilstm"], tmp / "cache", tmp / "runs")}
    kd = results["bow"]
    assert kd["teachers"] == pytest.approx({"topic": 2 / 3, "topic-b": 1 / 3}) and kd["ensemble"] == "mean"
    assert "teachers" not in results["bow-hard"] and "teachers" not in results["bilstm"]
    report = build_report(tmp / "runs", tmp / "cache").read_text()
    section = report.split("## Several teachers")[1]
    assert "teacher `topic`" in section and "teacher `topic-b`" in section and "**ensemble**" in section
    assert "| bow (mean)" in section
