"""`kdcache fidelity` (`make fidelity`): does distilling from the cache help? KD students against their
hard-label twins over several seeds, with all labels and in a label-scarce setting (the teacher fine-tuned on a
small labelled part; the cache also covers the unlabelled rest, which only KD can use). docs/fidelity.md."""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from .. import config as C, heads, layout
from ..cache.reader import read_columns
from ..capture.build import build_teacher_cache
from ..data import load_task_data
from ..report import fmt, per_language_rows
from ..train.classification import language_mean_logits
from ..train.loop import train_students
from .machine import machine
from .seeded import cell, mean_std, metric_of, publish

OOF = "out-of-fold targets"
CENTRED = "labels in one language, logits centred"


def run_fidelity(pipeline_name: str, seeds: list[int], students: list[str], scarce: int, out_dir: Path,
                 doc: Path | None, teachers_dir: Path | None = None, cache_root: Path | None = None,
                 overrides: list[str] = (), folds: int = 0, all_labels: bool = True) -> dict[str, Any]:
    """The all-labels setting reuses the pipeline's own teacher and cache; the label-scarce one builds its own.
    With `folds` = k, each setting is run again with out-of-fold training targets (k fold teachers beside the
    setting's teacher), and the render compares the two: KD gain and teacher build time."""
    teachers_dir = teachers_dir or layout.teachers_dir()
    base = C.load_pipeline(pipeline_name, list(overrides))
    task = next(iter(base.tasks))
    metric = metric_of(base.tasks[task].teacher.head)
    runs_of = C.student_families(base, students)
    names = [n for s in students for n in runs_of[s]]
    shared = shared_twins(base, students)
    settings = {}
    if all_labels:
        settings["all labels"] = (list(overrides), teachers_dir, layout.cache_root(base.name, cache_root) / task)
    if scarce:  # 0 = all-labels setting only
        settings[f"{scarce} labelled training rows"] = ([*overrides, f"tasks.{task}.data.labelled_limit={scarce}"],
                                                         out_dir / "teachers-scarce", out_dir / "cache-scarce" / task)
    if not settings:
        raise C.ConfigError("kdcache fidelity: no setting left to run (--scarce 0 with --only-scarce)")
    if folds:
        for name, (over, teachers, cache) in list(settings.items()):
            settings[f"{name}, {OOF} (k={folds})"] = ([*over, f"tasks.{task}.teacher.finetune.folds={folds}"],
                                                      teachers, cache.parent.parent / f"{cache.parent.name}-oof" / task)
    results: dict[str, Any] = {"date": _dt.date.today().isoformat(), "machine": machine(), "pipeline": base.name,
                               "source": base.tasks[task].data.source, "limit": base.tasks[task].data.limit,
                               "seeds": seeds, "students": students, "metric": metric, "settings": {},
                               "shared_twins": shared}
    ft = base.tasks[task].teacher.finetune
    train_rows = len(load_task_data(base.tasks[task].data).splits["train"]) if ft is not None and scarce else 0
    for name, (over, teachers, cache) in settings.items():
        if train_rows and "labelled_limit" in " ".join(over):
            # the small-label teacher gets about as many steps as the full one (up to 10 epochs), not 1/N of them
            over = [*over, f"tasks.{task}.teacher.finetune.epochs={min(10.0, ft.epochs * train_rows / scarce):.2f}"]
        pipeline = C.load_pipeline(pipeline_name, over)
        started = time.perf_counter()
        manifest = build_teacher_cache(pipeline, task, cache, teachers)
        built_s = time.perf_counter() - started
        rows: dict[str, dict[str, list[float]]] = {s: {"kd": [], "hard": []} for s in students}
        by_language: dict[str, dict[str, list[float]]] = {}
        for seed in seeds:
            seeded = C.load_pipeline(pipeline_name, [*over, f"train.seed={seed}"] +
                                     [f"students.{s}.twin=true" for s in students if s not in shared])
            runs = cell(seeded, names, cache.parent, manifest["fingerprint"],
                         out_dir / "runs" / base.name / name.replace(" ", "-") / str(seed))
            for s in students:  # a per-language family counts once per seed: the mean of its languages
                for kd in (True, False):
                    got = [r["test"][metric[0]] for r in runs if r["student"] in runs_of[s] and r["kd"] == kd]
                    if got:  # (a twin is skipped where its rows have no gold labels)
                        rows[s]["kd" if kd else "hard"].append(float(np.mean(got)))
            for s, other in shared.items():  # the same hard-label run: its twin's value, trained once
                rows[s]["hard"] = list(rows[other]["hard"])
            if manifest.get("languages"):
                for label, vals in per_language_rows(runs, metric[0]).items():
                    for code, v in vals.items():
                        by_language.setdefault(label, {}).setdefault(code, []).append(v)
        results["settings"][name] = {"teacher_test_accuracy": manifest["splits"]["test"]["stats"][metric[1]],
                                     "teacher_finetune_epochs": (pipeline.tasks[task].teacher.finetune.epochs
                                                                 if pipeline.tasks[task].teacher.finetune else None),
                                     # caches of token tasks built before kdcache counted labelled rows: all were
                                     "labelled_train_rows": manifest["splits"]["train"]["stats"].get(
                                         "labelled_rows", manifest["splits"]["train"]["rows"]),
                                     "train_rows": manifest["splits"]["train"]["rows"], "students": rows,
                                     "teacher_folds": manifest.get("teacher_folds", 0),
                                     # how far the training targets are from one-hot (in-sample vs out-of-fold)
                                     "teacher_train": {k: manifest["splits"]["train"]["stats"].get(k)
                                                       for k in (metric[1], "mean_entropy_nats")},
                                     # 0 when an earlier run's teacher and cache were reused as they were
                                     "build_seconds": round(built_s, 1), **_transfer(pipeline, names, manifest),
                                     # every cached split (other sources, transfer sets): how the teacher does there
                                     "teacher_splits": {sp: {k: v["stats"].get(k) for k in (metric[1],
                                                                                             "mean_confidence")}
                                                        for sp, v in manifest["splits"].items()}}
        if by_language:  # every student per language, the teacher's own value beside them
            test = manifest["splits"]["test"]["languages"]
            results["settings"][name]["by_language"] = {
                "teacher": {c: [test[c]["stats"].get(metric[1])] for c in manifest["languages"]}, **by_language}
    # an out-of-fold comparison has its own JSON and doc section: it does not replace the pipeline's main one
    name = base.name + ("-oof" if folds else "")
    results["flags"] = (f" --students {','.join(students)} --scarce {scarce}" + (" --only-scarce" if not all_labels else "")
                        + (f" --folds {folds}" if folds else "") + "".join(f" --set {o}" for o in overrides))
    return publish(results, out_dir / f"fidelity-{name}.json", render(results), doc, f"fidelity:{name}")


