"""Student registry: architecture name -> how to build it and which teacher heads it can learn from. Adding an
architecture: one small module with a params dataclass and a model class, plus one entry in REGISTRY."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from torch import nn

from ..heads import CAUSAL_LM, CHAT_LM, SEQUENCE, TOKEN
from ..typedconfig import build as build_params
from .base import Student
from .bilstm import BiLSTM, BiLSTMParams
from .bow import BagOfWords, BowParams
from .llama import LlamaParams, llama_student
from .multitask import MultiTaskBiLSTM
from .tagger import BiLSTMTagger, BiLSTMTaggerParams, TransformerTagger, TransformerTaggerParams
from .textcnn import TextCNN, TextCNNParams
from .tokenizers import HFTokenizer, WordTokenizer
from .transformer import TransformerParams, TransformerStudent


@dataclass(frozen=True)
class Arch:
    """A registered architecture. `make(params, ...)` takes the params dataclass then the head's sizes:
    sequence classifiers (vocab, labels, pad id) -> Student; taggers (vocab, labels); multitask (vocab,
    {task: (head, labels)}); causal LMs (vocab, sequence length)."""

    make: Callable[..., nn.Module]
    params: type
    heads: tuple[str, ...]
    multitask: bool = False  # one model for several tasks (a `tasks:` mapping), a head per task


REGISTRY: dict[str, Arch] = {
    "bow": Arch(BagOfWords, BowParams, (SEQUENCE,)),
    "textcnn": Arch(TextCNN, TextCNNParams, (SEQUENCE,)),
    "bilstm": Arch(BiLSTM, BiLSTMParams, (SEQUENCE,)),
    "transformer": Arch(TransformerStudent, TransformerParams, (SEQUENCE,)),
    "bilstm-tagger": Arch(BiLSTMTagger, BiLSTMTaggerParams, (TOKEN,)),
    "transformer-tagger": Arch(TransformerTagger, TransformerTaggerParams, (TOKEN,)),
    "bilstm-multitask": Arch(MultiTaskBiLSTM, BiLSTMTaggerParams, (SEQUENCE, TOKEN), multitask=True),
    "llama": Arch(llama_student, LlamaParams, (CAUSAL_LM, CHAT_LM)),
}


def build_student(arch: str, params: dict[str, Any], *sizes: Any, where: str = "student") -> nn.Module:
    """Instantiate a registered architecture (the config loader checked `arch`); unknown params name the key."""
    spec = REGISTRY[arch]
    return spec.make(build_params(spec.params, params, f"{where}.params"), *sizes)


__all__ = ["REGISTRY", "Arch", "Student", "build_student", "WordTokenizer", "HFTokenizer"]
