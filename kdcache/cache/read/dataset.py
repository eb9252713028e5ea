"""The streaming reader: a torch IterableDataset over one split of a cache, local or at an fsspec URL.

Work is planned in row groups (the manifest lists them, so no footer is read up front). Each epoch the row
groups are permuted with a seed (shard and row-group order at once), dealt round-robin to every (process,
DataLoader worker) pair — so each row is read exactly once per epoch across all of them — and their rows pass
through a seeded shuffle buffer. Rows are views into their row group's columns (`Row`), so a batch gathers each
column with one index per row group instead of a value at a time. Memory holds the row groups that still have rows in
the buffer (a few: a buffered row leaves at random), whatever the cache's size (on a remote filesystem, up to
READ_AHEAD more row groups, fetched on background threads while the current one is consumed).

A multilingual cache can be read for some of its languages (only their partitions are opened) and mixed in other
proportions than their sizes: each language then gives its share of the epoch's rows, in whole row groups, taken
from a seeded stream of its row groups (so a smaller share walks through all of its rows over several epochs).
"""

from __future__ import annotations

import hashlib
import itertools
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterator

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from .. import codecs
from ..format import CacheFormatError
from . import remote
from .columns import RowGroup
from .companions import companion_logits, ids_and_text, open_companion
from .expect import check_expected
from .plan import Unit, deal, dist_info, epoch_units, mixing_weights
from .remote import ShardFiles, is_local, open_manifest
from .rows import Row


