"""Presentation of every head: data/runs/<pipeline>/report.md and its plots, rebuilt from the run folders and the
caches' manifests, and the one-line summaries the CLI prints for a cache split or a finished run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .cache.format import CAUSAL_LM, SEQUENCE, TOKEN, CacheFormatError
from .cache.drift import read_drift
from .cache.reader import open_manifest, read_column
from .errors import KdcacheError
from .metrics import METRICS, HeadMetric, classification_metrics, log_softmax

CROSS = "cross-task"


class ReportError(KdcacheError):
    """Nothing to report yet; the message says which command makes it."""


def _fmt(v: Any, spec: str = ".4f") -> str:
    return "–" if v is None else format(v, spec)


# ----------------------------------------------------------------------------------------------- teacher rows

def _teacher(m: dict[str, Any]) -> dict[str, Any]:
    t = m["fingerprint_inputs"]["teacher"]
    return {"run": f"teacher ({t['name']})", "task": m["task"], "arch": t["class"], "kd": None,
            "parameters": t.get("parameters"), "device": m.get("device")}


def teacher_row_classification(cache: str, test_split: str) -> dict[str, Any]:
    """Test metrics from the cached logits, size and speed from the manifest."""
    m = open_manifest(cache)[2]
    logits = np.stack(read_column(str(cache), test_split, "logits"))
    labels = np.array([-1 if y is None else y for y in read_column(str(cache), test_split, "label")])
    pred = logits.argmax(1)
    stats = m["splits"][test_split]["stats"]
    return {**_teacher(m), "test": classification_metrics(pred, labels, pred, len(m["label_names"])),
            "inference_examples_per_s_cpu": stats.get("teacher_rows_per_s"), "size_bytes": None,
            "train_seconds": None, "baseline": _majority_baseline(cache, m, labels)}


def _majority_baseline(cache: str, m: dict[str, Any], test_labels: np.ndarray) -> dict[str, Any] | None:
    """The training split's most frequent label predicted for every test row: what any model must beat."""
    if "train" not in m["splits"]:
        return None
    train = [y for y in read_column(str(cache), "train", "label") if y is not None and y >= 0]
    if not train:
        return None
    label = int(np.bincount(train).argmax())
    pred = np.full(len(test_labels), label)
    return {"run": f"majority class ({m['label_names'][label]})",
            "test": classification_metrics(pred, test_labels, pred, len(m["label_names"]))}


def teacher_row_tokens(cache: str, test_split: str) -> dict[str, Any]:
    m = open_manifest(cache)[2]
    st = m["splits"][test_split]["stats"]
    return {**_teacher(m), "test": {"f1": st["teacher_entity_f1"]}, "uncovered_words": st.get("uncovered_words"),
            # tagging every word `O` finds no entity: F1 0, the floor a tagger must rise from
            "baseline": {"run": "all-`O` baseline", "test": {"f1": 0.0, "precision": 0.0, "recall": 0.0}}}


def teacher_row_lm(cache: str, test_split: str) -> dict[str, Any]:
    m = open_manifest(cache)[2]
    st = m["splits"][test_split]["stats"]
    return {**_teacher(m), "test": {"perplexity": st["teacher_perplexity"], "kl_to_teacher": 0.0,
                                    "bits_per_byte": st.get("teacher_bits_per_byte")},
            "tokens_per_s": st.get("teacher_tokens_per_s"), "mean_tail_mass": st.get("mean_tail_mass"),
            "top_k": m["lm"]["top_k"]}


# ------------------------------------------------------------------------------------------------- tables

def _gain(r: dict[str, Any], by_run: dict[str, dict], key: str, sign: float = 1.0) -> float | None:
    """The KD run's test `key` minus its hard-label twin's (times `sign`)."""
    twin = by_run.get(f"{r['run']}-hard")
    mine, theirs = (r.get("test") or {}).get(key), ((twin or {}).get("test") or {}).get(key)
    return None if not r["kd"] or mine is None or theirs is None else sign * (mine - theirs)


