"""Token classification in stage two: word-level taggers trained on the cached per-word teacher logits
(α·CE on gold tags + (1-α)·KD, dense over the tag set, T² scaled). Words the teacher never saw (beyond its
max_length) get the hard-label loss only; words without a gold tag get KD only. Metric: entity-level F1."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .. import config as C
from ..heads import TOKEN
from ..cache.reader import CacheDataset
from ..metrics import entity_f1
from ..students import WordTokenizer, build_student
from .head import Source, StudentModel, TrainHead, add_feature_terms
from .losses import dense_kd_loss_per_row


def pad_targets(batch: dict[str, Any], width: int, num_labels: int) -> tuple[torch.Tensor, ...]:
    """Gold tags [B, W] (-1 = padding or a word without a gold tag), teacher logits [B, W, C] and covered-word
    mask [B, W] from ragged rows."""
    B = len(batch["tags"])
    tags = torch.full((B, width), -1, dtype=torch.long)
    teacher = torch.zeros((B, width, num_labels))
    covered = torch.zeros((B, width), dtype=torch.bool)
    for i, (t, lg, c) in enumerate(zip(batch["tags"], batch["logits"], batch["covered_words"])):
        tags[i, :len(t)] = torch.as_tensor(t)
        teacher[i, :int(c)] = torch.as_tensor(lg)
        covered[i, :int(c)] = True
    return tags, teacher, covered


def pad_features(batch: dict[str, Any], layer: int, width: int, dim: int) -> torch.Tensor:
    """Cached per-word teacher features of one layer, zero-padded to [B, width, dim] (covered words filled)."""
    out = torch.zeros((len(batch["tags"]), width, dim))
    for i, f in enumerate(batch["features"]):
        x = f[f"layer_{layer}"]
        out[i, :len(x)] = torch.as_tensor(x)
    return out


def tagger_loss(logits: torch.Tensor, tags: torch.Tensor, teacher: torch.Tensor, covered: torch.Tensor,
                loss: C.LossConfig) -> tuple[torch.Tensor, dict[str, float]]:
    """Per word: α·CE + (1-α)·KD where it has a gold tag and teacher logits; CE alone where the teacher did not
    cover it; KD alone where it has no gold tag (label-scarce data); mean over the words that have a term.
    α = 1 (the hard-label twin) uses gold-tagged words only."""
    labelled = tags >= 0
    use = labelled | covered if loss.alpha < 1.0 else labelled
    if not use.any():  # e.g. a hard-label twin on a batch of untagged sentences: nothing to learn, no NaN
        return logits.sum() * 0.0, {"ce": 0.0, "kd": 0.0}
    s, y, t, cov, lab = logits[use].float(), tags[use], teacher[use], covered[use], labelled[use]
    ce = F.cross_entropy(s, y.clamp_min(0), reduction="none")
    if loss.alpha >= 1.0:
        return ce.mean(), {"ce": float(ce.detach().mean()), "kd": 0.0}
    kd = dense_kd_loss_per_row(s, t, loss.kind, loss.temperature, loss.beta)
    per = torch.where(lab, torch.where(cov, loss.alpha * ce + (1.0 - loss.alpha) * kd, ce), kd)
    return per.mean(), {"ce": float(ce.detach()[lab].mean()) if lab.any() else 0.0,
                        "kd": float(kd.detach()[cov].mean()) if cov.any() else 0.0}


class TaggerModel(StudentModel):
    """A word-level tagger (students/tagger.py) with its word vocabulary and the projections of its feature terms
    (student width -> teacher width, on the per-word representation)."""

    def __init__(self, tagger: nn.Module, tokenizer: WordTokenizer, terms: tuple[C.FeatureLossConfig, ...],
                 feature_dims: dict[int, int]) -> None:
        super().__init__()
        self.tagger, self.tokenizer, self.terms = tagger, tokenizer, terms
        self.projections = nn.ModuleList(nn.Linear(tagger.hidden_size, feature_dims[f.teacher_layer]) for f in terms)

    @property
    def core(self) -> nn.Module:
        return self.tagger

    def forward(self, task: str, batch: dict[str, Any], features: bool = True):
        dev = self.device()
        ids, shapes, mask = (x.to(dev) for x in self.tokenizer.encode_words(batch["words"]))
        if not self.terms or not features:
            return self.tagger(ids, shapes, mask), []
        h = self.tagger.encode(ids, shapes, mask)
        return self.tagger.head(h), [proj(h) for proj in self.projections]


class TokenClassification(TrainHead):
    name = TOKEN
    eval_batch_size = 128

    def tokenizer(self, st, source, where):
        return WordTokenizer.build_from_words([w for s in source.train.splits for w in source.column(s, "words")],
                                              st.vocab_size)

    def build_model(self, st, loss, source, tokenizer, max_length, where):
        tagger = build_student(st.arch, st.params, tokenizer.vocab_size, len(source.manifest["label_names"]),
                               where=where)
        return TaggerModel(tagger, tokenizer, loss.features, source.feature_dims)

    def targets(self, batch, source, device):
        # padded once per batch: every student's word ids have the batch's longest sentence width
        width = max(1, max(len(w) for w in batch["words"]))
        tags, teacher, covered = (x.to(device) for x in pad_targets(batch, width, len(source.manifest["label_names"])))
        wanted = {j: pad_features(batch, j, width, d).to(device)[covered] for j, d in source.feature_dims.items()} \
            if covered.any() else {}
        return tags, teacher, covered, wanted

    def loss(self, logits, features, targets, batch, loss, where):
        tags, teacher, covered, wanted = targets
        value, parts = tagger_loss(logits, tags, teacher, covered, loss)
        if wanted:  # feature terms on the words the teacher saw
            pairs = [(pred[covered], wanted[f.teacher_layer]) for f, pred in zip(loss.features, features)]
            value = add_feature_terms(value, pairs, loss, parts)
        return value, parts

    def chance(self, source):
        return "tagging every word `O`", 0.0, source.eval.num_rows  # finds no entity: F1 0

    @torch.inference_mode()
    def evaluate(self, model, task, ds: CacheDataset, source):
        """Entity-level precision/recall/F1 on gold tags, and word-level agreement with the teacher's tags."""
        model.eval()
        names = list(ds.manifest["label_names"])
        gold, pred, agree, covered_total = [], [], 0, 0
        for batch in torch.utils.data.DataLoader(ds, batch_size=self.eval_batch_size, collate_fn=ds.collate):
            out = model(task, batch, features=False)[0].argmax(-1).cpu().numpy()
            for i, (t, lg, c) in enumerate(zip(batch["tags"], batch["logits"], batch["covered_words"])):
                p = out[i, :len(t)]
                gold.append([names[x] for x in t])
                pred.append([names[x] for x in p])
                agree += int((p[:int(c)] == lg.argmax(-1)).sum())
                covered_total += int(c)
        return {**entity_f1(gold, pred), "teacher_agreement": agree / max(covered_total, 1), "rows": len(gold)}
