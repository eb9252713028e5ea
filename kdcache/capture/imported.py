"""`kdcache import`: a chat cache made from a top-k log-probability dataset another tool wrote (axolotl's KD layout,
cache/logprob_layout.py — e.g. `axolotl preprocess` output, or a `kdcache export`), with a manifest and checksums
like any capture, so stage two trains from it unchanged.

What the logprobs allow is kept exactly, the rest is refused rather than guessed: they are log p = z/T - lse_T at
the one temperature T they were taken at, so the cache holds T·log p as float32 raw logits with lse = 0 (the same
distribution at T, nothing else: another temperature needs the full logits, and stage two refuses to train at
one); the tail is the dataset's own `target_tail_logmass` where present, else log(1 - Σ p) of the kept top-k."""

from __future__ import annotations

import hashlib
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.compute as pc

from ..cache.format import FORMAT_VERSION, VOCAB_FILE, token_id_type
from ..cache.logprob_layout import FIELDS, TAIL_FIELD
from ..cache.codecs import shard_schema
from ..cache.writer import CacheWriter
from ..config import TeacherConfig
from ..errors import KdcacheError
from ..fingerprint import hash_file, hash_obj, hash_tokenizer
from ..heads import CHAT_LM
from ..vocab import vocab_bytes
from . import distributed
from .build import shard_loop
from .chat import ChatLM, ChatOut, ChatRows, chat_shard_table, response_bytes
from .lm import eos_id, vocab_file
from .models import load_tokenizer

MASS_SLACK = 1e-3  # Σ p above 1 by more than this is not one distribution's top-k at one temperature


class LogprobImportError(KdcacheError):
    """A logprob dataset that cannot become a cache; the message names the file, row and field, and what to do."""


def open_dataset(path: str) -> Any:
    """A `datasets.Dataset` (memory-mapped, random access by row range) of a Parquet or JSON-lines file, or of a
    `save_to_disk` folder (what `axolotl preprocess` leaves)."""
    import datasets
    p = Path(path)
    if p.is_dir():
        return datasets.load_from_disk(str(p))
    if not p.is_file():
        raise LogprobImportError(f"{path}: no such file or folder (a .parquet, .jsonl or a `save_to_disk` folder)")
    if p.suffix == ".parquet":
        return datasets.Dataset.from_parquet(str(p))
    if p.suffix in (".jsonl", ".json"):
        return datasets.Dataset.from_json(str(p))
    raise LogprobImportError(f"{path}: unknown file type {p.suffix!r}: a .parquet, .jsonl or a `save_to_disk` folder")


def _source_sha(path: str) -> str:
    p = Path(path)
    files = sorted(x for x in p.rglob("*") if x.is_file()) if p.is_dir() else [p]
    h = hashlib.sha256()
    for f in files:
        h.update(f.relative_to(p).as_posix().encode() if p.is_dir() else b"")
        hash_file(f, h)
    return h.hexdigest()


def check_columns(ds: Any, path: str) -> bool:
    """Whether the dataset has the tail column; refuses one without the layout's fields, saying what to do."""
    names = set(ds.column_names)
    missing = [f for f in FIELDS if f not in names and f not in ("attention_mask", "labels")]
    if missing and ("messages" in names or "logprobs" in names):
        raise LogprobImportError(f"{path}: rows of `messages` / raw `logprobs` without {missing}: tokenise them first "
                                 "(`axolotl preprocess` writes input_ids and the target_* fields), then import that")
    if missing:
        raise LogprobImportError(f"{path}: field(s) {missing} missing; the layout needs {', '.join(FIELDS)} "
                                 "(docs/cache-format.md, \"Exchange with axolotl\")")
    return TAIL_FIELD in names


