"""Presentation of every head: data/runs/<pipeline>/report.md and its plots (build.py), rebuilt from the run folders
and the caches' manifests; the teacher rows (teachers.py), tables (tables.py), plots (plots.py), sections
(sections.py), and the one-line summaries the CLI prints (summaries.py); how each head presents itself (heads.py).
The public names are importable from `kdcache.report`."""

from .build import ReportError, build_report, load_runs
from .heads import PRESENTERS, Presenter, presenter
from .heads import register as register_presenter
from .sections import chance_lines, drift_lines, stale_lines
from .summaries import cache_summary, info_lines, run_summary
from .tables import CROSS, fmt, per_language_rows

__all__ = ["CROSS", "PRESENTERS", "Presenter", "ReportError", "build_report", "cache_summary", "chance_lines",
           "drift_lines", "fmt", "info_lines", "load_runs", "per_language_rows", "presenter", "register_presenter",
           "run_summary", "stale_lines"]
