"""The on-disk cache format, version 2 (specified in docs/cache-format.md).

One cache = one task taught by one teacher:

    <cache>/manifest.json                        written last, atomically, with a digest of its own content;
                                                 the only thing readers trust
    <cache>/<split>/shard-00000.parquet          rows [0, shard_rows), plain Parquet (a split folder holds only
                                                 Parquet, so any engine opens it as a data set)
    <cache>/features.zarr/<split>/shard-00000/   Zarr v3 group, arrays row-aligned with that shard
                                                 (caches written before 2026-11-27 keep them in
                                                 <split>/features.zarr/: readers follow the manifest's paths)
    <cache>/_records/                            the build's fingerprint and a commit record per shard (kept: a
                                                 rerun resumes from them, and repairs a damaged manifest)
"""

from __future__ import annotations

import json
import os
import shlex
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import pyarrow as pa

from ..heads import HEADS
from ..errors import KdcacheError
from ..fingerprint import hash_obj

FORMAT_NAME = "kdcache-cache"
FORMAT_VERSION = 2
MANIFEST = "manifest.json"
DIGEST_KEY = "manifest_sha256"  # sha256 of the canonical JSON of every other manifest field
RECORD_DIGEST_KEY = "record_sha256"  # the same self-check in each commit record and build.json
RECORDS_DIR = "_records"
BUILD_STATE = "build.json"
LOCK_FILE = ".kdcache.lock"
FEATURES_DIR = "features.zarr"
VOCAB_FILE = "vocab.parquet"  # an LM teacher's vocabulary as bytes (id, bytes, special), with offsets on
SCHEMA_METADATA_KEY = b"kdcache"


class CacheFormatError(KdcacheError):
    """A cache on disk is unreadable, damaged or of another format/version; the message says what to do."""


def shard_name(index: int) -> str:
    return f"shard-{index:05d}"


def parquet_relpath(split: str, index: int, language: str | None = None) -> str:
    """A shard's Parquet file; multilingual caches keep each language in a hive partition `language=<code>/`."""
    return f"{split}/{'' if language is None else f'language={language}/'}{shard_name(index)}.parquet"


def features_relpath(split: str, index: int) -> str:
    return f"{features_group_relpath(split)}/{shard_name(index)}"


def features_group_relpath(split: str) -> str:
    """The split's Zarr group (beside the split's folder, which then holds Parquet only)."""
    return f"{FEATURES_DIR}/{split}"


def safe_path(root: Path, rel: str, what: str = "path") -> Path:
    """`root / rel`, refusing absolute names and `..` so a manifest cannot point outside its cache."""
    p = PurePosixPath(rel)
    if p.is_absolute() or ".." in p.parts or "\\" in rel or (p.parts and ":" in p.parts[0]):
        raise CacheFormatError(f"{root / MANIFEST}: {what} {rel!r} points outside the cache; the manifest is "
                               "damaged or hand-edited: rebuild the cache")
    return root / p


def parquet_schema(text_fields: tuple[str, ...], num_labels: int, meta: dict[str, Any]) -> pa.Schema:
    """Columns of a sequence-classification shard (one row per example)."""
    fields = [
        pa.field("row_id", pa.int64(), nullable=False),          # position in the split, 0-based
        pa.field("id", pa.string(), nullable=False),             # stable example id from the source
        *[pa.field(c, pa.string(), nullable=False) for c in text_fields],
        pa.field("label", pa.int32()),                           # gold label id; null = unlabelled
        # full teacher logits, exact: 4·C bytes/row
        pa.field("logits", pa.list_(pa.float32(), num_labels), nullable=False),
        pa.field("input_hash", pa.int64(), nullable=False),      # blake2b-64 of the teacher's input ids
        pa.field("num_tokens", pa.int32(), nullable=False),      # teacher tokens after truncation
        pa.field("truncated", pa.bool_(), nullable=False),       # input was longer than max_length
    ]
    return pa.schema(fields, metadata={SCHEMA_METADATA_KEY: json.dumps(meta, sort_keys=True).encode()})


def token_id_type(vocab_size: int) -> pa.DataType:
    """uint16 when every id fits (vocabularies up to 65,536), else int32."""
    return pa.uint16() if vocab_size <= 1 << 16 else pa.int32()


