"""Causal LM in stage one: pack each split's text into fixed-length sequences, run the teacher once, and keep per
position the top-k ids with their RAW logits (top-k taken on the device, before any softmax or temperature), the
full log-sum-exp and the exact log-mass outside the top-k at every configured temperature, and optionally
random-sampling targets. Temperature is applied at training time (train/losses.py)."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from ..cache.format import VOCAB_FILE, token_id_type
from ..heads import CAUSAL_LM
from ..config import CacheConfig
from ..failpoints import failpoint
from ..fingerprint import hash_ids, hash_tokenizer
from ..vocab import byte_ends, vocab_bytes
from .head import CaptureHead
from .logits import OutputHead, chunk_positions, chunked_targets, draw, next_ids, pack_draws, reduce, shaped
from .models import TeacherError
from .runner import BatchRunner, refuse_non_finite

log = logging.getLogger(__name__)


@dataclass
class Packed:
    """Packed sequences of one split: ids [n, L]; with offsets, per position the bytes of text its token ends after
    (uint16 [n, L]; an EOS between documents covers none) and per row the UTF-8 text its tokens cover."""

    ids: np.ndarray
    token_bytes: np.ndarray | None = None
    text: list[bytes] | None = None

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, rows: slice) -> "Packed":
        return Packed(self.ids[rows], None if self.token_bytes is None else self.token_bytes[rows],
                      None if self.text is None else self.text[rows])

    @staticmethod
    def concat(parts: list["Packed"]) -> "Packed":
        offsets = parts[0].text is not None
        return Packed(np.concatenate([p.ids for p in parts]),
                      np.concatenate([p.token_bytes for p in parts]) if offsets else None,
                      [t for p in parts for t in p.text] if offsets else None)


def eos_id(tokenizer: Any) -> int:
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    if eos is None:
        raise TeacherError("the teacher's tokenizer has no EOS (or SEP) token to separate packed documents")
    return int(eos)


def bos_id(tokenizer: Any) -> int | None:
    """The BOS id when the tokenizer starts every text with it (Gemma, Llama 2: their models expect it), else None."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return None
    return int(bos) if tokenizer("a")["input_ids"][:1] == [bos] else None


def pack(tokenizer: Any, texts: list[str], seq_len: int, offsets: bool = False,
         vocab: list[bytes] | None = None) -> Packed:
    """Token ids of every text, each preceded by BOS when the tokenizer uses one and followed by EOS, concatenated
    and cut into [n, seq_len] (remainder dropped); with `offsets`, also where each token ends in the text
    (`Packed`; `vocab`: the tokenizer's `vocab_bytes`)."""
    eos, bos = eos_id(tokenizer), bos_id(tokenizer)
    if offsets:
        ids, ends = byte_ends(tokenizer, texts, vocab if vocab is not None else vocab_bytes(tokenizer)[0])
    else:
        ids = tokenizer(list(texts), add_special_tokens=False, verbose=False)["input_ids"]
    first = () if bos is None else (bos,)
    flat = np.fromiter((t for x in ids for t in (*first, *x, eos)), dtype=np.int64)
    n = len(flat) // seq_len
    packed = Packed(flat[: n * seq_len].reshape(n, seq_len))
    if not offsets:
        return packed
    # bytes per token (leading whitespace goes with the token after it), 0 for each BOS and EOS; text after a
    # document's last token (trailing whitespace a tokenizer drops) belongs to no token and is not kept
    lengths = np.concatenate([x for e in ends for x in ([0] * len(first), np.diff(e, prepend=0), [0])]
                             ).astype(np.int64)[: n * seq_len]
    if lengths.size and lengths.max() > np.iinfo(np.uint16).max:
        raise TeacherError(f"a teacher token covers {int(lengths.max())} bytes of text (more than 65,535): clean "
                           "the text (long runs of whitespace?) or set cache.offsets: false")
    stream = b"".join(t.encode()[: int(e[-1])] for t, e in zip(texts, ends) if len(e))
    per_row = lengths.reshape(n, seq_len).sum(1)
    starts = np.concatenate([[0], np.cumsum(per_row)])
    packed.token_bytes = lengths.reshape(n, seq_len).astype(np.uint16)
    packed.text = [stream[starts[i]:starts[i + 1]] for i in range(n)]
    return packed


