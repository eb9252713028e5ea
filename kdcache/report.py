"""The comparison report: data/runs/<pipeline>/report.md and report.png, rebuilt from the run directories."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from .cache.format import CacheFormatError
from .reader import open_manifest, read_column
from .trainer import classification_metrics


def teacher_row(cache: str, test_split: str) -> dict[str, Any]:
    """The teacher's line, from the cache alone: test metrics from cached logits, size and speed from the manifest."""
    m = open_manifest(cache)[2]
    logits = np.stack(read_column(str(cache), test_split, "logits"))
    labels = np.array([-1 if y is None else y for y in read_column(str(cache), test_split, "label")])
    pred = logits.argmax(1)
    t = m["fingerprint_inputs"]["teacher"]
    stats = m["splits"][test_split]["stats"]
    return {"run": f"teacher ({t['name']})", "task": m["task"], "arch": t["class"], "kd": None,
            "parameters": t.get("parameters"), "test": classification_metrics(pred, labels, pred, len(m["label_names"])),
            "inference_examples_per_s_cpu": stats.get("teacher_rows_per_s"), "size_bytes": None,
            "train_seconds": None, "device": m.get("device")}


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
                stale.setdefault(cache, []).append(r["run"])
    lines = []
    for cache, names in stale.items():
        lines += [f"> **Stale runs**: {', '.join(sorted(names))} were trained on an earlier cache than the one at "
                  f"`{cache}` now (fingerprint {current[cache][:12]}; the teacher or its settings changed). Retrain "
                  f"them (`kdcache train <pipeline> --students ...`) before comparing them with the teacher row.", ""]
    return lines


def _fmt(v: Any, spec: str = ".4f") -> str:
    return "–" if v is None else format(v, spec)


