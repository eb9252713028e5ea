"""Token classification (NER) with word-aligned targets: the teacher's sub-token outputs are mapped back to WORDS
(each word takes its first sub-token's tag logits), so students with any tokenizer (a word-level BiLSTM, a
transformer with another vocabulary) can learn from the cache. Also the entity-level F1 (conlleval rules)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import torch

from . import config as C
from . import distributed
from .cache.format import FORMAT_VERSION, ner_parquet_schema
from .data import load_task_data
from .failpoints import failpoint
from .fingerprint import hash_ids, hash_obj, hash_table, hash_tokenizer
from .teacher import TeacherError, TeacherRunner

# ------------------------------------------------------------------------------------------ word alignment


def align_words(tokenizer: Any, sentences: Sequence[Sequence[str]], max_length: int):
    """Tokenise word lists; returns (input ids per sentence, first sub-token index of each COVERED word, truncated).

    Covered words are the prefix of words whose first sub-token survived truncation to `max_length`; a word that
    yields no sub-token at all ends the prefix too (it has nothing to take logits from). Needs a fast tokenizer.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise TeacherError("token-classification needs a fast (Rust) tokenizer for word alignment; "
                           f"{type(tokenizer).__name__} is not one")
    enc = tokenizer([list(s) for s in sentences], is_split_into_words=True, truncation=True, max_length=max_length,
                    return_attention_mask=False, return_token_type_ids=False)
    ids, first, truncated = enc["input_ids"], [], np.zeros(len(sentences), dtype=bool)
    for i, words in enumerate(sentences):
        pos: dict[int, int] = {}
        for t, w in enumerate(enc.word_ids(i)):
            if w is not None and w not in pos:
                pos[w] = t
        covered = 0
        while covered in pos:
            covered += 1
        first.append([pos[w] for w in range(covered)])
        truncated[i] = covered < len(words)
    return ids, first, truncated


def token_labels(first: list[int], tags: Sequence[int], length: int) -> list[int]:
    """Per sub-token training labels: the word's tag on its first sub-token, -100 (ignored) elsewhere."""
    out = [-100] * length
    for w, t in enumerate(first):
        out[t] = int(tags[w]) if tags[w] >= 0 else -100
    return out


# ------------------------------------------------------------------------------------------- entity F1


def entity_spans(tags: Sequence[str]) -> set[tuple[str, int, int]]:
    """(type, first word, last word) of every entity in an IOB2/IOB1 tag sequence, by conlleval's rules: an entity
    starts at B-X, or at I-X not continuing an X entity, and runs while I-X follows."""
    spans, start, kind = set(), None, None
    for i, tag in enumerate(list(tags) + ["O"]):
        prefix, _, t = tag.partition("-")
        continues = prefix == "I" and kind == t
        if start is not None and not continues:
            spans.add((kind, start, i - 1))
            start = kind = None
        if prefix in ("B", "I") and not continues:
            start, kind = i, t
    return spans


def entity_f1(gold: Sequence[Sequence[str]], pred: Sequence[Sequence[str]]) -> dict[str, float]:
    """Micro precision/recall/F1 over exact entity matches (type and boundaries), summed over sentences."""
    tp = n_gold = n_pred = 0
    for g, p in zip(gold, pred):
        gs, ps = entity_spans(g), entity_spans(p)
        tp += len(gs & ps)
        n_gold += len(gs)
        n_pred += len(ps)
    prec = tp / n_pred if n_pred else 0.0
    rec = tp / n_gold if n_gold else 0.0
    return {"precision": prec, "recall": rec, "f1": 2 * prec * rec / (prec + rec) if prec + rec else 0.0,
            "entities": n_gold}


# ------------------------------------------------------------------------------------------------ stage one


