"""CacheWriter: the one way a cache gets written.

Each shard is written under a temporary name and renamed when complete; then a small commit record goes to
`_records/<split>/shard-NNNNN.json` (the shard's commit point). The manifest is written last, from those records,
with a digest of its own content, and is the only thing readers trust. The records stay: a rerun resumes from them,
recaptures only the shards whose files no longer match, and rebuilds a damaged manifest. Shard writes run on a
background thread so the teacher's next forward pass overlaps them.
"""

from __future__ import annotations

import datetime as _dt
import errno
import hashlib
import json
import logging
import os
import shutil
import socket
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import zarr

from .. import __version__
from ..failpoints import failpoint
from ..fingerprint import diff_fields, hash_file, hash_tree, only_data_changed
from .format import (BUILD_STATE, DIGEST_KEY, FORMAT_NAME, FORMAT_VERSION, LOCK_FILE, MANIFEST, RECORDS_DIR,
                     CacheFormatError, features_group_relpath, features_relpath, fsync_dir, manifest_digest,
                     parquet_relpath, parquet_write_options, read_manifest, record_intact, safe_path, shard_name,
                     with_record_digest, write_json_atomic)


log = logging.getLogger(__name__)


class CacheConflictError(CacheFormatError):
    """The target folder holds a cache built with other settings, or is in use."""


# ------------------------------------------------------------------------------------------------- lock

def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def acquire_lock(root: Path) -> Path:
    """Create `<root>/.kdcache.lock` exclusively; a lock left by a dead process on this host is taken over."""
    path = root / LOCK_FILE
    me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                other = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError):
                other = {}
            if other.get("host") == me["host"] and isinstance(other.get("pid"), int) and not _pid_alive(other["pid"]):
                path.unlink(missing_ok=True)  # stale: its process is gone
                continue
            raise CacheConflictError(
                f"{root}: another kdcache process (pid {other.get('pid')} on {other.get('host')}) is writing this "
                f"cache; wait for it to finish, or delete {path} if that process no longer exists") from None
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        return path
    raise CacheConflictError(f"{path}: could not take the lock")


# ---------------------------------------------------------------------------------------------- writing

class CacheWriteError(CacheFormatError):
    """Writing a shard failed (disk full, permissions, I/O); nothing half-written is trusted."""


class _HashingFile:
    """A binary file that hashes what goes through it, so a shard's sha256 needs no second read."""

    def __init__(self, f: Any) -> None:
        self.f, self.sha256, self.size, self.closed = f, hashlib.sha256(), 0, False

    def write(self, data: Any) -> int:
        self.sha256.update(data)
        self.size += memoryview(data).nbytes
        return self.f.write(data)

    def tell(self) -> int:
        return self.f.tell()

    def flush(self) -> None:
        self.f.flush()

    def writable(self) -> bool:
        return True

    def close(self) -> None:
        self.closed = True