def shared_twins(p: C.PipelineConfig, students: list[str]) -> dict[str, str]:
    """Students whose hard-label twin would repeat another listed student's twin, mapped to that student: a twin
    reads no transfer split, so `x-transfer`'s twin is `x`'s twin again when the two differ only in `transfer`."""
    plain = {s: dataclasses.replace(p.students[s], twin=False) for s in students if s in p.students}
    out = {}
    for s, st in plain.items():
        same = [o for o, c in plain.items() if o != s and st.transfer and c == dataclasses.replace(st, transfer=())]
        if same:
            out[s] = same[0]
    return out


def _render_languages(s: dict[str, Any], words: str) -> list[str]:
    """The setting's per-language table: the teacher and every student family, mean ± std over seeds."""
    by = s.get("by_language")
    if not by:
        return []
    codes = list(by["teacher"])
    lines = [f"Per language ({words}; a `<name>@<code>` family is one student per language, trained and tested on "
             "its partition; a multilingual student is tested on each partition):", "",
             "| model | " + " | ".join(codes) + " | mean |", "|---|" + "---:|" * (len(codes) + 1)]
    for label, vals in by.items():
        cells = [vals.get(c) or [] for c in codes]
        per_seed = [float(np.mean(x)) for x in zip(*cells)] if all(cells) else []
        lines.append(f"| {label} | " + " | ".join(mean_std(x) if len(x) > 1 else fmt(x[0] if x else None)
                                                  for x in cells)
                     + f" | {mean_std(per_seed) if len(per_seed) > 1 else fmt(per_seed[0] if per_seed else None)} |")
    return lines + [""]