def pack_ids(ids: np.ndarray, bits: int) -> np.ndarray:
    """Non-negative ids below 2**bits as one little-endian bit stream (uint8): 18 bits hold Gemma's 262,144 ids
    where int32 spends 32. The candidate layout measured against int32 (`kdcache bench --id-layouts`)."""
    a = np.ascontiguousarray(ids, dtype="<u4").reshape(-1)
    if a.size and int(a.max()) >> bits:
        raise ValueError(f"id {int(a.max())} does not fit in {bits} bits")
    stream = np.unpackbits(a.view(np.uint8).reshape(-1, 4), axis=1, bitorder="little")[:, :bits]
    return np.packbits(stream.reshape(-1), bitorder="little")


def unpack_ids(buf: np.ndarray, count: int, bits: int) -> np.ndarray:
    """The `count` ids of a `pack_ids` stream, int64."""
    stream = np.unpackbits(np.asarray(buf, np.uint8), bitorder="little", count=count * bits).reshape(count, bits)
    full = np.zeros((count, 32), np.uint8)
    full[:, :bits] = stream
    return np.packbits(full, axis=1, bitorder="little").view("<u4").reshape(count).astype(np.int64)


def lm_parquet_schema(seq_len: int, k: int, num_temperatures: int, vocab_size: int, samples: bool,
                      meta: dict[str, Any], offsets: bool = False) -> pa.Schema:
    """Columns of a causal-LM shard: one row per packed sequence of `seq_len` tokens, per-position arrays flattened
    position-major (position p's top-k ids are topk_ids[p*k:(p+1)*k]; its value at temperature j is lse[p*nT+j])."""
    ids = token_id_type(vocab_size)
    fields = [
        pa.field("row_id", pa.int64(), nullable=False),
        pa.field("id", pa.string(), nullable=False),
        pa.field("input_ids", pa.list_(ids, seq_len), nullable=False),
        pa.field("topk_ids", pa.list_(ids, seq_len * k), nullable=False),            # descending logit order
        pa.field("topk_logits", pa.list_(pa.float16(), seq_len * k), nullable=False),  # raw logits, no temperature
        pa.field("lse", pa.list_(pa.float32(), seq_len * num_temperatures), nullable=False),   # logsumexp(z/T)
        pa.field("tail", pa.list_(pa.float32(), seq_len * num_temperatures), nullable=False),  # log mass outside top-k
        pa.field("input_hash", pa.int64(), nullable=False),
    ]
    if samples:
        fields += [pa.field("sample_ids", pa.list_(ids), nullable=False),           # distinct ids, position-major
                   pa.field("sample_counts", pa.list_(pa.uint16()), nullable=False),
                   pa.field("sample_lengths", pa.list_(pa.uint16(), seq_len), nullable=False)]  # distinct per position
    if offsets:  # what a student with its own tokenizer needs (docs/cross-tokenizer.md)
        fields += [pa.field("text", pa.binary(), nullable=False),                    # UTF-8 text the row's tokens cover
                   pa.field("token_bytes", pa.list_(pa.uint16(), seq_len), nullable=False)]  # bytes each token ends after
    return pa.schema(fields, metadata={SCHEMA_METADATA_KEY: json.dumps(meta, sort_keys=True).encode()})


def chat_parquet_schema(k: int, num_temperatures: int, vocab_size: int, samples: bool,
                        meta: dict[str, Any], logit_dtype: str = "float16") -> pa.Schema:
    """Columns of a chat-LM shard: one row per conversation, ragged. `input_ids` is the whole rendered conversation
    (prompt included: a student reads it); targets exist only at `positions`, the positions whose next token belongs
    to a learned turn (data.chat.roles), and are flattened position-major over those alone (the j-th listed position's
    top-k ids are topk_ids[j*k:(j+1)*k]), so prompt tokens cost no target bytes. `logit_dtype`: float16 as captured;
    float32 for a cache imported from log-probabilities (capture/imported.py), which keeps them exactly."""
    ids = token_id_type(vocab_size)
    fields = [
        pa.field("row_id", pa.int64(), nullable=False),
        pa.field("id", pa.string(), nullable=False),
        pa.field("input_ids", pa.list_(ids), nullable=False),
        pa.field("positions", pa.list_(pa.int32()), nullable=False),                # ascending
        pa.field("topk_ids", pa.list_(ids), nullable=False),                        # descending logit order
        pa.field("topk_logits", pa.list_(pa.from_numpy_dtype(np.dtype(logit_dtype))), nullable=False),  # raw, no T
        pa.field("lse", pa.list_(pa.float32()), nullable=False),                    # logsumexp(z/T), per position
        pa.field("tail", pa.list_(pa.float32()), nullable=False),                   # log mass outside the top-k
        pa.field("truncated", pa.bool_(), nullable=False),                          # cut at cache.max_length
        pa.field("reference", pa.string()),                                         # the data's own answer
        pa.field("input_hash", pa.int64(), nullable=False),
    ]
    if samples:
        fields += [pa.field("sample_ids", pa.list_(ids), nullable=False),
                   pa.field("sample_counts", pa.list_(pa.uint16()), nullable=False),
                   pa.field("sample_lengths", pa.list_(pa.uint16()), nullable=False)]  # per listed position
    return pa.schema(fields, metadata={SCHEMA_METADATA_KEY: json.dumps(meta, sort_keys=True).encode()})


