"""Rules of a pipeline that span fields or sections, checked at load: settings that depend on the teacher's head
ask the head registry by capability (kdcache/heads.py); student architectures and their heads come from the student
registry (imported when a pipeline with students is checked, so the schema alone needs no torch)."""

from __future__ import annotations

import dataclasses
import difflib
from .. import heads
from ..typedconfig import ConfigError

# (annotations name the schema's classes, config/schema.py, which imports this module)

STANDARD_SPLITS = ("train", "validation", "test", "dev", "valid", "val")


def check_split_names(p: PipelineConfig, name: str, task: TaskConfig) -> None:
    """A `data.files` split that no setting reads and whose name is a near-miss of a standard one (`tset:`) is a
    typo: refused at load, not found missing at stage two."""
    ft = task.teacher.finetune
    used = {p.train.train_split, p.train.eval_split, p.train.test_split, *((ft.train_split, ft.eval_split) if ft else ()),
            *(x for st in p.students.values() for x in (st.train_split, *st.transfer))}
    for split in task.data.files:
        if split in STANDARD_SPLITS or split in used:
            continue
        close = difflib.get_close_matches(split, STANDARD_SPLITS, n=1, cutoff=0.6)
        if close:
            raise ConfigError(f"`tasks.{name}.data.files.{split}`: no setting reads a split {split!r}; did you mean "
                              f"`{close[0]}`? (a split of another name is read only when a setting names it, e.g. "
                              "`train.eval_split` or a student's `transfer`)")


def check_task(name: str, task: TaskConfig) -> None:
    """Settings that depend on the teacher's head, named by key (so a typo fails at load, not mid-capture)."""
    where, head, feats = f"tasks.{name}", task.teacher.head, task.cache.features
    can = lambda capability: heads.has(head, capability)  # noqa: E731
    if feats.layers and feats.pooling not in heads.get(head).poolings:
        allowed = " or ".join(heads.get(head).poolings) or f"no features (a {head} cache keeps targets only)"
        raise ConfigError(f"`{where}.cache.features.pooling` = {feats.pooling!r}: a {head} teacher keeps {allowed}; "
                          f"set `{where}.cache.features.pooling` accordingly")
    if task.data.extra and not can(heads.EXTRA_SPLITS):
        raise ConfigError(f"`{where}.data.extra`: extra splits from other sources are for {_which(heads.EXTRA_SPLITS)} "
                          f"teachers (this task's teacher head is {head})")
    if task.data.augment is not None and not can(heads.AUGMENT):
        raise ConfigError(f"`{where}.data.augment`: augmented transfer sets are for {_which(heads.AUGMENT)} teachers "
                          f"(this task's teacher head is {head})")
    if task.data.chat is None and can(heads.CHAT_ROWS):
        raise ConfigError(f"`{where}.data.chat`: a {head} teacher reads one conversation per row; say which columns "
                          f"hold it (`{where}.data.chat: {{}}` for a `messages` column, or `prompt` and `response`)")
    if task.data.chat is not None and not can(heads.CHAT_ROWS):
        raise ConfigError(f"`{where}.data.chat`: chat rows are for {_which(heads.CHAT_ROWS)} teachers (this task's "
                          f"teacher head is {head}: set `{where}.teacher.head: chat-lm`)")
    folds = task.teacher.finetune.folds if task.teacher.finetune is not None else 0
    if folds == 1 or (folds and (not can(heads.FOLDS) or feats.pooling == "tokens" and feats.layers)):
        raise ConfigError(f"`{where}.teacher.finetune.folds` = {folds}: out-of-fold targets need k >= 2 folds (0 = "
                          f"off), a {_which(heads.FOLDS)} teacher, and pooled features (cls/mean) if any")
    ft = task.teacher.finetune
    if ft is not None and ft.train == "head" and not can(heads.HEAD_ONLY_FINETUNE):
        raise ConfigError(f"`{where}.teacher.finetune.train` = head: head-only fine-tuning is for "
                          f"{_which(heads.HEAD_ONLY_FINETUNE)} teachers; use `all`")
    if task.teacher.finetune is not None and not can(heads.FINETUNE):
        raise ConfigError(f"`{where}.teacher.finetune`: kdcache fine-tunes {_which(heads.FINETUNE, ' and ')} heads; "
                          f"a {head} teacher is used as it is (remove the section)")
    ft_labels = task.teacher.finetune.labels if task.teacher.finetune is not None else ()
    names = task.data.label_names
    for key, labels in (("data.labels", task.data.labels), ("teacher.finetune.labels", ft_labels)):
        if labels and (not can(heads.CLASS_FILTER) or task.data.languages or key != "data.labels" and folds):
            raise ConfigError(f"`{where}.{key}`: keeping rows by class is for {_which(heads.CLASS_FILTER)} data "
                              "without `languages` (and a fine-tuning row filter, without `finetune.folds`)")
        unknown = [x for x in labels if names and x not in names]
        if unknown:
            raise ConfigError(f"`{where}.{key}`: unknown label(s) {unknown}; the task's labels are {list(names)}")
    t = task.teacher
    if (t.max_memory or t.offload_folder) and not t.device_map:
        raise ConfigError(f"`{where}.teacher.max_memory` / `.offload_folder` place a teacher over devices: set "
                          f"`{where}.teacher.device_map` (e.g. auto) as well")
    for key, value in (("device_map", t.device_map), ("tp_plan", t.tp_plan)):
        if value and (not can(heads.DEVICE_MAP) or not t.model or t.from_config or t.finetune is not None):
            raise ConfigError(f"`{where}.teacher.{key}` = {value!r}: a teacher over several devices is for "
                              f"{_which(heads.DEVICE_MAP)} teachers loaded from `model` and used as they are (no "
                              "`from_config`, no `finetune`)")
    if t.tp_plan and t.gguf_file:
        raise ConfigError(f"`{where}.teacher.tp_plan` with `gguf_file`: convert the GGUF teacher once without "
                          "`tp_plan` (it is saved under the teachers folder), then name that folder as `model`")
    if t.tp_size is not None and (not t.tp_plan or t.tp_size < 1):
        raise ConfigError(f"`{where}.teacher.tp_size` = {t.tp_size}: processes per tensor-parallel replica, a "
                          f"positive number with `{where}.teacher.tp_plan: auto`")
    if t.device_map and t.tp_plan:
        raise ConfigError(f"`{where}.teacher`: `device_map` places whole layers, `tp_plan` splits each layer over the "
                          "processes: choose one")
    if task.teacher.run and (not can(heads.STUDENT_TEACHER) or task.teacher.finetune is not None or feats.layers
                             or task.teacher.model or task.teacher.from_config or task.teacher.gguf_file):
        raise ConfigError(f"`{where}.teacher.run`: a student run as the teacher is a sequence classifier used as it "
                          "is: no `model`, `from_config`, `gguf_file`, `finetune` or `cache.features`")


