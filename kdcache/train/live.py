"""Online KD, for comparison with the cache (`kdcache train --teacher live`, and the bench): the live teacher
computes each batch's targets. The only place stage two imports stage one."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .. import config as C
from ..capture.classification import SequenceRunner
from ..capture.teacher import prepare_teacher
from ..data import load_task_data


def live_targets(pipeline: C.PipelineConfig, task: str, teachers_dir: Path,
                 cache_layers: tuple[int, ...]) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """batch -> the batch with `logits` (and `features` of `cache_layers`) from the live teacher."""
    t = pipeline.tasks[task]
    model, tok, _ = prepare_teacher(pipeline.name, task, t, load_task_data(t.data), teachers_dir)
    feats = dataclasses.replace(t.cache.features, layers=cache_layers)
    runner = SequenceRunner(model, tok, t.cache.max_length, batch_size=1 << 30, sort_window=1, features=feats,
                            precision=t.teacher.precision, device=t.teacher.device)
    fields = t.data.text_fields

    def targets(batch: dict[str, Any]) -> dict[str, Any]:
        out = runner.run(batch[fields[0]], batch[fields[1]] if len(fields) > 1 else None)
        batch = dict(batch, logits=torch.from_numpy(out.logits))
        if cache_layers:
            batch["features"] = {k: torch.from_numpy(v.astype(np.float32)) for k, v in out.features.items()}
        return batch
    return targets