def classification_lines(runs: list[dict], teachers: dict[str, dict]) -> list[str]:
    by_run = {r["run"]: r for r in runs}
    device = next(iter(teachers.values()), {}).get("device", "?")
    lines = ["Test split metrics. Agreement = share of test rows where the student's prediction equals the teacher's. "
             "KD gain = test accuracy of the KD student minus its hard-label twin (same architecture, seed and data). "
             "CPU speed: student examples/s on ONE CPU thread of this machine, tokenisation included, warmed up, "
             "the median of 3 passes over 256 test texts (teacher: all threads of the capture, measured while "
             f"caching, on {device}). The majority class predicts the training split's most frequent label.", "",
             "| model | task | params | size MB | test acc | macro-F1 | agreement | CPU ex/s | train s | KD gain |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for task, t in teachers.items():
        lines.append(f"| **{t['run']}** | {task} | {t['parameters'] or 0:,} | – | {_fmt(t['test']['accuracy'])} | "
                     f"{_fmt(t['test']['macro_f1'])} | 1.0000 | {_fmt(t['inference_examples_per_s_cpu'], '.0f')} | – | – |")
        if t.get("baseline"):
            b = t["baseline"]["test"]
            lines.append(f"| {t['baseline']['run']} | {task} | 0 | – | {_fmt(b['accuracy'])} | {_fmt(b['macro_f1'])} | "
                         "– | – | – | – |")
    for r in _in_order(runs):
        test = r.get("test", {})
        lines.append(f"{_student(r)} {_fmt((r.get('size_bytes') or 0) / 1e6, '.2f')} | "
                     f"{_fmt(test.get('accuracy'))} | {_fmt(test.get('macro_f1'))} | {_fmt(test.get('agreement'))} | "
                     f"{_fmt(r.get('inference_examples_per_s_cpu'), '.0f')} | {_fmt(r['train_seconds'], '.1f')} | "
                     f"{_fmt(_gain(r, by_run, 'accuracy'), '+.4f')} |")
    return lines


def _in_order(runs: list[dict]) -> list[dict]:
    """By task and student, each KD run just before its hard-label twin."""
    return sorted(runs, key=lambda r: (r["task"], r["student"], not r["kd"]))


def _student(r: dict[str, Any]) -> str:
    """The cells every head's table starts a student row with: name (arch, KD or hard labels), task, params."""
    flag = " ⚠ at chance" if r.get("at_chance") else ""
    return (f"| {r['run']} ({r['arch']}{', KD' if r['kd'] else ', hard labels'}){flag} | {r['task']} | "
            f"{r['parameters']:,} |")


def token_lines(runs: list[dict], teachers: dict[str, dict]) -> list[str]:
    by_run = {r["run"]: r for r in runs}
    lines = ["Token classification: entity-level F1 on the test split (exact type and boundaries, conlleval "
             "rules); agreement = share of words tagged as the teacher tags them. KD gain = F1 of the KD student "
             "minus its hard-label twin (same architecture, seed and batches).", "",
             "| model | task | params | test entity F1 | precision | recall | teacher agreement | train s | KD gain |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for task, t in teachers.items():
        lines.append(f"| **{t['run']}** | {task} | {t['parameters'] or 0:,} | {t['test']['f1']:.4f} | – | – | 1.0000 | "
                     "– | – |")
        lines.append(f"| {t['baseline']['run']} | {task} | 0 | 0.0000 | – | – | – | – | – |")
    for r in _in_order(runs):
        test = r.get("test", {})
        lines.append(f"{_student(r)} {_fmt(test.get('f1'))} | {_fmt(test.get('precision'))} | "
                     f"{_fmt(test.get('recall'))} | {_fmt(test.get('teacher_agreement'))} | "
                     f"{r['train_seconds']:.1f} | {_fmt(_gain(r, by_run, 'f1'), '+.4f')} |")
    return lines


def lm_lines(runs: list[dict], teachers: dict[str, dict]) -> list[str]:
    by_run = {r["run"]: r for r in runs}
    lines = ["Causal-LM students: test perplexity on next tokens and KL(teacher ‖ student) over the cached top-k "
             "ids plus the exact tail bucket (T = 1). Gain = CE twin's perplexity minus the KD student's. Perplexity "
             "counts each model's own tokens; bits per byte (caches with offsets) compare any tokenizers. A student "
             "with its own tokenizer (docs/cross-tokenizer.md) learns from the teacher at its aligned positions "
             "(their share in `aligned`), and its KL is on the projected targets there.", "",
             "| model | task | params | tokenizer | targets | test ppl | bits/byte | aligned | KL to teacher | train s "
             "| ppl gain vs CE twin |",
             "|---|---|---:|---|---|---:|---:|---:|---:|---:|---:|"]
    for task, t in teachers.items():
        lines.append(f"| **{t['run']}** | {task} | {t['parameters'] or 0:,} | teacher's | – | "
                     f"{t['test']['perplexity']:.2f} | {_fmt(t['test'].get('bits_per_byte'))} | – | 0 | – | – |")
    for r in _in_order(runs):
        test = r.get("test", {})
        targets = (("ULD" if r["loss"].get("kind") == "uld" else r["loss"].get("targets", "topk"))
                   if r["kd"] else "next-token CE")
        tok = r.get("tokenizer", "teacher's")
        if tok != "teacher's" and r.get("student_vocab_size"):
            tok = f"{tok} ({r['student_vocab_size']:,} ids)"
        lines.append(f"| {r['run']} | {r['task']} | {r['parameters']:,} | {tok} | {targets} | "
                     f"{_fmt(test.get('perplexity'), '.2f')} | {_fmt(test.get('bits_per_byte'))} | "
                     f"{_fmt(test.get('aligned_share'), '.2f')} | {_fmt(test.get('kl_to_teacher'))} | "
                     f"{r['train_seconds']:.1f} | {_fmt(_gain(r, by_run, 'perplexity', -1.0), '+.2f')} |")
    return lines


def cross_lines(runs: list[dict[str, Any]]) -> list[str]:
    """One row per cross-task run: each task's test metric (accuracy or entity F1) and its KD gain over the twin."""
    by_run = {r["run"]: r for r in runs}
    tasks = sorted({t for r in runs for t in r["tasks"]})

    def metric(r, t):
        m = ((r or {}).get("test") or {}).get(t)
        return None if m is None else (m["f1"] if "f1" in m else m.get("accuracy"))

    lines = ["Cross-task students: one shared encoder, a head per task, trained on every listed task's cache. "
             "Test accuracy (classification) or entity F1 (token classification) per task; KD gain against the "
             "hard-label twin.", "",
             "| model | task weights | params | " + " | ".join(f"{t} test | {t} KD gain" for t in tasks) + " |",
             "|---|---|---:|" + "---:|---:|" * len(tasks)]
    teacher = []
    for t in tasks:  # each task's own teacher, from its cache's statistics
        cache = next(r["cache"][t] for r in runs if t in r["cache"])
        try:
            st = open_manifest(cache)[2]["splits"]["test"]["stats"]
            v = st.get("teacher_entity_f1", st.get("teacher_accuracy"))
        except (KeyError, FileNotFoundError, CacheFormatError):
            v = None
        teacher += [_fmt(v), "–"]
    lines.append("| **teachers** (one per task) | – | – | " + " | ".join(teacher) + " |")
    for r in sorted(runs, key=lambda r: (r["student"], not r["kd"])):
        twin = by_run.get(f"{r['run']}-hard") if r["kd"] else None
        cells = []
        for t in tasks:
            v, w = metric(r, t), metric(twin, t)
            cells += [_fmt(v), "–" if v is None or w is None else f"{v - w:+.4f}"]
        weights = ", ".join(f"{t} {w:g}" for t, w in sorted(r["tasks"].items()))
        lines.append(f"| {r['run']} ({'KD' if r['kd'] else 'hard labels'}) | {weights} | {r['parameters']:,} | "
                     + " | ".join(cells) + " |")
    return lines


# ------------------------------------------------------------------------------------------------- plots

def _scatter(ax, runs: list[dict], teachers: list[dict], xkey: str, metric: str) -> None:
    """Students (o = KD, x = hard labels) and teachers (*) at (xkey, test metric), a dashed line per baseline
    (majority class, all-`O`), and labels moved apart so that none overprints another."""
    from matplotlib.ticker import NullFormatter
    placed = []
    for r in runs + teachers:
        x, y = r.get(xkey), (r.get("test") or {}).get(metric)
        if not x or y is None:
            continue
        teacher = r in teachers
        style = {"marker": "*", "s": 220, "c": "black"} if teacher else \
            {"marker": "o" if r["kd"] else "x", "s": 60, "c": "tab:blue" if r["kd"] else "tab:orange"}
        ax.scatter(x, y, **style)
        placed.append((x, y, r["run"].split(" (")[0]))
    for t in teachers:
        base = (t.get("baseline") or {}).get("test", {}).get(metric)
        if base is not None:
            ax.axhline(base, ls="--", lw=1, c="gray")
            ax.annotate(t["baseline"]["run"], (0.01, base), xycoords=("axes fraction", "data"),
                        textcoords="offset points", xytext=(0, 3), fontsize=8, color="gray")
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(NullFormatter())  # 2x10^2, 3x10^2 ... overprint on a short log axis
    ax.grid(alpha=0.3)
    _label_apart(ax, placed)


def _label_apart(ax, points: list[tuple[float, float, str]], step: float = 11.0) -> None:
    """Label each point, nudging a label down in `step`-point steps while its box would overlap one already
    placed (bow and bow-hard often sit on top of each other)."""
    fig = ax.figure
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    boxes = []
    for x, y, name in sorted(points, key=lambda p: -p[1]):
        dy = 4.0
        while True:
            text = ax.annotate(name, (x, y), textcoords="offset points", xytext=(5, dy), fontsize=8)
            box = text.get_window_extent(renderer).expanded(1.02, 1.1)
            if not any(box.overlaps(b) for b in boxes) or dy < -12 * step:
                boxes.append(box)
                break
            text.remove()
            dy -= step


def _majority_accuracy(cache: str, language: str, test_split: str) -> float | None:
    """Test accuracy of predicting the most frequent training label of `language` for each of its test rows."""
    train = [y for y in read_column(cache, "train", "label", (language,)) if y is not None and y >= 0]
    test = np.array([-1 if y is None else y for y in read_column(cache, test_split, "label", (language,))])
    if not train or not (test >= 0).any():
        return None
    return float((test[test >= 0] == np.bincount(train).argmax()).mean())


def language_section(runs: list[dict[str, Any]], runs_dir: Path, test_split: str) -> list[str]:
    """Students of multilingual caches, metric per language: a table (teacher and the split's majority class per
    language first; per-language students `<name>@<code>` gathered in one row) and report-languages.png."""
    import matplotlib.pyplot as plt
    lines: list[str] = []
    tasks = sorted({r["task"] for r in runs if r.get("languages") and r.get("head") != CROSS})
    fig, axes = plt.subplots(1, max(1, len(tasks)), figsize=(7 * max(1, len(tasks)), 4.2), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        mine = [r for r in runs if r["task"] == task and r.get("languages") and r.get("head") != CROSS]
        try:
            m = open_manifest(mine[0]["cache"])[2]
        except (KeyError, FileNotFoundError, CacheFormatError):
            continue
        metric = METRICS[m["head"]]
        codes = list(m.get("languages") or sorted({c for r in mine for c in r["languages"]}))
        per_lang = m["splits"].get(test_split, {}).get("languages", {})
        if m["head"] == CAUSAL_LM and m["lm"].get("offsets"):  # per byte: students with other tokenizers compare
            metric = HeadMetric("bits_per_byte", "teacher_bits_per_byte", "test bits per byte", higher_is_better=False)
        rows: dict[str, dict[str, float | None]] = {
            "teacher": {c: per_lang.get(c, {}).get("stats", {}).get(metric.teacher_stat) for c in codes}}
        if m["head"] == SEQUENCE and "train" in m["splits"]:
            rows["majority class (of each language's training split)"] = {
                c: _majority_accuracy(mine[0]["cache"], c, test_split) for c in codes}
        rows.update(_per_language_rows(mine, metric.key))
        lines += [f"### Per language: task `{task}` ({metric.words})", "",
                  "The teacher's value comes from its cached test logits; a per-language student (`<name>@<code>`) "
                  "is trained and tested on its own language's partition, a multilingual one on all of them.", "",
                  *_language_table(rows, codes)]
        aligned = {k: v for k, v in _per_language_rows(mine, "aligned_share").items() if any(x is not None
                                                                                           for x in v.values())}
        if aligned:
            lines += ["Share of each own-tokenizer student's positions aligned with the teacher's (same byte, "
                      "docs/cross-tokenizer.md): there it learns from the projected targets, elsewhere from "
                      "next-token CE alone.", "", *_language_table(aligned, codes)]
        width = 0.8 / len(rows)
        for i, (label, vals) in enumerate(rows.items()):
            ax.bar([j + i * width for j in range(len(codes))], [vals.get(c) or 0.0 for c in codes], width,
                   label=label, color="black" if label == "teacher" else "lightgray" if label.startswith("majority") else None)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(codes))], codes)
        ax.set_ylabel(metric.words)
        ax.set_title(f"{task}: {metric.words} per language")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    if lines:
        fig.savefig(runs_dir / "report-languages.png", dpi=110)
        lines += ["![metric per language](report-languages.png)", ""]
    plt.close(fig)
    return lines


