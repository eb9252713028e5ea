"""Sequence classification in stage two: students on text (their own word vocabulary or any `transformers`
tokenizer) trained on the cached full logits, α·CE + (1-α)·KD (dense, T² scaled), plus feature terms on the
cached pooled hidden states. Metric: accuracy (and macro-F1, agreement with the teacher)."""

from __future__ import annotations

import copy
import statistics
import time
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import config as C
from ..heads import SEQUENCE
from ..cache.reader import CacheDataset, read_columns
from ..metrics import classification_metrics
from ..students import HFTokenizer, WordTokenizer, build_student
from .head import Source, StudentModel, TrainHead, add_feature_terms
from .losses import distillation_loss, multi_teacher_loss


def texts_of(batch: dict[str, Any], fields: tuple[str, ...] | list[str]) -> list[str]:
    """Input text per row; text pairs are joined with ' | '."""
    return [" | ".join(p) for p in zip(*(batch[f] for f in fields))]


def language_mean_logits(cache: str, split: str) -> dict[str, np.ndarray]:
    """Each language's mean cached teacher logits over `split` (every partition, labelled or not): what
    `loss.center_languages` subtracts."""
    cols = read_columns(cache, split, ["logits", "language"])
    logits, codes = np.asarray(cols["logits"], dtype=np.float64), np.asarray(cols["language"])
    return {code: logits[codes == code].mean(axis=0) for code in dict.fromkeys(cols["language"])}


class ClassifierModel(StudentModel):
    """A text classifier (students.base.Student) with its tokenizer and the projections of its feature terms."""

    def __init__(self, student: nn.Module, tokenizer: Any, terms: tuple[C.FeatureLossConfig, ...],
                 feature_dims: dict[int, int], fields: tuple[str, ...], max_length: int) -> None:
        super().__init__()
        self.student, self.tokenizer, self.terms = student, tokenizer, terms
        self.fields, self.max_length = tuple(fields), max_length
        self.projections = nn.ModuleList(nn.Linear(student.hidden_sizes[f.student_layer], feature_dims[f.teacher_layer])
                                         for f in terms)

    @property
    def core(self) -> nn.Module:
        return self.student

    def encode(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        ids, mask = self.tokenizer(texts_of(batch, self.fields), self.max_length)
        dev = self.device()
        return ids.to(dev), mask.to(dev)

    def forward(self, task: str, batch: dict[str, Any], features: bool = True):
        logits, hidden = self.student(*self.encode(batch))
        return logits, [proj(hidden[f.student_layer]) for proj, f in zip(self.projections, self.terms)] \
            if features else []


@torch.inference_mode()
def inference_speed(model: nn.Module, tokenizer: Any, texts: list[str], max_length: int, batch_size: int = 64,
                    repeats: int = 3) -> float:
    """Examples/s on ONE CPU thread, tokenisation included: warmed up, the median of `repeats` passes over up to 256
    texts. One thread and the median keep the figure comparable between runs, and on a busy machine."""
    model = copy.deepcopy(model).cpu().eval()
    texts = texts[:256]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.inference_mode():
            model(*tokenizer(texts[:batch_size], max_length))  # warm-up
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                for b in range(0, len(texts), batch_size):
                    model(*tokenizer(texts[b:b + batch_size], max_length))
                times.append(time.perf_counter() - t0)
    finally:
        torch.set_num_threads(threads)
    return len(texts) / statistics.median(times)


class SequenceClassification(TrainHead):
    name = SEQUENCE
    eval_batch_size = 256

    def tokenizer(self, st, source, where):
        if st.tokenizer != "words":
            return HFTokenizer(st.tokenizer)
        fields = source.train.text_fields  # the vocabulary of everything it trains on (transfer splits too)
        return WordTokenizer.build([t for s in source.train.splits for f in fields for t in source.column(s, f)],
                                   st.vocab_size)

    def build_model(self, st, loss, source, tokenizer, max_length, where):
        student = build_student(st.arch, st.params, tokenizer.vocab_size, len(source.manifest["label_names"]),
                                tokenizer.pad_id, where=where)
        return ClassifierModel(student, tokenizer, loss.features, source.feature_dims, source.train.text_fields,
                               max_length)

    def targets(self, batch, source, device):
        feats = {k: v.to(device) for k, v in batch.get("features", {}).items()}
        if "teacher_logits" in batch:  # several teachers: [B, teachers, C] and their weights
            return (batch["teacher_logits"].to(device), batch["label"].to(device), feats,
                    torch.tensor(list(source.teachers.values()), device=device))

        def shift(reference: str) -> torch.Tensor:  # asked for by a student with `loss.center_languages` only
            means = source.once("language_means", lambda: language_mean_logits(source.cache, source.train.split))
            return torch.as_tensor(np.stack([means[reference] - means[c] for c in batch["language"]]),
                                   dtype=torch.float32, device=device)
        return batch["logits"].to(device), batch["label"].to(device), feats, None, shift

    def loss(self, logits, features, targets, batch, loss, where):
        teacher, labels, wanted, weights, *shift = targets
        if loss.center_languages is not None:
            teacher = teacher + shift[0](loss.center_languages)
        if weights is None:
            value, parts = distillation_loss(logits, teacher, labels, loss.kind, loss.temperature, loss.alpha,
                                             loss.beta)
        else:
            value, parts = multi_teacher_loss(logits, teacher, weights, labels, loss.kind, loss.temperature,
                                              loss.alpha, loss.beta, loss.ensemble)
        pairs = [(pred, wanted[f"layer_{f.teacher_layer}"]) for f, pred in zip(loss.features, features)]
        return add_feature_terms(value, pairs, loss, parts), parts

    @torch.inference_mode()
    def evaluate(self, model, task, ds: CacheDataset, source):
        model.eval()
        preds, labels, teacher = [], [], []
        for batch in torch.utils.data.DataLoader(ds, batch_size=self.eval_batch_size, collate_fn=ds.collate):
            logits, _ = model(task, batch, features=False)
            preds.append(logits.argmax(-1).cpu().numpy())
            labels.append(batch["label"].numpy())
            teacher.append(batch["logits"].argmax(-1).numpy())
        return classification_metrics(np.concatenate(preds), np.concatenate(labels), np.concatenate(teacher),
                                      len(ds.manifest["label_names"]))

    def chance(self, source):
        train = [y for y in source.column(source.train.split, "label") if y is not None and y >= 0]
        ev = np.array([y for y in source.column(source.eval.split, "label") if y is not None and y >= 0])
        if not train or not len(ev):
            return None
        label = int(np.bincount(train).argmax())
        return f"majority class ({source.manifest['label_names'][label]})", float((ev == label).mean()), len(ev)

    def run_extras(self, model, source, pipeline):
        if source.test is None:
            return {}
        fields, split = source.train.text_fields, pipeline.train.test_split
        texts = texts_of({f: source.column(split, f) for f in fields}, fields)
        return {"inference_examples_per_s_cpu": round(inference_speed(model.core, model.tokenizer, texts,
                                                                       model.max_length), 1)}
