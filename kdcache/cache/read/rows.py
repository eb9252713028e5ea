"""Rows as the reader yields them (`Row`: a read-only view into its row group's columns) and a batch of them read
column by column (`Batch`: one fancy index per row group instead of a value at a time)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Iterator

import numpy as np


class Row(Mapping):
    """One cached row, read like a dict ({column: value}; `features`: {name: value}), but a view into its row
    group's columns: building none of it per row, and letting a batch gather each column in one go."""

    __slots__ = ("cols", "r")

    def __init__(self, cols: dict[str, Any], r: int) -> None:
        self.cols, self.r = cols, r

    def __getitem__(self, key: str) -> Any:
        v = self.cols[key]
        return {k: f[self.r] for k, f in v.items()} if key == "features" else v[self.r]

    def __iter__(self) -> Iterator[str]:
        return iter(self.cols)

    def __len__(self) -> int:
        return len(self.cols)

    def __repr__(self) -> str:
        return f"Row({dict(self)!r})"

    def __reduce__(self):  # pickled alone (e.g. rows returned by a worker's collate): as a dict, not its row group
        return dict, (dict(self),)


class Batch:
    """A batch's rows column by column. Rows that are views (`Row`) are gathered with one fancy index per row group
    they come from; any other mapping value by value."""

    def __init__(self, rows: list[Any]) -> None:
        self.rows = rows
        self.groups: list[tuple[dict[str, Any], np.ndarray]] | None = None  # None: not all views
        self.order: np.ndarray | None = None  # None: the groups' rows are already in batch order
        if all(type(r) is Row for r in rows):
            first = rows[0].cols
            if all(r.cols is first for r in rows):  # one row group (an unshuffled read): nothing to reorder
                self.groups = [(first, np.array([r.r for r in rows]))]
                return
            where: dict[int, tuple[dict[str, Any], list[int], list[int]]] = {}
            for i, row in enumerate(rows):
                g = where.setdefault(id(row.cols), (row.cols, [], []))
                g[1].append(i)
                g[2].append(row.r)
            self.groups = [(cols, np.array(r)) for cols, _, r in where.values()]
            # the groups' rows, concatenated, back in batch order
            self.order = np.argsort(np.concatenate([i for _, i, _ in where.values()]))

    def array(self, key: str, name: str | None = None) -> np.ndarray:
        """Column `key` (of `features`: feature `name`) stacked over the batch's rows."""
        if self.groups is None:
            return np.stack([r[key] if name is None else r[key][name] for r in self.rows])
        parts = [np.asarray(cols[key] if name is None else cols[key][name])[r] for cols, r in self.groups]
        return parts[0] if self.order is None else np.concatenate(parts)[self.order]

    def list(self, key: str) -> list[Any]:
        return [r[key] for r in self.rows]

