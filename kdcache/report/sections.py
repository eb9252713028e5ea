"""The report's sections beyond the per-head tables: per language, transfer sets, several teachers, and the
warnings on top (stale runs, students at chance); `kdcache drift`'s text."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .. import heads
from ..cache.drift import read_drift
from ..cache.format import CacheFormatError
from ..cache.reader import open_manifest, read_column
from ..metrics import METRICS, HeadMetric, log_softmax
from .tables import CROSS, fmt, in_order, language_table, per_language_rows
from .teachers import majority_accuracy


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
        if heads.has(m["head"], heads.CROSS_TOKENIZER) and m["lm"].get("offsets"):  # per byte: any tokenizers compare
            metric = HeadMetric("bits_per_byte", "teacher_bits_per_byte", "test bits per byte", higher_is_better=False)
        rows: dict[str, dict[str, float | None]] = {
            "teacher": {c: per_lang.get(c, {}).get("stats", {}).get(metric.teacher_stat) for c in codes}}
        if heads.has(m["head"], heads.MAJORITY_BASELINE) and "train" in m["splits"]:
            rows["majority class (of each language's training split)"] = {
                c: majority_accuracy(mine[0]["cache"], c, test_split) for c in codes}
        rows.update(per_language_rows(mine, metric.key))
        lines += [f"### Per language: task `{task}` ({metric.words})", "",
                  "The teacher's value comes from its cached test logits; a per-language student (`<name>@<code>`) "
                  "is trained and tested on its own language's partition, a multilingual one on all of them.", "",
                  *language_table(rows, codes)]
        aligned = {k: v for k, v in per_language_rows(mine, "aligned_share").items() if any(x is not None
                                                                                           for x in v.values())}
        if aligned:
            lines += ["Share of each own-tokenizer student's positions aligned with the teacher's (same byte, "
                      "docs/cross-tokenizer.md): there it learns from the projected targets, elsewhere from "
                      "next-token CE alone.", "", *language_table(aligned, codes)]
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
        lines += [f"| {r['run']} ({r.get('ensemble', 'mean')}) | – | {fmt((r.get('test') or {}).get('accuracy'))} |"
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
                         f"{fmt(st.get('teacher_accuracy'))} | {fmt(st.get('mean_confidence'))} | "
                         f"{fmt(st.get('mean_entropy_nats'))} | {', '.join(users.get((cache, split), []))} |")
    return [*lines, ""]



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
                  "teacher row.", *moved(cache, names), ""]
    return lines


def chance_lines(runs: list[dict[str, Any]]) -> list[str]:
    """A warning naming the students no better than a model that learned nothing (the majority class, all `O`) on
    the evaluation split, with what to change; the tables mark them ⚠."""
    flagged = [r for r in in_order(runs) if r.get("at_chance")]
    if not flagged:
        return []
    what = "; ".join(f"{r['run']} {r['at_chance']['score']:.4f} against the {r['at_chance']['baseline']}'s "
                     f"{r['at_chance']['baseline_score']:.4f} (± {r['at_chance']['margin']:.4f} over "
                     f"{r['at_chance']['rows']} rows)" for r in flagged)
    return [f"> **⚠ At chance** on the evaluation split: {what}. They learned next to nothing: give them more "
            "optimiser steps (`train.min_steps`, `train.epochs`), another learning rate (`train.learning_rate` or "
            "the student's own), or a smaller student.", ""]


def moved(cache: str, names: list[tuple[str, str]]) -> list[str]:
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
                     f"{s['agreement']:.4f} | {s['changed_predictions']} | {fmt(s['old_accuracy'])} -> "
                     f"{fmt(s['new_accuracy'])} |")
    for split, s in d["splits"].items():
        lines += ["", f"## {split}: per class (by the old prediction)", "", "| class | rows | mean KL | changed |",
                  "|---|---:|---:|---:|"]
        lines += [f"| {c} | {v['rows']} | {v['mean_kl']:.4f} | {v['changed']} |" for c, v in s["per_class"].items()]
        lines += ["", f"## {split}: rows that moved most", "", "| id | KL | old | new | text |", "|---|---:|---|---|---|"]
        lines += [f"| {r['id']} | {r['kl']:.4f} | {r['old']} | {r['new']} | {r['text'].replace('|', '/')} |"
                  for r in s["moved_most"]]
    return lines