class CacheDataset(torch.utils.data.IterableDataset):
    """Rows of one cached split (with `extra_splits`, of several, as one; with `generation`, as it was then: a
    grown cache's earlier rows only; with `labels`, only the rows of those classes). Sequence classification: dicts
    with `row_id`, `id`, the text field(s), `label` (-1 = none), `logits` [C] float32 and, when asked, `features`
    {layer_j: [H] float32}; token classification: `words`, `tags`, `logits` [covered_words, C], `covered_words`;
    causal LM: see `lm_columns`. Batch them with `ds.collate`.

    shuffle: permute row groups per epoch and pass rows through a `shuffle_buffer`-row buffer, seeded by
    (seed, epoch, rank, worker) so the same seed gives the same order. rank/world_size default to the running
    process group. Call `set_epoch(e)` before each epoch.
    """

    def __init__(self, url: str, split: str, *, shuffle: bool = False, seed: int = 0, shuffle_buffer: int = 2048,
                 feature_layers: tuple[int, ...] = (), expect: dict[str, Any] | None = None,
                 rank: int | None = None, world_size: int | None = None, languages: tuple[str, ...] | None = None,
                 mixing: str = "proportional", extra_splits: tuple[str, ...] = (),
                 companions: tuple[str, ...] = (), generation: int | None = None,
                 labels: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.url = str(url)
        self.fs, self.root, self.manifest = open_manifest(self.url)
        if expect:
            check_expected(self.manifest, expect, self.url)
        for s in (split, *extra_splits):
            if s not in self.manifest["splits"]:
                raise CacheFormatError(f"{self.url}: no split {s!r} (splits: {', '.join(self.manifest['splits'])})")
        self.split, self.splits = split, (split, *extra_splits)  # extra splits: read as part of this one
        self.collate = codecs.get(self.manifest["head"]).collate  # rows of this cache -> a batch
        self.generation = generation
        self.shards = self._shards_of(self.manifest)
        self.languages = self._select_languages(languages)
        chosen = [i for i, sh in enumerate(self.shards) if not languages or sh.get("language") in self.languages]
        self.num_rows = sum(self.shards[i]["rows"] for i in chosen)
        self.text_fields = tuple(self.manifest["text_fields"])
        self.shuffle, self.seed, self.buffer = shuffle, seed, max(1, shuffle_buffer)
        self.feature_layers = tuple(feature_layers)
        have = (self.manifest.get("features") or {}).get("layers", [])
        missing = [j for j in self.feature_layers if j not in have]
        if missing:
            raise CacheFormatError(f"{self.url}: teacher layer(s) {missing} are not cached (cached: {have or 'none'}); "
                                   "change the feature loss or rebuild the cache with cache.features.layers")
        if (self.manifest.get("features") or {}).get("pooling") == "tokens" and self.feature_layers:
            raise CacheFormatError(f"{self.url}: per-token features cannot feed a sequence-level feature loss yet")
        # a small remote split is held in memory, shard by shard, as it is first read (HOLD_BYTES)
        self.files = ShardFiles(self.fs, sum(self.shards[i]["bytes"] for i in chosen) <= remote.HOLD_BYTES)
        self.keep_labels = self._label_ids(labels)
        if self.keep_labels is not None:  # only rows of these classes: count them once
            self.num_rows = sum(int(np.isin(self.files.row_group(f"{self.root}/{self.shards[i]['parquet']}", g,
                                                               ["label"]).column("label").fill_null(-1).to_numpy(),
                                            self.keep_labels).sum())
                                for i in chosen for g in range(len(self.shards[i]["row_groups"])))
        self.companion_urls = tuple(str(c) for c in companions)
        ours = ids_and_text(self.fs, self.root, self.shards, self.text_fields) if companions else None  # read once
        self.companions = [open_companion(c, self.manifest, self.url, self.splits, self.text_fields, ours)
                           for c in self.companion_urls]
        self.rank, self.world_size = (rank, world_size) if rank is not None else dist_info()
        self.epoch = 0
        self.units = [Unit(i, g, sum(self.shards[i]["row_groups"][:g]), n, self.shards[i].get("language"))
                      for i in chosen for g, n in enumerate(self.shards[i]["row_groups"])]
        rows = {code: sum(u.rows for u in self.units if u.language == code) for code in self.languages}
        self.shares = mixing_weights(rows, mixing) if self.languages else {}
        # proportional mixing is the plain epoch (every row once); other mixings give each language a row budget
        self.budgets = {} if mixing == "proportional" else {k: round(p * self.num_rows) for k, p in self.shares.items()}

    def _shards_of(self, m: dict[str, Any]) -> list[dict[str, Any]]:
        """The shards this reader reads of its manifest: those of its splits, as of its generation."""
        return [sh for s in self.splits for sh in m["splits"][s]["shards"]
                if sh["row_start"] < self._rows_as_of(s, self.generation)]

    def _rows_as_of(self, split: str, generation: int | None) -> float:
        """Rows of `split` in the cache as of `generation` (None: the latest); a grown cache's shards never span
        two generations, so a shard is in a generation when it starts before that generation's row count."""
        if generation is None:
            return float("inf")
        gens = self.manifest.get("generations") or [{"generation": 0, "splits": {}}]
        known = [g["generation"] for g in gens]
        if generation not in known:
            raise CacheFormatError(f"{self.url}: no generation {generation} (generations: "
                                   f"{', '.join(map(str, known))}; `kdcache info` lists them)")
        splits = next(g for g in gens if g["generation"] == generation)["splits"]
        return splits[split]["rows"] if split in splits else (float("inf") if len(gens) == 1 else 0)

    def _label_ids(self, names: tuple[str, ...]) -> np.ndarray | None:
        """The label ids of `names` (rows of other classes are skipped), or None for every row."""
        if not names:
            return None
        have = self.manifest["label_names"]
        unknown = [x for x in names if x not in have]
        if unknown:
            raise CacheFormatError(f"{self.url}: no label(s) {unknown} in the cache (labels: {', '.join(have)}); "
                                   "check the student's `train_labels`")
        return np.array([have.index(x) for x in names])

    def _select_languages(self, wanted: tuple[str, ...] | None) -> list[str]:
        have = self.manifest.get("languages") or []
        if wanted and not have:
            raise CacheFormatError(f"{self.url}: the cache has no language partitions (built from data without "
                                   "`data.languages`, or before kdcache had them); drop the language selection, or "
                                   "rebuild the cache with data.languages set (`kdcache cache --overwrite`)")
        unknown = [c for c in wanted or () if c not in have]
        if unknown:
            raise CacheFormatError(f"{self.url}: no language {', '.join(map(repr, unknown))} in split {self.split!r} "
                                   f"(languages: {', '.join(have)})")
        return list(wanted) if wanted else list(have)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def epoch_units(self) -> list[Unit]:
        """The row groups of the current epoch: all of them, or each language's budget of them (mixing)."""
        return epoch_units(self.units, self.languages, self.budgets, self.seed, self.shuffle, self.epoch)

    def my_units(self, worker: int = 0, num_workers: int = 1) -> list[Unit]:
        """This (rank, worker)'s row groups for the current epoch, in reading order."""
        return deal(self.epoch_units(), self.seed, self.epoch, self.shuffle, self.rank * num_workers + worker,
                    self.world_size * num_workers)

    def __len__(self) -> int:
        return self.num_rows

    def _read_unit(self, u: Unit) -> dict[str, Any]:
        shard = self.shards[u.shard]
        path = f"{self.root}/{shard['parquet']}"  # read_manifest refused names outside the cache
        try:
            table = self.files.row_group(path, u.row_group)
        except (OSError, ValueError) as e:
            raise CacheFormatError(f"{path} (split {self.split}): cannot read row group {u.row_group}: {e}; "
                                   "run `kdcache verify` on the cache") from None
        if table.num_rows != u.rows:
            raise CacheFormatError(f"{path}: row group {u.row_group} has {table.num_rows} rows, manifest says "
                                   f"{u.rows}; the shard changed since it was written: run `kdcache verify`")
        features = (shard.get("features") or {}).get("path")
        group = RowGroup(self.manifest, self.text_fields, self.feature_layers, u.start, u.rows,
                         lambda: self.files.open_features(self.root, features), f"{self.root}/{features}", path)
        cols = codecs.get(self.manifest["head"]).decode(table, group)
        if self.companions:  # several teachers: [rows, teachers, C], this cache's teacher first
            cols["teacher_logits"] = np.stack([cols["logits"], *companion_logits(self.companions, cols["id"])],
                                              axis=1)
        if u.language is not None:
            cols["language"] = [u.language] * u.rows
        return cols

    def _read_ahead(self, units: list[Unit]) -> Iterator[tuple[Unit, dict[str, Any]]]:
        """Each unit with its columns, in order. On a remote filesystem the next units (READ_AHEAD, fewer when their
        row groups are large) are fetched on background threads while the caller works on this one, so object-storage
        latency hides behind training (one thread when Zarr features are read too: their store is then never read
        from two threads at once)."""
        if is_local(self.fs) or len(units) < 2:
            for u in units:
                yield u, self._read_unit(u)
            return
        group_bytes = max(sh["bytes"] / max(1, len(sh["row_groups"])) for sh in self.shards)
        ahead = max(1, min(remote.READ_AHEAD, int(remote.READ_AHEAD_BYTES // max(1.0, group_bytes))))
        pool = ThreadPoolExecutor(max_workers=1 if self.feature_layers else ahead,
                                  thread_name_prefix="kdcache-read-ahead")
        try:
            pending: deque = deque()
            todo = iter(units)
            for u in itertools.islice(todo, ahead):
                pending.append((u, pool.submit(self._read_unit, u)))
            while pending:
                u, future = pending.popleft()
                nxt = next(todo, None)
                if nxt is not None:
                    pending.append((nxt, pool.submit(self._read_unit, nxt)))
                yield u, future.result()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def _blocks(self, units: list[Unit]) -> Iterator[list[Row]]:
        """Each unit's rows (those of the wanted classes) as views into its columns, in order."""
        for u, cols in self._read_ahead(units):
            keep = range(u.rows) if self.keep_labels is None else np.flatnonzero(np.isin(cols["label"],
                                                                                          self.keep_labels)).tolist()
            yield [Row(cols, r) for r in keep]

    def __iter__(self) -> Iterator[Row]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        blocks = self._blocks(self.my_units(worker, workers))
        if not self.shuffle:
            for rows in blocks:
                yield from rows
            return
        # Each row past the first `buffer` swaps with a random one of the buffer, which is yielded; a unit's draws
        # are taken in one call (the same stream of numbers as one call per row, so the order is the same).
        rng = np.random.default_rng([self.seed, self.epoch, self.rank, worker, 1])
        buf: list[Row] = []
        for rows in blocks:
            fill = min(len(rows), self.buffer - len(buf))
            buf.extend(rows[:fill])
            if fill < len(rows):
                for i, row in zip(rng.integers(len(buf), size=len(rows) - fill).tolist(), rows[fill:]):
                    yield buf[i]
                    buf[i] = row
        rng.shuffle(buf)
        yield from buf



def read_vocab(url: str, manifest: dict[str, Any]) -> tuple[list[bytes], np.ndarray]:
    """An LM cache's teacher vocabulary as bytes (its `vocab.parquet`), checked against the manifest's sha256:
    (each id's bytes, special [V] bool)."""
    rel = manifest["lm"]["vocab_file"]
    fs, root = fsspec.core.url_to_fs(str(url))
    data = fs.cat_file(f"{root.rstrip('/')}/{rel}")
    if hashlib.sha256(data).hexdigest() != manifest["files"][rel]["sha256"]:
        raise CacheFormatError(f"{url}/{rel}: checksum mismatch with the manifest (the file changed since the cache "
                               "was written); rerun `kdcache cache` to rewrite it, or `kdcache verify` for details")
    t = pq.read_table(pa.BufferReader(data))
    return t.column("bytes").to_pylist(), t.column("special").to_numpy(zero_copy_only=False)


def read_column(url: str, split: str, column: str, languages: tuple[str, ...] | None = None) -> list[Any]:
    """One column of a cached split, in row order (e.g. the training text to build a word vocabulary); with
    `languages`, of those languages' partitions only."""
    return read_columns(url, split, [column], languages)[column]


def read_columns(url: str, split: str, columns: list[str],
                 languages: tuple[str, ...] | None = None) -> dict[str, list[Any]]:
    """Several columns of a cached split in one pass over its shards: column -> values in row order."""
    fs, root, m = open_manifest(url)
    out: dict[str, list[Any]] = {c: [] for c in columns}
    for shard in m["splits"][split]["shards"]:
        if languages and shard.get("language") not in languages:
            continue
        with fs.open(f"{root}/{shard['parquet']}", "rb") as f:
            table = pq.read_table(f, columns=columns)
        for c in columns:
            out[c] += table.column(c).to_pylist()
    return out