def build_report(runs_dir: Path, cache_root: str | Path, test_split: str = "test") -> Path:
    """Write report.md and report.png under runs_dir comparing the teacher(s) and every student run."""
    all_runs = load_runs(runs_dir)
    if not all_runs:
        raise FileNotFoundError(f"{runs_dir}: no */metrics.json; train students first (`kdcache train`)")
    runs = [r for r in all_runs if r.get("head", "sequence-classification") == "sequence-classification"]
    others = [r for r in all_runs if r not in runs]
    if not runs:
        return _head_report(runs_dir, others, test_split, [f"# Student comparison — {runs_dir.name}", "",
                                                           *stale_lines(all_runs)], "report.png")
    teachers = {}
    for task in sorted({r["task"] for r in runs}):
        cache = next((r["cache"] for r in runs if r["task"] == task), f"{cache_root}/{task}")
        try:
            teachers[task] = teacher_row(cache, test_split)
        except (KeyError, FileNotFoundError, CacheFormatError):
            continue  # the cache moved: the report shows the students alone
    by_run = {r["run"]: r for r in runs}
    lines = [f"# Student comparison — {runs_dir.name}", "", *stale_lines(all_runs),
             "Test split metrics. Agreement = share of test rows where the student's prediction equals the teacher's. "
             "KD gain = test accuracy of the KD student minus its hard-label twin (same architecture, seed and data). "
             "CPU speed: examples/s on this machine including tokenisation (teacher: measured during caching, "
             f"on {next(iter(teachers.values()), {}).get('device', '?')}).", "",
             "| model | task | params | size MB | test acc | macro-F1 | agreement | CPU ex/s | train s | KD gain |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for task, t in teachers.items():
        lines.append(f"| **{t['run']}** | {task} | {t['parameters'] or 0:,} | – | {_fmt(t['test']['accuracy'])} | "
                     f"{_fmt(t['test']['macro_f1'])} | 1.0000 | {_fmt(t['inference_examples_per_s_cpu'], '.0f')} | – | – |")
    for r in sorted(runs, key=lambda r: (r["task"], r["student"], not r["kd"])):
        test = r.get("test", {})
        twin = by_run.get(f"{r['run']}-hard")
        gain = test.get("accuracy") - twin["test"]["accuracy"] if r["kd"] and twin and test.get("accuracy") is not None \
            else None
        lines.append(f"| {r['run']} ({r['arch']}{', KD' if r['kd'] else ', hard labels'}) | {r['task']} | "
                     f"{r['parameters']:,} | {_fmt((r.get('size_bytes') or 0) / 1e6, '.2f')} | {_fmt(test.get('accuracy'))} | "
                     f"{_fmt(test.get('macro_f1'))} | {_fmt(test.get('agreement'))} | "
                     f"{_fmt(r.get('inference_examples_per_s_cpu'), '.0f')} | {_fmt(r['train_seconds'], '.1f')} | "
                     f"{_fmt(gain, '+.4f')} |")
    lines += ["", "![accuracy against size and speed](report.png)", ""]
    _plot(runs, list(teachers.values()), runs_dir / "report.png")
    if others:  # a pipeline with classification and token/LM tasks: their tables follow, plotted apart
        return _head_report(runs_dir, others, test_split, lines, "report-tokens.png")
    out = runs_dir / "report.md"
    out.write_text("\n".join(lines))
    return out


def _head_report(runs_dir: Path, runs: list[dict[str, Any]], test_split: str, lines: list[str], png: str) -> Path:
    """report.md (after `lines`) and the plot `png` for causal-LM (perplexity) and token-classification (entity F1)
    students."""
    from .lm_trainer import lm_report_lines, teacher_lm_row
    from .ner_trainer import ner_report_lines, teacher_ner_row
    heads = {"causal-lm": (teacher_lm_row, lm_report_lines, "perplexity", "test perplexity (log)"),
             "token-classification": (teacher_ner_row, ner_report_lines, "f1", "test entity F1")}
    panels = []
    cross = [r for r in runs if r.get("head") == "cross-task"]
    if cross:
        from .cross_trainer import cross_report_lines
        lines += [*cross_report_lines(cross), ""]
    for head, (teacher_row_of, table, metric, label) in heads.items():
        mine = [r for r in runs if r.get("head") == head]
        if not mine:
            continue
        teachers = {}
        for task in sorted({r["task"] for r in mine}):
            try:
                teachers[task] = teacher_row_of(next(r["cache"] for r in mine if r["task"] == task), test_split)
            except (KeyError, FileNotFoundError, CacheFormatError):
                continue  # the cache moved: the report shows the students alone
        lines += [*table(mine, teachers), ""]
        panels.append((mine, list(teachers.values()), metric, label))
    if panels:
        lines += [f"![metric against size]({png})", ""]
    out = runs_dir / "report.md"
    out.write_text("\n".join(lines))
    if not panels:
        return out
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 4.8), squeeze=False)
    for ax, (mine, teachers, metric, label) in zip(axes[0], panels):
        for r in mine + teachers:
            x, y = r.get("parameters"), (r.get("test") or {}).get(metric)
            if not x or y is None:
                continue
            teacher = r in teachers
            ax.scatter(x, y, marker="*" if teacher else ("o" if r["kd"] else "x"), s=200 if teacher else 60,
                       c="black" if teacher else ("tab:blue" if r["kd"] else "tab:orange"))
            ax.annotate(r["run"].split(" (")[0], (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
        ax.set_xscale("log")
        if metric == "perplexity":
            ax.set_yscale("log")
        ax.set_xlabel("parameters (log)")
        ax.set_ylabel(label)
        ax.set_title(f"{label} vs size (o = KD, x = hard labels, * = teacher)")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(runs_dir / png, dpi=110)
    plt.close(fig)
    return out


def _plot(runs: list[dict], teachers: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for ax, xkey, xlabel in ((axes[0], "parameters", "parameters (log)"),
                             (axes[1], "inference_examples_per_s_cpu", "CPU inference, examples/s (log)")):
        for r in runs + teachers:
            x, y = r.get(xkey), (r.get("test") or {}).get("accuracy")
            if not x or y is None:
                continue
            style = {"marker": "*", "s": 220, "c": "black"} if r in teachers else \
                {"marker": "o" if r["kd"] else "x", "s": 60, "c": "tab:blue" if r["kd"] else "tab:orange"}
            ax.scatter(x, y, **style)
            ax.annotate(r["run"].split(" (")[0], (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
        ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("test accuracy")
        ax.grid(alpha=0.3)
    axes[0].set_title("accuracy vs size (o = KD, x = hard labels, * = teacher)")
    axes[1].set_title("accuracy vs CPU speed")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
