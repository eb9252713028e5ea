"""Causal LM in stage one: pack each split's text into fixed-length sequences, run the teacher once, and keep per
position the top-k ids with their RAW logits (top-k taken on the device, before any softmax or temperature), the
full log-sum-exp and the exact log-mass outside the top-k at every configured temperature, and optionally
random-sampling targets. Temperature is applied at training time (train/losses.py)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import torch

from ..cache.format import CAUSAL_LM, token_id_type
from ..config import CacheConfig
from ..failpoints import failpoint
from ..fingerprint import hash_ids, hash_tokenizer
from .head import CaptureHead
from .models import TeacherError
from .runner import BatchRunner, refuse_non_finite


def pack(tokenizer: Any, texts: list[str], seq_len: int) -> np.ndarray:
    """Token ids of every text, each followed by EOS, concatenated and cut into [n, seq_len] (remainder dropped)."""
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    if eos is None:
        raise TeacherError("the teacher's tokenizer has no EOS (or SEP) token to separate packed documents")
    ids = tokenizer(list(texts), add_special_tokens=False, verbose=False)["input_ids"]
    flat = np.fromiter((t for x in ids for t in (*x, eos)), dtype=np.int64)
    n = len(flat) // seq_len
    return flat[: n * seq_len].reshape(n, seq_len)


class LMRunner(BatchRunner):
    """Runs a causal LM over packed sequences and reduces its [B, L, V] logits on the device to the cached
    targets, so only O(k) values per position ever leave the device."""

    def __init__(self, model: torch.nn.Module, cache: CacheConfig, precision: str = "auto",
                 device: str = "auto") -> None:
        super().__init__(model, cache.batch_size, 1, precision, device)
        self.cache = cache

    @torch.inference_mode()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Full teacher logits [B, L, V] (float32) for token ids [B, L], refusing NaN/inf."""
        with self.autocast():
            z = self.model(input_ids=x.to(self.device)).logits.float()
        refuse_non_finite(z, list(range(len(x))))
        return z

    @torch.inference_mode()
    def targets(self, z: torch.Tensor, x: torch.Tensor, k: int, temperatures) -> dict[str, torch.Tensor]:
        """On the device: top-k ids and raw logits (before any softmax or temperature), and per temperature the
        full log-sum-exp and the exact log-mass outside the top-k; plus the teacher's next-token loss and hits."""
        x = x.to(z.device)
        vals, ids = z.topk(min(k, z.shape[-1]), dim=-1)
        lse, tail = [], []
        for T in temperatures:
            zt = z / T
            lse_t = torch.logsumexp(zt, -1)
            lse.append(lse_t)
            tail.append(torch.logsumexp(zt.scatter_(-1, ids, float("-inf")), -1) - lse_t)
        lse1 = lse[list(temperatures).index(1.0)] if 1.0 in temperatures else torch.logsumexp(z, -1)
        nll = lse1[:, :-1] - z[:, :-1].gather(-1, x[:, 1:, None])[..., 0]
        return {"topk_ids": ids, "topk_logits": vals.half(), "lse": torch.stack(lse, -1),
                "tail": torch.stack(tail, -1), "nll": nll, "top1": ids[:, :-1, 0] == x[:, 1:]}

    def run(self, seqs: np.ndarray, seed: int = 0, on_batch=None) -> dict[str, np.ndarray]:
        """Targets for sequences [n, L]; arrays are [n, L, ...] (samples: flat ids/counts plus lengths [n, L])."""
        c = self.cache
        out: dict[str, list] = {}
        gen = torch.Generator(device=self.device).manual_seed(seed)
        for b in range(0, len(seqs), c.batch_size):
            x = torch.as_tensor(seqs[b:b + c.batch_size])
            z = self.forward(x)
            for key, v in self.targets(z, x, c.top_k, c.temperatures).items():
                out.setdefault(key, []).append(v.cpu().numpy())
            if c.samples:
                self.sample(z, c.samples, c.sample_temperature, gen, out)
            failpoint("teacher-batch")
            if on_batch:
                on_batch(len(x))
        return {key: (v if key in ("sample_ids", "sample_counts") else np.concatenate(v)) for key, v in out.items()}

    @staticmethod
    @torch.inference_mode()
    def sample(z: torch.Tensor, n: int, T: float, gen: torch.Generator, out: dict[str, list]) -> None:
        """n draws per position from softmax(z / T), kept as distinct ids with counts (ascending id order)."""
        B, L, V = z.shape
        draws = torch.multinomial(torch.softmax(z.view(-1, V) / T, -1), n, replacement=True, generator=gen)
        draws = draws.sort(-1).values.cpu().numpy()                              # [B*L, n]
        new = np.ones_like(draws, dtype=bool)
        new[:, 1:] = draws[:, 1:] != draws[:, :-1]
        starts = np.flatnonzero(new.ravel())                                      # runs never cross rows
        counts = np.diff(np.append(starts, draws.size))
        lengths = new.sum(-1).reshape(B, L)
        ids = draws.ravel()[starts]
        bounds = np.concatenate([[0], np.cumsum(lengths.sum(-1))])
        out.setdefault("sample_ids", []).extend(ids[bounds[i]:bounds[i + 1]] for i in range(B))
        out.setdefault("sample_counts", []).extend(counts[bounds[i]:bounds[i + 1]] for i in range(B))
        out.setdefault("sample_lengths", []).append(lengths)


