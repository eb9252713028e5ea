"""`kdcache verify` and `kdcache info`: re-check a cache against its manifest, and summarise it."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import zarr

from ..fingerprint import hash_file, hash_obj, hash_tree, only_data_changed
from .codecs import shard_schema
from .format import (LOCK_FILE, MANIFEST, RECORD_DIGEST_KEY, RECORDS_DIR, SCHEMA_METADATA_KEY, CacheFormatError,
                     read_manifest, record_intact, repair_command, safe_path, shard_fingerprint)


SPLIT_ORDER = {"train": 0, "validation": 1, "test": 2}


@dataclass
class VerifyReport:
    root: Path
    problems: list[str] = field(default_factory=list)
    bytes_checked: int = 0
    seconds: float = 0.0
    stray: list[Path] = field(default_factory=list)  # files the manifest does not list
    notes: list[str] = field(default_factory=list)  # what is not damage but worth saying (an unfinished append)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def fix(self) -> str | None:
        """The command (or action) that mends what was found."""
        if self.ok:
            return None
        if len(self.stray) == len(self.problems):
            return "delete the files not listed in the manifest (kdcache never reads them)"
        return f"`{repair_command(self.root)}` recaptures what is damaged or missing and rebuilds the manifest, " \
               "keeping every shard that checks out"

    def as_dict(self) -> dict[str, Any]:
        return {"cache": str(self.root), "ok": self.ok, "problems": self.problems, "fix": self.fix,
                "notes": self.notes, "bytes_checked": self.bytes_checked, "seconds": round(self.seconds, 3),
                "mb_per_s": round(self.bytes_checked / 1e6 / self.seconds, 1) if self.seconds else None}


def _check_shard(root: Path, m: dict[str, Any], split: str, shard: dict[str, Any], report: VerifyReport) -> None:
    path = safe_path(root, shard["parquet"])
    where = f"{path} (split {split}, rows {shard['row_start']}..{shard['row_start'] + shard['rows'] - 1})"
    if not path.is_file():
        report.problems.append(f"{where}: shard file missing")
        return
    size = path.stat().st_size
    report.bytes_checked += size
    if size != shard["bytes"]:
        report.problems.append(f"{where}: size {size} B, manifest says {shard['bytes']} B (truncated or replaced)")
    elif hash_file(path) != shard["sha256"]:
        report.problems.append(f"{where}: checksum mismatch (the file's bytes changed since it was written)")
    else:
        try:
            pf = pq.ParquetFile(path)
        except Exception as e:  # pyarrow raises several types for unreadable files
            report.problems.append(f"{where}: not readable as Parquet ({e})")
            return
        if pf.metadata.num_rows != shard["rows"]:
            report.problems.append(f"{where}: {pf.metadata.num_rows} rows, manifest says {shard['rows']}")
        groups = [pf.metadata.row_group(i).num_rows for i in range(pf.metadata.num_row_groups)]
        if groups != shard["row_groups"]:
            report.problems.append(f"{where}: row groups of {groups} rows in the file, the manifest says "
                                   f"{shard['row_groups']} (readers plan from the manifest)")
        expected = shard_schema(m)
        if not pf.schema_arrow.remove_metadata().equals(expected.remove_metadata()):
            report.problems.append(f"{where}: columns differ from format v{m['format_version']}: {pf.schema_arrow}")
        try:
            meta = json.loads((pf.schema_arrow.metadata or {}).get(SCHEMA_METADATA_KEY, b"{}"))
        except json.JSONDecodeError:
            meta = {}
        if meta.get("fingerprint") != shard_fingerprint(m, split, shard):
            report.problems.append(f"{where}: shard was written for another cache (fingerprint in its Parquet "
                                   f"metadata is {meta.get('fingerprint')!r})")
    feat = shard.get("features")
    if feat:
        fpath = safe_path(root, feat["path"])
        if not fpath.is_dir():
            report.problems.append(f"{fpath} (split {split}): feature group missing")
            return
        report.bytes_checked += sum(p.stat().st_size for p in fpath.rglob("*") if p.is_file())
        if hash_tree(fpath) != feat["sha256"]:
            report.problems.append(f"{fpath} (split {split}): feature checksum mismatch (a Zarr chunk or its "
                                   "metadata changed, was added or removed)")
            return
        group = zarr.open_group(str(fpath), mode="r")
        for name, spec in feat.get("arrays", {}).items():
            if name not in group or list(group[name].shape) != spec["shape"]:
                report.problems.append(f"{fpath}/{name} (split {split}): missing or shape differs from {spec['shape']}")


def _check_records(root: Path, m: dict[str, Any], report: VerifyReport) -> tuple[set[Path], bool]:
    """Every shard's commit record (what a repair rebuilds the manifest from) is there and agrees with it; also
    whether an append of new rows (a grow, same teacher and settings) was started and not finished."""
    listed, appending = {root / RECORDS_DIR / "build.json"}, False
    try:
        build = json.loads((root / RECORDS_DIR / "build.json").read_text())
        if not record_intact(build):
            report.problems.append(f"{root / RECORDS_DIR / 'build.json'}: its content does not match its digest "
                                   f"({RECORD_DIGEST_KEY}): it was changed after it was written")
        elif build.get("fingerprint") != m["fingerprint"]:
            appending = build.get("fingerprint") == hash_obj(build.get("fingerprint_inputs")) and \
                only_data_changed(m["fingerprint_inputs"], build.get("fingerprint_inputs") or {})
            if appending:
                report.notes.append(f"an append of new rows was started and not finished ({RECORDS_DIR}/build.json "
                                    "names the grown data); the cache is whole as its manifest lists it; "
                                    f"`{repair_command(root)}` finishes the append")
            else:
                report.problems.append(f"{root / RECORDS_DIR / 'build.json'}: fingerprint differs from the manifest's")
    except (OSError, ValueError, AttributeError):
        report.problems.append(f"{root / RECORDS_DIR / 'build.json'}: missing or unreadable")
    for split, s in m["splits"].items():
        for shard in s["shards"]:
            path = root / RECORDS_DIR / split / f"{shard['name']}.json"
            listed.add(path)
            try:
                rec = json.loads(path.read_text())
                # its own digest, and every field the manifest took from it (row groups, features, ...)
                same = record_intact(rec) and all(rec.get(k) == v for k, v in shard.items())
            except (OSError, ValueError, KeyError, TypeError):
                same = False
            if not same:
                report.problems.append(f"{path}: the shard's commit record is missing, damaged or disagrees with the "
                                       "manifest (a repair could not use it)")
    return listed, appending


def verify_cache(root: str | Path) -> VerifyReport:
    """Re-check the manifest (digest, fingerprint), every shard's size, checksum, row count, row groups and schema,
    every Zarr file, the commit records, and look for files the manifest does not list. Damage of any kind is
    reported, never raised."""
    root = Path(root)
    report = VerifyReport(root)
    t0 = time.perf_counter()
    try:
        m = read_manifest(root)
        _verify(root, m, report)
    except CacheFormatError as e:
        report.problems.append(str(e))
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:  # a manifest of the wrong shape
        report.problems.append(f"{root / MANIFEST}: unexpected content ({type(e).__name__}: {e}); the manifest is "
                               f"damaged: repair it with `{repair_command(root)}`")
    report.seconds = time.perf_counter() - t0
    return report


def _verify(root: Path, m: dict[str, Any], report: VerifyReport) -> None:
    if hash_obj(m["fingerprint_inputs"]) != m["fingerprint"]:
        report.problems.append(f"{root / MANIFEST}: `fingerprint` is not the sha256 of `fingerprint_inputs`")
    records, appending = _check_records(root, m, report)
    listed = {root / MANIFEST, root / LOCK_FILE} | records
    for rel, f in (m.get("files") or {}).items():
        try:
            path = safe_path(root, rel, "side file")
        except CacheFormatError as e:
            report.problems.append(str(e))
            continue
        listed.add(path)
        if not path.is_file():
            report.problems.append(f"{path}: side file missing (rebuild with `kdcache cache`: it rewrites it)")
        elif hash_file(path) != f["sha256"]:
            report.problems.append(f"{path}: checksum mismatch (the file changed since it was written; rerun "
                                   "`kdcache cache` to rewrite it)")
        else:
            report.bytes_checked += path.stat().st_size
    for split, s in m["splits"].items():
        total = 0
        for shard in s["shards"]:
            if shard["row_start"] != total:
                report.problems.append(f"{root / MANIFEST}: split {split} shard {shard['name']} starts at row "
                                       f"{shard['row_start']}, expected {total}")
            total += shard["rows"]
            try:
                _check_shard(root, m, split, shard, report)
            except CacheFormatError as e:
                report.problems.append(str(e))
                continue
            listed.add(root / shard["parquet"])
            if shard.get("features"):
                listed.update(p for p in (root / shard["features"]["path"]).rglob("*"))
                listed.add(root / shard["features"]["path"])
        if total != s["rows"]:
            report.problems.append(f"{root / MANIFEST}: split {split} shards hold {total} rows, manifest says {s['rows']}")
        group = s.get("features_group")
        if group:
            path = safe_path(root, group["path"], f"split {split} features group")
            listed.add(path)
            if not path.is_file() or hash_file(path) != group["sha256"]:
                report.problems.append(f"{path} (split {split}): the Zarr group's metadata is missing or changed")
    for p in sorted(root.rglob("*")):
        if appending and p.is_file() and p not in listed and _appended(root, m, p):
            continue  # a shard of the unfinished append, or its record: the manifest does not list it yet
        if p.is_file() and p not in listed:
            report.stray.append(p)
            report.problems.append(f"{p}: file not listed in the manifest (stray or left by an unfinished build); "
                                   "delete it, or rebuild the cache")


def _appended(root: Path, m: dict[str, Any], p: Path) -> bool:
    """Whether `p` is a file an append writes beside a finished cache: a new shard of a split (Parquet, Zarr group,
    commit record) whose name the manifest does not hold, or a temporary file of the writer."""
    rel = p.relative_to(root).parts
    shard = next((x for x in rel if x.startswith("shard-")), None)
    if rel[-1].startswith(".") and ".tmp-" in rel[-1]:
        return True
    split = rel[1] if rel[0] in (RECORDS_DIR, "features.zarr") and len(rel) > 2 else rel[0]
    names = {sh["name"] for sh in m["splits"].get(split, {}).get("shards", [])}
    return shard is not None and shard.split(".")[0] not in names


def _summary(shards: list[dict[str, Any]], rows: int, stats: dict[str, Any]) -> dict[str, Any]:
    """Rows, shards, bytes (per example, per token) and the head's statistics of a split or a language of it."""
    pq_bytes = sum(sh["bytes"] for sh in shards)
    feat_bytes = sum(sh.get("features", {}).get("bytes", 0) for sh in shards)
    out = {"rows": rows, "shards": len(shards), "parquet_bytes": pq_bytes, "feature_bytes": feat_bytes,
           "bytes_per_example": round((pq_bytes + feat_bytes) / max(rows, 1), 1), **stats}
    if "tokens" in stats:
        out["bytes_per_token"] = round(pq_bytes / max(stats["tokens"], 1), 1)
    if "response_tokens" in stats:  # chat caches: targets are stored at response tokens only
        out["bytes_per_response_token"] = round(pq_bytes / max(stats["response_tokens"], 1), 1)
    return out