def _per_language_rows(runs: list[dict[str, Any]], key: str) -> dict[str, dict[str, float | None]]:
    """Per student family (per-language students gathered in one row): test `key` per language."""
    rows: dict[str, dict[str, float | None]] = {}
    for r in _in_order(runs):
        family = r["student"].split("@")[0]
        kind = "one per language" if "@" in r["student"] else "multilingual"
        got = rows.setdefault(f"{family} ({kind}, {'KD' if r['kd'] else 'hard labels'})", {})
        if len(r["languages"]) == 1:
            got[r["languages"][0]] = (r.get("test") or {}).get(key)
        else:
            got.update({c: v.get(key) for c, v in (r.get("test_by_language") or {}).items()})
    return rows


def _language_table(rows: dict[str, dict[str, float | None]], codes: list[str]) -> list[str]:
    lines = ["| model | " + " | ".join(codes) + " | mean |", "|---|" + "---:|" * (len(codes) + 1)]
    for label, vals in rows.items():
        have = [vals[c] for c in codes if vals.get(c) is not None]
        lines.append(f"| {label} | " + " | ".join(_fmt(vals.get(c)) for c in codes) +
                     f" | {_fmt(float(np.mean(have)) if len(have) == len(codes) else None)} |")
    return lines + [""]


# head -> (teacher row, table, plotted metric, axis label); cross-task runs have a table of their own
HEADS: dict[str, tuple[Callable, Callable, str, str]] = {
    SEQUENCE: (teacher_row_classification, classification_lines, "accuracy", "test accuracy"),
    TOKEN: (teacher_row_tokens, token_lines, "f1", "test entity F1"),
    CAUSAL_LM: (teacher_row_lm, lm_lines, "perplexity", "test perplexity (log)"),
}


