"""Causal LM in stage two: small Llama-style students trained on the cached next-token targets (sparse KD: top-k +
exact tail, or sampled targets) against their next-token-CE twins. Metrics: held-out perplexity and
KL(teacher || student) on the cached top-k + tail buckets at T = 1."""

from __future__ import annotations

import copy
import itertools
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import config as C
from ..cache import codecs
from ..cache.reader import CacheMismatchError, read_vocab
from ..fingerprint import hash_tokenizer
from ..heads import CAUSAL_LM
from ..hub import from_pretrained, quiet_transformers
from ..students import build_student
from ..students.llama import merged
from .crosstok import (BPE_PREFIX, CrossLMModel, CrossTokenizer, bpe_tokenizer, cross_loss, cross_tokenizer,
                       evaluate_cross, select)
from .head import StudentModel, TrainHead
from .lm_losses import lm_loss, lm_targets, next_token_labels, padded_samples  # noqa: F401 (re-exported)
from .losses import kd_loss_per_row, token_ce_per_row


CROSS_LENGTH_FACTOR = 4
CALIBRATION_ROWS = 16  # cached training rows a layer-importance ranking (keep_layers: importance:N) is measured on  # a student row may hold up to this many times the teacher's tokens (the rest is cut)


class TokenizerMismatchError(CacheMismatchError):
    """A student names a tokenizer other than the teacher's, and the cache keeps no byte offsets to align them."""


def student_tokenizer(st: C.StudentConfig, source: Any, where: str) -> CrossTokenizer | None:
    """None when the student reads the cache's own token ids (`words`, or a tokenizer identical to the teacher's);
    else its own tokenizer, aligned with the teacher's through the cache's byte offsets (crosstok.py)."""
    if st.tokenizer == "words":
        return None
    lm = source.manifest["lm"]
    bpe = st.tokenizer.startswith(BPE_PREFIX)
    tok = None
    if not bpe:
        from transformers import AutoTokenizer
        tok = from_pretrained(AutoTokenizer, st.tokenizer)
        if hash_tokenizer(tok) == lm["tokenizer_sha256"]:
            return None
    if not lm.get("offsets"):
        raise TokenizerMismatchError(_no_offsets(source.cache, st.tokenizer, where))
    if bpe:  # trained on the cached training text of the student's languages
        tok = bpe_tokenizer(st.tokenizer, [t for s in source.train.splits for t in source.column(s, "text")], where)
    return cross_tokenizer(tok, lm, read_vocab(source.cache, source.manifest), where,
                           trained=st.tokenizer if bpe else None)


def _no_offsets(cache: str, name: str, where: str) -> str:
    return (f"{where}: tokenizer {name!r} is not the tokenizer the cache's token ids and top-k targets were made with, "
            f"and {cache} keeps no byte offsets to align another tokenizer with the teacher's: rebuild the cache with "
            "offsets (cache.offsets: true, the default for new LM caches; `kdcache cache <pipeline> --overwrite`), "
            "or remove `tokenizer:` from the student to use the teacher's")


@torch.inference_mode()
def evaluate_lm(model: nn.Module, ds: Any, lm: dict[str, Any], batch_size: int,
                device: torch.device) -> dict[str, Any]:
    """Perplexity on next tokens, and KL(teacher || student) over the cached top-k + tail buckets at T=1.
    `model(input_ids=...)` returns an object with `.logits` (a transformers causal LM)."""
    model.eval()
    nll, tokens, kl, positions, nbytes = 0.0, 0, 0.0, 0, 0
    at1 = C.LossConfig(kind="kl", temperature=1.0, alpha=0.0, targets="topk", chunk=32)
    collate = getattr(ds, "collate", codecs.get(CAUSAL_LM).collate)
    for batch in torch.utils.data.DataLoader(ds, batch_size=batch_size, collate_fn=collate):
        logits = model(input_ids=batch["input_ids"].to(device)).logits.float()
        flat = logits.reshape(-1, logits.shape[-1])
        labels = next_token_labels(batch["input_ids"]).to(device)
        ce = token_ce_per_row(flat, labels, 32)
        nll += float(ce[labels >= 0].sum())
        tokens += int((labels >= 0).sum())
        if "token_bytes" in batch:  # bytes of the predicted tokens (positions 1..L-1), as for the teacher's
            nbytes += int(batch["token_bytes"][:, 1:].sum())
        if 1.0 in lm["temperatures"]:
            t = lm_targets(batch, at1, lm)
            kl += float(kd_loss_per_row(flat, t.to(device), "kl", 1.0, chunk=32).sum())
            positions += flat.shape[0]
    return {"perplexity": math.exp(nll / max(tokens, 1)), "nll": nll / max(tokens, 1), "tokens": tokens,
            "kl_to_teacher": kl / positions if positions else None,
            **({"bits_per_byte": nll / math.log(2) / nbytes} if nbytes else {})}


