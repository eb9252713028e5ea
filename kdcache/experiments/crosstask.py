"""`kdcache fidelity <pipeline>` on a pipeline of several tasks (`pipelines/cross`): every multi-task student and
its hard-label twin over seeds, each task's test metric per student, and the paired gain of sharing one encoder
(a student of all tasks against the student of that task alone, same seed). docs/fidelity.md."""

from __future__ import annotations

import datetime as _dt
from pathlib import Path
from typing import Any

import numpy as np

from .. import config as C, layout
from ..capture.build import build_teacher_cache
from .machine import machine
from .seeded import cell, mean_std, metric_of, publish


def run_cross_task(pipeline_name: str, seeds: list[int], out_dir: Path, doc: Path | None,
                   teachers_dir: Path | None = None, cache_root: Path | None = None,
                   overrides: list[str] = ()) -> dict[str, Any]:
    """Build (or reuse) each task's cache, train every multi-task student with its twin per seed (resumable cells),
    and publish per-task mean ± std with the paired sharing gain."""
    base = C.load_pipeline(pipeline_name, list(overrides))
    root = layout.cache_root(base.name, cache_root)
    manifests = {t: build_teacher_cache(base, t, root / t, teachers_dir or layout.teachers_dir()) for t in base.tasks}
    students = [s for s, st in base.students.items() if st.tasks]
    if not students:
        raise C.ConfigError(f"kdcache fidelity {base.name}: a pipeline of several tasks is compared through its "
                            "multi-task students (`tasks:`); it has none")
    metrics = {t: metric_of(m["head"]) for t, m in manifests.items()}
    # scores[student][kd|hard][task] -> one value per seed
    scores: dict[str, dict[str, dict[str, list[float]]]] = {
        s: {"kd": {t: [] for t in base.students[s].tasks}, "hard": {t: [] for t in base.students[s].tasks}}
        for s in students}
    fingerprint = {t: m["fingerprint"] for t, m in manifests.items()}
    for seed in seeds:
        seeded = C.load_pipeline(pipeline_name, [*overrides, f"train.seed={seed}"]
                                 + [f"students.{s}.twin=true" for s in students])
        for r in cell(seeded, students, root, fingerprint, out_dir / "runs" / base.name / "cross-task" / str(seed)):
            for t, got in r["test"].items():  # (a multi-task student's test metrics are per task)
                scores[r["student"]]["kd" if r["kd"] else "hard"][t].append(float(got[metrics[t][0]]))
    results = {"date": _dt.date.today().isoformat(), "machine": machine(), "pipeline": base.name, "seeds": seeds,
               "metrics": metrics, "students": scores, "weights": {s: base.students[s].tasks for s in students},
               "teachers": {t: m["splits"]["test"]["stats"][metrics[t][1]] for t, m in manifests.items()},
               "flags": "".join(f" --set {o}" for o in overrides)}
    return publish(results, out_dir / f"fidelity-{base.name}.json", render(results), doc, f"fidelity:{base.name}")


def sharing_gains(r: dict[str, Any]) -> dict[str, dict[str, dict[str, list[float]]]]:
    """gains[student][kd|hard][task]: per seed, a student of several tasks minus the student of that task alone."""
    alone = {next(iter(w)): s for s, w in r["weights"].items() if len(w) == 1}
    return {s: {kind: {t: [a - b for a, b in zip(v, r["students"][alone[t]][kind][t])]
                       for t, v in r["students"][s][kind].items() if t in alone}
                for kind in ("kd", "hard")}
            for s, w in r["weights"].items() if len(w) > 1}


def render(r: dict[str, Any]) -> str:
    """The cross-task section: per task, KD and hard-label mean ± std over seeds, then the paired sharing gains."""
    tasks = list(r["teachers"])
    head = " | ".join(f"{t} {r['metrics'][t][2]} (KD / hard)" for t in tasks)
    lines = [f"## Pipeline `{r['pipeline']}`: one student of several tasks against one per task", "",
             f"`kdcache fidelity {r['pipeline']}{r.get('flags', '')}` on {r['date']} ({r['machine']}); seeds "
             f"{r['seeds']}. Each multi-task student and its hard-label twin per seed, mean ± std.", "",
             f"| student | {head} |", "|---|" + "---:|" * len(tasks),
             "| teachers | " + " | ".join(f"{r['teachers'][t]:.4f}" for t in tasks) + " |"]
    for s, v in r["students"].items():
        lines.append(f"| {s} ({', '.join(r['weights'][s])}) | " + " | ".join(
            f"{mean_std(v['kd'][t])} / {mean_std(v['hard'][t])}" if v["kd"].get(t) else "–" for t in tasks) + " |")
    gains = sharing_gains(r)
    if gains:
        lines += ["", "Sharing one encoder, paired by seed (the student of several tasks minus the student of the "
                      "task alone, in points):", "", f"| student | {head} |", "|---|" + "---:|" * len(tasks)]
        for s, g in gains.items():
            lines.append(f"| {s} | " + " | ".join(
                f"{_points(g['kd'][t])} / {_points(g['hard'][t])}" if g["kd"].get(t) else "–" for t in tasks) + " |")
    return "\n".join(lines + [""])


def _points(xs: list[float]) -> str:
    return f"{100 * np.mean(xs):+.1f} ± {100 * np.std(xs, ddof=1) if len(xs) > 1 else 0.0:.1f}"
