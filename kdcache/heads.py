"""The teacher heads, declared once: a `HeadSpec` per head names its metric, the features its teacher can keep and
the capabilities it has. Every rule and feature gate asks this registry by capability (`has(head, FOLDS)`), never
by comparing head names, so a new head (span extraction, a chat variant of causal-LM) says here what it supports.

Adding a head (docs/architecture.md): one `register(HeadSpec(...))`, a capture head (`capture.heads.register`), a
training head (`train.heads.register`) and a codec (`cache.codecs.register`). No torch import here: the config
loader and `kdcache config --reference` read this module."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

SEQUENCE, TOKEN, CAUSAL_LM, CHAT_LM = "sequence-classification", "token-classification", "causal-lm", "chat-lm"
DEFAULT_HEAD = SEQUENCE  # a pipeline's `teacher.head` when it names none

# -- capabilities: what a head's caches and students support beyond the common path (one line each, for the docs)
CAPABILITIES = {
    "finetune": "kdcache fine-tunes the teacher's head for the task (`teacher.finetune`)",
    "head_only_finetune": "`teacher.finetune.train: head` (frozen encoder, features computed once)",
    "folds": "out-of-fold training targets (`teacher.finetune.folds`)",
    "extra_splits": "cached splits from other sources (`data.extra`)",
    "augment": "augmented transfer sets (`data.augment`)",
    "class_filter": "keeping rows by class (`data.labels`, `finetune.labels`, a student's `train_labels`)",
    "student_teacher": "a finished student run as the teacher (`teacher.run`)",
    "live_teacher": "online KD with the live teacher (`kdcache train --teacher live`)",
    "several_teachers": "a student of several teachers' caches of the same rows (`teachers:`)",
    "continual": "a student starting from a finished run (`init_from`)",
    "center_languages": "per-language centring of cached logits (`loss.center_languages`)",
    "growth": "a cache that grows by new rows without recapturing the old ones",
    "drift": "drift measured between an old and a refreshed cache",
    "lifelong": "classes arriving in rounds (`lifelong:`)",
    "topk_targets": "per-position top-k targets with an exact tail per cached temperature (a loss must ask for a "
                    "stored temperature; no feature terms)",
    "cross_tokenizer": "students with their own tokenizer, aligned through the cache's byte offsets",
    "word_rows": "rows are word lists (a student's word vocabulary reads the cached words; one per-word "
                 "representation for feature terms)",
    "majority_baseline": "a majority-class baseline (the report's per-language row)",
    "sweep": "the `kdcache fidelity --sweep` grid of temperature and alpha",
    "device_map": "a teacher over several devices: placed by layer over GPUs, CPU memory and disk "
                  "(`teacher.device_map`), or split within each layer (`teacher.tp_plan`)",
    "chat_rows": "one conversation per row, rendered with the teacher's chat template (`data.chat`); targets only "
                 "where a student learns (the response turns)",
}
(FINETUNE, HEAD_ONLY_FINETUNE, FOLDS, EXTRA_SPLITS, AUGMENT, CLASS_FILTER, STUDENT_TEACHER, LIVE_TEACHER,
 SEVERAL_TEACHERS, CONTINUAL, CENTER_LANGUAGES, GROWTH, DRIFT, LIFELONG, TOPK_TARGETS, CROSS_TOKENIZER, WORD_ROWS,
 MAJORITY_BASELINE, SWEEP, DEVICE_MAP, CHAT_ROWS) = CAPABILITIES


class HeadError(ValueError):
    """A head name no registered head has."""


@dataclass(frozen=True)
class HeadMetric:
    """How a head's students are ranked: their test/validation `key`, the teacher's statistic in the manifest."""

    key: str
    teacher_stat: str
    words: str
    higher_is_better: bool = True

    def score(self, metrics: dict[str, Any]) -> float:
        """Higher is better, whatever the metric (a missing value ranks last)."""
        v = metrics.get(self.key)
        if v is None:
            return float("-inf")
        return float(v) if self.higher_is_better else -float(v)


@dataclass(frozen=True)
class HeadSpec:
    """One teacher head: its name (a pipeline's `teacher.head`, a manifest's `head`), how its students are ranked,
    what its teacher can keep as features (`cache.features.pooling` values; empty: none) and its capabilities."""

    name: str
    metric: HeadMetric
    help: str
    poolings: tuple[str, ...] = ()
    capabilities: frozenset[str] = field(default_factory=frozenset)

    def __post_init__(self) -> None:
        unknown = set(self.capabilities) - set(CAPABILITIES)
        if unknown:
            raise HeadError(f"head {self.name!r}: unknown capabilities {sorted(unknown)}; known: "
                            f"{', '.join(CAPABILITIES)}")


HEADS: dict[str, HeadSpec] = {}


def register(spec: HeadSpec) -> HeadSpec:
    """Add (or replace) a head; returns it."""
    HEADS[spec.name] = spec
    return spec


def get(name: str) -> HeadSpec:
    try:
        return HEADS[name]
    except KeyError:
        raise HeadError(f"unknown teacher head {name!r}; registered: {', '.join(HEADS)}") from None


class Registry(dict):
    """One stage's implementation per head name (capture heads, training heads): `register` refuses a name no
    `HeadSpec` declares, so no stage can know a head the rest of kdcache does not."""

    def register(self, item: Any) -> Any:
        """Add (or replace) the implementation of `item.name`, a registered `HeadSpec`."""
        get(item.name)
        self[item.name] = item
        return item


def has(head: str, capability: str) -> bool:
    """Whether `head` (a name) has `capability` (one of CAPABILITIES; a typo is a bug, so it raises)."""
    if capability not in CAPABILITIES:
        raise HeadError(f"unknown capability {capability!r}")
    return capability in get(head).capabilities


def with_capability(capability: str) -> list[str]:
    """The registered heads that have `capability`, in registration order (for messages)."""
    return [n for n in HEADS if has(n, capability)]


register(HeadSpec(
    SEQUENCE, HeadMetric("accuracy", "teacher_accuracy", "test accuracy"),
    "one row per example, the teacher's full class logits",
    poolings=("cls", "mean", "tokens"),
    capabilities=frozenset({FINETUNE, HEAD_ONLY_FINETUNE, FOLDS, EXTRA_SPLITS, AUGMENT, CLASS_FILTER, STUDENT_TEACHER,
                            LIVE_TEACHER, SEVERAL_TEACHERS, CONTINUAL, CENTER_LANGUAGES, GROWTH, DRIFT, LIFELONG,
                            MAJORITY_BASELINE, SWEEP})))
register(HeadSpec(
    TOKEN, HeadMetric("f1", "teacher_entity_f1", "test entity F1"),
    "one row per sentence, the teacher's tag logits per word (NER)",
    poolings=("words",),
    capabilities=frozenset({FINETUNE, CONTINUAL, WORD_ROWS, SWEEP})))
register(HeadSpec(
    CAUSAL_LM, HeadMetric("perplexity", "teacher_perplexity", "test perplexity", higher_is_better=False),
    "one row per packed sequence, top-k next-token targets per position",
    capabilities=frozenset({TOPK_TARGETS, CROSS_TOKENIZER, DEVICE_MAP})))
register(HeadSpec(
    CHAT_LM, HeadMetric("perplexity", "teacher_perplexity", "test perplexity on response tokens",
                        higher_is_better=False),
    "one row per conversation, top-k next-token targets at its response positions only",
    capabilities=frozenset({TOPK_TARGETS, DEVICE_MAP, CHAT_ROWS})))
