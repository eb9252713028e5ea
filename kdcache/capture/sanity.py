"""The teacher quality gate: a teacher no better than a constant guess, or nearly uniform, stops stage one with
what to change, before any student learns from its targets (after fine-tuning and again on the cached split)."""

from __future__ import annotations

import logging
import math
from typing import Any

from ..config import TaskConfig
from ..errors import KdcacheError
from .head import CaptureHead

log = logging.getLogger(__name__)


class TeacherQualityError(KdcacheError):
    """The teacher predicts no better than a baseline; the message names the settings to change."""


def check_teacher(task_name: str, task: TaskConfig, head: CaptureHead, summary: dict[str, Any], num_labels: int,
                  where: str) -> None:
    """Raise unless the teacher beats the head's baseline by `teacher.sanity.min_margin` and its predictions are
    sharper than `teacher.sanity.max_entropy` x ln(labels); `where` says which check ran (for the message)."""
    gate = task.teacher.sanity
    quality = head.quality(summary)
    if quality is None:
        return
    metric, score, baseline_name, baseline, entropy = quality
    problems = []
    if score < baseline + gate.min_margin:
        problems.append(f"its {metric} {score:.3f} does not beat the {baseline_name} baseline {baseline:.3f} by "
                        f"{gate.min_margin} (teacher.sanity.min_margin)")
    if entropy is not None and num_labels > 1 and entropy > gate.max_entropy * math.log(num_labels):
        problems.append(f"its mean entropy {entropy:.3f} nats is {entropy / math.log(num_labels):.0%} of the "
                        f"uniform distribution's {math.log(num_labels):.3f} (teacher.sanity.max_entropy "
                        f"{gate.max_entropy})")
    if not problems:
        log.info("task %s: teacher %s: %s %.4f against the %s baseline %.4f", task_name, where, metric, score,
                 baseline_name, baseline)
        return
    message = (f"task {task_name}: the teacher {where} looks untrained: {'; '.join(problems)}. Students would learn "
               "from near-guesses. Train it longer (tasks.{t}.teacher.finetune.epochs or .min_steps) or with another "
               "learning rate (.learning_rate), or check the labels; to go on anyway set "
               "tasks.{t}.teacher.sanity.enabled=false").replace("{t}", task_name)
    if not gate.enabled:
        log.warning("%s (gate off: going on)", message)
        return
    raise TeacherQualityError(message)