def one_row(row: dict[str, Any], where: str, k: int, vocab_size: int, temperature: float,
            stored_tail: bool) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """(input_ids [L], response mask [L], targets at the row's n target positions: topk_ids [n, k], topk_logits
    [n, k] float32, lse [n, 1] (0), tail [n, 1]), refusing any malformed field with `where` (file and row)."""
    ids = np.asarray(row["input_ids"], np.int64)
    L = len(ids)
    try:
        tok, lp, mask = (np.asarray(row[f], dt) for f, dt in (
            ("target_token_ids", np.int64), ("target_logprobs", np.float64), ("target_mask", np.int64)))
    except ValueError:
        raise LogprobImportError(f"{where}: target_* rows of unequal length; every position needs the same number of "
                                 "slots (pad with target_mask 0)") from None
    for name, a in (("target_token_ids", tok), ("target_logprobs", lp), ("target_mask", mask)):
        if a.ndim != 2 or a.shape[0] != L:
            raise LogprobImportError(f"{where}: `{name}` has shape {a.shape}, not [{L} positions, k slots] like "
                                     "input_ids")
    if L < 2 or (ids < 0).any() or (ids >= vocab_size).any():
        raise LogprobImportError(f"{where}: input_ids must hold 2 or more ids in [0, {vocab_size}) (the tokenizer's "
                                 "size)")
    scored = mask.astype(bool)
    pos = np.flatnonzero(scored.any(1))
    if len(pos) and pos[-1] == L - 1:
        raise LogprobImportError(f"{where}: the last position has targets, but it predicts no token of the row (row "
                                 "j is the distribution over input_ids[j + 1])")
    top_ids, logits, tails = np.zeros((len(pos), k), np.int64), np.zeros((len(pos), k), np.float32), []
    stored = row.get(TAIL_FIELD) if stored_tail else None
    for j, p in enumerate(pos):
        have = np.flatnonzero(scored[p])
        if len(have) < k:
            raise LogprobImportError(f"{where}, position {p}: {len(have)} scored slots, fewer than top_k = {k}: "
                                     f"import with --top-k {len(have)} (or fewer)")
        v, t = lp[p, have], tok[p, have]
        if not np.isfinite(v).all() or (v > 1e-4).any() or (t < 0).any() or (t >= vocab_size).any():
            raise LogprobImportError(f"{where}, position {p}: target_logprobs must be finite log-probabilities "
                                     f"(<= 0) of ids in [0, {vocab_size})")
        order = np.argsort(-v, kind="stable")
        v, t = v[order], t[order]
        mass = float(np.exp(v).sum())
        if mass > 1 + MASS_SLACK:
            raise LogprobImportError(f"{where}, position {p}: the probabilities sum to {mass:.4f} > 1, so they are "
                                     "not one distribution's top-k at one temperature (duplicate ids? a re-tempered "
                                     "top-k?)")
        kept = float(np.exp(v[:k]).sum())
        if stored is not None and stored[p] is not None and len(have) == k:
            tails.append(float(stored[p]))
        else:  # exact where the slots are the teacher's true top-k at T: the rest of the mass lies outside them
            tails.append(math.log1p(-min(kept, 1.0)) if kept < 1.0 else float("-inf"))
        top_ids[j], logits[j] = t[:k], (v[:k] * temperature).astype(np.float32)
    response = np.zeros(L, bool)
    response[pos + 1] = True
    return ids, response, {"topk_ids": top_ids, "topk_logits": logits, "lse": np.zeros((len(pos), 1), np.float32),
                           "tail": np.asarray(tails, np.float32).reshape(-1, 1)}


def _stats(rows: ChatRows, targets: list[dict[str, np.ndarray]], stop: int, temperature: float) -> dict[str, Any]:
    """The chat head's shard statistics. The teacher's probability of a next token outside the kept top-k is
    unknown but at most min(tail mass, the k-th probability): it is counted at that bound (so the teacher's loss and
    perplexity are lower bounds where it happens), and `next_outside_topk` says how often it did."""
    outside, scored = 0, []
    for i, t in enumerate(targets):
        nxt = rows.ids[i][rows.positions(i) + 1]
        inside = t["topk_ids"] == nxt[:, None]
        outside += int((~inside.any(1)).sum())
        lp = t["topk_logits"].astype(np.float64) / temperature
        logp = np.where(inside.any(1), (lp * inside).sum(1), np.minimum(t["tail"][:, 0], lp[:, -1]))
        scored.append({"nll": -logp, "top1": inside[:, 0], "tail": t["tail"]})
    stats = ChatLM().stats(rows, ChatOut(rows, scored, stop, None), [])
    return {**stats, "next_outside_topk": outside}


def _summarise(stats: list[dict[str, Any]]) -> dict[str, Any]:
    return {**ChatLM().summarise(stats), "next_outside_topk": sum(s["next_outside_topk"] for s in stats)}


