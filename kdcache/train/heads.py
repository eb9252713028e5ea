"""The training heads, by the name of the teacher head whose cache they read: the one place stage two dispatches on
a head. Cross-task students combine them (multitask.py). A new head registers its own (`register`) beside its
`HeadSpec` (kdcache/heads.py)."""

from __future__ import annotations

from .. import heads
from .chat import ChatLM
from .classification import SequenceClassification
from .head import TrainHead
from .lm import CausalLM
from .tokens import TokenClassification

HEADS: dict[str, TrainHead] = heads.Registry()
register = HEADS.register  # a new head: register(MyHead()) beside its HeadSpec

for _h in (SequenceClassification(), TokenClassification(), CausalLM(), ChatLM()):
    register(_h)
