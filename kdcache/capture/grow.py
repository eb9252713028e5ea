"""Caches that grow: when a task's data gains rows (same teacher, same settings), `kdcache cache` captures only the
new rows, as a new generation of shards after the old ones, which stay byte-identical.

Rows are matched by id and content: every cached row must still be in the data with the same text and label
(a changed or removed row means the cache no longer describes the data: rebuild with --overwrite), and a row
already cached is never captured again. The grown cache keeps the old rows in their cached order and appends the
new ones in data order; the manifest's `generations` list, per generation, how many rows of each split existed and
the data hash they had, so a reader can see the cache as of any generation (`CacheDataset(..., generation=g)`).
"""

from __future__ import annotations

import datetime as _dt
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from .. import heads
from ..cache.format import MANIFEST, CacheFormatError, read_manifest
from ..data import TaskData, take_rows

log = logging.getLogger(__name__)


class GrowError(CacheFormatError):
    """The data changed in a way a cache cannot grow into (a row changed or went away)."""


@dataclass(frozen=True)
class Growth:
    """A grown task's data in cache order, how many rows of each split are already cached, and the cache's
    generations so far."""

    data: TaskData
    cached_rows: dict[str, int]
    generations: list[dict[str, Any]]

    @property
    def new_rows(self) -> int:
        return sum(len(ds) for ds in self.data.splits.values()) - sum(self.cached_rows.values())

    def generations_after(self, split_sha: dict[str, str], fingerprint: str) -> list[dict[str, Any]]:
        """The manifest's generations once the new rows are written: the earlier ones, and one for the new rows
        (their splits' row counts and data hashes, and the fingerprint their shards are written under)."""
        if not self.new_rows:
            return self.generations
        return [*self.generations, {
            "generation": self.generations[-1]["generation"] + 1,
            "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "fingerprint": fingerprint,
            "splits": {s: {"rows": len(ds), "dataset_sha256": split_sha[s]} for s, ds in self.data.splits.items()}}]


def generations_of(m: dict[str, Any]) -> list[dict[str, Any]]:
    """A manifest's generations; a cache written before caches could grow is its own generation 0."""
    return m.get("generations") or [{"generation": 0, "created_at": m.get("created_at"),
                                     "fingerprint": m["fingerprint"],
                                     "splits": {s: {"rows": v["rows"], "dataset_sha256": v["dataset_sha256"]}
                                                for s, v in m["splits"].items()}}]


def plan_growth(root: Path, data: TaskData, head: str, columns: list[str]) -> Growth:
    """The data reordered so that the cached rows come first in their cached order, then the new rows; refuses
    a data set that changed or lost a cached row, naming the split, the row id and the column."""
    m = read_manifest(root)
    where = f"{root / MANIFEST}"
    if not heads.has(head, heads.GROWTH) or data.languages:
        raise GrowError(f"{where}: the data changed, and only {' or '.join(heads.with_capability(heads.GROWTH))} "
                        "caches without languages can grow by new rows so far; rebuild with --overwrite")
    splits, cached = {}, {}
    for split, ds in data.splits.items():
        old = m["splits"].get(split)
        if old is None:  # a split the cache does not have yet: all of it is new
            splits[split], cached[split] = ds, 0
            continue
        table = pq.read_table([str(root / sh["parquet"]) for sh in old["shards"]], columns=["id", *columns, "label"]) \
            if old["shards"] else None
        old_ids = table.column("id").to_pylist() if table is not None else []
        ids = ds["id"][:]
        position = {i: n for n, i in enumerate(ids)}
        missing = [i for i in old_ids if i not in position]
        if missing:
            raise GrowError(f"{where}: split {split!r}: {len(missing)} cached row(s) are no longer in the data (first "
                            f"id {missing[0]!r}); a cache grows by new rows only: rebuild with --overwrite")
        order = [position[i] for i in old_ids]
        now_rows = ds.select(order) if order else None
        for col in [*columns, "label"]:
            now = now_rows[col][:] if now_rows is not None else []
            was = [(-1 if v is None else v) for v in table.column(col).to_pylist()] if table is not None else []
            for i, (a, b) in enumerate(zip(was, now)):
                if a != b:
                    raise GrowError(f"{where}: split {split!r}: row {old_ids[i]!r} changed its `{col}` since it was "
                                    "cached; a cache grows by new rows only: rebuild with --overwrite")
        known = set(old_ids)
        order += [n for n, i in enumerate(ids) if i not in known]
        splits[split], cached[split] = take_rows(ds, order), len(old_ids)
    gone = sorted(set(m["splits"]) - set(data.splits))
    if gone:
        raise GrowError(f"{where}: the data no longer has split(s) {', '.join(gone)}; rebuild with --overwrite")
    return Growth(TaskData(splits, data.label_names, data.origin, data.id_field, data.languages), cached,
                  generations_of(m))


def growth_segments(growth: Growth) -> dict[str, list[tuple[None, int, int]]]:
    """Per split, the cached rows' segment and the new rows' (shards never span the two, so the old shards keep
    their indices, rows and bytes, and the new ones continue after them)."""
    out = {}
    for split, ds in growth.data.splits.items():
        n, total = growth.cached_rows[split], len(ds)
        out[split] = [seg for seg in ((None, 0, n), (None, n, total)) if seg[2] > seg[1]] or [(None, 0, 0)]
    return out
