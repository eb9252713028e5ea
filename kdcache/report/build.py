"""data/runs/<pipeline>/report.md and its plots, rebuilt from the run folders and the caches' manifests: a table
per head (heads.py says how each head presents itself), cross-task runs apart, then the sections."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .. import heads
from ..cache.format import CacheFormatError
from ..errors import KdcacheError
from .heads import presenter
from .plots import scatter
from .sections import chance_lines, ensemble_section, language_section, stale_lines, transfer_section
from .tables import CROSS, cross_lines


class ReportError(KdcacheError):
    """Nothing to report yet; the message says which command makes it."""


def load_runs(runs_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted(runs_dir.glob("*/metrics.json"))]



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
    present = {r.get("head", heads.DEFAULT_HEAD) for r in all_runs} - {CROSS}
    for head in [h for h in heads.HEADS if h in present] + sorted(present - set(heads.HEADS)):  # registry order
        show = presenter(head)
        mine = [r for r in all_runs if r.get("head", heads.DEFAULT_HEAD) == head]
        teachers = {}
        for task in sorted({r["task"] for r in mine}):
            try:
                teachers[task] = show.teacher_row(next(r["cache"] for r in mine if r["task"] == task), test_split)
            except (KeyError, FileNotFoundError, CacheFormatError):
                continue  # the cache moved: the report shows the students alone
        lines += [*show.lines(mine, teachers), ""]
        panels.append((show, mine, list(teachers.values())))
    if cross:
        lines += [*cross_lines(cross), ""]
    lines += language_section(all_runs, runs_dir, test_split)
    lines += transfer_section(all_runs)
    lines += ensemble_section(all_runs, test_split)
    speed = next((p for p in panels if p[0].speed_plot), None)
    if speed is not None:
        show, mine, teachers = speed
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
        for ax, xkey, xlabel, title in ((axes[0], "parameters", "parameters (log)",
                                         "accuracy vs size (o = KD, x = hard labels, * = teacher)"),
                                        (axes[1], "inference_examples_per_s_cpu", "CPU inference, examples/s (log)",
                                         "accuracy vs CPU speed")):
            scatter(ax, mine, teachers, xkey, show.plot_metric)
            ax.set_xlabel(xlabel)
            ax.set_ylabel(show.axis_label)
            ax.set_title(title)
        fig.tight_layout()
        fig.savefig(runs_dir / "report.png", dpi=110)
        plt.close(fig)
        lines += ["![accuracy against size and speed](report.png)", ""]
    others = [p for p in panels if p is not speed]
    if others:
        fig, axes = plt.subplots(1, len(others), figsize=(7 * len(others), 4.8), squeeze=False)
        for ax, (show, mine, teachers) in zip(axes[0], others):
            scatter(ax, mine, teachers, "parameters", show.plot_metric)
            if show.log_scale:
                ax.set_yscale("log")
            ax.set_xlabel("parameters (log)")
            ax.set_ylabel(show.axis_label)
            ax.set_title(f"{show.axis_label} vs size (o = KD, x = hard labels, * = teacher)")
        fig.tight_layout()
        png = "report-tokens.png" if speed is not None else "report.png"
        fig.savefig(runs_dir / png, dpi=110)
        plt.close(fig)
        lines += [f"![metric against size]({png})", ""]
    out = runs_dir / "report.md"
    out.write_text("\n".join(lines))
    return out
