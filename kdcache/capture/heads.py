"""The capture heads, by the name a pipeline's `teacher.head` uses: the one place stage one dispatches on a head.
A new head registers its own (`register`) beside its `HeadSpec` (kdcache/heads.py)."""

from __future__ import annotations

from .. import heads
from .classification import SequenceClassification
from .head import CaptureHead
from .lm import CausalLM
from .tokens import TokenClassification

HEADS: dict[str, CaptureHead] = {}


def register(head: CaptureHead) -> CaptureHead:
    """Add (or replace) the capture head of `head.name`, a registered `HeadSpec`."""
    heads.get(head.name)
    HEADS[head.name] = head
    return head


for _h in (SequenceClassification(), TokenClassification(), CausalLM()):
    register(_h)