class LMModel(StudentModel):
    """A causal-LM student (a transformers model) reading the cache's token ids."""

    def __init__(self, lm: nn.Module, tokenizer_sha256: str) -> None:
        super().__init__()
        self.lm, self.tokenizer_sha256 = lm, tokenizer_sha256

    @property
    def core(self) -> nn.Module:
        return self.lm

    def forward(self, task: str, batch: dict[str, Any], features: bool = True):
        batch["student_tokens"] = None  # the cache's own ids (a cross-tokenizer student of the batch set its own)
        return self.lm(input_ids=batch["input_ids"].to(self.device())).logits, []

    def save(self, folder: Path, state: dict[str, Any]) -> None:
        """A transformers folder (`AutoModelForCausalLM.from_pretrained`); its tokenizer is the teacher's, named by
        its sha256 in `tokenizer_sha256.txt` (the cache stores token ids, not the tokenizer files)."""
        self.lm.load_state_dict(state)
        merged(copy.deepcopy(self.lm)).save_pretrained(folder)  # LoRA adapters (if any) added into the weights
        (folder / "tokenizer_sha256.txt").write_text(self.tokenizer_sha256 + "\n")


class CausalLM(TrainHead):
    name = CAUSAL_LM
    eval_batch_size = 16

    def check_cache(self, manifest, pipeline, task, cache):
        """The cache must hold the temperatures and samples the students' losses ask for (the config loader checked
        them against the pipeline's cache settings; a cache built with other settings is caught here)."""
        lm = manifest["lm"]
        held = C.CacheConfig(temperatures=tuple(lm["temperatures"]), samples=lm["samples"],
                             sample_temperature=lm["sample_temperature"])
        for s in pipeline.students:
            if task in pipeline.student_tasks(s):
                try:
                    C.check_lm_loss(pipeline.student_loss(s), held, f"students.{s}.loss")
                except C.ConfigError as e:
                    fix = ("an imported cache holds what its logprobs held (their one temperature, no samples): "
                           "train within that"
                           if "imported" in manifest else "rebuild it with `kdcache cache`")
                    raise CacheMismatchError(f"{cache}: this cache cannot train students.{s}: {e}; {fix}") from None

    def tokenizer(self, st, source, where):
        quiet_transformers()
        return student_tokenizer(st, source, where)

    def build_model(self, st, loss, source, tokenizer, max_length, where):
        lm = source.manifest["lm"]
        if tokenizer is not None:  # its own tokenizer: more (or fewer) tokens per row than the teacher's
            if loss.targets != "topk" and loss.alpha < 1.0:
                raise C.ConfigError(f"`{where}.loss.targets` = {loss.targets!r}: a student with its own tokenizer "
                                    "learns from the top-k + tail targets projected onto its vocabulary; use "
                                    "targets: topk")
            max_len = CROSS_LENGTH_FACTOR * lm["seq_len"]
            return CrossLMModel(build_student(st.arch, st.params, tokenizer.vocab_size, max_len, where=where),
                                tokenizer, max_len)
        calibration = ([r["input_ids"] for r in itertools.islice(iter(source.train), CALIBRATION_ROWS)]
                       if str(st.params.get("keep_layers", "")).startswith("importance:") else None)
        return LMModel(build_student(st.arch, st.params, lm["vocab_size"], lm["seq_len"], calibration, where=where),
                       lm["tokenizer_sha256"])

    def targets(self, batch, source, device):
        return source.manifest["lm"]

    def loss(self, logits, features, targets, batch, loss, where):
        if batch.get("student_tokens") is None:
            return lm_loss(logits, batch, loss, targets)
        view, mapping = batch["student_tokens"]
        t = None if loss.alpha >= 1.0 else select(lm_targets(batch, loss, targets), view.teacher_pos).to(logits.device)
        return cross_loss(logits, view, t, mapping, loss)

    def evaluate(self, model, task, ds, source):
        lm = source.manifest["lm"]
        if isinstance(model, CrossLMModel):
            at1 = C.LossConfig(kind="kl", temperature=1.0, alpha=0.0, targets="topk", chunk=32)
            return evaluate_cross(model, ds, lambda b: lm_targets(b, at1, lm) if 1.0 in lm["temperatures"] else None,
                                  self.eval_batch_size)
        return evaluate_lm(model.core, ds, lm, self.eval_batch_size, model.device())

    def run_extras(self, model, source, pipeline):
        lm = source.manifest["lm"]
        if isinstance(model, CrossLMModel):
            return {"tokenizer_sha256": model.tok.sha256, "teacher_tokenizer_sha256": lm["tokenizer_sha256"],
                    "student_vocab_size": model.tok.vocab_size, "tokenizer": model.tok.trained or "own"}
        kept = getattr(model.core, "kdcache_kept_layers", None)  # a student from the teacher's layers
        return {"tokenizer_sha256": lm["tokenizer_sha256"], **({"kept_layers": kept} if kept is not None else {})}