def _which(capability: str, joiner: str = " or ") -> str:
    """The heads with `capability`, for a message ("sequence-classification")."""
    return joiner.join(heads.with_capability(capability)) or "no"


def check_student(p: PipelineConfig, name: str, st: StudentConfig) -> None:
    from ..students import REGISTRY  # (torch: only when a pipeline has students)
    where = f"students.{name}"
    arch = REGISTRY.get(st.arch)
    if arch is None:
        raise ConfigError(f"`{where}.arch`: unknown architecture {st.arch!r}; registered: {', '.join(REGISTRY)}")
    if st.tasks or arch.multitask:
        bad = [t for t in st.tasks if t not in p.tasks]
        if bad or not st.tasks or not arch.multitask or st.task is not None or any(w < 0 for w in st.tasks.values()):
            multi = ", ".join(a for a, spec in REGISTRY.items() if spec.multitask)
            raise ConfigError(f"pipeline {p.name!r}: `{where}`: a cross-task student has arch {multi}, no `task`, "
                              f"and `tasks:` mapping each of the pipeline's tasks it learns ({', '.join(p.tasks)}) "
                              "to a loss weight >= 0")
    elif (st.task or next((t for t in st.teachers if t in p.tasks), None)
          or (next(iter(p.tasks)) if len(p.tasks) == 1 else None)) not in p.tasks:
        raise ConfigError(f"pipeline {p.name!r}: `{where}.task` must name one of the tasks ({', '.join(p.tasks)})")
    if st.languages or st.per_language:
        if st.tasks:
            raise ConfigError(f"`{where}`: a cross-task student learns every language of its tasks; remove "
                              "`languages` / `per_language`")
        have = p.tasks[next(iter(p.student_tasks(name)))].data.languages
        unknown = [c for c in st.languages if c not in have]
        if not have or unknown:
            raise ConfigError(f"`{where}.languages`/`per_language`: its task's data has "
                              f"{'languages ' + ', '.join(have) if have else 'no `data.languages`'}"
                              f"{'; unknown: ' + ', '.join(unknown) if unknown else ''}")
    if st.init_from and (st.tasks or arch.multitask or not all(heads.has(p.tasks[t].teacher.head, heads.CONTINUAL)
                                                              for t in p.student_tasks(name))):
        raise ConfigError(f"`{where}.init_from`: continual students are single-task "
                          f"{_which(heads.CONTINUAL)} students")
    if st.teachers:  # tasks of this pipeline, or other caches of the same rows given by path or URL ("/" in it)
        ok = [heads.has(p.tasks[t].teacher.head, heads.SEVERAL_TEACHERS) if t in p.tasks else "/" in t
              for t in st.teachers]  # (a cache given by path is checked when it is opened)
        if st.tasks or not all(ok) or any(w <= 0 for w in st.teachers.values()) or \
                p.student_tasks(name).keys() - st.teachers.keys():
            raise ConfigError(f"`{where}.teachers` = {dict(st.teachers)}: several teachers are the pipeline's "
                              f"{_which(heads.SEVERAL_TEACHERS)} tasks ({', '.join(p.tasks)}) over the same rows, "
                              "each with a "
                              "weight > 0, including the student's own `task`; not for cross-task students")
    if st.train_labels:
        task = p.tasks[next(iter(p.student_tasks(name)))]
        names = task.data.label_names
        if st.tasks or not heads.has(task.teacher.head, heads.CLASS_FILTER) or \
                [x for x in st.train_labels if names and x not in names]:
            raise ConfigError(f"`{where}.train_labels` = {list(st.train_labels)}: names of its task's classes "
                              f"({', '.join(names) or 'from the data'}), for single-task "
                              f"{_which(heads.CLASS_FILTER)} students")
    split = p.student_train_split(name)
    if (st.transfer or st.train_split) and (st.tasks or split in st.transfer):
        raise ConfigError(f"`{where}.transfer` = {list(st.transfer)} / `train_split`: other training splits are for "
                          f"single-task students, and `transfer` must not repeat the training split `{split}`")
    loss = st.loss or p.train.loss
    lw = f"{where}.loss" if st.loss else "train.loss"
    if loss.kind == "jsd" and not 0 < loss.beta < 1:
        raise ConfigError(f"`{lw}.beta` = {loss.beta}: the jsd loss needs 0 < beta < 1")
    for task in p.student_tasks(name):
        head = p.tasks[task].teacher.head
        if head not in arch.heads:
            fits = ", ".join(a for a, spec in REGISTRY.items() if head in spec.heads and not spec.multitask)
            raise ConfigError(f"`{where}.arch`: {st.arch!r} cannot learn from task {task!r} (a {head} cache); use "
                              f"one of {fits}")
        if heads.has(head, heads.TOPK_TARGETS):
            check_lm_loss(loss, p.tasks[task].cache, lw)
        if heads.has(head, heads.CROSS_TOKENIZER) and st.tokenizer != "words" and not p.tasks[task].cache.offsets:
            raise ConfigError(f"`{where}.tokenizer` = {st.tokenizer!r}: a {head} student with its own "
                              f"tokenizer needs a cache with offsets; set tasks.{task}.cache.offsets: true")
        codes = p.tasks[task].data.languages
        if loss.center_languages is not None and (not heads.has(head, heads.CENTER_LANGUAGES) or st.teachers or
                                                  loss.center_languages not in codes):
            raise ConfigError(f"`{lw}.center_languages` = {loss.center_languages!r}: one of the task's languages "
                              f"({', '.join(codes) if codes else 'it has no `data.languages`'}), for single-teacher "
                              f"{_which(heads.CENTER_LANGUAGES)} students")
        if loss.kind == "uld" and (not heads.has(head, heads.CROSS_TOKENIZER) or st.tokenizer == "words") \
                and loss.alpha < 1.0:
            raise ConfigError(f"`{lw}.kind` is `uld`: the sorted-probability baseline is for causal-LM students "
                              "with their own tokenizer (`tokenizer: bpe:<size>` or a tokenizer name)")
        if heads.has(head, heads.WORD_ROWS):
            for i, f in enumerate(loss.features):
                if f.student_layer not in (0, -1):
                    raise ConfigError(f"`{lw}.features[{i}].student_layer` = {f.student_layer}: a tagger exposes "
                                      "one per-word representation (its last layer); use -1 (or 0)")


