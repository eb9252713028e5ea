"""Chat LM in stage one (`teacher.head: chat-lm`): each row is one conversation rendered with the teacher's own chat
template (data/chat.py), run alone — rows of a batch are length-sorted and right-padded, which a causal model
cannot see — and reduced to the cached targets (capture/logits.py) only at the positions whose next token belongs
to a learned turn (`data.chat.roles`, assistant by default): the prompt costs forward time but no target bytes.
Conversations longer than `cache.max_length` are cut there, flagged per row and counted."""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import pyarrow as pa
import torch

from ..cache.format import VOCAB_FILE
from ..config import ChatConfig, GenerateConfig, TaskConfig, to_dict
from ..data.chat import ChatError, Rendered, prompt_turns, render, render_prompt, to_messages
from ..failpoints import failpoint
from ..fingerprint import hash_ids
from ..generation import continue_prompts
from ..heads import CHAT_LM
from ..metrics import answer_matches, answer_right
from ..vocab import vocab_bytes
from .lm import CausalLM, LMRunner, eos_id, vocab_file
from .logits import pack_draws


@dataclass
class ChatRows:
    """Rendered conversations of one split: token ids [L_i] and response masks [L_i] (bool) per row, whether each
    was cut at max_length [n], per row the UTF-8 bytes of the tokens a student predicts (for bits per byte), and
    the data's own answer (the reference a generated answer is checked against)."""

    ids: list[np.ndarray]
    masks: list[np.ndarray]
    truncated: np.ndarray
    target_bytes: np.ndarray
    references: list[str | None]  # per row the data's own (gold) answer, its last assistant turn, where it has one

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, rows: slice) -> "ChatRows":
        return ChatRows(self.ids[rows], self.masks[rows], self.truncated[rows], self.target_bytes[rows],
                        self.references[rows])

    def positions(self, i: int) -> np.ndarray:
        """Row i's target positions: t where token t + 1 belongs to a learned turn (ascending)."""
        return np.flatnonzero(self.masks[i][1:])



def conversation(row: Mapping[str, Any], chat: ChatConfig, label_names, label_field: str | None,
                 where: str, prompt_only: bool = False) -> list[dict[str, str]]:
    """The row's turns, its prompt and response built from `chat.prompt_template` / `response_template` when set
    (over the row's columns; `{label}` = the gold label's name, `{Label}` capitalised); `prompt_only`: up to the response (none needed)."""
    fields = dict(row)
    label = row.get(label_field) if label_field else None
    if label is not None and label_names and (not isinstance(label, (int, np.integer)) or label >= 0):
        fields["label"] = label_names[int(label)] if isinstance(label, (int, np.integer)) else str(label)
        fields["Label"] = fields["label"][:1].upper() + fields["label"][1:]
    built = dict(row)
    for key, template in ((chat.prompt, chat.prompt_template), (chat.response, chat.response_template)):
        if template is not None and not (prompt_only and key == chat.response):
            try:
                built[key] = template.format(**fields)
            except (KeyError, IndexError, ValueError) as e:
                raise ChatError(f"{where}: `data.chat.{'prompt' if key == chat.prompt else 'response'}_template` "
                                f"{template!r} cannot be filled from this row ({type(e).__name__}: {e}); its fields "
                                f"are {', '.join(fields)}") from None
    if prompt_only and built.get(chat.messages) is None:
        built[chat.response] = ""  # (dropped below: the teacher writes it)
    turns = to_messages(built, where, chat.messages, chat.prompt, chat.response, chat.system)
    return prompt_turns(turns) if prompt_only else turns


def reference(row: Mapping[str, Any], chat: ChatConfig, label_names, label_field: str | None,
              where: str) -> str | None:
    """The row's own answer (its last assistant turn) when the teacher writes the responses: None when the row has
    none (prompts alone)."""
    try:
        return last_answer(conversation(row, chat, label_names, label_field, where))
    except ChatError:
        return None


def last_answer(turns: list[dict[str, str]]) -> str | None:
    """The content of the conversation's last assistant turn, or None."""
    return next((t["content"] for t in reversed(turns) if t["role"] == "assistant"), None)


