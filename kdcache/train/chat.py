"""Chat LM in stage two: causal-LM students trained on a chat cache's targets, which exist only at response positions
(capture/chat.py). The loss counts exactly those positions — next-token CE and KD alike — so the prompt is read but
never learned; metrics are over response tokens: perplexity, bits per byte and KL(teacher || student) at T = 1."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import config as C
from ..cache import codecs
from ..cache.reader import read_vocab
from ..generation import continue_prompts
from ..heads import CHAT_LM
from ..lmhead import OutputHead
from ..metrics import answer_matches, answer_right
from .lm import CausalLM, LMModel, TokenizerMismatchError
from .lm_losses import AtTargets, chat_loss, lm_targets, response_logits
from .losses import kd_loss_per_row, token_ce_per_row


GENERATED_TOKENS = 16  # the longest answer a student writes in evaluation when the cache does not say


class ChatModel(LMModel):
    """A causal-LM student that applies its output layer only at the batch's target positions, and there a chunk
    of them at a time in the loss (`AtTargets`, lm_losses.chat_loss): its body runs over the whole conversation, but
    no [B, L, V] or [N, V] logits are held while training (a long context costs its body's activations only)."""

    def __init__(self, lm: nn.Module, tokenizer_sha256: str) -> None:
        super().__init__(lm, tokenizer_sha256)
        self.head = OutputHead(lm)

    def forward(self, task: str, batch: dict[str, Any], features: bool = True):
        batch["student_tokens"] = None
        h = self.head.hidden(batch["input_ids"].to(self.device()))
        return AtTargets(h.reshape(-1, h.shape[-1])[batch["target_index"].to(h.device)], self.head), []


@torch.inference_mode()
def evaluate_chat(model: ChatModel, ds: Any, lm: dict[str, Any], vocab: list[bytes], batch_size: int,
                  device: torch.device) -> dict[str, Any]:
    """Over the response tokens of `ds`: perplexity, bits per byte (`vocab`: each id's UTF-8 bytes), top-1
    agreement with the teacher, KL(teacher || student) on the cached top-k + tail buckets at T = 1, and answer
    accuracy: the share of rows whose response greedy decoding would reproduce exactly (metrics.answer_right);
    where rows keep the data's own answer, generated accuracy: the student continues each prompt (greedy) and its
    answer is checked against that reference (metrics.answer_matches)."""
    model.eval()
    nbytes = np.fromiter((len(b) for b in vocab), dtype=np.int64)
    nll, tokens, kl, agree, total_bytes, right, rows = 0.0, 0, 0.0, 0, 0, 0, 0
    prompts, references = [], []
    at1 = C.LossConfig(kind="kl", temperature=1.0, alpha=0.0, targets="topk", chunk=32)
    for batch in torch.utils.data.DataLoader(ds, batch_size=batch_size, collate_fn=codecs.get(CHAT_LM).collate):
        flat, labels = response_logits(model("", batch)[0].logits().float(), batch)
        nll += float(token_ce_per_row(flat, labels, 32).sum())
        tokens += len(labels)
        total_bytes += int(nbytes[labels.cpu().numpy()].sum())
        top1 = flat.argmax(-1).cpu()
        agree += int((top1 == batch["topk_ids"][:, 0]).sum())
        owner, at = np.divmod(batch["target_index"].numpy(), batch["input_ids"].shape[1])
        hits, nxt = (top1 == labels.cpu()).numpy(), labels.cpu().numpy()
        right += sum(answer_right(hits[owner == j], nxt[owner == j], at[owner == j], lm["eos_id"])
                     for j in range(len(batch["id"])))
        rows += len(batch["id"])
        for j, ref in enumerate(batch.get("reference") or []):
            if ref is not None:  # the prompt: every token up to the first response position
                prompts.append(batch["input_ids"][j, :int(at[owner == j].min()) + 1].numpy())
                references.append(ref)
        if 1.0 in lm["temperatures"]:
            kl += float(kd_loss_per_row(flat, lm_targets(batch, at1, lm).to(device), "kl", 1.0, chunk=32).sum())
    generated = {}
    if prompts:
        gen = (lm.get("chat") or {}).get("generate") or {}
        written, _ = continue_prompts(model.core, prompts, lm["eos_id"], gen.get("max_new_tokens", GENERATED_TOKENS),
                                      batch_size, device)
        texts = [b"".join(vocab[t] for t in w).decode("utf-8", errors="replace") for w in written]
        generated = {"generated_accuracy": float(np.mean([answer_matches(t, r) for t, r in zip(texts, references)]))}
    return {"perplexity": math.exp(nll / max(tokens, 1)), "nll": nll / max(tokens, 1), "tokens": tokens,
            "bits_per_byte": nll / math.log(2) / max(total_bytes, 1), "top1_agreement": agree / max(tokens, 1),
            "answer_accuracy": right / max(rows, 1), **generated,
            "kl_to_teacher": kl / tokens if tokens and 1.0 in lm["temperatures"] else None}


class ChatLM(CausalLM):
    """Students of a chat cache: the causal-LM students (checkpoint, config), reading the teacher's token ids."""

    name = CHAT_LM

    def tokenizer(self, st, source, where):
        try:
            return super().tokenizer(st, source, where)  # None: the teacher's own ids
        except TokenizerMismatchError:
            raise C.ConfigError(f"`{where}.tokenizer` = {st.tokenizer!r}: a chat-lm cache keeps no byte offsets, so "
                                "its students read the teacher's token ids (remove the setting, or name the "
                                "teacher's own tokenizer)") from None

    def loss(self, logits, features, targets, batch, loss, where):
        return chat_loss(logits, batch, loss, targets)

    def evaluate(self, model, task, ds, source):
        vocab = source.once("vocab", lambda: read_vocab(source.cache, source.manifest)[0])
        return evaluate_chat(model, ds, source.manifest["lm"], vocab, self.eval_batch_size, model.device())

    def build_model(self, st, loss, source, tokenizer, max_length, where):
        m = super().build_model(st, loss, source, tokenizer, max_length, where)
        return ChatModel(m.lm, m.tokenizer_sha256)  # (tokenizer is None: `tokenizer` refuses another one)
