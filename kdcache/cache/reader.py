"""Streaming reader: a torch IterableDataset over one split of a cache, local or at an fsspec URL.

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
import io
import itertools
import os
import threading
import zlib
from collections import deque
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Iterator

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import zarr

from ..fingerprint import diff_fields
from .format import CAUSAL_LM, MANIFEST, SEQUENCE, TOKEN, CacheFormatError, read_manifest


# On remote filesystems (s3://, gs://, ...): at most this many row groups fetched ahead of the one being read, on as
# many threads, and at most READ_AHEAD_BYTES of them (by their Parquet bytes), so large row groups take fewer.
READ_AHEAD = 8
READ_AHEAD_BYTES = 64 << 20
# A remote split whose shards hold at most this many bytes in all is fetched a whole shard per request and kept in
# memory for the reader's life (one request per shard, none in later epochs); a larger one a row group at a time.
HOLD_BYTES = 64 << 20


class RangeFile(io.RawIOBase):
    """A read-only file of `size` bytes of which only [start, start + len(data)) is held: what pyarrow reads of one
    row group, given its footer, fetched from a remote store in a single request. A read outside it is a bug."""

    def __init__(self, size: int, start: int, data: bytes) -> None:
        super().__init__()
        self.size_, self.start, self.data, self.pos = size, start, data, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = 0) -> int:
        self.pos = offset if whence == 0 else self.pos + offset if whence == 1 else self.size_ + offset
        return self.pos

    def readinto(self, buf: Any) -> int:
        n = min(len(buf), self.size_ - self.pos)
        lo = self.pos - self.start
        if n > 0 and not (0 <= lo and lo + n <= len(self.data)):
            raise OSError(f"read of bytes {self.pos}..{self.pos + n} outside the fetched range {self.start}.."
                          f"{self.start + len(self.data)}")
        buf[:n] = self.data[lo:lo + n]
        self.pos += n
        return n


class CacheMismatchError(CacheFormatError):
    """The cache was built for other data, another task or another label set than the student expects."""


def open_manifest(url: str) -> tuple[Any, str, dict[str, Any]]:
    """(filesystem, root path, checked manifest) for a local path or fsspec URL such as s3://bucket/cache."""
    fs, root = fsspec.core.url_to_fs(str(url))
    root = root.rstrip("/")
    if not fs.exists(f"{root}/{MANIFEST}"):
        raise CacheFormatError(f"{url}: no {MANIFEST}; not a finished kdcache cache (build it with `kdcache cache`)")
    if _is_local(fs):
        return fs, root, read_manifest(root)
    import tempfile  # remote: same checks on a local copy of the small manifest
    with tempfile.TemporaryDirectory() as tmp:
        fs.get(f"{root}/{MANIFEST}", os.path.join(tmp, MANIFEST))
        return fs, root, read_manifest(tmp)


def _is_local(fs: Any) -> bool:
    return "file" in (fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,))


def check_expected(manifest: dict[str, Any], expect: dict[str, Any], where: str) -> None:
    """Refuse a cache whose task, head, labels or data config differ from what the student's pipeline expects."""
    expect = dict(expect)
    data = manifest.get("config", {}).get("data")
    defaults = expect.pop("data_defaults", None)
    if isinstance(data, dict) and defaults:  # settings newer than the cache: it was built with their defaults
        data = {**{k: v for k, v in defaults.items() if k not in data}, **data}
    got = {"task": manifest["task"], "head": manifest["head"], "label_names": manifest["label_names"], "data": data}
    wanted = {k: v for k, v in expect.items() if v is not None}
    changed = diff_fields({k: got.get(k) for k in wanted}, wanted)
    if changed:
        detail = "; ".join(f"{k}: cache has {_dig(got, k)!r}, pipeline expects {_dig(wanted, k)!r}" for k in changed[:4])
        raise CacheMismatchError(f"{where}: cache was built for other data or labels than this student expects "
                                 f"({detail}); rebuild the cache for this pipeline with `kdcache cache`")