def ensemble_section(runs: list[dict[str, Any]], test_split: str) -> list[str]:
    """Students of several teachers: each teacher's test accuracy from its cache, the weighted ensemble's (mean of
    the teachers' distributions at T = 1), and the students that learned from them."""
    sets: dict[tuple, list[dict[str, Any]]] = {}
    for r in runs:
        if r.get("teacher_caches"):
            sets.setdefault(tuple((t, c, r["teachers"][t]) for t, c in r["teacher_caches"].items()), []).append(r)
    if not sets:
        return []
    lines = ["## Several teachers", "", f"Test accuracy ({test_split} split) of each teacher from its cached logits, "
             "of their weighted ensemble (the mean of their distributions) and of the students distilled from them.",
             "", "| model | weight | test acc |", "|---|---:|---:|"]
    for members, students in sets.items():
        try:
            logits = [np.stack(read_column(c, test_split, "logits")) for _, c, _ in members]
            labels = np.array([-1 if y is None else y for y in read_column(members[0][1], test_split, "label")])
        except (KeyError, FileNotFoundError, CacheFormatError):
            continue
        keep = labels >= 0

        def acc(pred: np.ndarray) -> float:
            return float((pred[keep] == labels[keep]).mean()) if keep.any() else float("nan")
        mean = sum(w * np.exp(log_softmax(z)) for (_, _, w), z in zip(members, logits))
        lines += [f"| teacher `{t}` ({open_manifest(c)[2]['fingerprint_inputs']['teacher']['name']}) | {w:.2f} | "
                  f"{acc(z.argmax(1)):.4f} |" for (t, c, w), z in zip(members, logits)]
        lines.append(f"| **ensemble** | 1.00 | {acc(mean.argmax(1)):.4f} |")
        lines += [f"| {r['run']} ({r.get('ensemble', 'mean')}) | – | {_fmt((r.get('test') or {}).get('accuracy'))} |"
                  for r in students]
    return [*lines, ""]


