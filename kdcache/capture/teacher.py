"""The teacher of a task, ready to run: fine-tuned first when the pipeline asks, converted once from GGUF, or
loaded as it is (from the hub, a folder, a `pkg:` folder or a config), or a kdcache student run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .. import config as C
from ..data import TaskData
from ..fingerprint import hash_obj
from ..hub import quiet_transformers
from .finetune import finetune_key, finetune_teacher
from .heads import HEADS
from .models import TeacherError, auto_class, build_model, convert_gguf, load_tokenizer, model_identity, placement


def prepare_teacher(pipeline: str, task_name: str, task: C.TaskConfig, data: TaskData,
                    teachers_dir: Path) -> tuple[torch.nn.Module, Any, dict[str, Any]]:
    """(model, tokenizer, identity) of the task's teacher; derived weights go to <teachers_dir>/<pipeline>/<task>/."""
    quiet_transformers()
    cfg, head = task.teacher, HEADS[task.teacher.head]
    if cfg.run:  # a kdcache student run as the teacher
        from .student_teacher import load_run_teacher
        return load_run_teacher(task_name, task, data)
    folder = teachers_dir / pipeline / task_name
    if cfg.finetune is not None or cfg.gguf_file:
        if cfg.finetune is not None:
            finetune_teacher(task_name, task, data, head, folder)
        elif not (folder / "config.json").is_file():  # a plain transformers folder reloads in about a second
            convert_gguf(cfg, head.auto_class, folder)
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = auto_class(head.auto_class).from_pretrained(
            folder, **(placement(cfg) if cfg.device_map or cfg.tp_plan else {"dtype": torch.float32}))
        identity = model_identity(model, cfg.model or "from_config", cfg.revision)
        if cfg.finetune is not None:
            identity["finetune_sha256"] = hash_obj(finetune_key(task, data))
        else:
            identity["gguf_file"] = cfg.gguf_file
        return model, tokenizer, identity
    tokenizer = load_tokenizer(cfg)
    model, head_trained = build_model(cfg, head.auto_class, data.label_names if head.labelled else None)
    if head.labelled and not head_trained and not cfg.from_config:
        raise TeacherError(f"task {task_name}: teacher {cfg.model!r} has no trained {cfg.head} head for this task; "
                           "add a `teacher.finetune:` section so kdcache fine-tunes it first")
    return model, tokenizer, model_identity(model, cfg.model or "from_config", cfg.revision)