class WordTeacherRunner(TeacherRunner):
    """A token-classification teacher run over word lists; returns each covered word's first-sub-token logits and,
    when feature layers are set, its first-sub-token hidden states (ragged by sentence, with offsets)."""

    HEAD = "token-classification"
    POOLINGS = ("words",)

    @torch.inference_mode()
    def run_words(self, sentences: Sequence[Sequence[str]], on_batch=None) -> dict[str, Any]:
        ids, first, truncated = align_words(self.tokenizer, sentences, self.max_length)
        lengths = np.array([len(x) for x in ids], dtype=np.int32)
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        logits: list[np.ndarray | None] = [None] * len(ids)
        feats: dict[str, list] = {f"layer_{j}": [None] * len(ids) for j in self.layers}
        for batch in self._batches(lengths):
            width = int(lengths[batch].max())
            x = torch.full((len(batch), width), pad_id, dtype=torch.long)
            mask = torch.zeros_like(x)
            for r, i in enumerate(batch):
                x[r, :lengths[i]] = torch.as_tensor(ids[i])
                mask[r, :lengths[i]] = 1
            with self._autocast():
                out = self.model(input_ids=x.to(self.device), attention_mask=mask.to(self.device),
                                 output_hidden_states=bool(self.layers))
            z = out.logits.float()
            if not torch.isfinite(z).all():
                raise TeacherError(f"teacher produced NaN/inf logits for sentences {sorted(batch.tolist())[:10]}; "
                                   "nothing was written. Check the teacher weights, or use precision fp32")
            for r, i in enumerate(batch):  # gather on the device, then one copy per sentence
                at = torch.as_tensor(first[i], dtype=torch.long, device=z.device)
                logits[i] = z[r, at].cpu().numpy()
                for j in self.layers:
                    feats[f"layer_{j}"][i] = out.hidden_states[j][r, at].float().cpu().numpy()
            failpoint("teacher-batch")
            if on_batch:
                on_batch(len(batch))
        covered = np.array([len(f) for f in first], dtype=np.int32)
        features = {name: np.concatenate(parts).astype(self.feature_dtype) for name, parts in feats.items()}
        if features:
            features["offsets"] = np.concatenate([[0], np.cumsum(covered, dtype=np.int64)])
        return {"logits": logits, "covered": covered, "features": features,
                "input_hash": np.array([hash_ids(np.asarray(x)) for x in ids], dtype=np.int64),
                "num_tokens": lengths, "truncated": truncated}


def ner_shard_table(rows: dict[str, list], out: dict[str, Any], row_start: int, schema: pa.Schema) -> pa.Table:
    n = len(rows["id"])
    return pa.Table.from_pydict({
        "row_id": pa.array(np.arange(row_start, row_start + n, dtype=np.int64)),
        "id": pa.array(rows["id"], pa.string()), "words": rows["words"], "tags": rows["tags"],
        "logits": pa.array([x.reshape(-1) for x in out["logits"]], pa.list_(pa.float32())),
        "covered_words": pa.array(out["covered"], pa.int32()), "input_hash": pa.array(out["input_hash"], pa.int64()),
        "num_tokens": pa.array(out["num_tokens"], pa.int32()), "truncated": pa.array(out["truncated"], pa.bool_()),
    }, schema=schema)


def ner_shard_stats(rows: dict[str, list], out: dict[str, Any], names: Sequence[str], seconds: float) -> dict:
    """Sums that add up across shards: words, covered words, truncated sentences, the teacher's entity counts."""
    gold, pred = [], []
    for tags, lg, c in zip(rows["tags"], out["logits"], out["covered"]):
        gold.append([names[t] if t >= 0 else "O" for t in tags])  # untagged words (label-scarce): no gold entity
        pred.append([names[t] for t in lg.argmax(-1)] + ["O"] * (len(tags) - int(c)))
    tp = sum(len(entity_spans(g) & entity_spans(p)) for g, p in zip(gold, pred))
    return {"rows": len(rows["id"]), "words": int(sum(len(t) for t in rows["tags"])),
            "labelled_rows": int(sum(1 for t in rows["tags"] if t and min(t) >= 0)),
            "covered_words": int(out["covered"].sum()), "truncated": int(out["truncated"].sum()),
            "tp": tp, "gold_entities": sum(len(entity_spans(g)) for g in gold),
            "pred_entities": sum(len(entity_spans(p)) for p in pred), "seconds": float(seconds),
            "tokens_sum": int(out["num_tokens"].sum())}


