"""The per-position top-k log-probability layout of axolotl's KD trainer (and of the DistillKit-style logprob datasets
prepared for it), and `kdcache export` of a chat cache into it.

One row per conversation, every list as long as `input_ids` (L):
- `input_ids` [L], `attention_mask` [L] (1), `labels` [L] (the token where the position before it holds targets,
  else -100);
- `target_token_ids` [L][k], `target_logprobs` [L][k] (log-probabilities at the export temperature T over the
  teacher's full vocabulary: z/T - logsumexp(z/T), float32), `target_mask` [L][k] (1 where the slot is scored);
  row j is the teacher's distribution over input_ids[j + 1] (axolotl's alignment), rows without targets are padding;
- kdcache's own extras, ignored by axolotl: `target_tail_logmass` [L] (log of the mass outside the row's top-k at T,
  null where the row has no targets: what `kdcache import` needs to keep the tail exact), `id`, `reference`.

A sidecar `kdcache_export.json` names the source cache's fingerprint, the temperature and the rows per split.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from ..errors import KdcacheError
from ..heads import CHAT_LM
from .format import read_manifest
from .reader import CacheDataset

FIELDS = ("input_ids", "attention_mask", "labels", "target_token_ids", "target_logprobs", "target_mask")
TAIL_FIELD = "target_tail_logmass"
PAD_LOGPROB = -1e9  # an unscored slot (its mask is 0): exp() of it is 0 in any precision
IGNORE = -100  # a label no loss counts (transformers' convention)
SIDECAR = "kdcache_export.json"
FORMATS = ("parquet", "jsonl")


class ExportError(KdcacheError):
    """The cache cannot be exported as asked; the message says why and what to do."""


def schema() -> pa.Schema:
    ids, scores = pa.list_(pa.int32()), pa.list_(pa.float32())
    flags = pa.list_(pa.int8())
    return pa.schema([pa.field("id", pa.string()), pa.field("input_ids", ids), pa.field("attention_mask", flags),
                      pa.field("labels", ids), pa.field("target_token_ids", pa.list_(ids)),
                      pa.field("target_logprobs", pa.list_(scores)), pa.field("target_mask", pa.list_(flags)),
                      pa.field(TAIL_FIELD, scores), pa.field("reference", pa.string())])


def logprobs_at(topk_logits: np.ndarray, lse: np.ndarray) -> np.ndarray:
    """log p [n, k] (float32) at T = 1 of cached raw logits [n, k] and their log-sum-exp [n]: computed as stage
    two's `TopKTargets.from_cached` does, so an export then import reads back the very targets it trained on."""
    return (torch.as_tensor(np.array(topk_logits)).float() - torch.as_tensor(np.array(lse)).float()[:, None]
            ).clamp(max=0.0).numpy()


def exported_row(row: dict[str, Any], j: int, temperature: float) -> dict[str, Any]:
    """One cached conversation (CacheDataset row) at the cache's j-th temperature in the layout above."""
    ids = np.asarray(row["input_ids"], np.int64)
    L, pos = len(ids), np.asarray(row["positions"], np.int64)
    k = row["topk_ids"].shape[1]
    tok = np.zeros((L, k), np.int32)
    lp = np.full((L, k), PAD_LOGPROB, np.float32)
    mask = np.zeros((L, k), np.int8)
    tail = [None] * L
    tok[pos] = row["topk_ids"]
    z = np.asarray(row["topk_logits"], np.float32) / np.float32(temperature)
    lp[pos] = logprobs_at(z, row["lse"][:, j])
    mask[pos] = 1
    for p, t in zip(pos, row["tail"][:, j]):
        tail[p] = float(t)
    labels = np.full(L, IGNORE, np.int64)
    labels[pos + 1] = ids[pos + 1]
    return {"id": row["id"], "input_ids": ids.tolist(), "attention_mask": [1] * L, "labels": labels.tolist(),
            "target_token_ids": tok.tolist(), "target_logprobs": lp.tolist(), "target_mask": mask.tolist(),
            TAIL_FIELD: tail, "reference": row.get("reference")}


def _rows(cache: str, split: str, j: int, temperature: float, batch: int) -> Iterator[list[dict[str, Any]]]:
    out: list[dict[str, Any]] = []
    for row in CacheDataset(cache, split):
        out.append(exported_row(row, j, temperature))
        if len(out) == batch:
            yield out
            out = []
    if out:
        yield out


def export_cache(cache: str, out: Path, temperature: float = 1.0, fmt: str = "parquet",
                 splits: list[str] | None = None, batch: int = 64) -> dict[str, Any]:
    """Write each split of a chat cache as `<out>/<split>.parquet` (or `.jsonl`) in the layout above at a cached
    `temperature`, streaming `batch` rows at a time; returns the sidecar's content."""
    m = read_manifest(cache)
    if m["head"] != CHAT_LM:
        raise ExportError(f"{cache}: a {m['head']} cache; `kdcache export` writes chat-lm caches (one conversation "
                          "per row, targets at response positions), the rows axolotl's KD trainer reads")
    temps = m["lm"]["temperatures"]
    if temperature not in temps:
        raise ExportError(f"{cache}: no targets at temperature {temperature} (cached: {temps}); logprobs at another "
                          "temperature need the teacher's full logits: export at a cached one, or recache with "
                          f"`cache.temperatures` including {temperature}")
    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt!r}: one of {', '.join(FORMATS)}")
    wanted = splits or list(m["splits"])
    missing = [s for s in wanted if s not in m["splits"]]
    if missing:
        raise ExportError(f"{cache}: no split(s) {missing} (splits: {', '.join(m['splits'])})")
    out.mkdir(parents=True, exist_ok=True)
    j, rows = temps.index(temperature), {}
    for split in wanted:
        path, tmp = out / f"{split}.{fmt}", out / f".{split}.{fmt}.tmp"
        n = 0
        if fmt == "parquet":
            with pq.ParquetWriter(tmp, schema(), compression="zstd") as w:
                for part in _rows(cache, split, j, temperature, batch):
                    w.write_table(pa.Table.from_pylist(part, schema=schema()))
                    n += len(part)
        else:
            with open(tmp, "w") as f:
                for part in _rows(cache, split, j, temperature, batch):
                    f.writelines(json.dumps(r) + "\n" for r in part)
                    n += len(part)
        tmp.replace(path)  # a reader never sees a half-written file under the final name
        rows[split] = n
    side = {"source_fingerprint": m["fingerprint"], "head": m["head"], "temperature": temperature,
            "top_k": m["lm"]["top_k"], "tokenizer_sha256": m["lm"]["tokenizer_sha256"], "format": fmt, "rows": rows,
            "layout": "axolotl KD: target row j is the distribution over input_ids[j + 1]"}
    (out / SIDECAR).write_text(json.dumps(side, indent=1) + "\n")
    return side
