"""A finished run's student as `kdcache train` saved it (a run folder: config.yaml, checkpoint/student.pt and what
reads its inputs), found and checked in one place for both of its readers: a continual student that starts from it
(train/continual.py) and a cache that takes it as the teacher (capture/student_teacher.py)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from ..typedconfig import ConfigError
from .tokenizers import HFTokenizer, WordTokenizer


@dataclass
class SavedRun:
    """A run folder and what its config.yaml says of the student (arch, params, max_length)."""

    run: Path
    checkpoint: Path
    config: dict[str, Any]

    @property
    def student(self) -> dict[str, Any]:
        return self.config.get("student_config") or {}

    @property
    def max_length(self) -> int:
        return int((self.config.get("train") or {}).get("max_length", 128))

    def tokenizer(self) -> Any:
        """The tokenizer the weights were trained with (its word vocabulary, or its saved tokenizer)."""
        if (self.checkpoint / WordTokenizer.FILE).is_file():
            return WordTokenizer.load(self.checkpoint)
        return HFTokenizer(str(self.checkpoint))

    def state(self) -> dict[str, torch.Tensor]:
        """The best weights of the student's core."""
        return torch.load(self.checkpoint / "student.pt", map_location="cpu", weights_only=True)


def find_run(path: str | Path, where: str) -> SavedRun:
    """The run folder `path` names (the run or its checkpoint/), or a ConfigError naming `where` and what is missing."""
    path = Path(path)
    run = path.parent if path.name == "checkpoint" else path
    ckpt = run / "checkpoint"
    if not (ckpt / "student.pt").is_file() or not (run / "config.yaml").is_file():
        raise ConfigError(f"`{where}` = {str(path)!r}: not a finished kdcache run (expected {run}/config.yaml and "
                          f"{ckpt}/student.pt, as `kdcache train` writes them)")
    return SavedRun(run, ckpt, yaml.safe_load((run / "config.yaml").read_text()) or {})