def vocab_table(tokenizer: Any) -> pa.Table:
    """The teacher's vocabulary as bytes (`vocab.parquet` of an LM cache with offsets): id, bytes, special."""
    tokens, special = vocab_bytes(tokenizer)
    return pa.table({"id": pa.array(np.arange(len(tokens), dtype=np.int32)), "bytes": pa.array(tokens, pa.binary()),
                     "special": pa.array(special, pa.bool_())})


def vocab_file(tokenizer: Any) -> bytes:
    """`vocab.parquet` (zstd) of `vocab_table`."""
    sink = pa.BufferOutputStream()
    pq.write_table(vocab_table(tokenizer), sink, compression="zstd")
    return sink.getvalue().to_pybytes()


class LMRunner(BatchRunner):
    """Runs a causal LM over packed sequences and reduces its logits on the device to the cached targets, a chunk
    of positions at a time (capture/logits.py): only O(k) values per position leave the device, and no [B, L, V]
    tensor is ever held. Under no_grad, not inference_mode: transformers wraps a teacher of several tensor-parallel
    replicas (`teacher.tp_size`) in FSDP, whose hooks refuse inference tensors."""

    def __init__(self, model: torch.nn.Module, cache: CacheConfig, precision: str = "auto",
                 device: str = "auto") -> None:
        super().__init__(model, cache.batch_size, 1, precision, device)
        self.cache = cache
        self.head: OutputHead | bool | None = None  # first batch decides: the split head, or False (full forward)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Full teacher logits [B, L, V] (float32) for token ids [B, L], refusing NaN/inf: the unchunked reference."""
        with self.autocast():
            z = self.model(input_ids=x.to(self.device)).logits.float()
        refuse_non_finite(z, list(range(len(x))))
        return z

    @torch.no_grad()
    def targets(self, z: torch.Tensor, x: torch.Tensor, k: int, temperatures) -> dict[str, torch.Tensor]:
        """Targets [B, L, ...] of full logits z [B, L, V] for ids x [B, L] (see logits.reduce), in one piece."""
        B, L, V = z.shape
        return shaped({key: [v] for key, v in reduce(z.reshape(B * L, V), next_ids(x.to(z.device)), k,
                                                      temperatures).items()}, B, L)

    @torch.no_grad()
    def chunked(self, x: torch.Tensor, gen: torch.Generator | None = None) -> tuple[dict[str, torch.Tensor], Any]:
        """Targets [B, L, ...] of ids x [B, L] and sorted draws [B·L, samples] (or None), computed `logit_chunk`
        positions at a time from one run of the model's body."""
        B, L = x.shape
        t, draws = self.at_positions(x, None, gen)
        return shaped({key: [v] for key, v in t.items()}, B, L), draws

    @torch.no_grad()
    def at_positions(self, x: torch.Tensor, positions: torch.Tensor | None,
                     gen: torch.Generator | None = None) -> tuple[dict[str, torch.Tensor], Any]:
        """Flat targets [n, ...] and draws [n, samples] (or None) at `positions` [n] of the flattened B·L positions
        of ids x [B, L] (None: all of them), from one run of the model's body and its output layer on `logit_chunk`
        of them at a time (a right-padded batch is exact here: a causal position sees no padding after it)."""
        c, x = self.cache, x.to(self.device)
        B, L = x.shape
        if self.head is None:
            head = OutputHead(self.model)
            with self.autocast():
                ok = head.check(self.model, x[:1, :min(L, 16)])
            if not ok:
                log.warning("%s: its output layer could not be split off the body exactly; capturing from the full "
                            "forward (memory grows with batch_size × max_length × vocabulary)",
                            type(self.model).__name__)
            self.head = head if ok else False
        V = int(self.model.get_output_embeddings().weight.shape[0])
        size = chunk_positions(c.logit_chunk, V, self.device)
        nxt = next_ids(x)
        where = torch.arange(B * L, device=x.device) if positions is None else positions.to(x.device)
        if self.head:
            with self.autocast():
                h = self.head.hidden(x).reshape(B * L, -1)
            h = h if positions is None else h[where]

            def logits_of(sl: slice) -> torch.Tensor:
                with self.autocast():
                    return self.head.logits(h[sl]).float()
        else:
            with self.autocast():
                full = self.model(input_ids=x).logits.reshape(B * L, -1)

            def logits_of(sl: slice) -> torch.Tensor:
                return full[where[sl]].float()
        return chunked_targets(logits_of, nxt[where], where // L, size, c.top_k, c.temperatures, c.samples,
                               c.sample_temperature, gen)

    @torch.no_grad()
    def run(self, seqs: np.ndarray, seed: int = 0, on_batch=None) -> dict[str, np.ndarray]:
        """Targets for sequences [n, L]; arrays are [n, L, ...] (samples: flat ids/counts plus lengths [n, L])."""
        c = self.cache
        out: dict[str, list] = {}
        gen = torch.Generator(device=self.device).manual_seed(seed)
        for b in range(0, len(seqs), c.batch_size):
            x = torch.as_tensor(seqs[b:b + c.batch_size])
            t, draws = self.chunked(x, gen)
            for key, v in t.items():
                out.setdefault(key, []).append(v.cpu().numpy())
            if draws is not None:
                pack_draws(draws.cpu().numpy(), *x.shape, out)
            failpoint("teacher-batch")
            if on_batch:
                on_batch(len(x))
        return {key: (v if key in ("sample_ids", "sample_counts") else np.concatenate(v)) for key, v in out.items()}

    @staticmethod
    @torch.no_grad()
    def sample(z: torch.Tensor, n: int, T: float, gen: torch.Generator, out: dict[str, list]) -> None:
        """n draws per position from softmax(z / T) of full logits z [B, L, V], kept as distinct ids with counts."""
        B, L, V = z.shape
        pack_draws(draw(z.view(-1, V), n, T, gen).cpu().numpy(), B, L, out)


