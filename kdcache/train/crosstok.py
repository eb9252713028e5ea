"""Causal-LM students with their own tokenizer, distilled offline from a cache with byte offsets
(docs/cross-tokenizer.md).

Where a student token and a teacher token end at the same byte of the text, both models predict what follows the
same prefix: there the teacher's cached next-token top-k (with its exact tail) is projected onto the student's
vocabulary — each teacher candidate goes to the student token its bytes start with, probabilities summed, mass
with no student token kept in the tail — and trained with the usual KD losses. Other positions get next-token
cross-entropy only. Both sides are compared per byte (bits per byte), whatever their tokenizers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from torch import nn

from .. import config as C
from ..cache import codecs
from ..fingerprint import hash_tokenizer
from ..heads import CAUSAL_LM
from ..vocab import byte_ends, vocab_bytes, whole_characters
from .head import StudentModel
from .losses import LOG_TINY, TopKTargets, kd_loss_per_row, token_ce_per_row

BPE_PREFIX = "bpe:"
STUDENT_EOS = "<|endoftext|>"


def train_bpe(texts: Iterable[str], size: int) -> Any:
    """A byte-level BPE of `size` ids (EOS included) trained on `texts` (the `tokenizers` library; deterministic
    for the same texts), as a `transformers` fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=size, special_tokens=[STUDENT_EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=STUDENT_EOS, pad_token=STUDENT_EOS)


def student_eos(tokenizer: Any, where: str) -> int:
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    if eos is None:
        raise C.ConfigError(f"`{where}.tokenizer`: it has no EOS (or SEP) token to end documents with")
    return int(eos)


def compute_id_map(teacher: Sequence[bytes], teacher_special: Sequence[bool], teacher_eos: int,
                   student: Sequence[bytes], student_special: Sequence[bool], student_eos: int) -> np.ndarray:
    """[V_teacher] int64: the student id each teacher id goes to, -1 for none (its mass joins the tail).
    Byte-identical vocabularies map to themselves; otherwise a teacher token goes to the student token with exactly
    its bytes, else to the longest student token its bytes start with (the student token that would come first),
    and the teacher's EOS to the student's."""
    if list(teacher) == list(student) and list(teacher_special) == list(student_special):
        return np.arange(len(teacher), dtype=np.int64)
    exact: dict[bytes, int] = {}
    for i, b in enumerate(student):
        if b and not student_special[i]:
            exact.setdefault(b, i)
    longest = max((len(b) for b in exact), default=0)
    out = np.full(len(teacher), -1, dtype=np.int64)
    for v, b in enumerate(teacher):
        if teacher_special[v] or not b:
            continue
        j = exact.get(b)
        n = min(len(b), longest)
        while j is None and n > 0:
            j = exact.get(b[:n])
            n -= 1
        out[v] = -1 if j is None else j
    out[teacher_eos] = student_eos
    return out


_ID_MAPS: dict[tuple[str, str], np.ndarray] = {}


def id_map(teacher_key: str, teacher: tuple[list[bytes], Sequence[bool], int], student_key: str,
           student: tuple[list[bytes], Sequence[bool], int]) -> np.ndarray:
    """`compute_id_map` once per (teacher vocabulary, student tokenizer) pair in this process, then reused."""
    key = (teacher_key, student_key)
    if key not in _ID_MAPS:
        _ID_MAPS[key] = compute_id_map(*teacher, *student)
    return _ID_MAPS[key]