def _dig(d: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        d = d.get(part) if isinstance(d, dict) else None
    return d


@dataclass(frozen=True)
class Unit:
    """One row group: the smallest piece of work a worker reads."""

    shard: int
    row_group: int
    start: int  # first row inside the shard
    rows: int
    language: str | None = None


MIXINGS = ("proportional", "uniform", "temperature:<T>")


def mixing_weights(rows: dict[str, int], mixing: str) -> dict[str, float]:
    """Each language's share of an epoch: `proportional` to its rows (every row once per epoch), `uniform`, or
    `temperature:T` (p ∝ rows^(1/T), as in multilingual pre-training: T=1 proportional, large T near uniform)."""
    if mixing == "proportional":
        w = {k: float(n) for k, n in rows.items()}
    elif mixing == "uniform":
        w = {k: 1.0 for k in rows}
    elif mixing.startswith("temperature:"):
        try:
            t = float(mixing.split(":", 1)[1])
        except ValueError:
            t = 0.0
        if not t > 0:
            raise CacheFormatError(f"language mixing {mixing!r}: the temperature must be a number > 0, e.g. "
                                   "`temperature:3`")
        w = {k: float(n) ** (1.0 / t) for k, n in rows.items()}
    else:
        raise CacheFormatError(f"language mixing {mixing!r}: use one of {', '.join(MIXINGS)}")
    total = sum(w.values())
    return {k: v / total for k, v in w.items()}

def dist_info() -> tuple[int, int]:
    """(rank, world size) of this process: torch.distributed when initialised, else accelerate's env vars."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


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
        self.collate = COLLATE[self.manifest["head"]]  # rows of this cache -> a batch
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
        self._footers: dict[str, Any] = {}  # shard path -> (its Parquet footer, remote: its size), read once
        # a small remote split is held in memory, shard by shard, as it is first read (HOLD_BYTES)
        self._hold = sum(self.shards[i]["bytes"] for i in chosen) <= HOLD_BYTES
        self._shard_bytes: dict[str, Future] = {}
        self._held_lock = threading.Lock()
        self.keep_labels = self._label_ids(labels)
        if self.keep_labels is not None:  # only rows of these classes: count them once
            self.num_rows = sum(int(np.isin(self._row_group(self.fs, f"{self.root}/{self.shards[i]['parquet']}", g,
                                                            ["label"]).column("label").fill_null(-1).to_numpy(),
                                            self.keep_labels).sum())
                                for i in chosen for g in range(len(self.shards[i]["row_groups"])))
        self.companion_urls = tuple(str(c) for c in companions)
        ours = self._ids_and_text(self.fs, self.root, self.shards) if companions else None  # read once for them all
        self.companions = [self._companion(c, ours) for c in self.companion_urls]
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

    def _companion(self, url: str, ours: dict[str, list]) -> tuple[dict[str, int], np.ndarray]:
        """(row id -> position, logits [rows, C]) of another teacher's cache of this reader's rows (`ours`: their ids
        and text checksums), in any order or shard layout (a grown cache and a fresh one of the same data differ in
        both); refused unless its head and label set agree and it holds every row read here with the same text."""
        fs, root, m = open_manifest(url)
        mine = self.manifest
        problem = None
        if m["head"] != SEQUENCE or mine["head"] != SEQUENCE:
            problem = f"several teachers are for sequence-classification caches (this one is {m['head']})"
        elif m["label_names"] != mine["label_names"]:
            problem = f"its label set {m['label_names']} differs from {mine['label_names']} (of {self.url})"
        elif [s for s in self.splits if s not in m["splits"]] or list(m["text_fields"]) != list(self.text_fields):
            problem = f"it lacks split(s) of {', '.join(self.splits)} or has other text fields than {self.url}"
        if problem is None:
            theirs = self._ids_and_text(fs, root, [sh for s in self.splits for sh in m["splits"][s]["shards"]],
                                        ["logits"])
            index = {i: n for n, i in enumerate(theirs["id"])}
            for i, text in zip(ours["id"], ours["text"]):
                n = index.get(i)
                if n is None or theirs["text"][n] != text:
                    how = "missing" if n is None else "there with other text"
                    problem = (f"it does not hold the same rows: row {i!r} is {how}; "
                               "cache every teacher from the same data settings (the same rows; their order and shards "
                               "may differ)")
                    break
        if problem:
            raise CacheMismatchError(f"{url}: cannot serve as another teacher of {self.url}: {problem}")
        return index, np.concatenate(theirs["logits"]) if theirs["logits"] else np.zeros((0, len(m["label_names"])))

    def _ids_and_text(self, fs: Any, root: str, shards: list[dict[str, Any]], more: list[str] = ()) -> dict[str, list]:
        """Ids, a checksum of each row's text, and `more` columns (an array per shard) of these shards of a cache."""
        out: dict[str, list] = {"id": [], "text": [], **{c: [] for c in more}}
        for sh in shards:
            with fs.open(f"{root}/{sh['parquet']}", "rb") as f:
                table = pq.read_table(f, columns=["id", *self.text_fields, *more])
            out["id"] += table.column("id").to_pylist()
            out["text"] += [zlib.crc32("\x1f".join(t).encode()) for t in
                            zip(*(table.column(c).to_pylist() for c in self.text_fields))]
            for c in more:
                out[c].append(np.asarray(table.column(c).combine_chunks().values.to_numpy()).reshape(table.num_rows, -1))
        return out

    def _companion_logits(self, ids: list[str]) -> list[np.ndarray]:
        """The other teachers' logits [rows, C] of these rows (their presence was checked when opened)."""
        return [logits[[index[i] for i in ids]] for index, logits in self.companions]

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
        if not self.budgets:
            return list(self.units)
        out: list[Unit] = []
        for li, code in enumerate(self.languages):
            mine = [u for u in self.units if u.language == code]
            if not mine:
                continue
            cycles: dict[int, np.ndarray] = {}  # the language's stream: one seeded permutation of it per cycle
            pos, taken = 0, []
            for _ in range(self.epoch + 1):  # replay earlier epochs to find where this one starts
                taken, rows = [], 0
                while rows < self.budgets[code]:
                    cycle, at = divmod(pos, len(mine))
                    if cycle not in cycles:
                        cycles[cycle] = (np.random.default_rng([self.seed, li, cycle]).permutation(len(mine))
                                         if self.shuffle else np.arange(len(mine)))
                    taken.append(mine[cycles[cycle][at]])
                    rows += taken[-1].rows
                    pos += 1
            out += taken
        return out

    def my_units(self, worker: int = 0, num_workers: int = 1) -> list[Unit]:
        """This (rank, worker)'s row groups for the current epoch, in reading order."""
        units = self.epoch_units()
        order = np.arange(len(units))
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(len(units))
        slot, slots = self.rank * num_workers + worker, self.world_size * num_workers
        return [units[i] for i in order[slot::slots]]

    def __len__(self) -> int:
        return self.num_rows

    def _row_group(self, fs: Any, path: str, group: int, columns: list[str] | None = None) -> pa.Table:
        """One row group of a shard. On a remote store: from the shard held in memory (small splits, `HOLD_BYTES`),
        else with each file's footer read once and the row group's column chunks in one ranged request."""
        if not _is_local(fs) and self._hold:
            return pq.ParquetFile(pa.BufferReader(self._held(fs, path))).read_row_group(group, columns=columns)
        if path not in self._footers:
            with fs.open(path, "rb") as f:
                self._footers[path] = (pq.ParquetFile(f).metadata, f.size if not _is_local(fs) else None)
        meta, size = self._footers[path]
        if _is_local(fs):
            return pq.ParquetFile(path, metadata=meta).read_row_group(group, columns=columns)
        chunks = [meta.row_group(group).column(i) for i in range(meta.num_columns)]
        spans = [(c.dictionary_page_offset if c.has_dictionary_page and c.dictionary_page_offset else
                  c.data_page_offset, c.total_compressed_size) for c in chunks
                 if columns is None or c.path_in_schema.split(".")[0] in columns]
        start, end = min(a for a, _ in spans), max(a + n for a, n in spans)
        view = RangeFile(size, start, fs.cat_file(path, start=start, end=end))
        return pq.ParquetFile(view, metadata=meta).read_row_group(group, columns=columns)

    def __getstate__(self) -> dict[str, Any]:
        """For DataLoader workers started by spawn: without the lock and the shards held so far."""
        return {**self.__dict__, "_held_lock": None, "_shard_bytes": {}}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, _held_lock=threading.Lock())

    def _held(self, fs: Any, path: str) -> bytes:
        """A remote shard's bytes, fetched once (by the first thread that wants them; others wait for it)."""
        with self._held_lock:
            future = self._shard_bytes.get(path)
            mine = future is None
            if mine:
                future = self._shard_bytes[path] = Future()
        if mine:
            try:
                future.set_result(fs.cat_file(path))
            except BaseException as e:
                with self._held_lock:
                    self._shard_bytes.pop(path, None)
                future.set_exception(e)
        return future.result()

    def _read_unit(self, u: Unit) -> dict[str, Any]:
        shard = self.shards[u.shard]
        path = f"{self.root}/{shard['parquet']}"  # read_manifest refused names outside the cache
        try:
            table = self._row_group(self.fs, path, u.row_group)
        except (OSError, ValueError) as e:
            raise CacheFormatError(f"{path} (split {self.split}): cannot read row group {u.row_group}: {e}; "
                                   "run `kdcache verify` on the cache") from None
        if table.num_rows != u.rows:
            raise CacheFormatError(f"{path}: row group {u.row_group} has {table.num_rows} rows, manifest says "
                                   f"{u.rows}; the shard changed since it was written: run `kdcache verify`")
        cols = DECODERS[self.manifest["head"]](self, table, shard, u)
        if self.companions:  # several teachers: [rows, teachers, C], this cache's teacher first
            cols["teacher_logits"] = np.stack([cols["logits"], *self._companion_logits(cols["id"])], axis=1)
        if u.language is not None:
            cols["language"] = [u.language] * u.rows
        return cols

    def _word_features(self, shard: dict[str, Any], u: Unit, covered: np.ndarray) -> dict[str, list[np.ndarray]]:
        """Per-word features of a row group's sentences: {layer_j: [covered_words_r x H] per row}."""
        group = self._open_features(shard)
        off = np.asarray(group["offsets"][u.start:u.start + u.rows + 1])
        if not np.array_equal(np.diff(off), covered):
            raise CacheFormatError(f"{self.root}/{shard['features']['path']}: word-feature offsets of rows "
                                   f"{u.start}..{u.start + u.rows - 1} disagree with covered_words in "
                                   f"{shard['parquet']}; run `kdcache verify`, then rebuild the cache")
        out = {}
        for j in self.feature_layers:
            block = np.asarray(group[f"layer_{j}"][off[0]:off[-1]], np.float32)
            out[f"layer_{j}"] = np.split(block, (off[1:-1] - off[0]).astype(np.int64))
        return out

    def _open_features(self, shard: dict[str, Any]):
        rel = shard["features"]["path"]
        if _is_local(self.fs):
            return zarr.open_group(f"{self.root}/{rel}", mode="r")
        from zarr.storage import FsspecStore
        protocol = self.fs.protocol[0] if isinstance(self.fs.protocol, (tuple, list)) else self.fs.protocol
        return zarr.open_group(FsspecStore.from_url(f"{protocol}://{self.root}/{rel}", read_only=True,
                                                    storage_options=getattr(self.fs, "storage_options", None)),
                               mode="r")

    def _read_ahead(self, units: list[Unit]) -> Iterator[tuple[Unit, dict[str, Any]]]:
        """Each unit with its columns, in order. On a remote filesystem the next units (READ_AHEAD, fewer when their
        row groups are large) are fetched on background threads while the caller works on this one, so object-storage
        latency hides behind training (one thread when Zarr features are read too: their store is then never read
        from two threads at once)."""
        if _is_local(self.fs) or len(units) < 2:
            for u in units:
                yield u, self._read_unit(u)
            return
        group_bytes = max(sh["bytes"] / max(1, len(sh["row_groups"])) for sh in self.shards)
        ahead = max(1, min(READ_AHEAD, int(READ_AHEAD_BYTES // max(1.0, group_bytes))))
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


class _Batch:
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


def _sequence_columns(ds: CacheDataset, table, shard: dict[str, Any], u: Unit) -> dict[str, Any]:
    cols = {
        "row_id": table.column("row_id").to_numpy(),
        "id": table.column("id").to_pylist(),
        **{c: table.column(c).to_pylist() for c in ds.text_fields},
        "label": table.column("label").fill_null(-1).to_numpy().astype(np.int64),
        "logits": np.asarray(table.column("logits").combine_chunks().values.to_numpy()).reshape(table.num_rows, -1),
    }
    if ds.feature_layers:
        group = ds._open_features(shard)
        cols["features"] = {f"layer_{j}": np.asarray(group[f"layer_{j}"][u.start:u.start + u.rows], np.float32)
                            for j in ds.feature_layers}
    return cols


def _token_columns(ds: CacheDataset, table, shard: dict[str, Any], u: Unit) -> dict[str, Any]:
    c = len(ds.manifest["label_names"])
    cols = {"row_id": table.column("row_id").to_numpy(), "id": table.column("id").to_pylist(),
            "words": table.column("words").to_pylist(), "tags": table.column("tags").to_pylist(),
            "logits": [np.array(x, np.float32).reshape(-1, c) for x in
                       table.column("logits").to_numpy(zero_copy_only=False)],
            "covered_words": table.column("covered_words").to_numpy()}
    if ds.feature_layers:
        cols["features"] = ds._word_features(shard, u, cols["covered_words"])
    return cols


def _flat(table, name: str, shape: tuple[int, ...]) -> np.ndarray:
    return np.asarray(table.column(name).combine_chunks().values.to_numpy(zero_copy_only=False)).reshape(shape)


def lm_columns(table, lm: dict[str, Any]) -> dict[str, Any]:
    """A causal-LM row group as arrays: input_ids [n, L]; topk_ids / topk_logits [n, L, k]; lse / tail [n, L, nT];
    with samples, per-row flat sample_ids / sample_counts and sample_lengths [n, L]."""
    n, L, k, nT = table.num_rows, lm["seq_len"], lm["top_k"], len(lm["temperatures"])
    cols: dict[str, Any] = {
        "row_id": table.column("row_id").to_numpy(), "id": table.column("id").to_pylist(),
        "input_ids": _flat(table, "input_ids", (n, L)).astype(np.int64),
        "topk_ids": _flat(table, "topk_ids", (n, L, k)), "topk_logits": _flat(table, "topk_logits", (n, L, k)),
        "lse": _flat(table, "lse", (n, L, nT)), "tail": _flat(table, "tail", (n, L, nT)),
    }
    if lm.get("samples"):
        ids, counts = table.column("sample_ids").combine_chunks(), table.column("sample_counts").combine_chunks()
        off = ids.offsets.to_numpy()
        flat_ids, flat_counts = ids.values.to_numpy(), counts.values.to_numpy()
        cols["sample_ids"] = [flat_ids[off[i]:off[i + 1]] for i in range(n)]
        cols["sample_counts"] = [flat_counts[off[i]:off[i + 1]] for i in range(n)]
        cols["sample_lengths"] = _flat(table, "sample_lengths", (n, L))
    if lm.get("offsets"):
        cols["text"] = table.column("text").to_pylist()
        cols["token_bytes"] = _flat(table, "token_bytes", (n, L))
    return cols


_STACKED = ("input_ids", "topk_ids", "topk_logits", "lse", "tail", "sample_lengths", "token_bytes")


def _collate_sequence(rows: list[Any]) -> dict[str, Any]:
    """Texts stay lists; labels [B] int64; logits [B, C] float32 (several teachers: also teacher_logits [B, T, C]);
    features {name: [B, H]}."""
    batch = _Batch(rows)
    out: dict[str, Any] = {k: batch.list(k) for k in rows[0]
                           if k not in ("label", "logits", "features", "row_id", "teacher_logits")}
    out["row_id"] = torch.as_tensor(batch.array("row_id"))
    out["label"] = torch.as_tensor(batch.array("label").astype(np.int64, copy=False))
    out["logits"] = torch.as_tensor(batch.array("logits"))
    if "teacher_logits" in rows[0]:  # several teachers: [B, teachers, C]
        out["teacher_logits"] = torch.as_tensor(batch.array("teacher_logits"))
    if "features" in rows[0]:
        out["features"] = {k: torch.as_tensor(batch.array("features", k)) for k in rows[0]["features"]}
    return out


def _collate_tokens(rows: list[Any]) -> dict[str, Any]:
    """Ragged per sentence (lists per key), padded by the trainer; row ids [B]."""
    out: dict[str, Any] = {k: [r[k] for r in rows] for k in rows[0]}
    out["row_id"] = torch.as_tensor(np.array(out["row_id"]))
    return out


def _collate_lm(rows: list[Any]) -> dict[str, Any]:
    """Per-position arrays stacked to [B, ...]; sample ids/counts concatenated in row order."""
    batch = _Batch(rows)
    out = {k: torch.as_tensor(batch.array(k).astype(
        np.int64 if k.endswith(("ids", "lengths", "bytes")) else np.float32, copy=False))
           for k in _STACKED if k in rows[0]}
    out["row_id"] = torch.as_tensor(batch.array("row_id"))
    out["id"] = batch.list("id")
    for k in ("language", "text"):
        if k in rows[0]:
            out[k] = batch.list(k)
    if "sample_ids" in rows[0]:
        out["sample_ids"] = torch.as_tensor(np.concatenate(batch.list("sample_ids")).astype(np.int64))
        out["sample_counts"] = torch.as_tensor(np.concatenate(batch.list("sample_counts")).astype(np.int64))
    return out


# head -> how one of its row groups becomes columns, and how its rows become a batch
DECODERS = {SEQUENCE: _sequence_columns, TOKEN: _token_columns,
            CAUSAL_LM: lambda ds, table, shard, u: lm_columns(table, ds.manifest["lm"])}
COLLATE = {SEQUENCE: _collate_sequence, TOKEN: _collate_tokens, CAUSAL_LM: _collate_lm}


def collate(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Batch rows of any head (recognised by their columns); `CacheDataset.collate` is the same, picked by head."""
    head = TOKEN if "words" in rows[0] else CAUSAL_LM if "input_ids" in rows[0] else SEQUENCE
    return COLLATE[head](rows)


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

