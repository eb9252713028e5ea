"""What stage one's data loading returns: a task's rows per split (`TaskData`), row selection helpers, and the
error every data problem raises (naming the file, column or row)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import datasets

from ..errors import KdcacheError


class DataError(KdcacheError):
    """Input data is missing or malformed; the message names the file, column or row."""


@dataclass(frozen=True)
class TaskData:
    """A task's rows: split name -> Dataset(id, <text fields>, label), and the label names."""

    splits: dict[str, datasets.Dataset]
    label_names: tuple[str, ...]
    origin: str  # where the rows came from, for messages
    id_field: str | None = None  # the source's own stable id column, if it has one
    languages: tuple[str, ...] = ()  # multilingual data: every split has a `language` column, rows grouped by it

    def only(self, language: str) -> "TaskData":
        """The rows of one language (splits where it has none are left out)."""
        splits = {}
        for split, ds in self.splits.items():
            keep = [i for i, code in enumerate(ds["language"][:]) if code == language]
            if keep:
                splits[split] = ds.select(keep)
        return TaskData(splits, self.label_names, self.origin, self.id_field, (language,))


def take_rows(ds: datasets.Dataset, rows: list[int]) -> datasets.Dataset:
    """The rows of `ds` at these positions, in this order, as a table of their own (so `ds.data.table` is exactly
    them, for hashing), without `datasets`' progress bar."""
    return datasets.Dataset(ds.select(rows).with_format("arrow")[:] if rows else ds.data.table.slice(0, 0))



def stable_bucket(key: str, seed: str = "kdcache-split", buckets: int = 100) -> int:
    """Deterministic 0..buckets-1 bucket of a key, for splits that keep groups (e.g. a movie) together."""
    return int.from_bytes(hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest(), "big") % buckets



def of_classes(ds: datasets.Dataset, keep: tuple[str, ...], label_names: tuple[str, ...],
               where: str) -> datasets.Dataset:
    """The rows of `ds` whose gold label is named in `keep` (`data.labels`, `finetune.labels`), and those without a
    label; `where` names the source and the setting in the error for an unknown name."""
    unknown = [x for x in keep if x not in label_names]
    if unknown:
        raise DataError(f"{where} names unknown label(s) {unknown}; the labels are {list(label_names)}")
    ids = {label_names.index(x) for x in keep}
    return take_rows(ds, [i for i, y in enumerate(ds["label"][:]) if y < 0 or y in ids])