def ner_parquet_schema(num_labels: int, meta: dict[str, Any]) -> pa.Schema:
    """Columns of a token-classification shard: one row per sentence, ragged by its number of words. The teacher's
    tag logits are PER WORD (its first sub-token), exact float32, flattened word-major, for the first
    `covered_words` words (the rest fell beyond the teacher's max_length: hard labels only)."""
    fields = [
        pa.field("row_id", pa.int64(), nullable=False),
        pa.field("id", pa.string(), nullable=False),
        pa.field("words", pa.list_(pa.string()), nullable=False),
        pa.field("tags", pa.list_(pa.int32()), nullable=False),                 # gold tag id per word
        pa.field("logits", pa.list_(pa.float32()), nullable=False),             # covered_words x num_labels
        pa.field("covered_words", pa.int32(), nullable=False),
        pa.field("input_hash", pa.int64(), nullable=False),
        pa.field("num_tokens", pa.int32(), nullable=False),
        pa.field("truncated", pa.bool_(), nullable=False),
    ]
    return pa.schema(fields, metadata={SCHEMA_METADATA_KEY: json.dumps(meta, sort_keys=True).encode()})


def build_columns(m: dict[str, Any]) -> list[pa.Field]:
    """Columns the build loop adds after any head's own: which fold's teacher (trained without the row) labelled
    it, -1 = the full teacher (out-of-fold targets); the id of the row an augmented row was derived from, null for
    the others (data.augment); the row's language (multilingual data)."""
    return ([pa.field("teacher_fold", pa.int8(), nullable=False)] if m.get("teacher_folds") else []) + \
        ([pa.field("parent", pa.string())] if m.get("augment") else []) + \
        ([pa.field("language", pa.string(), nullable=False)] if m.get("languages") else [])


def parquet_write_options(schema: pa.Schema, row_group_rows: int) -> dict[str, Any]:
    """zstd, dictionary only for strings, byte-stream-split for float leaves: 2-4x faster than defaults here."""
    strings, floats = [], []
    for f in schema:
        t = f.type
        if pa.types.is_string(t):
            strings.append(f.name)
        elif pa.types.is_floating(t):
            floats.append(f.name)
        elif (pa.types.is_list(t) or pa.types.is_fixed_size_list(t)) and pa.types.is_floating(t.value_type):
            floats.append(f"{f.name}.list.element")
    return dict(compression="zstd", compression_level=3, use_dictionary=strings,
                use_byte_stream_split=floats, row_group_size=row_group_rows, write_statistics=["row_id"])


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON (sorted keys) atomically: readers see the old file or the whole new one."""
    write_text_atomic(path, json.dumps(obj, indent=1, sort_keys=True) + "\n")


def write_text_atomic(path: Path, text: str) -> None:
    """Write under a temporary name of this process's own, fsync, then rename: readers, and writers in other
    processes, see the old file or one whole new one."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{os.urandom(4).hex()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def manifest_digest(m: dict[str, Any]) -> str:
    """The manifest's self-check: sha256 of the canonical JSON of every field but the digest itself."""
    return hash_obj({k: v for k, v in m.items() if k != DIGEST_KEY})


def with_record_digest(record: dict[str, Any]) -> dict[str, Any]:
    """A commit record (or build.json) with its self-check: sha256 of the canonical JSON of its other fields."""
    body = {k: v for k, v in record.items() if k != RECORD_DIGEST_KEY}
    return {**body, RECORD_DIGEST_KEY: hash_obj(body)}


def record_intact(record: Any) -> bool:
    """A record whose digest matches its content; one written before records carried digests counts as intact
    (verify still compares it with the manifest)."""
    return isinstance(record, dict) and (RECORD_DIGEST_KEY not in record or
                                         record[RECORD_DIGEST_KEY] == with_record_digest(record)[RECORD_DIGEST_KEY])