def transfer_section(runs: list[dict[str, Any]]) -> list[str]:
    """Per cache and transfer split (unlabelled rows the teacher labelled): its size, how sure the teacher is on it
    next to the labelled splits, and the students that read it."""
    users: dict[tuple[str, str], list[str]] = {}
    for r in runs:
        for split in r.get("transfer") or {}:
            users.setdefault((r["cache"], split), []).append(r["run"])
    if not users:
        return []
    lines = ["## Transfer sets", "", "Unlabelled rows the teacher labelled once, read by KD students with their "
             "training split (their hard-label twins read the training split alone). The teacher's confidence (mean "
             "top probability) and entropy on them against the labelled splits show how far from its training data "
             "they are.", "", "| cache | split | rows | labelled | teacher accuracy | teacher confidence | teacher "
             "entropy (nats) | students |", "|---|---|---|---|---|---|---|---|"]
    for cache in dict.fromkeys(c for c, _ in users):
        try:
            m = open_manifest(cache)[2]
        except (FileNotFoundError, CacheFormatError):
            continue
        for split, sp in m["splits"].items():
            st = sp.get("stats") or {}
            lines.append(f"| {Path(cache).name} | {split} | {sp['rows']} | {st.get('labelled_rows', '–')} | "
                         f"{_fmt(st.get('teacher_accuracy'))} | {_fmt(st.get('mean_confidence'))} | "
                         f"{_fmt(st.get('mean_entropy_nats'))} | {', '.join(users.get((cache, split), []))} |")
    return [*lines, ""]


def load_runs(runs_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted(runs_dir.glob("*/metrics.json"))]


