"""Reading a cache's files where they are: local disk or an fsspec URL (s3://, gs://, ...). A remote row group is
fetched in one ranged request given its shard's footer (read once); a small remote split is held in memory whole."""

from __future__ import annotations

import io
import os
import threading
from concurrent.futures import Future
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from ..format import MANIFEST, CacheFormatError, read_manifest

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


def open_manifest(url: str) -> tuple[Any, str, dict[str, Any]]:
    """(filesystem, root path, checked manifest) for a local path or fsspec URL such as s3://bucket/cache."""
    fs, root = fsspec.core.url_to_fs(str(url))
    root = root.rstrip("/")
    if not fs.exists(f"{root}/{MANIFEST}"):
        raise CacheFormatError(f"{url}: no {MANIFEST}; not a finished kdcache cache (build it with `kdcache cache`)")
    if is_local(fs):
        return fs, root, read_manifest(root)
    import tempfile  # remote: same checks on a local copy of the small manifest
    with tempfile.TemporaryDirectory() as tmp:
        fs.get(f"{root}/{MANIFEST}", os.path.join(tmp, MANIFEST))
        return fs, root, read_manifest(tmp)


def is_local(fs: Any) -> bool:
    return "file" in (fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,))


class ShardFiles:
    """Row groups of one cache's shards on `fs`: each file's footer read once; on a remote store either the whole
    shard held in memory (`hold`: small splits) or a row group's column chunks fetched in one ranged request."""

    def __init__(self, fs: Any, hold: bool) -> None:
        self.fs, self.hold = fs, hold
        self.local = is_local(fs)
        self._footers: dict[str, Any] = {}  # shard path -> (its Parquet footer, remote: its size)
        self._shard_bytes: dict[str, Future] = {}
        self._lock = threading.Lock()

    def row_group(self, path: str, group: int, columns: list[str] | None = None) -> pa.Table:
        fs = self.fs
        if not self.local and self.hold:
            return pq.ParquetFile(pa.BufferReader(self._held(path))).read_row_group(group, columns=columns)
        if path not in self._footers:
            with fs.open(path, "rb") as f:
                self._footers[path] = (pq.ParquetFile(f).metadata, f.size if not self.local else None)
        meta, size = self._footers[path]
        if self.local:
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
        return {**self.__dict__, "_lock": None, "_shard_bytes": {}}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, _lock=threading.Lock())

    def _held(self, path: str) -> bytes:
        """A remote shard's bytes, fetched once (by the first thread that wants them; others wait for it)."""
        with self._lock:
            future = self._shard_bytes.get(path)
            mine = future is None
            if mine:
                future = self._shard_bytes[path] = Future()
        if mine:
            try:
                future.set_result(self.fs.cat_file(path))
            except BaseException as e:
                with self._lock:
                    self._shard_bytes.pop(path, None)
                future.set_exception(e)
        return future.result()

    def open_features(self, root: str, rel: str):
        """A shard's Zarr group of features (`rel`, from the manifest), read-only."""
        import zarr
        if self.local:
            return zarr.open_group(f"{root}/{rel}", mode="r")
        from zarr.storage import FsspecStore
        protocol = self.fs.protocol[0] if isinstance(self.fs.protocol, (tuple, list)) else self.fs.protocol
        return zarr.open_group(FsspecStore.from_url(f"{protocol}://{root}/{rel}", read_only=True,
                                                    storage_options=getattr(self.fs, "storage_options", None)),
                               mode="r")