def ner_summarise(stats: list[dict[str, Any]]) -> dict[str, Any]:
    tot = {k: sum(s.get(k, 0) for s in stats) for k in ("rows", "words", "covered_words", "truncated", "tp",
                                                        "gold_entities", "pred_entities", "seconds", "tokens_sum",
                                                        "labelled_rows")}
    p = tot["tp"] / tot["pred_entities"] if tot["pred_entities"] else 0.0
    r = tot["tp"] / tot["gold_entities"] if tot["gold_entities"] else 0.0
    return {"rows": tot["rows"], "labelled_rows": tot["labelled_rows"], "words": tot["words"],
            "uncovered_words": tot["words"] - tot["covered_words"],
            "truncated_rows": tot["truncated"], "teacher_entity_f1": 2 * p * r / (p + r) if p + r else 0.0,
            "gold_entities": tot["gold_entities"], "mean_tokens": tot["tokens_sum"] / max(tot["rows"], 1),
            "teacher_rows_per_s": tot["rows"] / tot["seconds"] if tot["seconds"] else None}


def build_ner_cache(pipeline: C.PipelineConfig, task_name: str, out_dir: Path, teachers_dir: Path,
                    overwrite: bool = False) -> dict[str, Any]:
    """Cache one token-classification task (called by capture.build_teacher_cache)."""
    from .capture import prepare_teacher, write_shards
    task = pipeline.tasks[task_name]
    dist = distributed.state()
    data = load_task_data(task.data)
    model, tokenizer, identity = distributed.main_first(
        lambda: prepare_teacher(pipeline.name, task_name, task, data, teachers_dir))
    device = task.teacher.device if task.teacher.device != "auto" or dist.num_processes == 1 else str(dist.device)
    runner = WordTeacherRunner(model, tokenizer, task.cache.max_length, task.cache.batch_size, task.cache.sort_window,
                               task.cache.features, task.teacher.precision, device)
    features = {"layers": runner.layers, "pooling": "words", "dtype": task.cache.features.dtype} \
        if runner.layers else None
    names = list(data.label_names)
    inputs = {"format_version": FORMAT_VERSION, "task": task_name, "head": "token-classification",
              "teacher": identity, "tokenizer_sha256": hash_tokenizer(tokenizer), "max_length": task.cache.max_length,
              "alignment": "first-subtoken", "compute_dtype": str(runner.dtype).replace("torch.", ""),
              "shard_rows": task.cache.shard_rows,
              "data": {"source": task.data.source, "label_names": names,
                       "splits": {s: hash_table(ds.data.table) for s, ds in data.splits.items()}},
              **({"features": features} if features else {})}  # absent when off: older caches keep their fingerprint
    meta = {"format_version": FORMAT_VERSION, "task": task_name, "fingerprint": hash_obj(inputs)}
    schema = ner_parquet_schema(len(names), meta)
    header = {"pipeline": pipeline.name, "task": task_name, "head": "token-classification", "label_names": names,
              "text_fields": ["words"], "fingerprint": meta["fingerprint"], "fingerprint_inputs": inputs,
              "data_origin": data.origin,
              "features": dict(features, hidden_size=getattr(model.config, "hidden_size", None)) if features else None,
              "config": C.to_dict(task), "device": str(runner.device),
              "processes": dist.num_processes}

    def produce(split: str, start: int, stop: int, bar):
        rows = data.splits[split][start:stop]
        t0 = time.perf_counter()
        out = runner.run_words(rows["words"], on_batch=bar.update)
        return (ner_shard_table(rows, out, start, schema), out["features"] or None,
                ner_shard_stats(rows, out, names, time.perf_counter() - t0))

    sizes = {split: len(ds) for split, ds in data.splits.items()}
    return write_shards(out_dir, header, task, task_name, sizes, inputs["data"]["splits"], produce, ner_summarise,
                        overwrite)
