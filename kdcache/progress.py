"""Progress bars for long work: rows/s and ETA on stderr (plain lines, not redraws, when not a terminal)."""

from __future__ import annotations

import sys

from tqdm.auto import tqdm


def progress(total: int | None, desc: str, unit: str = "rows", disable: bool = False) -> tqdm:
    """A tqdm bar with a rate in `unit`/s; refreshes every 30 s when stderr is not a terminal."""
    tty = sys.stderr.isatty()
    return tqdm(total=total, desc=desc, unit=unit, unit_scale=True, dynamic_ncols=True, disable=disable,
                mininterval=0.5 if tty else 30.0, smoothing=0.1)