def repair_command(root: Path) -> str:
    """The command that repairs the cache at `root` (recaptures damaged shards, rebuilds the manifest)."""
    try:
        build = json.loads((root / RECORDS_DIR / BUILD_STATE).read_text())
        if not record_intact(build):
            raise ValueError("build.json damaged")  # name nothing from it
        args = build.get("command_args") or [build.get("pipeline") or "<pipeline>"]
        pipeline, task = " ".join(shlex.quote(str(a)) for a in args), build["fingerprint_inputs"]["task"]
    except (OSError, ValueError, AttributeError, KeyError, TypeError):
        pipeline, task = "<pipeline>", root.name
    if pipeline.startswith("import "):  # made by `kdcache import` (its whole command is kept)
        return f"kdcache {pipeline}"
    if task == root.name:
        return f"kdcache cache {pipeline} --out {shlex.quote(str(root.parent))} --task {task}"
    return f"kdcache cache {pipeline} ... (the command that built {root}, same settings)"


def read_manifest(root: str | Path) -> dict[str, Any]:
    """Read and check a cache's manifest: JSON, format name and version, its digest, required fields and paths.
    Any damage is named as damage to the manifest, with the command that repairs it."""
    root = Path(root)
    path = root / MANIFEST
    if not path.is_file():
        hint = " (a build was started but not finished: rerun `kdcache cache` to resume it)" \
            if (root / RECORDS_DIR).is_dir() else ""
        raise CacheFormatError(f"{path}: no manifest, so {root} is not a finished kdcache cache{hint}")
    damaged = f"the manifest is damaged; repair it with `{repair_command(root)}` (rebuilt from the shard records)"
    try:
        m = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CacheFormatError(f"{path}: not valid JSON ({e}): {damaged}") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT_NAME:
        raise CacheFormatError(f"{path}: not a kdcache manifest "
                               f"(format={m.get('format') if isinstance(m, dict) else None!r}): {damaged}")
    v = m.get("format_version")
    if v != FORMAT_VERSION:
        raise CacheFormatError(f"{path}: cache format version {v!r}, this kdcache reads version {FORMAT_VERSION}; "
                               "upgrade kdcache to read it, or rebuild the cache with this version "
                               f"(`kdcache cache <pipeline> --out {root.parent} --task {root.name} --overwrite`)")
    if m.get(DIGEST_KEY) != manifest_digest(m):
        raise CacheFormatError(f"{path}: content does not match its digest ({DIGEST_KEY}): it was changed after it "
                               f"was written: {damaged}")
    for key in ("task", "head", "fingerprint", "fingerprint_inputs", "label_names", "text_fields", "splits"):
        if key not in m:
            raise CacheFormatError(f"{path}: manifest field `{key}` is missing: {damaged}")
    if m["head"] not in HEADS:
        raise CacheFormatError(f"{path}: unknown head {m['head']!r}; this kdcache knows {tuple(HEADS)}")
    for split, s in m["splits"].items():
        for shard in s.get("shards", []):
            safe_path(root, shard["parquet"], f"split {split} shard path")
            if shard.get("features"):
                safe_path(root, shard["features"]["path"], f"split {split} features path")
    return m


def shard_fingerprint(m: dict[str, Any], split: str, shard: dict[str, Any]) -> str:
    """The fingerprint a shard was written under: the manifest's, or in a grown cache that of the first generation
    holding its rows (older shards keep the fingerprint of the data they were captured from)."""
    for g in m.get("generations") or []:
        if shard["row_start"] < g["splits"].get(split, {}).get("rows", 0):
            return g.get("fingerprint", m["fingerprint"])
    return m["fingerprint"]


def find_caches(path: str | Path) -> list[Path]:
    """The cache at `path`, or the caches one level below it (a pipeline's folder holds one per task)."""
    path = Path(path)
    if not path.exists():
        raise CacheFormatError(f"{path}: no such folder; build it with `kdcache cache <pipeline> --out {path}`")
    if (path / MANIFEST).is_file() or (path / RECORDS_DIR).is_dir():
        return [path]
    found = sorted(p for p in path.iterdir() if p.is_dir() and ((p / MANIFEST).is_file() or (p / RECORDS_DIR).is_dir()))
    if not found:
        raise CacheFormatError(f"{path}: no kdcache cache here (no {MANIFEST} in it or in its sub-folders)")
    return found