def check_lifelong(p: PipelineConfig, life: LifelongConfig) -> None:
    """A lifelong section names a classification task and student, and rounds of distinct, known classes."""
    task = life.task or (next(iter(p.tasks)) if len(p.tasks) == 1 else None)
    if task not in p.tasks or not heads.has(p.tasks[task].teacher.head, heads.LIFELONG):
        raise ConfigError(f"`lifelong.task` = {life.task!r}: name one of the pipeline's {_which(heads.LIFELONG)} "
                          f"tasks ({', '.join(p.tasks)})")
    st = p.students.get(life.student)
    if st is None or p.student_tasks(life.student) != {task: 1.0} or st.teachers or st.transfer:
        raise ConfigError(f"`lifelong.student` = {life.student!r}: name a student of task {task} (one teacher, no "
                          f"transfer splits); students: {', '.join(p.students)}")
    seen = [x for r in life.rounds for x in r.labels]
    names = p.tasks[task].data.label_names
    if not life.rounds or len(set(seen)) != len(seen) or any(not r.labels for r in life.rounds) or \
            (names and set(seen) - set(names)) or life.rounds[0].teacher != "refresh":
        known = f", of {', '.join(names)}" if names else ""
        raise ConfigError(f"`lifelong.rounds`: each round names new classes (no class twice{known}), "
                          "and the first round fine-tunes the teacher (`teacher: refresh`)")