def stale_lines(runs: list[dict[str, Any]]) -> list[str]:
    """A warning naming the runs trained on other targets than their cache holds now (the teacher was refreshed or
    the cache rebuilt with other settings): the teacher row comes from the current cache, so they no longer compare."""
    current: dict[str, str | None] = {}
    stale: dict[str, list[str]] = {}
    for r in runs:
        cache, fp = r.get("cache"), r.get("cache_fingerprint")
        if not cache or not fp:
            continue
        pairs = [(cache[t], fp[t]) for t in cache] if isinstance(cache, dict) else [(cache, fp)]  # cross-task: per task
        for cache, fp in pairs:
            if cache not in current:
                try:
                    current[cache] = open_manifest(cache)[2]["fingerprint"]
                except (KeyError, FileNotFoundError, CacheFormatError):
                    current[cache] = None  # the cache moved: nothing to compare with
            if current[cache] not in (None, fp):
                stale.setdefault(cache, []).append((r["run"], fp))
    lines = []
    for cache, names in stale.items():
        lines += [f"> **Stale runs**: {', '.join(sorted(n for n, _ in names))} were trained on an earlier cache "
                  f"than the one at `{cache}` now (fingerprint {current[cache][:12]}; the teacher or its settings "
                  f"changed). Retrain them (`kdcache train <pipeline> --students ...`) before comparing them with the "
                  "teacher row.", *_moved(cache, names), ""]
    return lines


def chance_lines(runs: list[dict[str, Any]]) -> list[str]:
    """A warning naming the students no better than a model that learned nothing (the majority class, all `O`) on
    the evaluation split, with what to change; the tables mark them ⚠."""
    flagged = [r for r in _in_order(runs) if r.get("at_chance")]
    if not flagged:
        return []
    what = "; ".join(f"{r['run']} {r['at_chance']['score']:.4f} against the {r['at_chance']['baseline']}'s "
                     f"{r['at_chance']['baseline_score']:.4f} (± {r['at_chance']['margin']:.4f} over "
                     f"{r['at_chance']['rows']} rows)" for r in flagged)
    return [f"> **⚠ At chance** on the evaluation split: {what}. They learned next to nothing: give them more "
            "optimiser steps (`train.min_steps`, `train.epochs`), another learning rate (`train.learning_rate` or "
            "the student's own), or a smaller student.", ""]


def _moved(cache: str, names: list[tuple[str, str]]) -> list[str]:
    """How far each stale run's targets moved, where `kdcache drift` measured it."""
    out = []
    for fp in dict.fromkeys(fp for _, fp in names):
        d = read_drift(cache, fp)
        if d is None:
            continue
        runs = ", ".join(sorted(n for n, f in names if f == fp))
        moved = "; ".join(f"{split} mean KL {s['mean_kl']:.4f} nats, {s['changed_predictions']} of "
                          f"{s['rows_compared']} predictions changed" for split, s in d["splits"].items())
        out.append(f"> Their targets moved ({runs}; `kdcache drift`): {moved}.")
    return out


