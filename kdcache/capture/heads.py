"""The capture heads, by the name a pipeline's `teacher.head` uses: the one place stage one dispatches on a head."""

from __future__ import annotations

from .classification import SequenceClassification
from .head import CaptureHead
from .lm import CausalLM
from .tokens import TokenClassification

HEADS: dict[str, CaptureHead] = {h.name: h for h in (SequenceClassification(), TokenClassification(), CausalLM())}
