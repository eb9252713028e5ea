"""Student registry. Adding an architecture: one small module with a params dataclass and a `Student`
subclass, plus one line in REGISTRY."""

from __future__ import annotations

from typing import Any

from ..config import ConfigError, build
from .base import Student
from .bilstm import BiLSTM, BiLSTMParams
from .bow import BagOfWords, BowParams
from .textcnn import TextCNN, TextCNNParams
from .tokenizers import HFTokenizer, WordTokenizer
from .transformer import TransformerParams, TransformerStudent

REGISTRY: dict[str, tuple[type, type]] = {
    "bow": (BagOfWords, BowParams),
    "textcnn": (TextCNN, TextCNNParams),
    "bilstm": (BiLSTM, BiLSTMParams),
    "transformer": (TransformerStudent, TransformerParams),
}


def build_student(arch: str, params: dict[str, Any], vocab_size: int, num_labels: int, pad_id: int,
                  where: str = "student") -> Student:
    """Instantiate a registered architecture; unknown params name the key and the closest valid one."""
    if arch not in REGISTRY:
        raise ConfigError(f"{where}.arch: unknown architecture {arch!r}; registered: {', '.join(REGISTRY)}")
    cls, params_cls = REGISTRY[arch]
    return cls(build(params_cls, params, f"{where}.params"), vocab_size, num_labels, pad_id)


__all__ = ["REGISTRY", "Student", "build_student", "WordTokenizer", "HFTokenizer"]