def lm_shard_table(rows: Packed, t: dict[str, Any], row_start: int, split: str, schema: pa.Schema) -> pa.Table:
    """One shard of packed sequences and their targets (see format.lm_parquet_schema)."""
    seqs = rows.ids
    n, L = seqs.shape
    id_type = schema.field("topk_ids").type.value_type

    def fixed(a: np.ndarray, tp: pa.DataType) -> pa.Array:
        a = np.ascontiguousarray(a).reshape(n, -1)
        return pa.FixedSizeListArray.from_arrays(pa.array(a.ravel(), tp), a.shape[1])

    cols = {
        "row_id": pa.array(np.arange(row_start, row_start + n, dtype=np.int64)),
        "id": pa.array([f"{split}-{row_start + i}" for i in range(n)], pa.string()),
        "input_ids": fixed(seqs, id_type),
        "topk_ids": fixed(t["topk_ids"], id_type),
        "topk_logits": fixed(t["topk_logits"], pa.float16()),
        "lse": fixed(t["lse"].astype(np.float32), pa.float32()),
        "tail": fixed(t["tail"].astype(np.float32), pa.float32()),
        "input_hash": pa.array([hash_ids(s) for s in seqs], pa.int64()),
    }
    if "sample_lengths" in t:
        cols["sample_ids"] = pa.array([a.astype(np.int64) for a in t["sample_ids"]], pa.list_(id_type))
        cols["sample_counts"] = pa.array([a.astype(np.int64) for a in t["sample_counts"]], pa.list_(pa.uint16()))
        cols["sample_lengths"] = fixed(t["sample_lengths"], pa.uint16())
    if "text" in schema.names:
        cols["text"] = pa.array(rows.text, pa.binary())
        cols["token_bytes"] = fixed(rows.token_bytes, pa.uint16())
    return pa.Table.from_pydict(cols, schema=schema)


