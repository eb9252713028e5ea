"""Small transformer student: a `transformers` encoder built from a config, trained from scratch, or initialised
from chosen teacher layers ("weight distillation": the teacher's weight file is read once here, never run)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from .base import Student, masked_mean


@dataclass(frozen=True)
class TransformerParams:
    model_type: str = "bert"
    hidden: int = 128
    layers: int = 2
    heads: int = 2
    intermediate: int = 512
    dropout: float = 0.1
    max_positions: int = 512
    init_from_teacher: str | None = None   # teacher folder (or hub name / pkg:) whose weights initialise the student
    teacher_layers: tuple[int, ...] = ()   # 0-based teacher encoder layers copied into student layers 0, 1, ...
    freeze_embeddings: bool = False        # keep the word embeddings fixed (cheaper steps; sensible when inherited)


def _teacher_state(path: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise ValueError(f"students.*.params.init_from_teacher: no *.safetensors weight file in {path}")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    return state


class TransformerStudent(Student):
    def __init__(self, p: TransformerParams, vocab_size: int, num_labels: int, pad_id: int) -> None:
        super().__init__()
        import transformers
        from ..hub import resolve_model_name
        if p.init_from_teacher:
            path = resolve_model_name(p.init_from_teacher)
            conf = transformers.AutoConfig.from_pretrained(path)
            layers = list(p.teacher_layers) or list(range(conf.num_hidden_layers))
            conf.num_hidden_layers = len(layers)
            conf.num_labels = num_labels
            self.model = transformers.AutoModelForSequenceClassification.from_config(conf)
            self._init_from(_teacher_state(path), layers)
        else:
            conf = transformers.AutoConfig.for_model(
                p.model_type, vocab_size=vocab_size, hidden_size=p.hidden, num_hidden_layers=p.layers,
                num_attention_heads=p.heads, intermediate_size=p.intermediate, hidden_dropout_prob=p.dropout,
                attention_probs_dropout_prob=p.dropout, max_position_embeddings=p.max_positions,
                pad_token_id=pad_id, num_labels=num_labels)
            self.model = transformers.AutoModelForSequenceClassification.from_config(conf)
        if p.freeze_embeddings:
            self.model.get_input_embeddings().weight.requires_grad_(False)
        self.hidden_sizes = [self.model.config.hidden_size] * (self.model.config.num_hidden_layers + 1)

    def _init_from(self, teacher: dict[str, torch.Tensor], layers: list[int]) -> None:
        """Copy embeddings, the chosen encoder layers (renumbered) and matching heads from the teacher's tensors."""
        mine = self.model.state_dict()
        new_of_old = {t: s for s, t in enumerate(layers)}
        loaded = {}
        for key, value in teacher.items():
            m = re.match(r"(.*\.layer\.)(\d+)(\..*)", key)
            if m:
                if int(m.group(2)) not in new_of_old:
                    continue
                key = f"{m.group(1)}{new_of_old[int(m.group(2))]}{m.group(3)}"
            if key in mine and mine[key].shape == value.shape:
                loaded[key] = value
        if not any(".layer." in k for k in loaded):
            raise ValueError("init_from_teacher: no encoder layer matched the student's parameter names")
        self.model.load_state_dict(loaded, strict=False)

    def forward(self, input_ids, attention_mask):
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
        return out.logits, [masked_mean(h, attention_mask) for h in out.hidden_states]