def project(t: TopKTargets, mapping: torch.Tensor) -> tuple[TopKTargets, torch.Tensor]:
    """Teacher top-k targets [N, k] onto the student's vocabulary with `mapping` [V_teacher] (-1: none): a student
    id's probability is the sum over the teacher ids mapped to it; mass with no student id joins the tail, which
    keeps its exact teacher mass. Returns (targets with `present` marking one slot per distinct student id, rows
    [N] bool that have at least one)."""
    sid = mapping[t.ids]
    ok = sid >= 0
    p = t.logprobs.exp() * ok
    lost = (t.logprobs.exp() * ~ok).sum(-1)
    k = sid.shape[-1]
    slots = torch.arange(k, device=sid.device)
    same = (sid[:, :, None] == sid[:, None, :]) & ok[:, None, :]
    first = torch.where(ok, same.int().argmax(-1), slots)                       # the first slot holding that id
    mass = torch.zeros_like(p).scatter_add_(1, first, p)
    present = ok & (first == slots)
    rows = present.any(-1)
    anchor = sid.gather(1, present.int().argmax(-1, keepdim=True)).clamp_min(0)  # a present id of the row
    tail = t.tail if t.tail is not None else torch.log1p(-t.logprobs.exp().sum(-1).clamp(max=1 - 1e-7))
    tail = torch.logaddexp(tail, torch.log(lost.clamp_min(0)))
    return TopKTargets(torch.where(present, sid, anchor), torch.where(present, mass.clamp_min(1e-38).log(),
                                                                      torch.full_like(mass, LOG_TINY)),
                       tail, present), rows


@dataclass
class StudentTokens:
    """A cache batch seen through a student's tokenizer. ids/mask [B, S]; labels [B*S] next student token (-100:
    none); student_pos / teacher_pos [A]: aligned positions, flat in [B*S] and in the cache's [B*L]."""

    ids: torch.Tensor
    mask: torch.Tensor
    labels: torch.Tensor
    student_pos: torch.Tensor
    teacher_pos: torch.Tensor
    predicted_bytes: int
    predicted_chars: int
    positions: int
    truncated: int


def tokens_for(batch: dict[str, Any], tok: Any, eos: int, teacher_eos: int, max_len: int,
               vocab: Sequence[bytes] | None = None) -> StudentTokens:
    """Tokenise each cached row's text with the student's tokenizer (`vocab`: its `vocab_bytes`, for exact byte
    ends), document by document (the teacher's EOS positions say where one ends; the student's EOS goes there),
    and align: a student position is aligned with the teacher position ending at the same byte and after as many
    documents (the last of each where character offsets give several tokens one end). Bytes of a character cut
    at a row's edge get no student token."""
    tb = batch["token_bytes"].numpy()
    tids = batch["input_ids"].numpy()
    B, L = tids.shape
    ends_t = np.cumsum(tb, 1)
    is_eos = tids == teacher_eos
    key_t = ends_t + np.cumsum(is_eos, 1)
    segs, owner, closed = [], [], []
    for r, text in enumerate(batch["text"]):
        cuts = ends_t[r][is_eos[r]]
        starts = np.concatenate([[0], cuts])
        stops = np.concatenate([cuts, [len(text)]])
        for j, (a, b) in enumerate(zip(starts, stops)):
            lo, hi = whole_characters(text[a:b])
            segs.append(text[a + lo:a + hi])
            owner.append((r, int(a + lo)))
            closed.append(j < len(cuts))
    ids, ends = byte_ends(tok, [s.decode() for s in segs], vocab)
    rows: list[list[int]] = [[] for _ in range(B)]
    row_ends: list[list[int]] = [[] for _ in range(B)]
    for (r, a), seg, x, e, c in zip(owner, segs, ids, ends, closed):
        rows[r] += x + ([eos] if c else [])
        row_ends[r] += [int(v) + a for v in e] + ([a + len(seg)] if c else [])
    S = max(1, min(max_len, max(len(x) for x in rows)))
    out_ids = torch.full((B, S), eos, dtype=torch.long)
    mask = torch.zeros((B, S), dtype=torch.long)
    labels = torch.full((B, S), -100, dtype=torch.long)
    s_pos, t_pos = [], []
    pbytes = pchars = positions = truncated = 0
    for r in range(B):
        x, e = rows[r][:S], np.asarray(row_ends[r][:S], dtype=np.int64)
        truncated += len(rows[r]) > S
        n = len(x)
        if not n:
            continue
        out_ids[r, :n] = torch.as_tensor(x)
        mask[r, :n] = 1
        labels[r, :n - 1] = torch.as_tensor(x[1:])
        key_s = e + np.cumsum(np.asarray(x) == eos)
        t = np.searchsorted(key_t[r], key_s, side="right") - 1
        last = np.append(key_s[1:] != key_s[:-1], True)  # the last student token ending at that key
        ok = (t >= 0) & (key_t[r][np.clip(t, 0, L - 1)] == key_s) & last
        s_pos.append(r * S + np.flatnonzero(ok))
        t_pos.append(r * L + t[ok])
        text = batch["text"][r]
        pbytes += int(e[-1] - e[0])
        pchars += len(text[e[0]:e[-1]].decode(errors="ignore"))
        positions += n
    cat = (lambda a: torch.as_tensor(np.concatenate(a), dtype=torch.long)) if s_pos else (
        lambda a: torch.zeros(0, dtype=torch.long))
    return StudentTokens(out_ids, mask, labels.reshape(-1), cat(s_pos), cat(t_pos), pbytes, pchars, positions,
                         truncated)


