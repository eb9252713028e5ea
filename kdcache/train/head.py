"""What a teacher head supplies to stage two. The training loop (loop.py) is the same for every head; a head says
how its students are built, what a batch's targets are, its loss and its evaluation. Registered in heads.py."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .. import config as C
from ..cache.reader import CacheDataset, read_column
from ..metrics import METRICS, HeadMetric
from .losses import feature_loss


class StudentModel(nn.Module):
    """A student as the loop drives it: `forward(task, batch)` turns a collated cache batch into (logits, projected
    features for the feature-loss terms); `core` is what the checkpoint keeps (the projections serve training)."""

    core: nn.Module

    def forward(self, task: str, batch: dict[str, Any], features: bool = True):  # pragma: no cover - interface
        raise NotImplementedError

    def device(self) -> torch.device:
        return next(self.parameters()).device

    def save(self, folder: Path, state: dict[str, Any]) -> None:
        """Write the checkpoint (weights of `state` + what it needs to read inputs) into `folder`."""
        torch.save(state, folder / "student.pt")
        self.tokenizer.save(folder)


@dataclass
class Source:
    """One task's cache as the training loop sees it."""

    task: str
    cache: str
    head: TrainHead
    train: CacheDataset
    eval: CacheDataset
    test: CacheDataset | None
    loader: torch.utils.data.DataLoader
    transform: Callable[[dict[str, Any]], dict[str, Any]] | None = None  # the live teacher (online KD)
    languages: tuple[str, ...] | None = None  # the languages read (None: every one the cache has)
    teachers: dict[str, float] = field(default_factory=dict)  # several teachers: task -> weight (sum 1), own first
    _once: dict[str, Any] = field(default_factory=dict)  # what `once` computed (columns, statistics)

    @property
    def manifest(self) -> dict[str, Any]:
        return self.train.manifest

    def column(self, split: str, name: str) -> list[Any]:
        """A column of a cached split, read once (e.g. training text for the students' vocabularies)."""
        return self.once(f"column {split} {name}", lambda: read_column(self.cache, split, name, self.languages))

    def once(self, key: str, make: Callable[[], Any]) -> Any:
        """`make()`, computed once per source (e.g. a statistic of the whole cache a head needs every batch)."""
        if key not in self._once:
            self._once[key] = make()
        return self._once[key]

    def labelled_train_rows(self) -> int | None:
        """Gold-labelled rows in the training selection (None when the head keeps no such count)."""
        splits = [self.manifest["splits"][s] for s in self.train.splits]
        stats = [sp["languages"][c]["stats"] for sp in splits for c in self.languages] if self.languages else \
            [sp["stats"] for sp in splits]
        counts = [s.get("labelled_rows") for s in stats]
        return None if None in counts else sum(counts)

    @property
    def feature_dims(self) -> dict[int, int]:
        return {j: self.manifest["features"]["hidden_size"] for j in self.train.feature_layers}




class TrainHead:
    """One teacher head in stage two (subclasses: classification.py, tokens.py, lm.py)."""

    name: str = ""
    eval_batch_size: int = 128

    @property
    def metric(self) -> HeadMetric:
        return METRICS[self.name]

    def check_cache(self, manifest: dict[str, Any], pipeline: C.PipelineConfig, task: str, cache: str) -> None:
        """Refuse a cache that cannot serve the pipeline's students (beyond the data/label expectation)."""

    def tokenizer(self, st: C.StudentConfig, source: Source, where: str) -> Any:
        """The student's tokenizer (built once per student, shared with its twin)."""
        raise NotImplementedError

    def build_model(self, st: C.StudentConfig, loss: C.LossConfig, source: Source, tokenizer: Any, max_length: int,
                    where: str) -> StudentModel:
        raise NotImplementedError

    def targets(self, batch: dict[str, Any], source: Source, device: torch.device) -> Any:
        """A batch's targets on the device, computed once for every student of the batch."""
        raise NotImplementedError

    def loss(self, logits: torch.Tensor, features: list[torch.Tensor], targets: Any, batch: dict[str, Any],
             loss: C.LossConfig, where: str) -> tuple[torch.Tensor, dict[str, float]]:
        """(loss, parts) for one student on one batch; parts["feature"] = Σ weight·term when it has feature terms."""
        raise NotImplementedError

    def evaluate(self, model: StudentModel, task: str, ds: CacheDataset, source: Source) -> dict[str, Any]:
        raise NotImplementedError

    def run_extras(self, model: StudentModel, source: Source, pipeline: C.PipelineConfig) -> dict[str, Any]:
        """Head-specific fields of a finished single-task run's metrics."""
        return {}

    def chance(self, source: Source) -> tuple[str, float, int] | None:
        """(name, evaluation metric, rows it is measured on) of a model that learned nothing, on the source's
        evaluation split: a student no better is flagged (None: the head has no such baseline)."""
        return None


def at_chance(score: float | None, chance: tuple[str, float, int] | None) -> dict[str, Any] | None:
    """The flag of a student whose evaluation `score` is no better than `chance` (a rate p on n rows) beyond two
    standard errors of that rate, sqrt(p(1-p)/n): what the report and the log call out; None when it is better."""
    if score is None or chance is None:
        return None
    name, p, n = chance
    margin = 2 * (p * (1 - p) / max(1, n)) ** 0.5
    return None if score > p + margin else {"baseline": name, "baseline_score": p, "score": score,
                                            "margin": round(margin, 4), "rows": n}


def add_feature_terms(loss: torch.Tensor, pairs: list[tuple[torch.Tensor, torch.Tensor]], cfg: C.LossConfig,
                      parts: dict[str, float]) -> torch.Tensor:
    """loss + Σ weight · feature_loss(projected student features, cached teacher features) over the terms of `cfg`
    (`pairs` in the same order); records each term (`feat<i>`) and their weighted sum (`feature`) in `parts`."""
    total = 0.0
    for i, (f, (pred, wanted)) in enumerate(zip(cfg.features, pairs)):
        term = feature_loss(pred, wanted, f.kind)
        parts[f"feat{i}"] = float(term.detach())
        loss = loss + f.weight * term
        total += f.weight * parts[f"feat{i}"]
    if cfg.features:
        parts["feature"] = total
    return loss
