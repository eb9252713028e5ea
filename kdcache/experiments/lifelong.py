"""`kdcache lifelong` (`make lifelong`): a task's data arrives in rounds of classes (the pipeline's `lifelong:`
section). Each round refreshes the teacher's cache (rebuilt when the teacher is fine-tuned again, grown by the new
rows when it is kept) and updates one student three ways, per seed:

- `scratch`: trained anew on every row so far;
- `continual`: starts from its previous round's run (`init_from`) and trains on the new classes' rows only;
- `memory`: the same, plus a KD term on its previous run's own outputs over those rows (that run cached as a
  teacher with `teacher.run`: learning without forgetting).

Per round: test accuracy on every class so far, on the earlier rounds' classes (forgetting) and on the new ones,
the wall time of each strategy and the rows each teacher pass covered. docs/lifecycle.md, docs/fidelity.md."""

from __future__ import annotations

import datetime as _dt
import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from .. import config as C
from ..cache.reader import read_columns
from ..capture.build import build_teacher_cache
from ..capture.refresh import refresh_teacher_cache
from ..train.loop import train_students
from .seeded import mean_std, publish
from .machine import machine

STRATEGIES = ("scratch", "continual", "memory")


def _accuracy(correct: list[int], rows: list[int], classes: list[int]) -> float | None:
    """Accuracy over the test rows of `classes`, from per-class counts."""
    n = sum(rows[c] for c in classes)
    return sum(correct[c] for c in classes) / n if n else None


def _groups(label_names: list[str], seen: list[str], new: tuple[str, ...]) -> dict[str, list[int]]:
    return {"seen": [label_names.index(x) for x in seen],
            "old": [label_names.index(x) for x in seen if x not in new],
            "new": [label_names.index(x) for x in new]}


def _teacher_scores(cache: Path, groups: dict[str, list[int]], classes: int) -> dict[str, float | None]:
    cols = read_columns(str(cache), "test", ["label", "logits"])
    y = np.array([-1 if v is None else v for v in cols["label"]])
    pred = np.array(cols["logits"]).argmax(1)
    rows = np.bincount(y[y >= 0], minlength=classes).tolist()
    correct = np.bincount(y[(y >= 0) & (pred == y)], minlength=classes).tolist()
    return {g: _accuracy(correct, rows, c) for g, c in groups.items()}


def _student(base: C.PipelineConfig, name: str, **changes: Any) -> str:
    """A `--set` override defining student `name` as the lifelong student with `changes` (no hard-label twin)."""
    spec = {k: v for k, v in C.to_dict(base.students[base.lifelong.student]).items() if v is not None}
    spec.update(twin=False, **changes)
    return f"students.{name}={json.dumps(spec)}"


def run_lifelong(pipeline_name: str, seeds: list[int], out_dir: Path, doc: Path | None,
                 teachers_dir: Path | None = None, overrides: list[str] = ()) -> dict[str, Any]:
    """Every round of the pipeline's `lifelong:` section for every seed; the per-round table (JSON, printed, and
    the pipeline's section of `doc`). Starts from nothing in `out_dir` (its caches and runs are rebuilt)."""
    base = C.load_pipeline(pipeline_name, list(overrides))
    life = base.lifelong
    if life is None:
        raise C.ConfigError(f"pipeline {base.name!r} has no `lifelong:` section (rounds of arriving classes); see "
                            "pipelines/lifelong/pipeline.yaml")
    task = life.task or next(iter(base.tasks))
    for sub in ("cache", "cache.archive", "memory", "runs"):
        shutil.rmtree(out_dir / sub, ignore_errors=True)
    teachers_dir = teachers_dir or out_dir / "teachers"
    cache = out_dir / "cache" / task
    student = life.student
    finetuned = base.tasks[task].teacher.finetune is not None
    seen: list[str] = []
    teacher_classes: list[str] = []
    teacher_round = 0  # the round whose teacher labels this one (its own folder: a rerun fine-tunes nothing again)
    previous: dict[tuple[str, int], Path] = {}  # (strategy, seed) -> its last run
    results: dict[str, Any] = {"date": _dt.date.today().isoformat(), "machine": machine(), "pipeline": base.name,
                               "task": task, "student": student, "seeds": seeds, "memory_weight": life.memory_weight,
                               "epochs": base.train.epochs,
                               "rounds": []}
    for r, rnd in enumerate(life.rounds):
        seen += rnd.labels
        if rnd.teacher == "refresh":
            teacher_classes, teacher_round = list(seen), r
        over = [*overrides, f"tasks.{task}.data.labels={json.dumps(seen)}"]
        if finetuned:
            over.append(f"tasks.{task}.teacher.finetune.labels={json.dumps(teacher_classes)}")
        pipeline = C.load_pipeline(pipeline_name, over)
        started = time.perf_counter()
        manifest, _drift = refresh_teacher_cache(pipeline, task, cache, teachers_dir / f"round-{teacher_round}")
        teacher_s = time.perf_counter() - started
        label_names = list(manifest["label_names"])
        groups = _groups(label_names, seen, rnd.labels)
        total = sum(v["rows"] for v in manifest["splits"].values())
        gens = manifest.get("generations") or []  # a rebuilt cache has none; a grown one ends with this round's
        grown = bool(r) and len(gens) > 1 and gens[-1]["fingerprint"] == manifest["fingerprint"]
        captured = total - sum(s["rows"] for s in gens[-2]["splits"].values()) if grown else total
        entry: dict[str, Any] = {
            "round": r, "classes": list(rnd.labels), "teacher": rnd.teacher, "cache": "grown" if grown else
            ("refreshed" if r else "built"), "teacher_rows": captured, "cache_rows": total,
            "teacher_seconds": round(teacher_s, 1), "teacher_test": _teacher_scores(cache, groups, len(label_names)),
            "students": {k: {g: [] for g in groups} for k in STRATEGIES},
            "seconds": {k: [] for k in STRATEGIES}, "best_epoch": {k: [] for k in STRATEGIES}}
        for seed in seeds:
            runs = out_dir / "runs" / f"seed-{seed}" / f"round-{r}"
            names = {"scratch": f"{student}-scratch"}
            sets = [f"train.seed={seed}", _student(base, names["scratch"])]
            extra_s = {k: 0.0 for k in STRATEGIES}
            if r:
                names.update(continual=f"{student}-continual", memory=f"{student}-memory")
                sets.append(_student(base, names["continual"], init_from=str(previous["continual", seed]),
                                     train_labels=list(rnd.labels)))
                memory = out_dir / "memory" / f"seed-{seed}" / f"round-{r}" / task
                t0 = time.perf_counter()
                build_teacher_cache(_memory_pipeline(pipeline_name, over, task, previous["memory", seed]), task,
                                    memory, teachers_dir)
                extra_s["memory"] = time.perf_counter() - t0
                loss = C.to_dict(base.student_loss(student))
                sets.append(_student(base, names["memory"], init_from=str(previous["memory", seed]),
                                     train_labels=list(rnd.labels), loss={**loss, "ensemble": "terms"},
                                     teachers={task: 1.0, str(memory): life.memory_weight}))
            seeded = C.load_pipeline(pipeline_name, [*over, *sets])
            done = {m["run"]: m for m in train_students(seeded, list(names.values()), {task: str(cache)}, runs)}
            for strategy in STRATEGIES:
                name = names.get(strategy, names["scratch"])  # round 0: one run starts all three
                test = done[name]["test"]
                for g, classes in groups.items():
                    entry["students"][strategy][g].append(_accuracy(test["class_correct"], test["class_rows"], classes))
                entry["seconds"][strategy].append(done[name]["train_seconds"] + extra_s[strategy])
                entry["best_epoch"][strategy].append(done[name]["best_epoch"])
                previous[strategy, seed] = runs / name
        results["rounds"].append(entry)
    return publish(results, out_dir / f"lifelong-{base.name}.json", render(results), doc, f"lifelong:{base.name}")


