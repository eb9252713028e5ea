"""The training heads, by the name of the teacher head whose cache they read: the one place stage two dispatches on
a head. Cross-task students combine them (multitask.py)."""

from __future__ import annotations

from .classification import SequenceClassification
from .head import TrainHead
from .lm import CausalLM
from .tokens import TokenClassification

HEADS: dict[str, TrainHead] = {h.name: h for h in (SequenceClassification(), TokenClassification(), CausalLM())}
