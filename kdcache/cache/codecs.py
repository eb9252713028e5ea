"""Each teacher head's codec: how its shards' Parquet columns are laid out (schema), how a row group of them
becomes columns in memory (decode) and how rows become a training batch (collate). Registered by head name; a new
head registers its own (`register`), beside its `HeadSpec` (kdcache/heads.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import pyarrow as pa

from ..heads import CAUSAL_LM, CHAT_LM, DEFAULT_HEAD, SEQUENCE, TOKEN
from .format import (CacheFormatError, build_columns, chat_parquet_schema, lm_parquet_schema, ner_parquet_schema,
                     parquet_schema)
from .read import chat, columns as cols


@dataclass(frozen=True)
class Codec:
    """schema(manifest or manifest header, shard metadata) -> the head's own columns; decode(row group's table,
    `columns.RowGroup`) -> {column: values}; collate(rows) -> batch; marker: a column only this head's rows have, so
    `collate` recognises rows of unknown origin (None: the default head's rows)."""

    schema: Callable[[dict[str, Any], dict[str, Any]], pa.Schema]
    decode: Callable[[pa.Table, cols.RowGroup], dict[str, Any]]
    collate: Callable[[list[Any]], dict[str, Any]]
    marker: str | None = None


CODECS: dict[str, Codec] = {}


def register(head: str, codec: Codec) -> Codec:
    CODECS[head] = codec
    return codec


def get(head: str) -> Codec:
    try:
        return CODECS[head]
    except KeyError:
        raise CacheFormatError(f"no codec for teacher head {head!r} (codecs: {', '.join(CODECS)}); a cache of "
                               "this head was written by a kdcache with a head this one lacks") from None


def shard_schema(m: dict[str, Any], meta: dict[str, Any] | None = None, head_only: bool = False) -> pa.Schema:
    """The shard schema a manifest's (or a manifest header's) head and settings call for (`head_only`: without the
    build loop's columns, i.e. what the head itself writes)."""
    schema = get(m["head"]).schema(m, meta or {})
    for f in [] if head_only else build_columns(m):
        schema = schema.append(f)
    return schema


def collate(rows: list[Any]) -> dict[str, Any]:
    """Batch rows of any head, recognised by their columns (a `CacheDataset`'s own `collate` is picked by head)."""
    for codec in CODECS.values():
        if codec.marker is not None and codec.marker in rows[0]:
            return codec.collate(rows)
    return get(DEFAULT_HEAD).collate(rows)


def _sequence_schema(m: dict[str, Any], meta: dict[str, Any]) -> pa.Schema:
    return parquet_schema(tuple(m["text_fields"]), len(m["label_names"]), meta)


def _token_schema(m: dict[str, Any], meta: dict[str, Any]) -> pa.Schema:
    return ner_parquet_schema(len(m["label_names"]), meta)


def _lm_schema(m: dict[str, Any], meta: dict[str, Any]) -> pa.Schema:
    lm = m["lm"]
    return lm_parquet_schema(lm["seq_len"], lm["top_k"], len(lm["temperatures"]), lm["vocab_size"], lm["samples"] > 0,
                             meta, bool(lm.get("offsets")))


def _chat_schema(m: dict[str, Any], meta: dict[str, Any]) -> pa.Schema:
    lm = m["lm"]
    return chat_parquet_schema(lm["top_k"], len(lm["temperatures"]), lm["vocab_size"], lm["samples"] > 0, meta,
                               lm.get("logit_dtype", "float16"))


register(SEQUENCE, Codec(_sequence_schema, cols.sequence_columns, cols.collate_sequence))
register(TOKEN, Codec(_token_schema, cols.token_columns, cols.collate_tokens, marker="words"))
# (chat rows have input_ids too: their marker is looked for first)
register(CHAT_LM, Codec(_chat_schema, chat.chat_row_group, chat.collate_chat, marker="positions"))
register(CAUSAL_LM, Codec(_lm_schema, cols.lm_row_group, cols.collate_lm, marker="input_ids"))
