"""Per-head decoding of a row group into columns, and of rows into a batch (the built-in heads' codecs,
registered in cache/codecs.py). A decoder receives the row group's table and a `RowGroup` with what else it may
read (the manifest, the feature layers asked for, the shard's Zarr group), never the dataset."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from ..format import CacheFormatError
from .rows import Batch


@dataclass(frozen=True)
class RowGroup:
    """Beside a row group's Parquet table: its cache's manifest, the text fields, the teacher layers a student asked
    for, the row group's place in its shard ([start, start + rows)) and its shard's features (Zarr group, on demand;
    `features_path` names it in messages)."""

    manifest: dict[str, Any]
    text_fields: tuple[str, ...]
    feature_layers: tuple[int, ...]
    start: int
    rows: int
    open_features: Callable[[], Any]
    features_path: str = ""
    parquet_path: str = ""


def sequence_columns(table, g: RowGroup) -> dict[str, Any]:
    """Sequence classification: row_id, id, text field(s), label [n] int64 (-1 = none), logits [n, C] float32 and,
    when asked, features {layer_j: [n, H] float32}."""
    cols = {
        "row_id": table.column("row_id").to_numpy(),
        "id": table.column("id").to_pylist(),
        **{c: table.column(c).to_pylist() for c in g.text_fields},
        "label": table.column("label").fill_null(-1).to_numpy().astype(np.int64),
        "logits": np.asarray(table.column("logits").combine_chunks().values.to_numpy()).reshape(table.num_rows, -1),
    }
    if g.feature_layers:
        group = g.open_features()
        cols["features"] = {f"layer_{j}": np.asarray(group[f"layer_{j}"][g.start:g.start + g.rows], np.float32)
                            for j in g.feature_layers}
    return cols


def token_columns(table, g: RowGroup) -> dict[str, Any]:
    """Token classification: words, tags, logits [covered_words, C] per row, covered_words; per-word features."""
    c = len(g.manifest["label_names"])
    cols = {"row_id": table.column("row_id").to_numpy(), "id": table.column("id").to_pylist(),
            "words": table.column("words").to_pylist(), "tags": table.column("tags").to_pylist(),
            "logits": [np.array(x, np.float32).reshape(-1, c) for x in
                       table.column("logits").to_numpy(zero_copy_only=False)],
            "covered_words": table.column("covered_words").to_numpy()}
    if g.feature_layers:
        cols["features"] = word_features(g, cols["covered_words"])
    return cols


def word_features(g: RowGroup, covered: np.ndarray) -> dict[str, list[np.ndarray]]:
    """Per-word features of a row group's sentences: {layer_j: [covered_words_r x H] per row}."""
    group = g.open_features()
    off = np.asarray(group["offsets"][g.start:g.start + g.rows + 1])
    if not np.array_equal(np.diff(off), covered):
        raise CacheFormatError(f"{g.features_path}: word-feature offsets of rows {g.start}..{g.start + g.rows - 1} "
                               f"disagree with covered_words in {g.parquet_path}; run `kdcache verify`, then rebuild the "
                               "cache")
    out = {}
    for j in g.feature_layers:
        block = np.asarray(group[f"layer_{j}"][off[0]:off[-1]], np.float32)
        out[f"layer_{j}"] = np.split(block, (off[1:-1] - off[0]).astype(np.int64))
    return out


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




def lm_row_group(table, g: RowGroup) -> dict[str, Any]:
    return lm_columns(table, g.manifest["lm"])


_STACKED = ("input_ids", "topk_ids", "topk_logits", "lse", "tail", "sample_lengths", "token_bytes")


def collate_sequence(rows: list[Any]) -> dict[str, Any]:
    """Texts stay lists; labels [B] int64; logits [B, C] float32 (several teachers: also teacher_logits [B, T, C]);
    features {name: [B, H]}."""
    batch = Batch(rows)
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


def collate_tokens(rows: list[Any]) -> dict[str, Any]:
    """Ragged per sentence (lists per key), padded by the trainer; row ids [B]."""
    out: dict[str, Any] = {k: [r[k] for r in rows] for k in rows[0]}
    out["row_id"] = torch.as_tensor(np.array(out["row_id"]))
    return out


def collate_lm(rows: list[Any]) -> dict[str, Any]:
    """Per-position arrays stacked to [B, ...]; sample ids/counts concatenated in row order."""
    batch = Batch(rows)
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