def _memory_pipeline(pipeline_name: str, over: list[str], task: str, run: Path) -> C.PipelineConfig:
    """The round's data with the previous run as the teacher (its outputs on every row: the memory term)."""
    teacher = {"run": str(run), "sanity": {"enabled": False}}  # a memory is not judged on the new classes
    return C.load_pipeline(pipeline_name, [*over, f"tasks.{task}.teacher={json.dumps(teacher)}",
                                           f"tasks.{task}.cache.features={{}}"])


def render(r: dict[str, Any]) -> str:
    """The per-round table: the teacher's pass, then each strategy's accuracy on every class so far, the old
    classes and the new ones (mean ± std over seeds), and its wall time."""
    out = [f"## Lifelong: pipeline `{r['pipeline']}`, classes arriving in rounds ({r['date']})", "",
           f"Machine: {r['machine']}. Command: `kdcache lifelong {r['pipeline']} --seeds "
           f"{','.join(map(str, r['seeds']))}`. Student `{r['student']}`, {len(r['seeds'])} seed(s); test accuracy "
           "(mean ± std) on every class so far (*seen*), on the earlier rounds' classes (*old*: forgetting) and on "
           f"the round's new classes (*new*). Memory weight {r['memory_weight']}.", "",
           "| round | classes | teacher | cache | teacher rows | teacher s | teacher seen / old / new |",
           "|---|---|---|---|---:|---:|---|"]
    fmt = lambda v: "–" if v is None else f"{v:.3f}"  # noqa: E731
    for e in r["rounds"]:
        t = e["teacher_test"]
        out.append(f"| {e['round']} | {', '.join(e['classes'])} | {e['teacher']} | {e['cache']} | "
                   f"{e['teacher_rows']:,} of {e['cache_rows']:,} | {e['teacher_seconds']:.0f} | "
                   f"{fmt(t['seen'])} / {fmt(t['old'])} / {fmt(t['new'])} |")
    out += ["", "| round | strategy | seen | old (forgetting) | new | train s | epoch kept |",
            "|---|---|---|---|---|---:|---|"]
    for e in r["rounds"]:
        for k in STRATEGIES if e["round"] else ("scratch",):
            acc = e["students"][k]
            cells = [mean_std(acc[g]) if acc[g] and None not in acc[g] else "–" for g in ("seen", "old", "new")]
            out.append(f"| {e['round']} | {k if e['round'] else 'all three (first round)'} | {' | '.join(cells)} | "
                       f"{np.mean(e['seconds'][k]):.1f} | {', '.join(map(str, e['best_epoch'][k]))} |")
    out += ["", "*scratch*: retrained on every row so far; *continual*: the previous round's run trained on the new "
            "classes' rows; *memory*: the same plus a KD term on the previous run's own outputs over those rows "
            "(its time includes caching them). Epoch kept: the epoch of best validation accuracy (on every class so far), "
            f"per seed, of {r.get('epochs', '?')}. Teacher rows: the rows the teacher ran over this round (a kept "
            "teacher labels only the new rows: the cache grows).", ""]
    return "\n".join(out)
