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
    """sha256 of a table's content (schema metadata ignored), via one Arrow IPC stream of contiguous batches."""
    table = table.replace_schema_metadata(None).combine_chunks()
    sink = _HashSink()
    with pa.ipc.new_stream(sink, table.schema) as w:
        for batch in table.to_batches(max_chunksize=65536):
            w.write_batch(batch)
    return sink.h.hexdigest()


class _HashSink:
    """A file-like object that hashes what is written to it."""

    def __init__(self) -> None:
        self.h = hashlib.sha256()
        self.closed = False

    def write(self, data: Any) -> int:
        mv = memoryview(data)
        self.h.update(mv)
        return mv.nbytes

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True


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