def drift_lines(d: dict[str, Any]) -> list[str]:
    """What `kdcache drift` prints: per split, how far the targets moved, per class, and the rows that moved most."""
    lines = [f"# Drift: {d['old']['cache']} -> {d['new']['cache']}", "",
             f"Fingerprints {d['old']['fingerprint'][:12]} -> {d['new']['fingerprint'][:12]}; changed: "
             f"{', '.join(d['changed_inputs']) or 'nothing'}. KL(old || new) at T = 1 on the rows both caches hold "
             "(same id and text).", "",
             "| split | rows compared | mean KL (nats) | max KL | agreement | changed predictions | accuracy old -> new |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for split, s in d["splits"].items():
        lines.append(f"| {split} | {s['rows_compared']} | {s['mean_kl']:.4f} | {s['max_kl']:.4f} | "
                     f"{s['agreement']:.4f} | {s['changed_predictions']} | {_fmt(s['old_accuracy'])} -> "
                     f"{_fmt(s['new_accuracy'])} |")
    for split, s in d["splits"].items():
        lines += ["", f"## {split}: per class (by the old prediction)", "", "| class | rows | mean KL | changed |",
                  "|---|---:|---:|---:|"]
        lines += [f"| {c} | {v['rows']} | {v['mean_kl']:.4f} | {v['changed']} |" for c, v in s["per_class"].items()]
        lines += ["", f"## {split}: rows that moved most", "", "| id | KL | old | new | text |", "|---|---:|---|---|---|"]
        lines += [f"| {r['id']} | {r['kl']:.4f} | {r['old']} | {r['new']} | {r['text'].replace('|', '/')} |"
                  for r in s["moved_most"]]
    return lines


def build_report(runs_dir: Path, cache_root: str | Path, test_split: str = "test") -> Path:
    """Write report.md (a table per head, cross-task runs apart) and report.png (classification: accuracy against
    size and CPU speed) / report-tokens.png (token and LM heads: metric against size) under runs_dir."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    all_runs = load_runs(runs_dir)
    if not all_runs:
        raise ReportError(f"{runs_dir}: no run folders (*/metrics.json) to report on; train students first with "
                          "`kdcache train <pipeline>` (make train-student)")
    lines = [f"# Student comparison — {runs_dir.name}", "", *stale_lines(all_runs), *chance_lines(all_runs)]
    cross = [r for r in all_runs if r.get("head") == CROSS]
    panels = []
    for head, (teacher_row, table, metric, label) in HEADS.items():
        mine = [r for r in all_runs if r.get("head", SEQUENCE) == head]
        if not mine:
            continue
        teachers = {}
        for task in sorted({r["task"] for r in mine}):
            try:
                teachers[task] = teacher_row(next(r["cache"] for r in mine if r["task"] == task), test_split)
            except (KeyError, FileNotFoundError, CacheFormatError):
                continue  # the cache moved: the report shows the students alone
        lines += [*table(mine, teachers), ""]
        panels.append((head, mine, list(teachers.values()), metric, label))
    if cross:
        lines += [*cross_lines(cross), ""]
    lines += language_section(all_runs, runs_dir, test_split)
    lines += transfer_section(all_runs)
    lines += ensemble_section(all_runs, test_split)
    if any(head == SEQUENCE for head, *_ in panels):
        _, mine, teachers, metric, label = next(p for p in panels if p[0] == SEQUENCE)
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
        for ax, xkey, xlabel, title in ((axes[0], "parameters", "parameters (log)",
                                         "accuracy vs size (o = KD, x = hard labels, * = teacher)"),
                                        (axes[1], "inference_examples_per_s_cpu", "CPU inference, examples/s (log)",
                                         "accuracy vs CPU speed")):
            _scatter(ax, mine, teachers, xkey, metric)
            ax.set_xlabel(xlabel)
            ax.set_ylabel(label)
            ax.set_title(title)
        fig.tight_layout()
        fig.savefig(runs_dir / "report.png", dpi=110)
        plt.close(fig)
        lines += ["![accuracy against size and speed](report.png)", ""]
    others = [p for p in panels if p[0] != SEQUENCE]
    if others:
        fig, axes = plt.subplots(1, len(others), figsize=(7 * len(others), 4.8), squeeze=False)
        for ax, (head, mine, teachers, metric, label) in zip(axes[0], others):
            _scatter(ax, mine, teachers, "parameters", metric)
            if metric == "perplexity":
                ax.set_yscale("log")
            ax.set_xlabel("parameters (log)")
            ax.set_ylabel(label)
            ax.set_title(f"{label} vs size (o = KD, x = hard labels, * = teacher)")
        fig.tight_layout()
        png = "report-tokens.png" if any(p[0] == SEQUENCE for p in panels) else "report.png"
        fig.savefig(runs_dir / png, dpi=110)
        plt.close(fig)
        lines += [f"![metric against size]({png})", ""]
    out = runs_dir / "report.md"
    out.write_text("\n".join(lines))
    return out


# ------------------------------------------------------------------------------------------ CLI summaries

# head -> what a split's statistics add to `kdcache cache`'s line, to `kdcache info`'s line
SPLIT_SUMMARY: dict[str, Callable[[dict], str]] = {
    SEQUENCE: lambda s: (f", teacher accuracy {s['teacher_accuracy']:.4f}" if s.get("teacher_accuracy") is not None
                         else f", unlabelled, teacher confidence {s['mean_confidence']:.3f}"
                         if s.get("mean_confidence") is not None else ""),
    TOKEN: lambda s: (f", {s['words']} words ({s['uncovered_words']} beyond max_length), teacher entity F1 "
                      f"{s['teacher_entity_f1']:.4f}"),
    CAUSAL_LM: lambda s: (f", {s['tokens']} tokens, teacher perplexity {s['teacher_perplexity']:.2f}"
                          + (f", {s['teacher_bits_per_byte']:.3f} bits/byte" if s.get("teacher_bits_per_byte") else "")),
}
SPLIT_INFO: dict[str, Callable[[dict], str]] = {
    SEQUENCE: lambda s: (f"{s['bytes_per_example']:>8} B/ex  teacher acc {_fmt(s['teacher_accuracy'])}  confidence "
                         f"{_fmt(s.get('mean_confidence'), '.3f')}  entropy {s['mean_entropy_nats']:.3f}  truncated "
                         f"{s['truncated_rows']}"),
    TOKEN: lambda s: (f"{s['bytes_per_example']:>8} B/ex  teacher entity F1 {s['teacher_entity_f1']:.4f}  words "
                      f"{s['words']}  truncated {s['truncated_rows']} ({s['uncovered_words']} words)"),
    CAUSAL_LM: lambda s: (f"{s['bytes_per_token']:>8} B/token  teacher ppl {s['teacher_perplexity']:.2f}  top-1 "
                          f"{s['teacher_top1_accuracy']:.3f}  tail mass {s['mean_tail_mass']:.4f}"
                          + (f"  {s['teacher_bits_per_byte']:.3f} bits/byte" if s.get("teacher_bits_per_byte") else "")
                          + (f"  {s['tokens_per_word']:.2f} tokens/word" if s.get("tokens_per_word") else "")),
}
# head -> a finished run's test metrics in `kdcache train`'s line
RUN_SUMMARY: dict[str, Callable[[dict], str]] = {
    SEQUENCE: lambda t: (f"test acc {_fmt(t.get('accuracy'))}  macro-F1 {_fmt(t.get('macro_f1'))}  agreement "
                         f"{_fmt(t.get('agreement'))}"),
    TOKEN: lambda t: (f"test entity F1 {_fmt(t.get('f1'))}  precision {_fmt(t.get('precision'))}  recall "
                      f"{_fmt(t.get('recall'))}"),
    CAUSAL_LM: lambda t: (f"test perplexity {_fmt(t.get('perplexity'), '.2f')}  KL to teacher "
                          f"{_fmt(t.get('kl_to_teacher'))}"
                          + (f"  bits/byte {t['bits_per_byte']:.4f}" if t.get("bits_per_byte") is not None else "")
                          + (f"  aligned {t['aligned_share']:.2f}" if t.get("aligned_share") is not None else "")),
    CROSS: lambda t: "  ".join(f"{task} {'entity F1' if 'f1' in m else 'test acc'} "
                               f"{_fmt(m.get('f1', m.get('accuracy')))}" for task, m in t.items()),
}


def cache_summary(root: Path, manifest: dict[str, Any]) -> list[str]:
    """What `kdcache cache` prints per split of a finished cache."""
    return [f"{root}: {split}: {s['rows']} rows in {len(s['shards'])} shard(s)"
            + SPLIT_SUMMARY[manifest["head"]](s["stats"]) for split, s in manifest["splits"].items()]


def info_lines(i: dict[str, Any]) -> list[str]:
    """What `kdcache info` prints for one cache (`cache.verify.cache_info`)."""
    t = i["teacher"]
    out = [f"{i['cache']}  task={i['task']}  head={i['head']}  format v{i['format_version']}",
           f"  teacher      {t['name']} ({t['class']}, weights {t['weights_sha256'][:12]})",
           f"  fingerprint  {i['fingerprint']}"]
    if i.get("lm"):
        lm = i["lm"]
        out.append(f"  targets      top-{lm['top_k']} of {lm['vocab_size']} ({lm['id_dtype']} ids, float16 logits), "
                   f"lse + exact tail at T={lm['temperatures']}, {lm['samples']} samples/position, "
                   f"{lm['seq_len']} tokens/row")
    else:
        out.append(f"  labels       {', '.join(i['labels'])}")
    if i["features"]:
        f = i["features"]
        out.append(f"  features     layers {f['layers']} pooled {f['pooling']} as {f['dtype']} (hidden {f['hidden_size']})")
    out.append(f"  total        {i['rows']} rows, {i['bytes'] / 1e6:.2f} MB, {i['bytes_per_example']} B/example")
    c = i.get("capture")
    if c and c.get("seconds"):
        rate = c["rows"] / c["seconds"]
        tokens = f", {rate * i['lm']['seq_len']:,.0f} tokens/s" if i.get("lm") else ""
        out.append(f"  capture      {c['rows']} rows in {c['seconds']:.1f} s ({rate:.{0 if rate >= 10 else 2}f} rows/s"
                   f"{tokens}, everything included) on {i['device']} x {i['processes']} process(es), last run")
    for g in i.get("generations") or []:  # a grown cache: rows per split as of each generation
        rows = ", ".join(f"{split} {v['rows']}" for split, v in g["splits"].items())
        out.append(f"  generation {g['generation']}  {rows}  ({g.get('created_at') or 'before growing'})")
    for split, s in i["splits"].items():
        out.append(f"  {split:<12} {s['rows']:>8} rows {s['shards']:>3} shards {SPLIT_INFO[i['head']](s)}")
        for code, lang in (s.get("languages") or {}).items():
            out.append(f"    {code:<10} {lang['rows']:>8} rows {lang['shards']:>3} shards {SPLIT_INFO[i['head']](lang)}")
    return out


def run_summary(r: dict[str, Any]) -> str:
    """What `kdcache train` prints for one finished run."""
    return (f"{r['run']:<24} {RUN_SUMMARY[r.get('head', SEQUENCE)](r.get('test', {}))}  {r['parameters']:,} params  "
            f"{r['train_seconds']:.1f} s")
