"""A finished kdcache student run as a task's teacher (`teacher.run`): its own outputs cached like any teacher's,
e.g. as the memory of what a continual student learned (learning without forgetting). The student runs behind the
same calls as a `transformers` classifier and tokenizer, so the build loop treats it like one."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any, Sequence

import torch

from .. import config as C
from ..data import TaskData, portable_origin
from ..fingerprint import hash_file
from ..students import build_student
from ..students.saved import SavedRun, find_run
from .models import TeacherError


class RunTokenizer:
    """A student's tokenizer behind the call the teacher runners make: pairs joined with ' | ' as the student read
    them, truncated at the shorter of the cache's and the run's max_length (what the student saw in training)."""

    def __init__(self, saved: SavedRun) -> None:
        self.inner, self.own_max = saved.tokenizer(), saved.max_length
        self.pad_token_id = self.inner.pad_id
        hf = getattr(self.inner, "tok", None)
        self.special_tokens_map = dict(hf.special_tokens_map) if hf is not None else {}

    def get_vocab(self) -> dict[str, int]:
        return self.inner.tok.get_vocab() if hasattr(self.inner, "tok") else dict(self.inner.index)

    def __call__(self, texts: Sequence[str], pairs: Sequence[str] | None = None, *, truncation: bool = True,
                 max_length: int | None = None, **_: Any) -> dict[str, list[list[int]]]:
        texts = [f"{a} | {b}" for a, b in zip(texts, pairs)] if pairs is not None else list(texts)
        limit = min(max_length or self.own_max, self.own_max) if truncation else None
        return {"input_ids": self.inner.encode(texts, limit)}


class RunClassifier(torch.nn.Module):
    """A student (students.base.Student) answering like a `transformers` sequence classifier: `.logits`."""

    def __init__(self, student: torch.nn.Module, num_labels: int, name: str) -> None:
        super().__init__()
        self.student = student
        self.config = SimpleNamespace(num_hidden_layers=None, hidden_size=None, num_labels=num_labels,
                                      _name_or_path=name)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, output_hidden_states: bool = False,
                **_: Any) -> SimpleNamespace:
        logits, _hidden = self.student(input_ids, attention_mask)
        return SimpleNamespace(logits=logits, hidden_states=None)


def load_run_teacher(task_name: str, task: C.TaskConfig, data: TaskData) -> tuple[torch.nn.Module, Any, dict]:
    """(model, tokenizer, identity) of the run `teacher.run` names, its label count checked against the task's."""
    where = f"tasks.{task_name}.teacher.run"
    saved = find_run(task.teacher.run or "", where)
    st = saved.student
    if not st.get("arch"):
        raise TeacherError(f"{saved.run}/config.yaml: no `student_config.arch`; `{where}` needs a run written by "
                           "`kdcache train`")
    tokenizer = RunTokenizer(saved)
    core = build_student(st["arch"], st.get("params") or {}, tokenizer.inner.vocab_size, len(data.label_names),
                         tokenizer.pad_token_id, where=where)
    try:
        core.load_state_dict(saved.state())
    except RuntimeError as e:
        raise TeacherError(f"`{where}`: the weights in {saved.checkpoint} do not fit a {st['arch']} student of this "
                           f"task's {len(data.label_names)} labels ({str(e)[:200]}); name a run of this task") from None
    model = RunClassifier(core, len(data.label_names), str(saved.run)).eval()
    identity = {"name": f"run:{portable_origin(str(Path(saved.run).resolve()))}", "revision": None,
                "weights_sha256": hash_file(saved.checkpoint / "student.pt"), "class": st["arch"],
                "num_labels": len(data.label_names), "parameters": sum(p.numel() for p in core.parameters()),
                "student": {k: st.get(k) for k in ("arch", "params", "tokenizer", "vocab_size")},
                "max_length": saved.max_length}
    return model, tokenizer, identity
