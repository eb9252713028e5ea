"""Out-of-fold training targets (cross-fitting, `teacher.finetune.folds: k`): the training split is cut into k
folds by a stable hash of each row's id; the teacher fine-tuned on the other k-1 folds labels each fold, so no
training row's soft label comes from a teacher that saw it (an in-sample teacher's targets on small data are
nearly one-hot). Validation and test keep the teacher fine-tuned on all of train."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from .. import config as C
from ..data import TaskData, stable_bucket
from ..fingerprint import hash_obj
from .finetune import finetune_key, finetune_teacher
from .heads import HEADS
from .models import auto_class

FOLD_SEED = "kdcache-fold"


def fold_of(ids: Sequence[str], k: int) -> np.ndarray:
    """Each row's fold, 0..k-1, from its id alone (so a rerun, another process or a reader agree)."""
    return np.array([stable_bucket(str(i), FOLD_SEED, k) for i in ids], dtype=np.int8)


def without_fold(data: TaskData, split: str, fold: int, k: int) -> TaskData:
    """`data` with the rows of `fold` removed from `split` (what that fold's teacher is fine-tuned on)."""
    ds = data.splits[split]
    keep = np.flatnonzero(fold_of(ds["id"][:], k) != fold)
    return TaskData({**data.splits, split: ds.select(keep)}, data.label_names, data.origin, data.id_field)


def fold_folder(teachers_dir: Path, pipeline: str, task_name: str, fold: int, k: int) -> Path:
    return teachers_dir / pipeline / f"{task_name}.fold-{fold}-of-{k}"


def prepare_fold_teachers(pipeline: str, task_name: str, task: C.TaskConfig, data: TaskData,
                          teachers_dir: Path) -> tuple[list[torch.nn.Module], list[str]]:
    """The k fold teachers (fine-tuned once each, reused while nothing changes) and their fine-tune keys' sha256s
    (for the fingerprint)."""
    ft, head = task.teacher.finetune, HEADS[task.teacher.head]
    assert ft is not None and ft.folds >= 2
    models, keys = [], []
    for f in range(ft.folds):
        part = without_fold(data, ft.train_split, f, ft.folds)
        folder = finetune_teacher(f"{task_name} (fold {f + 1} of {ft.folds})", task, part, head,
                                  fold_folder(teachers_dir, pipeline, task_name, f, ft.folds))
        models.append(auto_class(head.auto_class).from_pretrained(folder, dtype=torch.float32))
        keys.append(hash_obj(finetune_key(task, part)))
    return models, keys


def run_out_of_fold(head: Any, runners: list[Any], rows: dict[str, list], task: C.TaskConfig, seed: int,
                    on_batch: Any) -> tuple[Any, np.ndarray]:
    """(the head's outputs for `rows`, each row's fold): each fold's rows run through that fold's teacher; an
    augmented row is in its parent's fold."""
    keys = [p if p is not None else i for p, i in zip(rows["parent"], rows["id"])] if "parent" in rows else rows["id"]
    folds = fold_of(keys, len(runners))
    parts = []
    for f, runner in enumerate(runners):
        idx = np.flatnonzero(folds == f)
        if len(idx):
            parts.append((idx, head.run(runner, {c: [v[i] for i in idx] for c, v in rows.items()}, task, seed,
                                        on_batch)))
    return head.merge_rows(parts, len(folds)), folds