def import_logprobs(sources: dict[str, str], out_dir: Path, tokenizer: str, temperature: float = 1.0,
                    top_k: int | None = None, teacher: str = "imported", name: str = "imported", task: str = "chat",
                    shard_rows: int = 256, row_group_rows: int = 64, overwrite: bool = False) -> dict[str, Any]:
    """Write `out_dir` (a chat cache) from {split: dataset path}; a rerun resumes from the shards written. `teacher`:
    the name of the model that wrote the logprobs (for the report); `name`/`task`: the pipeline and task it stands
    for (stage two reads `<cache root>/<pipeline>/<task>/`)."""
    tok = load_tokenizer(TeacherConfig(tokenizer=tokenizer))
    vocab, _ = vocab_bytes(tok)
    nbytes = np.fromiter((len(b) for b in vocab), np.int64)
    V = len(vocab)
    data = {split: open_dataset(path) for split, path in sources.items()}
    tails = {split: check_columns(ds, sources[split]) for split, ds in data.items()}
    if top_k is None:  # the first target position's scored slots
        first = next((m for ds in data.values() for r in ds.select_columns(["target_mask"]) for m in r["target_mask"]
                      if sum(m)), None)
        if first is None:
            raise LogprobImportError(f"{', '.join(sources.values())}: no row has a scored target (target_mask is "
                                     "all 0)")
        top_k = int(sum(first))
    seq_len = max(int(pc.max(pc.list_value_length(ds.data.column("input_ids"))).as_py() or 0) for ds in data.values())
    lm = {"top_k": top_k, "temperatures": [temperature], "samples": 0, "sample_temperature": temperature,
          "seq_len": seq_len, "vocab_size": V, "id_dtype": str(token_id_type(V)),
          "tokenizer_sha256": hash_tokenizer(tok),
          "eos_id": eos_id(tok), "bos_id": None, "rows": "chat", "vocab_file": VOCAB_FILE, "logit_dtype": "float32",
          "chat": None, "chat_template_sha256": hashlib.sha256((tok.chat_template or "").encode()).hexdigest()}
    split_sha = {split: _source_sha(path) for split, path in sources.items()}
    inputs = {"format_version": FORMAT_VERSION, "task": task, "head": CHAT_LM, "imported": split_sha, "lm": lm,
              "shard_rows": shard_rows, "teacher": {"name": teacher, "class": "imported logprobs", "parameters": None}}
    files = {VOCAB_FILE: vocab_file(tok)}
    header = {"pipeline": name, "task": task, "head": CHAT_LM, "label_names": [], "text_fields": [],
              "fingerprint": hash_obj(inputs), "fingerprint_inputs": inputs, "data_origin": None, "features": None,
              "config": {}, "device": "cpu", "processes": 1, "lm": lm,
              "imported": {"sources": dict(sources), "temperature": temperature,
                                 "tail": {s: "stored" if t else "recovered as log(1 - sum p)"
                                          for s, t in tails.items()}},
              "files": {rel: {"sha256": hashlib.sha256(b).hexdigest(), "bytes": len(b)} for rel, b in files.items()}}
    meta = {"format_version": FORMAT_VERSION, "task": task, "fingerprint": header["fingerprint"]}
    schema = shard_schema(header, meta)
    stop = lm["eos_id"]

    def produce(split: str, start: int, end: int, bar, language) -> tuple[Any, None, dict]:
        t0, ds = time.perf_counter(), data[split]
        ids, masks, targets, refs = [], [], [], []
        for i, row in enumerate(ds.select(range(start, end))):
            a, m, t = one_row(row, f"{sources[split]}, row {start + i}", top_k, V, temperature, tails[split])
            ids.append(a), masks.append(m), targets.append(t), refs.append(row.get("reference"))
            bar.update(1)
        rows = ChatRows(ids, masks, np.zeros(len(ids), bool),
                        np.asarray([response_bytes(a, m, nbytes) for a, m in zip(ids, masks)], np.int64), refs)
        table = chat_shard_table(rows, targets, start, split, schema)
        return table, None, dict(_stats(rows, targets, stop, temperature), seconds=time.perf_counter() - t0)

    with CacheWriter(out_dir, header, overwrite=overwrite, row_group_rows=row_group_rows, files=files,
                     source=["import", *(f"{s}={p}" for s, p in sources.items()), "--tokenizer", tokenizer,
                             "--temperature", str(temperature), "--top-k", str(top_k), "--teacher", teacher,
                             "--pipeline", name, "--task", task, "--out", str(out_dir)]) as writer:
        segments = {split: [(None, 0, len(ds))] for split, ds in data.items()}
        return shard_loop(writer, segments, split_sha, shard_rows, produce, _summarise, task,
                          distributed.Replica(distributed.state(), 1), out_dir)