def response_bytes(ids: np.ndarray, mask: np.ndarray, nbytes: np.ndarray) -> int:
    """UTF-8 bytes of the tokens a student predicts in one row (`nbytes` [V]: each id's bytes)."""
    return int(nbytes[ids[1:][mask[1:]]].sum())


def chat_rows(ds: Any, split: str, tokenizer: Any, task: TaskConfig, label_names) -> ChatRows:
    """Every row of a split rendered (`ds`: a datasets.Dataset): whole conversations, or with `data.chat.generate`
    the prompts the teacher continues (masks all false until it has written); a row that cannot be is refused by
    split, row and id."""
    chat, L = task.data.chat, task.cache.max_length
    nbytes = token_bytes(tokenizer)
    ids, masks, cut, target_bytes, references = [], [], [], [], []
    for i, row in enumerate(ds):
        where = f"split {split!r}, row {i}" + (f" (id {row['id']!r})" if "id" in row else "")
        turns = conversation(row, chat, label_names, task.data.label_field, where, prompt_only=bool(chat.generate))
        references.append(reference(row, chat, label_names, task.data.label_field, where) if chat.generate
                           else last_answer(turns))
        if chat.generate:
            r = Rendered(render_prompt(tokenizer, turns, where), None, False)
            if len(r.ids) >= L:
                raise ChatError(f"{where}: its prompt has {len(r.ids)} tokens, leaving no room for a response in "
                                f"cache.max_length = {L}: raise cache.max_length or shorten the prompt (e.g. "
                                "`{text:.2000}` in data.chat.prompt_template)")
            r = Rendered(r.ids, np.zeros(len(r.ids), bool), False)
        else:
            r = render(tokenizer, turns, where, chat.roles, L)
            if not r.mask[1:].any():
                raise ChatError(f"{where}: the first {L} tokens hold no response token to learn (cache.max_length "
                                "cuts the conversation before its first learned turn): raise cache.max_length or "
                                "shorten the prompt")
        ids.append(r.ids)
        masks.append(r.mask)
        cut.append(r.truncated)
        target_bytes.append(response_bytes(r.ids, r.mask, nbytes))
    return ChatRows(ids, masks, np.asarray(cut, bool), np.asarray(target_bytes, np.int64), references)


def token_bytes(tokenizer: Any) -> np.ndarray:
    """[V] int64: the UTF-8 bytes each id stands for (0 for special tokens)."""
    return np.fromiter((len(b) for b in vocab_bytes(tokenizer)[0]), dtype=np.int64)


@dataclass
class ChatOut:
    """A shard's output: its rows as cached (with the teacher's responses, when it wrote them) and per row the
    targets at their target positions."""

    rows: ChatRows
    targets: list[dict[str, np.ndarray]]
    stop: int  # the end-of-turn id
    written_right: list[bool | None] | None = None  # teacher-written responses: each one's answer checked


def padded_batches(ids: list[np.ndarray], batch_size: int):
    """(row indices, their ids right-padded with 0 [b, longest]) per batch of `batch_size` rows, longest rows first
    (length-bucketed: little padding; a causal model never sees the padding after a row)."""
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    for b in range(0, len(order), batch_size):
        members = order[b:b + batch_size]
        x = np.zeros((len(members), max(len(ids[i]) for i in members)), np.int64)
        for j, i in enumerate(members):
            x[j, :len(ids[i])] = ids[i]
        yield members, x


