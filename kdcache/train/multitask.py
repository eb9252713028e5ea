"""Cross-task students: one shared word-level encoder learns several tasks' caches (e.g. sentiment and CoNLL NER),
a head per task; each task's batches are scored by that task's own training head (its loss against its own
teacher's cached targets, its metric), so the model only has to produce each task's logits."""

from __future__ import annotations

from typing import Any

from torch import nn

from .. import config as C, heads
from ..students import WordTokenizer, build_student
from ..students.tokenizers import WORD
from .head import Source, StudentModel


def sentence_words(batch: dict[str, Any], fields: list[str] | tuple[str, ...]) -> list[list[str]]:
    """A classification batch's texts as word lists (case kept for the word shapes), text pairs joined."""
    return [[w for f in fields for w in WORD.findall(batch[f][i])] for i in range(len(batch["id"]))]


class MultitaskModel(StudentModel):
    """students.multitask.MultiTaskBiLSTM with its word vocabulary: `forward(task, batch)` gives that task's logits
    ([B, W, C] per word for a token task, [B, C] per sentence otherwise)."""

    def __init__(self, net: nn.Module, tokenizer: WordTokenizer, text_fields: dict[str, tuple[str, ...] | None]) -> None:
        super().__init__()
        self.net, self.tokenizer = net, tokenizer
        self.text_fields = text_fields  # task -> its text columns, or None for a token task (rows are words)

    @property
    def core(self) -> nn.Module:
        return self.net

    def forward(self, task: str, batch: dict[str, Any], features: bool = True):
        if "_words" not in batch:  # split once per batch, whatever the number of students reading it
            fields = self.text_fields[task]
            batch["_words"] = batch["words"] if fields is None else sentence_words(batch, fields)
        dev = self.device()
        ids, shapes, mask = (x.to(dev) for x in self.tokenizer.encode_words(batch["_words"]))
        return self.net(task, ids, shapes, mask), []


def multitask_tokenizer(st: C.StudentConfig, sources: dict[str, Source]) -> WordTokenizer:
    """A word vocabulary from every listed task's cached training words."""
    words = []
    for t in sorted(st.tasks):
        src = sources[t]
        split = src.train.split
        if heads.has(src.manifest["head"], heads.WORD_ROWS):
            words += src.column(split, "words")
        else:
            cols = {f: src.column(split, f) for f in src.train.text_fields}
            words += sentence_words({**cols, "id": cols[src.train.text_fields[0]]}, src.train.text_fields)
    return WordTokenizer.build_from_words(words, st.vocab_size)


def build_multitask(st: C.StudentConfig, sources: dict[str, Source], tokenizer: WordTokenizer,
                    where: str) -> MultitaskModel:
    task_heads = {t: (sources[t].manifest["head"], len(sources[t].manifest["label_names"])) for t in st.tasks}
    fields = {t: None if heads.has(sources[t].manifest["head"], heads.WORD_ROWS) else sources[t].train.text_fields
              for t in st.tasks}
    return MultitaskModel(build_student(st.arch, st.params, tokenizer.vocab_size, task_heads, where=where), tokenizer,
                          fields)
