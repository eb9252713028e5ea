"""Sharing a cache: `kdcache push <cache> <url>` and `kdcache pull <url> <dir>` (docs/sharing.md).

Both copy every file of a finished cache (shards, Zarr groups, side files, commit records) and the manifest LAST,
so a half-copied cache is never visible as complete: readers trust only a manifest. Push refuses a cache that does
not verify and first removes any manifest already at the destination; pull checks every file the manifest lists
against its checksum before it writes the manifest, and resumes: files already there with the right checksum are
not fetched again.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import fsspec

from ..fingerprint import hash_file, hash_tree
from ..progress import progress
from .format import LOCK_FILE, MANIFEST, CacheFormatError, read_manifest, safe_path
from .reader import open_manifest
from .verify import verify_cache

log = logging.getLogger(__name__)


class ShareError(CacheFormatError):
    """A push or pull that cannot complete; the message names the file and what to do."""


def _files(root: Path) -> list[str]:
    """Every file of a local cache but its manifest, lock and half-written temporaries, relative, sorted."""
    out = []
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_file() and rel not in (MANIFEST, LOCK_FILE) and ".tmp-" not in p.name:
            out.append(rel)
    return out


def push(cache: str | Path, url: str) -> dict[str, Any]:
    """Copy a finished local cache to `url` (any fsspec URL: s3://bucket/prefix, a folder), manifest last."""
    root = Path(cache)
    report = verify_cache(root)
    if not report.ok:
        raise ShareError(f"{root}: does not verify ({'; '.join(report.problems[:3])}); `kdcache verify {root}` "
                         "names every problem: rebuild or repair it before sharing it")
    fs, dest = fsspec.core.url_to_fs(url)
    dest = dest.rstrip("/")
    if fs.exists(f"{dest}/{MANIFEST}"):  # replacing a cache: hide the old one first
        fs.rm(f"{dest}/{MANIFEST}")
    files = _files(root)
    for folder in sorted({dest, *(f"{dest}/{Path(rel).parent.as_posix()}" for rel in files)}):
        fs.makedirs(folder, exist_ok=True)  # a local folder needs its parents; object storage ignores it
    with progress(sum((root / f).stat().st_size for f in files), desc=f"push {root.name}", unit="B") as bar:
        for rel in files:
            fs.put_file(str(root / rel), f"{dest}/{rel}")
            bar.update((root / rel).stat().st_size)
    _put_manifest(fs, root, dest)
    return {"url": url, "files": len(files) + 1, "bytes": report.bytes_checked}


def _put_manifest(fs: Any, root: Path, dest: str) -> None:
    """The manifest, last: the moment the copy becomes a cache."""
    fs.put_file(str(root / MANIFEST), f"{dest}/{MANIFEST}")


def _listed_checks(m: dict[str, Any]) -> dict[str, str]:
    """What the manifest says each file (or Zarr group folder) must hash to: relative path -> sha256."""
    checks = {rel: f["sha256"] for rel, f in (m.get("files") or {}).items()}
    for s in m["splits"].values():
        for sh in s["shards"]:
            checks[sh["parquet"]] = sh["sha256"]
            if sh.get("features"):
                checks[sh["features"]["path"]] = sh["features"]["sha256"]
        if s.get("features_group"):
            checks[s["features_group"]["path"]] = s["features_group"]["sha256"]
    return checks


def pull(url: str, out: str | Path) -> dict[str, Any]:
    """Copy the cache at `url` into the local folder `out`, every listed file checked, the manifest last."""
    fs, src, m = open_manifest(url)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if (out / MANIFEST).exists():
        have = read_manifest(out)
        if have["fingerprint"] == m["fingerprint"] and verify_cache(out).ok:
            log.info("%s: already holds this cache, verified; nothing to fetch", out)
            return {"url": url, "fetched": 0, "out": str(out)}
        (out / MANIFEST).unlink()  # about to change: no longer a finished cache until the new manifest lands
    remote = sorted(p for p in fs.find(src) if p.rsplit("/", 1)[-1] != MANIFEST)
    checks = _listed_checks(m)
    intact = [rel + "/" for rel, sha in checks.items()  # Zarr groups already here in full (a resumed pull)
              if (out / rel).is_dir() and hash_tree(safe_path(out, rel, "listed folder")) == sha]
    fetched = 0
    sizes = fs.sizes(remote) if remote else []
    with progress(sum(sizes), desc=f"pull {src.rsplit('/', 1)[-1]}", unit="B") as bar:
        for path, size in zip(remote, sizes):
            rel = path[len(src):].lstrip("/")
            local = safe_path(out, rel, "remote file")
            # a file listed on its own and already here intact is kept (a resumed pull); the rest is fetched
            kept = local.is_file() and (rel.startswith(tuple(intact)) or rel in checks and hash_file(local) == checks[rel])
            if not kept:
                local.parent.mkdir(parents=True, exist_ok=True)
                tmp = local.with_name(f".{local.name}.tmp-{os.getpid()}")
                fs.get_file(path, str(tmp))
                os.replace(tmp, local)
                fetched += 1
            bar.update(size)
    for rel, sha in checks.items():
        local = safe_path(out, rel, "listed file")
        got = (hash_tree(local) if local.is_dir() else hash_file(local)) if local.exists() else None
        if got != sha:
            raise ShareError(f"{url}/{rel}: {'missing' if got is None else 'checksum mismatch'} after the copy (the "
                             "object is damaged or was replaced after the manifest was written); nothing is trusted "
                             f"in {out} until it is fixed: push the cache again, then rerun this pull (it resumes)")
    tmp = out / f".{MANIFEST}.tmp-{os.getpid()}"
    fs.get_file(f"{src}/{MANIFEST}", str(tmp))
    os.replace(tmp, out / MANIFEST)
    report = verify_cache(out)
    if not report.ok:
        (out / MANIFEST).unlink()
        raise ShareError(f"{out}: the copy does not verify ({'; '.join(report.problems[:3])}); rerun the pull")
    return {"url": url, "fetched": fetched, "out": str(out)}



def shared_location(url: str, task: str, fingerprint: str) -> str:
    """Where a cache lives in a shared store: `<url>/<task>-<first 16 hex digits of its fingerprint>`, so the same
    teacher, data and settings always land at (and are found at) the same place."""
    return f"{url.rstrip('/')}/{task}-{fingerprint[:16]}"


def fetch_shared(url: str, task: str, fingerprint: str, out: str | Path) -> dict[str, Any] | None:
    """The shared cache with exactly this fingerprint pulled into `out` (its manifest), or None when the store has
    none (a cache at that place with another fingerprint is ignored)."""
    where = shared_location(url, task, fingerprint)
    try:
        m = open_manifest(where)[2]
    except CacheFormatError:
        return None
    if m["fingerprint"] != fingerprint:
        log.warning("%s: holds a cache with another fingerprint; ignored", where)
        return None
    pull(where, out)
    log.info("%s: an identical cache was already shared; pulled it instead of running the teacher", where)
    return read_manifest(out)
