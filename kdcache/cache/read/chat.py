"""A chat-LM cache's row groups as ragged columns, and rows of conversations as a right-padded training batch
(the `chat-lm` codec, registered in cache/codecs.py; layout: format.chat_parquet_schema)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .columns import RowGroup
from .rows import Batch

RAGGED = ("input_ids", "positions", "topk_ids", "topk_logits", "lse", "tail", "sample_ids", "sample_counts",
          "sample_lengths")


def _split(table, name: str, width: int | None = None) -> list[np.ndarray]:
    """A list column as one array per row, reshaped [n_i, width] when a width is given (1 included: a cache of one
    temperature still has lse [n_i, 1])."""
    col = table.column(name).combine_chunks()
    off, flat = col.offsets.to_numpy(), col.values.to_numpy(zero_copy_only=False)
    parts = [flat[off[i]:off[i + 1]] for i in range(len(off) - 1)]
    return [p.reshape(-1, width) for p in parts] if width is not None else parts


def chat_row_group(table, g: RowGroup) -> dict[str, Any]:
    """Per row: input_ids [L_i], positions [n_i], topk_ids / topk_logits [n_i, k], lse / tail [n_i, nT]; with
    samples, flat sample_ids / sample_counts and sample_lengths [n_i]; truncated [n] (bool); reference (the data's
    own answer, or None)."""
    lm = g.manifest["lm"]
    k, nT = lm["top_k"], len(lm["temperatures"])
    cols: dict[str, Any] = {"row_id": table.column("row_id").to_numpy(), "id": table.column("id").to_pylist(),
                            "truncated": table.column("truncated").to_numpy(zero_copy_only=False),
                            "reference": table.column("reference").to_pylist()}
    for name, width in (("input_ids", None), ("positions", None), ("topk_ids", k), ("topk_logits", k), ("lse", nT),
                        ("tail", nT), ("sample_ids", None), ("sample_counts", None), ("sample_lengths", None)):
        if name in table.column_names:
            cols[name] = _split(table, name, width)
    return cols


def collate_chat(rows: list[Any]) -> dict[str, Any]:
    """input_ids [B, L] right-padded with 0 (L: the longest row; a causal student never sees the padding) and
    `lengths` [B]; `target_index` [N]: the flat index b·L + t of each row's target positions, in row order, with
    their targets concatenated: topk_ids / topk_logits [N, k], lse / tail [N, nT], sample_lengths [N]."""
    batch = Batch(rows)
    ids = batch.list("input_ids")
    L = max(len(x) for x in ids)
    x = np.zeros((len(ids), L), np.int64)
    for j, row in enumerate(ids):
        x[j, :len(row)] = row
    pos = batch.list("positions")
    out: dict[str, Any] = {
        "input_ids": torch.as_tensor(x), "lengths": torch.as_tensor([len(r) for r in ids]),
        "target_index": torch.as_tensor(np.concatenate([j * L + p.astype(np.int64) for j, p in enumerate(pos)])),
        "row_id": torch.as_tensor(batch.array("row_id")), "id": batch.list("id")}
    for name in RAGGED[2:]:
        if name in rows[0]:
            a = np.concatenate(batch.list(name))
            out[name] = torch.as_tensor(a.astype(np.float32 if a.dtype.kind == "f" else np.int64, copy=False))
    for name in ("language", "reference"):
        if name in rows[0]:
            out[name] = batch.list(name)
    return out