def _write_parquet(path: Path, table: pa.Table, row_group_rows: int) -> dict[str, Any]:
    """Write one shard under a temporary name, fsync, rename; its size, sha256 and row groups as written."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    footer: list = []
    with open(tmp, "wb") as f:
        out = _HashingFile(f)
        pq.write_table(table, out, metadata_collector=footer, **parquet_write_options(table.schema, row_group_rows))
        f.flush()
        os.fsync(f.fileno())
    failpoint("parquet-written")  # a complete temporary file, not yet renamed
    os.replace(tmp, path)
    meta = footer[0]
    return {"bytes": out.size, "sha256": out.sha256.hexdigest(),
            "row_groups": [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]}


def _write_features(path: Path, features: dict[str, np.ndarray], attrs: dict[str, Any]) -> None:
    """Write one shard's feature arrays as a Zarr v3 group under a temporary name, then rename it."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    group = zarr.open_group(str(tmp), mode="w", attributes=attrs)
    for name, arr in features.items():
        chunk_rows = max(1, min(len(arr), (4 << 20) // max(1, arr[0:1].nbytes)))  # ~4 MiB chunks
        a = group.create_array(name, shape=arr.shape, dtype=arr.dtype,
                               chunks=(chunk_rows, *arr.shape[1:]) if arr.ndim > 1 else (chunk_rows,))
        a[...] = arr
    failpoint("zarr-written")
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)


def _per_language(records: list[dict[str, Any]], summarise) -> dict[str, Any]:
    """A multilingual split's rows, shards, bytes and head statistics per language (shard records in row order)."""
    out: dict[str, Any] = {}
    for code in dict.fromkeys(r["language"] for r in records):
        mine = [r for r in records if r["language"] == code]
        out[code] = {"rows": sum(r["rows"] for r in mine), "shards": len(mine),
                     "bytes": sum(r["bytes"] + (r.get("features") or {}).get("bytes", 0) for r in mine),
                     "stats": summarise([r["stats"] for r in mine])}
    return out


class CacheWriter:
    """Context manager that owns a cache folder while a build runs (see module docstring).

    header: manifest fields known before any shard (task, head, label_names, text_fields, fingerprint,
    fingerprint_inputs, features, config, ...).
    """

    def __init__(self, root: str | Path, header: dict[str, Any], overwrite: bool = False,
                 row_group_rows: int = 2048, role: str = "owner", files: dict[str, bytes] | None = None,
                 source: list[str] | None = None) -> None:
        self.root = Path(root)
        self.header = header
        self.source = source  # `kdcache cache` arguments naming the pipeline and its settings, for repair commands
        self.files = files or {}  # side files at the cache root (e.g. an LM teacher's vocabulary); header["files"]
        self.overwrite = overwrite
        self.row_group_rows = row_group_rows
        self.role = role  # "owner" locks, checks and cleans the folder; a "worker" (another rank) only writes
        self.complete = False  # True when a finished, intact cache with this fingerprint is already there
        self._pool: ThreadPoolExecutor | None = None
        self._pending: list[Future] = []
        self._lock: Path | None = None

    # -- opening: refuse other settings, resume our own
    def __enter__(self) -> "CacheWriter":
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kdcache-writer")
        if self.role == "worker":
            return self
        self.root.mkdir(parents=True, exist_ok=True)
        try:
            self._lock = acquire_lock(self.root)
        except OSError as e:
            if e.errno not in (errno.EROFS, errno.EACCES, errno.EPERM):
                raise
            return self._read_only(e)
        try:
            self._check_existing()
            self._write_files()  # missing or changed side files are rewritten, a finished cache's included
            if self.complete:
                return self
            self._clean_temporaries()
            (self.root / RECORDS_DIR).mkdir(exist_ok=True)
            write_json_atomic(self.root / RECORDS_DIR / BUILD_STATE, with_record_digest(
                {**{k: self.header.get(k) for k in ("pipeline", "fingerprint", "fingerprint_inputs")},
                 "command_args": self.source or [self.header.get("pipeline")]}))
        except BaseException:
            self._release()
            raise
        return self

    def _write_files(self) -> None:
        """The side files, each under a temporary name then renamed (rewritten when missing or changed); the
        manifest lists them with their checksums (`header["files"]`), so verify and readers can trust them."""
        for rel, data in self.files.items():
            path = safe_path(self.root, rel, "side file")
            if path.is_file() and hash_file(path) == self.header["files"][rel]["sha256"]:
                continue
            tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        if self.files:
            fsync_dir(self.root)

    def _wipe(self) -> None:
        for p in self.root.iterdir():
            if p.name != LOCK_FILE:
                shutil.rmtree(p) if p.is_dir() else p.unlink()

    def _read_only(self, e: OSError) -> "CacheWriter":
        """A folder that cannot be written (a read-only mount): fine when it holds this cache, finished and intact
        (nothing to write); otherwise refused, saying so."""
        try:
            m = read_manifest(self.root)
        except (FileNotFoundError, CacheFormatError):
            m = None
        if m is not None and m["fingerprint"] == self.header["fingerprint"] and not self._damaged_shards(m):
            log.info("%s: the folder is read-only (%s); the cache in it is complete and intact", self.root,
                     e.strerror)
            self.complete = True
            return self
        raise CacheConflictError(f"{self.root}: the folder cannot be written ({e.strerror}) and does not hold this "
                                 "cache finished and intact; build it in a writable folder (--out) or make this one "
                                 "writable") from None

    def _check_existing(self) -> None:
        """Decide what the folder holds: nothing (build), our cache intact (nothing to do), our cache damaged or
        unfinished (resume: redo what no longer checks out), another cache (refuse unless --overwrite)."""
        manifest, state = self.root / MANIFEST, self.root / RECORDS_DIR / BUILD_STATE
        if self.overwrite and (manifest.exists() or state.parent.exists()):
            self._wipe()  # --overwrite always rebuilds, whatever state the cache is in
            return
        old, what, damage = None, "", None
        if manifest.exists():
            try:
                old, what = read_manifest(self.root), "finished cache"
            except CacheFormatError as e:
                damage = e
        if old is None and state.is_file():
            try:
                old, what = json.loads(state.read_text()), "damaged cache" if damage else "unfinished build"
            except (json.JSONDecodeError, UnicodeDecodeError):
                old = None
        if old is None:
            if damage is not None or state.parent.exists():
                raise CacheConflictError(f"{self.root}: {damage or 'build records unreadable'}; there are no readable "
                                         "shard records to repair it from: rerun with --overwrite to rebuild the cache")
            stray = [p.name for p in self.root.iterdir() if p.name != LOCK_FILE]
            if stray:
                raise CacheConflictError(f"{self.root}: folder is not empty and holds no kdcache cache "
                                         f"({', '.join(sorted(stray)[:5])}); choose another --out")
            return
        if old.get("fingerprint") != self.header["fingerprint"] and self.header.get("generations") and \
                only_data_changed(old.get("fingerprint_inputs", {}), self.header["fingerprint_inputs"]):
            # a cache growing by new rows (capture/grow.py): its shards and records stay, new shards follow them
            log.info("%s: the data grew; capturing the new rows as generation %d", self.root,
                     self.header["generations"][-1]["generation"])
            return
        if old.get("fingerprint") != self.header["fingerprint"]:
            changed = diff_fields(old.get("fingerprint_inputs", {}), self.header["fingerprint_inputs"])
            raise CacheConflictError(
                f"{self.root}: holds a {what} built with other settings (changed: {', '.join(changed) or 'unknown'}); "
                "pass --overwrite to replace it, or choose another --out")
        if what == "damaged cache":
            log.warning("%s: %s; rebuilding it from the shard records", self.root, damage)
        if what == "finished cache":
            bad = self._damaged_shards(old)
            self.complete = not bad
            if bad:
                log.warning("%s: %d shard(s) no longer match their checksums (%s); recapturing them", self.root,
                            len(bad), ", ".join(bad[:5]))

    def _damaged_shards(self, m: dict[str, Any]) -> list[str]:
        """Shards of a finished cache whose files or commit records no longer match the manifest."""
        bad = []
        for split, s in m["splits"].items():
            group = s.get("features_group")
            if group and not self._group_intact(group):
                bad.append(group["path"])
            for sh in s["shards"]:
                rec = self._read_record(split, int(sh["name"].rsplit("-", 1)[1]))
                if not (rec and rec.get("sha256") == sh["sha256"] and (rec.get("features") or {}).get("sha256") ==
                        (sh.get("features") or {}).get("sha256") and self._files_match(rec)):
                    bad.append(f"{split}/{sh['name']}")
        return bad

    def _group_intact(self, group: dict[str, Any]) -> bool:
        path = safe_path(self.root, group["path"], "features group")
        return path.is_file() and hash_file(path) == group["sha256"]

    def _clean_temporaries(self, pid: int | None = None) -> None:
        """Delete half-written files left under temporary names: every process's (we hold the lock), or one's."""
        for p in self.root.rglob(f".*.tmp-{pid or '*'}"):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)

    # -- shards
    def _record_path(self, split: str, index: int) -> Path:
        return self.root / RECORDS_DIR / split / f"{shard_name(index)}.json"

    def _read_record(self, split: str, index: int) -> dict[str, Any] | None:
        try:
            rec = json.loads(self._record_path(split, index).read_text())
        except (OSError, ValueError):
            return None
        if not record_intact(rec):  # never trust what verify would not: its shard is captured again
            log.warning("%s: commit record damaged (its digest does not match); recapturing its shard",
                        self._record_path(split, index))
            return None
        return rec

    def _files_match(self, rec: dict[str, Any]) -> bool:
        """The record's Parquet file and feature group are there with the recorded sizes and checksums."""
        try:
            pq_path = self.root / rec["parquet"]
            if not pq_path.is_file() or pq_path.stat().st_size != rec["bytes"] or hash_file(pq_path) != rec["sha256"]:
                return False
            feat = rec.get("features")
            return not feat or ((self.root / feat["path"]).is_dir()
                                and hash_tree(self.root / feat["path"]) == feat["sha256"])
        except (KeyError, TypeError, ValueError):  # a damaged record: the shard is redone
            return False

    def shard_done(self, split: str, index: int, row_start: int, rows: int) -> bool:
        """True when the shard's commit record exists and its files still match their checksums."""
        rec = self._read_record(split, index)
        return bool(rec) and (rec.get("row_start"), rec.get("rows")) == (row_start, rows) and self._files_match(rec)

    def submit(self, split: str, index: int, row_start: int, table: pa.Table,
               features: dict[str, np.ndarray] | None, stats: dict[str, Any], language: str | None = None) -> None:
        """Queue one shard for writing (in its language's partition when given); at most one write waits while the
        caller computes the next shard."""
        assert self._pool is not None, "use CacheWriter as a context manager"
        while len(self._pending) >= 1:
            self._pending.pop(0).result()  # re-raises a failed write here
        self._pending.append(self._pool.submit(self._write_shard, split, index, row_start, table, features, stats,
                                               language))

    def _write_shard(self, split: str, index: int, row_start: int, table: pa.Table,
                     features: dict[str, np.ndarray] | None, stats: dict[str, Any], language: str | None) -> None:
        try:
            self._write_shard_files(split, index, row_start, table, features, stats, language)
        except OSError as e:
            self._clean_temporaries(os.getpid())
            raise CacheWriteError(
                f"{self.root}: writing {split}/{shard_name(index)} failed: {e}. Nothing half-written is trusted; "
                "fix the cause (e.g. free disk space) and rerun the same command to resume") from e

    def _write_shard_files(self, split: str, index: int, row_start: int, table: pa.Table,
                           features: dict[str, np.ndarray] | None, stats: dict[str, Any], language: str | None) -> None:
        pq_rel = parquet_relpath(split, index, language)
        (self.root / pq_rel).parent.mkdir(parents=True, exist_ok=True)
        record: dict[str, Any] = {"name": shard_name(index), "row_start": row_start, "rows": table.num_rows,
                                  "stats": stats}
        if language is not None:
            record["language"] = language
        if features:
            rel = features_relpath(split, index)
            parent = (self.root / rel).parent
            if not (parent / "zarr.json").is_file():  # the split's group, so zarr.open_group lists every shard
                try:
                    parent.mkdir(parents=True, exist_ok=True)
                    zarr.open_group(str(parent), mode="a")
                except zarr.errors.ContainsGroupError:
                    pass  # another process of a multi-process capture created it first
            _write_features(self.root / rel, features, {"row_start": row_start, "rows": table.num_rows})
            size = sum(p.stat().st_size for p in (self.root / rel).rglob("*") if p.is_file())
            record["features"] = {"path": rel, "bytes": size, "sha256": hash_tree(self.root / rel),
                                  "arrays": {k: {"shape": list(v.shape), "dtype": str(v.dtype)} for k, v in features.items()}}
        record.update(parquet=pq_rel, **_write_parquet(self.root / pq_rel, table, self.row_group_rows))
        rec_path = self._record_path(split, index)
        rec_path.parent.mkdir(parents=True, exist_ok=True)
        failpoint("before-shard-record")
        write_json_atomic(rec_path, with_record_digest(record))

    def flush(self) -> None:
        """Wait for queued shard writes; re-raise the first failure."""
        while self._pending:
            self._pending.pop(0).result()

    # -- commit
    def commit(self, splits: dict[str, dict[str, Any]], summarise, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """Write the manifest from the shards' commit records.

        splits: split -> {"rows": int, "dataset_fingerprint": str}; summarise(list of shard stats) -> dict.
        """
        self.flush()
        out_splits = {}
        for split, info in splits.items():
            records = sorted((json.loads(p.read_text()) for p in (self.root / RECORDS_DIR / split).glob("*.json")),
                             key=lambda r: r["row_start"]) if (self.root / RECORDS_DIR / split).is_dir() else []
            covered = 0
            for r in records:
                if r["row_start"] != covered:
                    raise CacheFormatError(f"{self.root}: split {split} has no shard for rows from {covered}; "
                                           "rerun `kdcache cache` to finish the build")
                covered += r["rows"]
            if covered != info["rows"]:
                raise CacheFormatError(f"{self.root}: split {split} has {covered} of {info['rows']} rows written; "
                                       "rerun `kdcache cache` to finish the build")
            shards = [{k: r[k] for k in ("name", "row_start", "rows", "row_groups", "parquet", "bytes", "sha256", "features",
                                         "language") if k in r} for r in records]
            out_splits[split] = {**info, "shards": shards, "stats": summarise([r["stats"] for r in records])}
            if any("language" in r for r in records):
                out_splits[split]["languages"] = _per_language(records, summarise)
            group = f"{features_group_relpath(split)}/zarr.json"
            if (self.root / group).is_file():  # the split's Zarr group metadata, so verify covers every Zarr file
                out_splits[split]["features_group"] = {"path": group, "sha256": hash_file(self.root / group)}
        manifest = {
            "format": FORMAT_NAME, "format_version": FORMAT_VERSION, "kdcache_version": __version__,
            "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            **self.header, **(extra or {}), "splits": out_splits,
            "totals": {"rows": sum(s["rows"] for s in out_splits.values()),
                       "bytes": sum(sh["bytes"] + sh.get("features", {}).get("bytes", 0)
                                    for s in out_splits.values() for sh in s["shards"])},
        }
        manifest[DIGEST_KEY] = manifest_digest(manifest)
        failpoint("before-manifest")
        try:
            write_json_atomic(self.root / MANIFEST, manifest)
        except OSError as e:
            self._clean_temporaries(os.getpid())
            raise CacheWriteError(f"{self.root}: writing {MANIFEST} failed: {e}. Every shard is written and kept; "
                                  "fix the cause and rerun the same command to commit the cache") from e
        failpoint("after-manifest")
        fsync_dir(self.root)
        self.complete = True
        return manifest

    def __exit__(self, *exc: Any) -> None:
        try:
            if self._pool is not None:
                if exc[0] is None:
                    self.flush()
                self._pool.shutdown(wait=True)
        finally:
            self._release()

    def _release(self) -> None:
        if self._lock is not None:
            self._lock.unlink(missing_ok=True)
            self._lock = None