def student_families(p: PipelineConfig, names: list[str]) -> dict[str, list[str]]:
    """Each named student's runs: itself, or for a `per_language` student all its `<name>@<code>` students."""
    out = {s: [n for n in p.students if n == s or n.startswith(f"{s}@")] for s in names}
    missing = [s for s, runs in out.items() if not runs]
    if missing:
        raise ConfigError(f"pipeline {p.name!r} has no student {', '.join(map(repr, missing))} "
                          f"(its students: {', '.join(dict.fromkeys(n.split('@')[0] for n in p.students)) or 'none'})")
    return out


def per_language_students(p: PipelineConfig) -> dict[str, StudentConfig]:
    """Students with `per_language` become one student per language, `<name>@<code>` (in the task's language order)."""
    out = {}
    for name, st in p.students.items():
        if not st.per_language:
            out[name] = st
            continue
        task = p.student_tasks(name)
        codes = st.languages or tuple(p.tasks[next(iter(task))].data.languages)
        for code in codes:
            out[f"{name}@{code}"] = dataclasses.replace(st, per_language=False, languages=(code,))
    return out


def check_lm_loss(loss: LossConfig, cache: CacheConfig, lw: str) -> None:
    """A causal-LM student's loss must ask for targets its cache stores."""
    if loss.features:
        raise ConfigError(f"`{lw}.features`: causal-LM students take no feature terms (the cache keeps none)")
    if loss.alpha >= 1.0:
        return
    if loss.kind == "mse":
        raise ConfigError(f"`{lw}.kind` = 'mse' compares full logits, and an LM cache keeps the top-k and its tail: "
                          "use kl, reverse_kl, jsd or soft_ce")
    if loss.kind == "uld" and loss.targets != "topk":
        raise ConfigError(f"`{lw}.kind` = 'uld' sorts the cached top-k probabilities; set targets: topk")
    if loss.targets == "sampled":
        if not cache.samples:
            raise ConfigError(f"`{lw}.targets` is `sampled` but the task's cache.samples is 0; set cache.samples "
                              "> 0, or use targets `topk`")
        if loss.temperature != cache.sample_temperature:
            raise ConfigError(f"`{lw}.temperature` = {loss.temperature}: sampled targets are drawn at "
                              f"cache.sample_temperature = {cache.sample_temperature}; use that")
    elif loss.temperature not in cache.temperatures:
        raise ConfigError(f"`{lw}.temperature` = {loss.temperature} is not one the cache stores the log-sum-exp "
                          f"and tail for (cache.temperatures = {list(cache.temperatures)}); pick one of them")