def cache_info(root: str | Path) -> dict[str, Any]:
    """Rows, bytes, bytes per example, fingerprint and statistics of one cache."""
    root = Path(root)
    m = read_manifest(root)
    splits = {}
    for split, s in sorted(m["splits"].items(), key=lambda kv: (SPLIT_ORDER.get(kv[0], 9), kv[0])):
        splits[split] = _summary(s["shards"], s["rows"], s["stats"])
        if s.get("languages"):
            text = (m.get("text") or {}).get(split) or {}
            splits[split]["languages"] = {code: {**_summary([sh for sh in s["shards"] if sh.get("language") == code],
                                                            lang["rows"], lang["stats"]), **text.get(code, {})}
                                          for code, lang in s["languages"].items()}
        elif (m.get("text") or {}).get(split):
            splits[split].update(m["text"][split])
    total_rows = m["totals"]["rows"]
    return {"cache": str(root), "task": m["task"], "pipeline": m.get("pipeline"), "head": m["head"],
            "format_version": m["format_version"], "fingerprint": m["fingerprint"],
            "teacher": m["fingerprint_inputs"]["teacher"], "labels": m["label_names"], "features": m.get("features"),
            "rows": total_rows, "bytes": m["totals"]["bytes"],
            "bytes_per_example": round(m["totals"]["bytes"] / max(total_rows, 1), 1), "splits": splits,
            "created_at": m.get("created_at"), "capture": m.get("capture"), "device": m.get("device"),
            "processes": m.get("processes"), "lm": m.get("lm"), "generations": m.get("generations")}


def refuse_damaged(cache: str | Path) -> None:
    """Raise, naming the first problems, when a local cache fails `verify_cache` (trainers call it first)."""
    report = verify_cache(cache)
    if not report.ok:
        raise CacheFormatError(f"refusing to train on a damaged cache: {'; '.join(report.problems[:3])}")