class ChatRunner(LMRunner):
    """An LMRunner over conversations: length-sorted, right-padded batches of `cache.batch_size` rows, targets at
    each row's target positions only; with `generate`, the teacher first writes each row's response."""

    def __init__(self, model: torch.nn.Module, task: TaskConfig, tokenizer: Any, device: str = "auto") -> None:
        super().__init__(model, task.cache, task.teacher.precision, device)
        self.max_length = task.cache.max_length
        self.stop, self.nbytes = eos_id(tokenizer), token_bytes(tokenizer)
        self.decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)

    def write_responses(self, rows: ChatRows, gen: GenerateConfig, seed: int) -> ChatRows:
        """Each prompt continued by the teacher (generation.py) until its end of turn or `max_new_tokens` (or
        `cache.max_length`), the response masked as what students learn. Seeded: the same shard writes the same
        responses."""
        torch.manual_seed(seed)
        written, cut = continue_prompts(self.model, rows.ids, self.stop, gen.max_new_tokens, self.cache.batch_size,
                                        self.device, gen.do_sample, gen.temperature, gen.top_p, self.max_length,
                                        self.autocast)
        ids = [np.concatenate([p, r]) for p, r in zip(rows.ids, written)]
        masks = [np.concatenate([np.zeros(len(p), bool), np.ones(len(r), bool)]) for p, r in zip(rows.ids, written)]
        return ChatRows(ids, masks, cut, np.asarray([response_bytes(a, m, self.nbytes) for a, m in zip(ids, masks)],
                                                    np.int64), rows.references)

    @torch.no_grad()
    def run_rows(self, rows: ChatRows, seed: int = 0, on_batch=None) -> list[dict[str, np.ndarray]]:
        """Per row (in row order): targets [n_i, ...] at its n_i target positions; with samples, the distinct
        sampled ids and counts (flat) and sample_lengths [n_i]."""
        gen = torch.Generator(device=self.device).manual_seed(seed)
        out: list[dict[str, np.ndarray]] = [{} for _ in range(len(rows))]
        for members, x in padded_batches(rows.ids, self.cache.batch_size):
            pos = [j * x.shape[1] + rows.positions(i) for j, i in enumerate(members)]
            counts = [len(p) for p in pos]
            t, draws = self.at_positions(torch.as_tensor(x), torch.as_tensor(np.concatenate(pos)), gen)
            t = {key: v.cpu().numpy() for key, v in t.items()}
            bounds = np.concatenate([[0], np.cumsum(counts)])
            for j, i in enumerate(members):
                sl = slice(bounds[j], bounds[j + 1])
                out[i] = {key: v[sl] for key, v in t.items()}
                if draws is not None:
                    packed: dict[str, list] = {}
                    pack_draws(draws[sl].cpu().numpy(), 1, counts[j], packed)
                    out[i].update(sample_ids=packed["sample_ids"][0], sample_counts=packed["sample_counts"][0],
                                  sample_lengths=packed["sample_lengths"][0][0])
            failpoint("teacher-batch")
            if on_batch:
                on_batch(len(members))
        return out


def chat_shard_table(rows: ChatRows, out: list[dict[str, np.ndarray]], row_start: int, split: str,
                     schema: pa.Schema) -> pa.Table:
    """One shard of conversations and their targets (see format.chat_parquet_schema)."""
    n = len(rows)
    id_type = schema.field("topk_ids").type.value_type

    def ragged(parts: list[np.ndarray], tp: pa.DataType) -> pa.Array:
        offsets = np.concatenate([[0], np.cumsum([len(p) for p in parts])]).astype(np.int32)
        return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(np.concatenate(parts), tp))

    def per_row(key: str) -> list[np.ndarray]:
        return [np.ascontiguousarray(o[key]).reshape(-1) for o in out]

    cols = {
        "row_id": pa.array(np.arange(row_start, row_start + n, dtype=np.int64)),
        "id": pa.array([f"{split}-{row_start + i}" for i in range(n)], pa.string()),
        "input_ids": ragged(rows.ids, id_type),
        "positions": ragged([rows.positions(i).astype(np.int32) for i in range(n)], pa.int32()),
        "topk_ids": ragged(per_row("topk_ids"), id_type),
        "topk_logits": ragged(per_row("topk_logits"), schema.field("topk_logits").type.value_type),
        "lse": ragged(per_row("lse"), pa.float32()),
        "tail": ragged(per_row("tail"), pa.float32()),
        "truncated": pa.array(rows.truncated, pa.bool_()),
        "reference": pa.array(rows.references, pa.string()),
        "input_hash": pa.array([hash_ids(s) for s in rows.ids], pa.int64()),
    }
    if "sample_ids" in schema.names:
        cols["sample_ids"] = ragged(per_row("sample_ids"), id_type)
        cols["sample_counts"] = ragged(per_row("sample_counts"), pa.uint16())
        cols["sample_lengths"] = ragged(per_row("sample_lengths"), pa.uint16())
    return pa.Table.from_pydict(cols, schema=schema)


