"""Content hashes for everything that changes the cached targets. Hashing never falls back to randomness:
what cannot be hashed raises, so two caches with equal fingerprints really were built from equal inputs."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pyarrow as pa
import torch

from .errors import KdcacheError

CHUNK = 1 << 20  # read files in 1 MiB pieces


class FingerprintError(KdcacheError):
    """Something that changes the targets could not be hashed."""


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def hash_obj(obj: Any) -> str:
    """sha256 of the canonical JSON of a plain object."""
    try:
        return hashlib.sha256(canonical_json(obj).encode()).hexdigest()
    except TypeError as e:
        raise FingerprintError(f"cannot hash {type(obj).__name__}: {e}") from None


def hash_file(path: str | Path, h: "hashlib._Hash | None" = None) -> str:
    """sha256 of a file's bytes."""
    h = h or hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
    return h.hexdigest()


def hash_tree(root: str | Path, files: Iterable[Path] | None = None) -> str:
    """sha256 over (relative path, sha256 of content) of every file below `root`, in sorted order."""
    root = Path(root)
    files = sorted(files if files is not None else (p for p in root.rglob("*") if p.is_file()))
    h = hashlib.sha256()
    for p in files:
        h.update(str(p.relative_to(root).as_posix()).encode() + b"\0" + hash_file(p).encode() + b"\n")
    return h.hexdigest()


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def hash_weight_files(folder: str | Path) -> str:
    """sha256 over the weight files (and config.json) of a model folder."""
    folder = Path(folder)
    files = [p for p in folder.rglob("*") if p.is_file() and (p.suffix in WEIGHT_SUFFIXES or p.name == "config.json")]
    if not any(p.suffix in WEIGHT_SUFFIXES for p in files):
        raise FingerprintError(f"{folder}: no weight files ({', '.join(WEIGHT_SUFFIXES)}) to fingerprint")
    return hash_tree(folder, files)


def hash_state_dict(state: dict) -> str:
    """sha256 of a model's tensors (name, dtype, shape, bytes), for models built in memory."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}\n".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def hash_tokenizer(tokenizer: Any) -> str:
    """sha256 of what decides a tokenizer's ids: its serialised pipeline (or vocab) and special tokens."""
    parts: dict[str, Any] = {"class": type(tokenizer).__name__,
                             "special": {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())},
                             "padding_side": getattr(tokenizer, "padding_side", None),
                             "truncation_side": getattr(tokenizer, "truncation_side", None)}
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        parts["backend"] = json.loads(backend.to_str())
    elif hasattr(tokenizer, "get_vocab"):
        parts["vocab"] = sorted(tokenizer.get_vocab().items())
    else:
        raise FingerprintError(f"cannot fingerprint tokenizer {type(tokenizer).__name__}: it has neither a "
                               "serialisable backend nor a vocabulary")
    return hash_obj(parts)


def hash_table(table: pa.Table) -> str:
    """sha256 of a table's content: column names, types and values, never its layout (chunking, slice offsets,
    an all-valid validity bitmap or none), so the same rows read from a file or taken from another table agree."""
    h = hashlib.sha256()
    for field, col in zip(table.schema, table.columns):
        h.update(f"{field.name}\0{field.type}\0{len(col)}\0".encode())
        _hash_values(h, col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col)
    return h.hexdigest()


def _hash_values(h: Any, arr: pa.Array) -> None:
    """Feed `h` an array's nulls (a packed mask) and values, layout-free: text as lengths + the bytes its slice
    spans, lists as lengths + their flattened values, fixed-width values as numpy bytes (nulls as 0)."""
    import pyarrow.compute as pc
    t = arr.type
    h.update(np.packbits(arr.is_valid().to_numpy(zero_copy_only=False)).tobytes())
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_binary(t) or pa.types.is_large_binary(t):
        arr = pc.fill_null(arr, pa.scalar("" if "string" in str(t) else b"", t))
        wide = pa.types.is_large_string(t) or pa.types.is_large_binary(t)
        offsets = np.frombuffer(arr.buffers()[1], dtype=np.int64 if wide else np.int32)
        offsets = offsets[arr.offset:arr.offset + len(arr) + 1]
        h.update(np.diff(offsets).astype(np.int64).tobytes())
        if len(arr) and arr.buffers()[2] is not None:
            h.update(memoryview(arr.buffers()[2])[int(offsets[0]):int(offsets[-1])])
    elif pa.types.is_list(t) or pa.types.is_large_list(t):
        h.update(pc.fill_null(pc.list_value_length(arr), 0).to_numpy(zero_copy_only=False).astype(np.int64).tobytes())
        _hash_values(h, arr.flatten())
    elif pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t):
        h.update(pc.fill_null(arr, pa.scalar(False if pa.types.is_boolean(t) else 0, t))
                 .to_numpy(zero_copy_only=False).tobytes())
    else:  # rarer types (structs, dictionaries, dates): their Python values, canonically
        h.update(json.dumps(arr.to_pylist(), sort_keys=True, default=str).encode())


def hash_ids(ids: np.ndarray) -> int:
    """64-bit hash of one example's teacher input ids, stored so readers can check token alignment."""
    digest = hashlib.blake2b(np.ascontiguousarray(ids, dtype=np.int32).tobytes(), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


def diff_fields(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested dicts (for 'which setting changed' messages)."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new)):
            out += diff_fields(old.get(k), new.get(k), f"{prefix}.{k}" if prefix else str(k))
        return out
    return [] if old == new else [prefix or "<root>"]


def only_data_changed(old_inputs: dict[str, Any], new_inputs: dict[str, Any]) -> bool:
    """True when two fingerprints' inputs differ in the data's split hashes alone (same teacher and settings): the
    case where a cache may grow by new rows (capture/grow.py)."""
    changed = diff_fields(old_inputs, new_inputs)
    return bool(changed) and all(k.startswith("data.splits.") for k in changed)