def _render_splits(s: dict[str, Any]) -> list[str]:
    """A line on the teacher per cached split, when the cache holds more than train / validation / test."""
    splits = s.get("teacher_splits") or {}
    if set(splits) <= {"train", "validation", "test"}:
        return []
    parts = []
    for sp, v in splits.items():
        score, confidence = v.values()  # (the metric, the mean top probability)
        parts.append(f"{sp} {fmt(score)}" if score is not None or confidence is None
                     else f"{sp} unlabelled, confidence {confidence:.3f}")
    return ["Teacher per cached split: " + ", ".join(parts) + ".", ""]


def _transfer(pipeline: C.PipelineConfig, students: list[str], manifest: dict[str, Any]) -> dict[str, Any]:
    """The transfer splits the students read: rows, the teacher's time on them (from the shard stats), readers."""
    readers = [s for s in students if pipeline.students[s].transfer]
    splits = {t for s in readers for t in pipeline.students[s].transfer}
    if not splits:
        return {}
    stats = [manifest["splits"][t]["stats"] for t in splits]
    return {"transfer_rows": sum(manifest["splits"][t]["rows"] for t in splits), "transfer_students": readers,
            "transfer_seconds": sum(st["rows"] / st["teacher_rows_per_s"] for st in stats
                                    if st.get("teacher_rows_per_s"))}


def run_zero_shot(pipeline_name: str, labelled: str, student: str, seeds: list[int], out_dir: Path,
                  doc: Path | None, teachers_dir: Path | None = None, cache_root: Path | None = None,
                  overrides: list[str] = ()) -> dict[str, Any]:
    """Labels in one language only: a teacher fine-tuned on `labelled`'s rows labels every language; per language,
    the teacher (zero-shot), `student` trained on its cached soft labels alone (as cached, and for classification
    also centred on `labelled`: `loss.center_languages`), and the same student on that language's gold labels (the
    ceiling, from the pipeline's all-labels cache), over `seeds`."""
    teachers_dir = teachers_dir or layout.teachers_dir()
    base = C.load_pipeline(pipeline_name, list(overrides))
    task = next(iter(base.tasks))
    codes = list(base.tasks[task].data.languages)
    if labelled not in codes:
        raise C.ConfigError(f"pipeline {base.name!r}: --zero-shot {labelled!r} is not one of its languages "
                            f"({', '.join(codes) or 'none: set data.languages'})")
    metric = metric_of(base.tasks[task].teacher.head)
    per_language = [*overrides, f"students.{student}.per_language=true", f"students.{student}.twin=true"]
    zero_shot = [*per_language] + [f"tasks.{task}.data.languages.{c}.labelled_limit=0" for c in codes if c != labelled]
    st = base.students.get(student) or base.students.get(f"{student}@{labelled}")  # (per_language: expanded)
    centred = f"{'students.' + student if st and st.loss else 'train'}.loss.center_languages={labelled}"
    zs_dirs = (out_dir / "teachers-zero-shot", out_dir / "cache-zero-shot" / task)
    settings = {"all labels": (per_language, teachers_dir, layout.cache_root(base.name, cache_root) / task),
                f"labels in {labelled} only": (zero_shot, *zs_dirs)}
    if heads.has(base.tasks[task].teacher.head, heads.CENTER_LANGUAGES):  # the same cache, logits centred on `labelled`
        settings[CENTRED] = ([*zero_shot, centred, f"students.{student}.twin=false"], *zs_dirs)
    results: dict[str, Any] = {"date": _dt.date.today().isoformat(), "machine": machine(), "pipeline": base.name,
                               "labelled": labelled, "student": student, "seeds": seeds, "metric": metric,
                               "languages": codes, "teacher": {}, "runs": {}}
    for name, (over, teachers, cache) in settings.items():
        pipeline = C.load_pipeline(pipeline_name, over)
        manifest = build_teacher_cache(pipeline, task, cache, teachers)
        results["teacher"][name] = {c: manifest["splits"]["test"]["languages"][c]["stats"].get(metric[1])
                                    for c in codes}
        if name == CENTRED:
            results["teacher"][name] = _centred_teacher(str(cache), labelled, pipeline.train.train_split,
                                                        pipeline.train.test_split)
        for seed in seeds:
            seeded = C.load_pipeline(pipeline_name, [*over, f"train.seed={seed}"])
            for r in train_students(seeded, [f"{student}@{c}" for c in codes], cache.parent,
                                    out_dir / "runs" / "zero-shot" / name.replace(" ", "-") / str(seed)):
                results["runs"].setdefault(name, {}).setdefault(r["run"], []).append(r["test"][metric[0]])
    return publish(results, out_dir / f"zero-shot-{base.name}.json", render_zero_shot(results), doc,
                    f"fidelity:{base.name}-zero-shot")