class ChatLM(CausalLM):
    """The chat variant of the causal-LM head: rows are conversations, targets sit at response positions."""

    name = CHAT_LM

    def runner(self, model, tokenizer, task, device):
        return ChatRunner(model, task, tokenizer, device)

    def units(self, data, tokenizer, task):
        return {split: chat_rows(ds, split, tokenizer, task, data.label_names) for split, ds in data.splits.items()}

    def text_stats(self, data, tokenizer, task):
        return None  # per split token counts are in the shard statistics (prompt and response apart)

    def settings(self, task, runner, model, tokenizer):
        lm = super().settings(task, runner, model, tokenizer)["lm"]
        lm.pop("offsets", None)  # chat rows keep no byte offsets; the vocabulary file is always written
        return {"lm": {**lm, "eos_id": eos_id(tokenizer), "vocab_file": VOCAB_FILE, "rows": "chat",
                       "chat": to_dict(task.data.chat),
                       "chat_template_sha256": hashlib.sha256(
                           (getattr(tokenizer, "chat_template", None) or "").encode()).hexdigest()}}

    def files(self, task, tokenizer):
        return {VOCAB_FILE: vocab_file(tokenizer)}  # always: bits per byte of the response tokens in stage two

    def run(self, runner, rows, task, seed, on_batch):
        gen = task.data.chat.generate
        right = None
        if gen is not None:
            prompts, rows = rows, runner.write_responses(rows, gen, seed)
            right = [None if ref is None else answer_matches(runner.decode(ids[len(p):]), ref)
                     for p, ids, ref in zip(prompts.ids, rows.ids, rows.references)]
        return ChatOut(rows, runner.run_rows(rows, seed=seed, on_batch=on_batch), runner.stop, right)

    def table(self, rows, out, row_start, split, schema, task):
        return chat_shard_table(out.rows, out.targets, row_start, split, schema)

    def stats(self, rows, out, label_names):
        """Teacher loss and top-1 over the response positions, their tail mass at the first temperature, tokens read
        (prompt included) and rows cut at max_length."""
        rows, t = out.rows, out.targets
        right = [answer_right(o["top1"], rows.ids[i][rows.positions(i) + 1], rows.positions(i), out.stop)
                 for i, o in enumerate(t)]
        checked = [x for x in (out.written_right or []) if x is not None]
        return {"rows": len(rows), "tokens": int(sum(len(x) for x in rows.ids)), "answers_right": int(sum(right)),
                "references": len(checked), "references_matched": int(sum(checked)),
                "predicted_tokens": int(sum(len(o["nll"]) for o in t)),
                "predicted_bytes": int(rows.target_bytes.sum()), "truncated_rows": int(rows.truncated.sum()),
                "nll_sum": float(sum(o["nll"].astype(np.float64).sum() for o in t)),
                "top1_hits": int(sum(o["top1"].sum() for o in t)),
                "tail_mass_sum": float(sum(np.exp(o["tail"][:, 0].astype(np.float64)).sum() for o in t))}

    def summarise(self, stats):
        tot = {k: sum(s[k] for s in stats) for k in ("rows", "tokens", "predicted_tokens", "predicted_bytes",
                                                     "truncated_rows", "nll_sum", "top1_hits", "tail_mass_sum",
                                                     "answers_right", "references", "references_matched",
                                                     "seconds")}
        pred = max(tot["predicted_tokens"], 1)
        return {"rows": tot["rows"], "tokens": tot["tokens"], "response_tokens": tot["predicted_tokens"],
                "truncated_rows": tot["truncated_rows"],
                "teacher_bits_per_byte": tot["nll_sum"] / math.log(2) / max(tot["predicted_bytes"], 1),
                "teacher_perplexity": float(np.exp(tot["nll_sum"] / pred)),
                "teacher_top1_accuracy": tot["top1_hits"] / pred,
                "teacher_answer_accuracy": tot["answers_right"] / max(tot["rows"], 1),
                # teacher-written responses: the share whose answer is the data's own (None: nothing to check)
                "teacher_generated_accuracy": (tot["references_matched"] / tot["references"]
                                               if tot["references"] else None),
                "mean_tail_mass": tot["tail_mass_sum"] / pred,
                "teacher_tokens_per_s": tot["tokens"] / tot["seconds"] if tot["seconds"] else None}
