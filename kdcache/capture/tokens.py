"""Token classification (NER) in stage one, with word-aligned targets: per sentence, the teacher's full tag logits
for each covered WORD (its first sub-token, exact float32) and, optionally, that sub-token's hidden states
(ragged by sentence, with offsets), so word-level students with any vocabulary can learn from the cache."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import torch

from ..heads import TOKEN
from ..failpoints import failpoint
from ..fingerprint import hash_ids
from ..metrics import entity_f1, entity_spans
from .head import CaptureHead
from .runner import TextRunner, pad_rows, refuse_non_finite
from .words import align_words, token_labels


class WordRunner(TextRunner):
    """A token-classification teacher run over word lists, length-batched."""

    @torch.inference_mode()
    def run_words(self, sentences: Sequence[Sequence[str]], on_batch=None) -> dict[str, Any]:
        """Per sentence: logits [covered_words, C]; features {layer_j: [words, H]} + offsets; hashes, lengths."""
        ids, first, truncated = align_words(self.tokenizer, sentences, self.max_length)
        lengths = np.array([len(x) for x in ids], dtype=np.int32)
        logits: list[np.ndarray | None] = [None] * len(ids)
        feats: dict[str, list] = {f"layer_{j}": [None] * len(ids) for j in self.feature_layers}
        for batch in self.batches(lengths):
            x, mask = self.padded(ids, batch, self.pad_id)
            with self.autocast():
                out = self.model(input_ids=x, attention_mask=mask, output_hidden_states=bool(self.feature_layers))
            z = out.logits.float()
            refuse_non_finite(z, [int(i) for i in batch])
            for r, i in enumerate(batch):  # gather on the device, then one copy per sentence
                at = torch.as_tensor(first[i], dtype=torch.long, device=z.device)
                logits[i] = z[r, at].cpu().numpy()
                for j in self.feature_layers:
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


def word_predictions(model: torch.nn.Module, tokenizer: Any, sentences, tags, names, max_length: int,
                     batch_size: int = 64) -> tuple[list[list[str]], list[list[str]]]:
    """(gold, predicted) tag names per word for a token classifier; words beyond max_length predicted `O`."""
    model.eval()
    ids, first, _ = align_words(tokenizer, sentences, max_length)
    gold, pred = [], []
    for b in range(0, len(ids), batch_size):
        rows = range(b, min(b + batch_size, len(ids)))
        input_ids, mask = pad_rows(ids, rows, tokenizer.pad_token_id or 0)
        z = model(input_ids=input_ids, attention_mask=mask).logits
        for r, i in enumerate(rows):
            p = z[r, first[i]].argmax(-1).tolist() if first[i] else []
            pred.append([names[t] for t in p] + ["O"] * (len(tags[i]) - len(p)))
            gold.append([names[t] for t in tags[i]])
    return gold, pred


class TokenClassification(CaptureHead):
    name = TOKEN
    auto_class = "AutoModelForTokenClassification"

    def runner(self, model, tokenizer, task, device):
        return WordRunner.for_task(model, tokenizer, task, device)

    def text_columns(self, task):
        return ["words"]

    def settings(self, task, runner, model, tokenizer):
        return {"max_length": task.cache.max_length, "alignment": "first-subtoken"}

    def run(self, runner, rows, task, seed, on_batch):
        return runner.run_words(rows["words"], on_batch=on_batch)

    def table(self, rows, out, row_start, split, schema, task):
        n = len(rows["id"])
        return pa.Table.from_pydict({
            "row_id": pa.array(np.arange(row_start, row_start + n, dtype=np.int64)),
            "id": pa.array(rows["id"], pa.string()), "words": rows["words"], "tags": rows["tags"],
            "logits": pa.array([x.reshape(-1) for x in out["logits"]], pa.list_(pa.float32())),
            "covered_words": pa.array(out["covered"], pa.int32()),
            "input_hash": pa.array(out["input_hash"], pa.int64()),
            "num_tokens": pa.array(out["num_tokens"], pa.int32()), "truncated": pa.array(out["truncated"], pa.bool_()),
        }, schema=schema)

    def shard_features(self, out):
        return out["features"] or None

    def stats(self, rows, out, label_names):
        """Words, covered words, truncated sentences, the teacher's entity counts."""
        gold, pred = [], []
        for tags, lg, c in zip(rows["tags"], out["logits"], out["covered"]):
            gold.append([label_names[t] if t >= 0 else "O" for t in tags])  # untagged words: no gold entity
            pred.append([label_names[t] for t in lg.argmax(-1)] + ["O"] * (len(tags) - int(c)))
        tp = sum(len(entity_spans(g) & entity_spans(p)) for g, p in zip(gold, pred))
        return {"rows": len(rows["id"]), "words": int(sum(len(t) for t in rows["tags"])),
                "labelled_rows": int(sum(1 for t in rows["tags"] if t and min(t) >= 0)),
                "covered_words": int(out["covered"].sum()), "truncated": int(out["truncated"].sum()),
                "tp": tp, "gold_entities": sum(len(entity_spans(g)) for g in gold),
                "pred_entities": sum(len(entity_spans(p)) for p in pred),
                "tokens_sum": int(out["num_tokens"].sum())}

    def summarise(self, stats):
        tot = {k: sum(s.get(k, 0) for s in stats) for k in ("rows", "words", "covered_words", "truncated", "tp",
                                                            "gold_entities", "pred_entities", "seconds",
                                                            "tokens_sum", "labelled_rows")}
        p = tot["tp"] / tot["pred_entities"] if tot["pred_entities"] else 0.0
        r = tot["tp"] / tot["gold_entities"] if tot["gold_entities"] else 0.0
        return {"rows": tot["rows"], "labelled_rows": tot["labelled_rows"], "words": tot["words"],
                "uncovered_words": tot["words"] - tot["covered_words"],
                "truncated_rows": tot["truncated"], "teacher_entity_f1": 2 * p * r / (p + r) if p + r else 0.0,
                "gold_entities": tot["gold_entities"], "mean_tokens": tot["tokens_sum"] / max(tot["rows"], 1),
                "teacher_rows_per_s": tot["rows"] / tot["seconds"] if tot["seconds"] else None}

    def labelled_rows(self, ds):
        return _gold_tagged(ds)

    def finetune_examples(self, tokenizer, ds, task):
        """Gold-tagged sentences only; each word's tag on its first sub-token, -100 elsewhere."""
        ds = ds.select(_gold_tagged(ds))
        if len(ds) == 0:
            return [], []
        ids, first, _ = align_words(tokenizer, ds["words"][:], task.cache.max_length)
        return ids, [token_labels(f, t, len(x)) for f, t, x in zip(first, ds["tags"][:], ids)]

    def finetune_loss(self, logits, targets):
        target = torch.full(logits.shape[:2], -100, dtype=torch.long)
        for r, labels in enumerate(targets):
            target[r, :len(labels)] = torch.as_tensor(labels)
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=-100)

    def quality(self, summary):
        if not summary.get("gold_entities"):
            return None
        return "entity F1", summary["teacher_entity_f1"], "all-`O`", 0.0, None

    @torch.inference_mode()
    def finetune_eval(self, model, tokenizer, ds, task, label_names):
        gold, pred = word_predictions(model, tokenizer, ds["words"][:], ds["tags"][:], label_names,
                                      task.cache.max_length)
        scores = entity_f1(gold, pred)
        return {"teacher_entity_f1": scores["f1"], "gold_entities": scores["entities"]}


def _gold_tagged(ds: Any) -> list[int]:
    """Rows whose every word has a gold tag (what the teacher fine-tunes on)."""
    return [i for i, t in enumerate(ds["tags"][:]) if t and min(t) >= 0]