@dataclass
class CrossTokenizer:
    """A student's own tokenizer with what training from a teacher's cache needs (built once per student)."""

    tokenizer: Any
    sha256: str
    eos: int
    teacher_eos: int
    mapping: np.ndarray
    vocab: list[bytes]
    trained: str | None = None  # "bpe:<size>" when kdcache trained it on the cached text

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)


def bpe_tokenizer(spec: str, texts: Sequence[bytes], where: str) -> Any:
    """`bpe:<size>`: a byte-level BPE trained on the cached training text."""
    try:
        size = int(spec[len(BPE_PREFIX):])
    except ValueError:
        raise C.ConfigError(f"`{where}.tokenizer` = {spec!r}: write bpe:<vocabulary size>, e.g. bpe:8000") from None
    return train_bpe((t.decode(errors="ignore") for t in texts), size)


def cross_tokenizer(tok: Any, lm: dict[str, Any], teacher_vocab: tuple[list[bytes], Any], where: str,
                    trained: str | None = None) -> CrossTokenizer:
    """The student's tokenizer with its EOS and the teacher-id -> student-id map (computed once per pair)."""
    eos = student_eos(tok, where)
    sha = hash_tokenizer(tok)
    s_bytes, s_special = vocab_bytes(tok)
    extra = max(0, lm["vocab_size"] - len(teacher_vocab[0]))  # model outputs beyond the tokenizer's ids: no bytes
    mapping = id_map(lm["tokenizer_sha256"], (list(teacher_vocab[0]) + [b""] * extra,
                                              list(teacher_vocab[1]) + [True] * extra, lm["eos_id"]),
                     sha, (s_bytes, s_special, eos))
    return CrossTokenizer(tok, sha, eos, lm["eos_id"], mapping, s_bytes, trained)


def cross_loss(logits: torch.Tensor, view: StudentTokens, targets: TopKTargets | None, mapping: torch.Tensor,
               loss: C.LossConfig) -> tuple[torch.Tensor, dict[str, float]]:
    """α·next-token CE + (1-α)·KD at aligned positions, CE alone elsewhere; mean over positions that have either.
    `targets`: the teacher's targets at the aligned positions (None for the CE-only twin)."""
    V = logits.shape[-1]
    flat = logits.reshape(-1, V)
    labels = view.labels.to(flat.device)
    ce = token_ce_per_row(flat, labels, loss.chunk)
    has = labels >= 0
    ce_mean = ce[has].mean() if has.any() else ce.sum() * 0.0
    if loss.alpha >= 1.0 or targets is None:
        return ce_mean, {"ce": float(ce_mean.detach()), "kd": 0.0}
    pos = view.student_pos.to(flat.device)
    if loss.kind == "uld":  # sorted probabilities: no id needs to match, so nothing is projected
        kd, keep = kd_loss_per_row(flat[pos], targets, "uld", loss.temperature, chunk=loss.chunk), None
    else:
        proj, keep = project(targets, mapping)
        kd = kd_loss_per_row(flat[pos], proj, loss.kind, loss.temperature, loss.beta, loss.chunk)
    a = torch.zeros_like(has)
    a[pos] = True if keep is None else keep
    kd_full = torch.zeros_like(ce).index_put((pos,), kd)
    per = torch.where(has, ce, torch.zeros_like(ce))
    per = torch.where(a, torch.where(has, loss.alpha * per, per) + (1.0 - loss.alpha) * kd_full, per)
    counted = has | a
    total = per[counted].mean() if counted.any() else per.sum() * 0.0
    return total, {"ce": float(ce_mean.detach()), "kd": float(kd_full[a].detach().mean()) if a.any() else 0.0}


