"""The capture heads, by the name a pipeline's `teacher.head` uses: the one place stage one dispatches on a head.
A new head registers its own (`register`) beside its `HeadSpec` (kdcache/heads.py)."""

from __future__ import annotations

from .. import heads
from .chat import ChatLM
from .classification import SequenceClassification
from .head import CaptureHead
from .lm import CausalLM
from .tokens import TokenClassification

HEADS: dict[str, CaptureHead] = heads.Registry()
register = HEADS.register  # a new head: register(MyHead()) beside its HeadSpec

for _h in (SequenceClassification(), TokenClassification(), CausalLM(), ChatLM()):
    register(_h)