def _centred_teacher(cache: str, reference: str, train_split: str, test_split: str) -> dict[str, float]:
    """Per language, the teacher's test accuracy once its logits are centred on `reference` as the students see
    them (`loss.center_languages`: the means come from the training split)."""
    means = language_mean_logits(cache, train_split)
    test = read_columns(cache, test_split, ["logits", "label", "language"])
    right: dict[str, list[bool]] = {}
    for x, y, c in zip(test["logits"], test["label"], test["language"]):
        right.setdefault(c, []).append(int(np.argmax(np.asarray(x) + means[reference] - means[c])) == y)
    return {c: float(np.mean(v)) for c, v in right.items()}


def render_zero_shot(r: dict[str, Any]) -> str:
    s, lab, words = r["student"], r["labelled"], r["metric"][2]
    zs, full = f"labels in {lab} only", "all labels"
    lines = [f"## Labels in one language: `{r['pipeline']}`, only `{lab}` labelled", "",
             f"`kdcache fidelity {r['pipeline']} --zero-shot {lab} --students {s}` on {r['date']} ({r['machine']}); "
             f"seeds {r['seeds']}; {words}. The teacher is fine-tuned on the `{lab}` rows alone and labels every "
             f"language; `{s}@<code>` is trained on one language's partition: from the teacher's soft labels alone "
             "where that language has no labels, and on its gold labels (hard-label twin, all-labels cache) for the "
             "ceiling.", "",
             f"| language | teacher, {lab} labels only | {s}: KD, no labels in the language | teacher, centred | "
             f"{s}: KD on the centred teacher | {s}: gold labels (ceiling) | teacher, all labels |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for c in r["languages"]:
        kd, kd_c, gold = (r["runs"].get(setting, {}).get(f"{s}@{c}{suffix}", [])
                          for setting, suffix in ((zs, ""), (CENTRED, ""), (full, "-hard")))
        lines.append(f"| {c}{' (labelled)' if c == lab else ''} | {fmt(r['teacher'][zs].get(c))} | "
                     f"{mean_std(kd) if kd else '–'} | {fmt(r['teacher'].get(CENTRED, {}).get(c))} | "
                     f"{mean_std(kd_c) if kd_c else '–'} | {mean_std(gold) if gold else '–'} | "
                     f"{fmt(r['teacher'][full].get(c))} |")
    return "\n".join(lines + ["", f"Centred: each language's cached logits shifted by `{lab}`'s mean training logits "
                                   "minus its own (`loss.center_languages`, docs/multilingual.md); the teacher's "
                                   "column is its test accuracy with the same shift.", ""])


SWEEP = {  # name -> loss changes against the pipeline's loss; the first is the reference row
    "T=2, α=0.5 (reference)": {"temperature": 2.0, "alpha": 0.5},
    "T=1": {"temperature": 1.0, "alpha": 0.5},
    "T=4": {"temperature": 4.0, "alpha": 0.5},
    "α=0 (KD only)": {"temperature": 2.0, "alpha": 0.0},
    "α=0.9": {"temperature": 2.0, "alpha": 0.9},
    "+ feature loss (cosine to the last cached layer)": {"temperature": 2.0, "alpha": 0.5, "features": "last"},
    "α=1 (hard labels only)": {"temperature": 2.0, "alpha": 1.0},
}


def run_sweep(pipeline_name: str, student: str, seeds: list[int], out_dir: Path, doc: Path | None,
              teachers_dir: Path | None = None, cache_root: Path | None = None,
              overrides: list[str] = ()) -> dict[str, Any]:
    """Temperature, α and feature loss on/off for one student: every variant trained in the same pass over the
    cache (same seed, initial weights and batches), over several seeds."""
    teachers_dir = teachers_dir or layout.teachers_dir()
    import dataclasses

    base = C.load_pipeline(pipeline_name, list(overrides))
    task = next(iter(base.tasks))
    head = base.tasks[task].teacher.head
    if not heads.has(head, heads.SWEEP):
        raise C.ConfigError(f"pipeline {base.name!r}: the sweep covers {' and '.join(heads.with_capability(heads.SWEEP))} "
                            f"students, not {head}; for causal-LM targets use `kdcache bench lm` (k, sampled, naive "
                            "top-k)")
    metric = metric_of(head)
    cache = layout.cache_root(base.name, cache_root) / task
    manifest = build_teacher_cache(base, task, cache, teachers_dir)
    layers = (manifest.get("features") or {}).get("layers") or []
    st = base.students[student]
    rows: dict[str, list[float]] = {}
    for seed in seeds:
        variants = {}
        for name, change in SWEEP.items():
            change = dict(change)
            if change.pop("features", None):
                if not layers:
                    continue  # the cache holds no features: no feature-loss row
                change["features"] = (C.FeatureLossConfig(teacher_layer=layers[-1], student_layer=0, kind="cosine",
                                                          weight=0.5),)
            loss = dataclasses.replace(base.train.loss, **change)
            variants[f"{student}~{len(variants)}"] = (name, dataclasses.replace(st, loss=loss, twin=False))
        pipeline = dataclasses.replace(base, students={k: v for k, (_, v) in variants.items()},
                                       train=dataclasses.replace(base.train, seed=seed))
        for r in train_students(pipeline, list(variants), cache.parent, out_dir / "runs" / "sweep" / str(seed)):
            rows.setdefault(variants[r["run"]][0], []).append(r["test"][metric[0]])
    results = {"date": _dt.date.today().isoformat(), "machine": machine(), "pipeline": base.name, "student": student,
               "seeds": seeds, "overrides": list(overrides), "metric": metric, "rows": rows}
    return publish(results, out_dir / f"sweep-{base.name}-{student}.json", render_sweep(results), doc,
                    f"fidelity:{base.name}-sweep-{student}")


def render_sweep(r: dict[str, Any]) -> str:
    ref = next(iter(r["rows"].values()))
    sets = "".join(f" --set {o}" for o in r.get("overrides", []))
    words = r.get("metric", metric_of(heads.DEFAULT_HEAD))[2]
    lines = [f"## Sweep: `{r['student']}` on `{r['pipeline']}`", "",
             f"`kdcache fidelity {r['pipeline']} --sweep {r['student']}{sets}` on {r['date']} ({r['machine']}); seeds "
             f"{r['seeds']}. Every variant trained in the same pass (same initial weights and batches); Δ is paired "
             "against the first row.", "", f"| variant | {words} | Δ vs reference |", "|---|---:|---:|"]
    for name, accs in r["rows"].items():
        lines.append(f"| {name} | {mean_std(accs)} | {mean_std([a - b for a, b in zip(accs, ref)])} |")
    return "\n".join(lines + [""])


# Tang et al. (2019), "Distilling task-specific knowledge from BERT into simple neural networks", Table 1, SST-2
TANG_2019 = {"bilstm": 0.867, "bilstm (distilled)": 0.907}


def render(r: dict[str, Any]) -> str:
    """One pipeline's section of docs/fidelity.md."""
    limit = f", at most {r['limit']} rows per split (the first ones)" if r.get("limit") else ""
    words = (r.get("metric") or metric_of(heads.DEFAULT_HEAD))[2]
    oof = " --folds" in r.get("flags", "")
    lines = [f"## Pipeline `{r['pipeline']}` (data: {r.get('source', '?')}{limit})"
             + (f": {OOF} against in-sample targets" if oof else ""), "",
             f"`kdcache fidelity {r['pipeline']}{r.get('flags', '') if oof else ''}` on {r['date']} "
             f"({r['machine']}); seeds {r['seeds']}; "
             f"{words}.", ""]
    for name, s in r["settings"].items():
        lines += [f"### {name}", "",
                  f"Teacher {words} {s['teacher_test_accuracy']:.4f} (fine-tuned for "
                  f"{s.get('teacher_finetune_epochs')} epochs); {s['labelled_train_rows']} of "
                  f"{s['train_rows']} training rows labelled (hard-label twins learn from those only; KD students "
                  "learn from every row's cached soft labels)."
                  + (f" Transfer set: {s['transfer_rows']} unlabelled variants of the training rows, labelled once by "
                     "the teacher in " + (f"{s['transfer_seconds']:.0f} s" if s.get("transfer_seconds") else "the cache")
                     + f", read by {', '.join(s['transfer_students'])} (KD alone on them)." if s.get("transfer_rows")
                     else ""), "",
                  *_render_splits(s), "| student | KD | hard labels | KD gain |", "|---|---:|---:|---:|"]
        for student, v in s["students"].items():
            gain = [a - b for a, b in zip(v["kd"], v["hard"])]
            lines.append(f"| {student} | {mean_std(v['kd'])} | {mean_std(v['hard'])} | {mean_std(gain)} |")
        lines.append("")
        shared = r.get("shared_twins") or {}
        if shared:
            lines += ["(" + "; ".join(f"{s}'s hard labels are {o}'s twin" for s, o in shared.items())
                      + ": a twin reads no transfer rows, so it is trained once.)", ""]
        lines += _render_languages(s, words)
    lines += _render_oof(r)
    other_domain = any(set(s.get("teacher_splits") or {}) - {"train", "validation", "test", "transfer"}
                       for s in r["settings"].values())
    if r.get("source") == "sst2" and not other_domain:  # (a cross-domain teacher is not Tang et al.'s setting)
        transfer = max((s.get("transfer_rows") or 0 for s in r["settings"].values()), default=0)
        augmented = (f"a transfer set of {transfer} variants of the training phrases (theirs: about 20 per phrase of "
                     "67,349)" if transfer else "no augmentation")
        lines += ["Next to Tang et al. (2019, full SST-2, BERT-large teacher, 300-d word2vec BiLSTM, "
                  f"training set augmented for distillation): BiLSTM hard labels {TANG_2019['bilstm']:.3f}; BiLSTM distilled "
                  f"{TANG_2019['bilstm (distilled)']:.3f} (gain +{TANG_2019['bilstm (distilled)'] - TANG_2019['bilstm']:.3f}). "
                  f"Ours differ in teacher (MiniLM-L6, 22M), embeddings (random init, no word2vec), {augmented}, "
                  "and the training subset above; the comparison is of the gain's direction and size, not of "
                  "absolute accuracy.", ""]
    return "\n".join(lines)


def _render_oof(r: dict[str, Any]) -> list[str]:
    """Out-of-fold against in-sample targets, paired by seed: what cross-fitting buys each KD student, and its cost."""
    # (the in-sample setting's name, its results, the out-of-fold results)
    pairs = [(name.split(f", {OOF}")[0], s) for name, s in r["settings"].items() if OOF in name]
    pairs = [(base, r["settings"][base], s) for base, s in pairs]
    if not pairs:
        return []
    lines = [f"### {OOF} against in-sample targets", "",
             "KD students trained on out-of-fold targets minus the same students (same seed, initial weights and "
             "batches) trained on in-sample targets; teacher build time is the wall time of `kdcache cache` for the "
             "setting on this machine (0 where an earlier run's teacher and cache were reused).", "",
             "| setting | student | in-sample KD | out-of-fold KD | gain | teacher build s (in-sample / out-of-fold) |",
             "|---|---|---:|---:|---:|---:|"]
    stats = []
    for name, ins, oof in pairs:
        t = [(s.get("teacher_train") or {}) for s in (ins, oof)]
        key = r["metric"][1]
        if all(x.get(key) is not None for x in t):
            stats.append(f"- {name}: the teacher's {key.removeprefix('teacher_').replace('_', ' ')} on the rows "
                         f"it labels for training {t[0][key]:.3f} in-sample, {t[1][key]:.3f} out-of-fold; mean entropy of "
                         f"those targets {t[0]['mean_entropy_nats']:.3f} / {t[1]['mean_entropy_nats']:.3f} nats.")
        for student, v in oof["students"].items():
            base = ins["students"][student]["kd"]
            gain = [a - b for a, b in zip(v["kd"], base)]
            lines.append(f"| {name} | {student} | {mean_std(base)} | {mean_std(v['kd'])} | "
                         f"{mean_std(gain)} | {ins.get('build_seconds', 0):.0f} / {oof.get('build_seconds', 0):.0f} |")
    return lines + ([""] + stats if stats else []) + [""]