def select(t: TopKTargets, rows: torch.Tensor) -> TopKTargets:
    """The targets of some flat positions."""
    return TopKTargets(t.ids[rows], t.logprobs[rows], None if t.tail is None else t.tail[rows])


class CrossLMModel(StudentModel):
    """A causal-LM student with its own tokenizer. `forward` tokenises the batch's cached text and aligns it with
    the teacher's positions, leaving the result in `batch["student_tokens"]` for the loss of the same step."""

    def __init__(self, lm: nn.Module, tok: CrossTokenizer, max_len: int) -> None:
        super().__init__()
        self.lm, self.tok, self.max_len = lm, tok, max_len
        self.register_buffer("mapping", torch.as_tensor(tok.mapping), persistent=False)

    @property
    def core(self) -> nn.Module:
        return self.lm

    def student_tokens(self, batch: dict[str, Any]) -> StudentTokens:
        """The batch through this student's tokenizer, computed once per batch for every student sharing it (a KD
        student and its twin)."""
        seen = batch.setdefault("_tokenised", {})
        key = (self.tok.sha256, self.max_len)
        if key not in seen:
            seen[key] = tokens_for(batch, self.tok.tokenizer, self.tok.eos, self.tok.teacher_eos, self.max_len,
                                   self.tok.vocab)
        return seen[key]

    def forward(self, task: str, batch: dict[str, Any], features: bool = True):
        view = self.student_tokens(batch)
        batch["student_tokens"] = (view, self.mapping)
        d = self.device()
        return self.lm(input_ids=view.ids.to(d), attention_mask=view.mask.to(d)).logits, []

    def save(self, folder: Path, state: dict[str, Any]) -> None:
        """A transformers folder with the student's own tokenizer beside its weights."""
        self.lm.load_state_dict(state)
        self.lm.save_pretrained(folder)
        self.tok.tokenizer.save_pretrained(folder)


@torch.inference_mode()
def evaluate_cross(model: CrossLMModel, ds: Any, targets_at, batch_size: int) -> dict[str, Any]:
    """Bits per byte and per-character perplexity of the student's next-token loss (comparable across tokenizers),
    its own-token perplexity, the share of its positions aligned with the teacher's, and KL(teacher || student) on
    the projected targets at T = 1 there. `targets_at(batch)`: the teacher's flat top-k targets at T = 1."""
    model.eval()
    device = model.device()
    nll, tokens, nbytes, chars, aligned, positions, kl, kl_n = 0.0, 0, 0, 0, 0, 0, 0.0, 0
    for batch in torch.utils.data.DataLoader(ds, batch_size=batch_size, collate_fn=getattr(ds, "collate", codecs.get(CAUSAL_LM).collate)):
        view = model.student_tokens(batch)
        logits = model.lm(input_ids=view.ids.to(device), attention_mask=view.mask.to(device)).logits.float()
        flat = logits.reshape(-1, logits.shape[-1])
        labels = view.labels.to(device)
        ce = token_ce_per_row(flat, labels, 32)
        nll += float(ce[labels >= 0].sum())
        tokens += int((labels >= 0).sum())
        nbytes, chars = nbytes + view.predicted_bytes, chars + view.predicted_chars
        aligned, positions = aligned + len(view.student_pos), positions + view.positions
        t = targets_at(batch)
        if t is not None and len(view.student_pos):
            proj, keep = project(select(t, view.teacher_pos).to(device), model.mapping)
            d = kd_loss_per_row(flat[view.student_pos.to(device)], proj, "kl", 1.0, chunk=32)
            kl += float(d[keep].sum())
            kl_n += int(keep.sum())
    return {"perplexity": math.exp(nll / max(tokens, 1)), "nll": nll / max(tokens, 1), "tokens": tokens,
            "bits_per_byte": nll / math.log(2) / max(nbytes, 1), "char_perplexity": math.exp(nll / max(chars, 1)),
            "aligned_share": aligned / max(positions, 1), "kl_to_teacher": kl / kl_n if kl_n else None}