class CausalLM(CaptureHead):
    name = CAUSAL_LM
    auto_class = "AutoModelForCausalLM"
    labelled = False

    def runner(self, model, tokenizer, task, device):
        return LMRunner(model, task.cache, task.teacher.precision, device)

    def units(self, data, tokenizer, task):
        field, seq_len = task.data.text_fields[0], task.cache.max_length
        vocab = vocab_bytes(tokenizer)[0] if task.cache.offsets else None
        packed = {split: pack(tokenizer, ds[field][:], seq_len, task.cache.offsets, vocab)
                  for split, ds in data.splits.items()}
        for split, p in packed.items():
            if len(p) == 0:
                raise TeacherError(f"split {split!r} has fewer than {seq_len} tokens of text; lower "
                                   "cache.max_length (the packed sequence length) or add data")
        return packed

    def text_stats(self, data, tokenizer, task):
        field, out = task.data.text_fields[0], {}
        for split, ds in data.splits.items():
            texts = ds[field][:]
            words = sum(len(t.split()) for t in texts)
            tokens = sum(len(x) for x in tokenizer(list(texts), add_special_tokens=False, verbose=False)["input_ids"])
            out[split] = {"words": words, "tokens": tokens, "tokens_per_word": round(tokens / max(words, 1), 3)}
        return out

    def text_columns(self, task):
        return []  # shards keep the packed token ids, not text

    def settings(self, task, runner, model, tokenizer):
        c, vocab = task.cache, int(model.get_output_embeddings().weight.shape[0])
        return {"lm": {"seq_len": c.max_length, "top_k": min(c.top_k, vocab), "temperatures": list(c.temperatures),
                       "vocab_size": vocab, "samples": c.samples, "sample_temperature": c.sample_temperature,
                       "id_dtype": str(token_id_type(vocab)), "tokenizer_sha256": hash_tokenizer(tokenizer),
                       "bos_id": bos_id(tokenizer),
                       **({"offsets": True, "eos_id": eos_id(tokenizer), "vocab_file": VOCAB_FILE}
                          if c.offsets else {})}}

    def files(self, task, tokenizer):
        return {VOCAB_FILE: vocab_file(tokenizer)} if task.cache.offsets else {}

    def features(self, task, runner):
        return None

    def manifest_extras(self, inputs):
        return {"lm": inputs["lm"]}

    def run(self, runner, rows, task, seed, on_batch):
        return runner.run(rows.ids, seed=seed, on_batch=on_batch)

    def table(self, rows, out, row_start, split, schema, task):
        return lm_shard_table(rows, out, row_start, split, schema)

    def stats(self, rows, out, label_names):
        """Teacher next-token loss, top-1 hits, tail mass at the first temperature."""
        predicted = {} if rows.token_bytes is None else {"predicted_bytes": int(rows.token_bytes[:, 1:].sum(dtype=np.int64))}
        return {**predicted, "rows": int(out["nll"].shape[0]), "tokens": int(out["tail"].shape[0] * out["tail"].shape[1]),
                "predicted_tokens": int(out["nll"].size), "nll_sum": float(out["nll"].astype(np.float64).sum()),
                "top1_hits": int(out["top1"].sum()),
                "tail_mass_sum": float(np.exp(out["tail"][..., 0].astype(np.float64)).sum())}

    def summarise(self, stats):
        tot = {k: sum(s[k] for s in stats) for k in ("rows", "tokens", "predicted_tokens", "nll_sum", "top1_hits",
                                                     "tail_mass_sum", "seconds")}
        pred = max(tot["predicted_tokens"], 1)
        per_byte = {}
        if all("predicted_bytes" in s for s in stats):  # bits per byte: comparable across tokenizers
            per_byte = {"teacher_bits_per_byte": tot["nll_sum"] / math.log(2) / max(sum(s["predicted_bytes"]
                                                                                         for s in stats), 1)}
        return {"rows": tot["rows"], "tokens": tot["tokens"], **per_byte,
                "teacher_perplexity": float(np.exp(tot["nll_sum"] / pred)),
                "teacher_top1_accuracy": tot["top1_hits"] / pred,
                "mean_tail_mass": tot["tail_mass_sum"] / max(tot["tokens"], 1),
                "teacher_tokens_per_s": tot["tokens"] / tot["seconds"] if tot["seconds"] else None}
