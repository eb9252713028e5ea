"""Several teachers of the same rows: other caches (`companions`) whose logits are joined to this cache's rows by
id, in any order or shard layout, after checking they hold the same rows with the same text."""

from __future__ import annotations

import zlib
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from ...heads import SEVERAL_TEACHERS, has, with_capability
from .expect import CacheMismatchError
from .remote import open_manifest


def ids_and_text(fs: Any, root: str, shards: list[dict[str, Any]], text_fields: tuple[str, ...],
                 more: list[str] = ()) -> dict[str, list]:
    """Ids, a checksum of each row's text, and `more` columns (an array [rows, -1] per shard) of these shards."""
    out: dict[str, list] = {"id": [], "text": [], **{c: [] for c in more}}
    for sh in shards:
        with fs.open(f"{root}/{sh['parquet']}", "rb") as f:
            table = pq.read_table(f, columns=["id", *text_fields, *more])
        out["id"] += table.column("id").to_pylist()
        out["text"] += [zlib.crc32("\x1f".join(t).encode()) for t in
                        zip(*(table.column(c).to_pylist() for c in text_fields))]
        for c in more:
            out[c].append(np.asarray(table.column(c).combine_chunks().values.to_numpy()).reshape(table.num_rows, -1))
    return out


def open_companion(url: str, mine: dict[str, Any], mine_url: str, splits: tuple[str, ...],
                   text_fields: tuple[str, ...], ours: dict[str, list]) -> tuple[dict[str, int], np.ndarray]:
    """(row id -> position, logits [rows, C]) of another teacher's cache `url` of the rows of `mine` (the manifest
    at `mine_url`; `ours`: their ids and text checksums, from `ids_and_text`); refused unless both heads serve
    several teachers, the label sets agree and it holds every row read here with the same text."""
    fs, root, m = open_manifest(url)
    problem = None
    if not (has(m["head"], SEVERAL_TEACHERS) and has(mine["head"], SEVERAL_TEACHERS)):
        problem = (f"several teachers are for {' or '.join(with_capability(SEVERAL_TEACHERS))} caches "
                   f"(this one is {m['head']})")
    elif m["label_names"] != mine["label_names"]:
        problem = f"its label set {m['label_names']} differs from {mine['label_names']} (of {mine_url})"
    elif [s for s in splits if s not in m["splits"]] or list(m["text_fields"]) != list(text_fields):
        problem = f"it lacks split(s) of {', '.join(splits)} or has other text fields than {mine_url}"
    if problem is None:
        theirs = ids_and_text(fs, root, [sh for s in splits for sh in m["splits"][s]["shards"]], text_fields,
                              ["logits"])
        index = {i: n for n, i in enumerate(theirs["id"])}
        for i, text in zip(ours["id"], ours["text"]):
            n = index.get(i)
            if n is None or theirs["text"][n] != text:
                how = "missing" if n is None else "there with other text"
                problem = (f"it does not hold the same rows: row {i!r} is {how}; "
                           "cache every teacher from the same data settings (the same rows; their order and shards "
                           "may differ)")
                break
    if problem:
        raise CacheMismatchError(f"{url}: cannot serve as another teacher of {mine_url}: {problem}")
    return index, np.concatenate(theirs["logits"]) if theirs["logits"] else np.zeros((0, len(m["label_names"])))


def companion_logits(companions: list[tuple[dict[str, int], np.ndarray]], ids: list[str]) -> list[np.ndarray]:
    """The other teachers' logits [rows, C] of these rows (their presence was checked when opened)."""
    return [logits[[index[i] for i in ids]] for index, logits in companions]