def lm_shard_table(seqs: np.ndarray, t: dict[str, Any], row_start: int, split: str, schema: pa.Schema) -> pa.Table:
    """One shard of packed sequences and their targets (see format.lm_parquet_schema)."""
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
    return pa.Table.from_pydict(cols, schema=schema)


class CausalLM(CaptureHead):
    name = CAUSAL_LM
    auto_class = "AutoModelForCausalLM"
    labelled = False

    def runner(self, model, tokenizer, task, device):
        return LMRunner(model, task.cache, task.teacher.precision, device)

    def units(self, data, tokenizer, task):
        field, seq_len = task.data.text_fields[0], task.cache.max_length
        packed = {split: pack(tokenizer, ds[field][:], seq_len) for split, ds in data.splits.items()}
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
                       "id_dtype": str(token_id_type(vocab)), "tokenizer_sha256": hash_tokenizer(tokenizer)}}

    def features(self, task, runner):
        return None

    def manifest_extras(self, inputs):
        return {"lm": inputs["lm"]}

    def run(self, runner, rows, task, seed, on_batch):
        return runner.run(rows, seed=seed, on_batch=on_batch)

    def table(self, rows, out, row_start, split, schema, task):
        return lm_shard_table(rows, out, row_start, split, schema)

    def stats(self, rows, out, label_names):
        """Teacher next-token loss, top-1 hits, tail mass at the first temperature."""
        return {"rows": int(out["nll"].shape[0]), "tokens": int(out["tail"].shape[0] * out["tail"].shape[1]),
                "predicted_tokens": int(out["nll"].size), "nll_sum": float(out["nll"].astype(np.float64).sum()),
                "top1_hits": int(out["top1"].sum()),
                "tail_mass_sum": float(np.exp(out["tail"][..., 0].astype(np.float64)).sum())}

    def summarise(self, stats):
        tot = {k: sum(s[k] for s in stats) for k in ("rows", "tokens", "predicted_tokens", "nll_sum", "top1_hits",
                                                     "tail_mass_sum", "seconds")}
        pred = max(tot["predicted_tokens"], 1)
        return {"rows": tot["rows"], "tokens": tot["tokens"],
                "teacher_perplexity": float(np.exp(tot["nll_sum"] / pred)),
                "teacher_top1_accuracy": tot["top1_hits"] / pred,
                "mean_tail_mass": tot["tail_mass_sum"] / max(tot["tokens"], 1),
                "teacher_tokens_per_s": tot["tokens"] / tot["seconds"] if tot["seconds"] else None}
