"""Stage one for causal-LM teachers (head `causal-lm`): pack each split's text into fixed-length sequences, run
the teacher once, and keep per position the top-k ids with their RAW logits (top-k taken on the device, before
any softmax or temperature), the full log-sum-exp and the exact log-mass outside the top-k at every configured
temperature, and optionally random-sampling targets. Temperature is applied at training time (losses.py)."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from . import config as C
from . import distributed
from .cache.format import FORMAT_VERSION, lm_parquet_schema, token_id_type
from .data import load_task_data
from .failpoints import failpoint
from .fingerprint import hash_ids, hash_obj, hash_table, hash_tokenizer
from .resolve import resolve_model_name
from .teacher import TeacherError, load_tokenizer, model_identity, pick_device, pick_dtype, teacher_log_level

log = logging.getLogger(__name__)


def prepare_lm_teacher(pipeline: str, task_name: str, task: C.TaskConfig, teachers_dir: Path):
    """(model, tokenizer, identity) of a causal-LM teacher. A GGUF checkpoint is converted once into
    `<teachers_dir>/<pipeline>/<task>/` (a plain transformers folder that reloads in about a second)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    teacher_log_level()
    cfg = task.teacher
    if cfg.from_config:
        conf = dict(cfg.from_config)
        model_type = conf.pop("model_type", None)
        if not model_type:
            raise TeacherError("teacher.from_config needs `model_type` (e.g. llama)")
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **conf))
        tokenizer = load_tokenizer(cfg)
    elif cfg.gguf_file:
        folder = teachers_dir / pipeline / task_name
        if not (folder / "config.json").is_file():
            convert_gguf(resolve_model_name(cfg.model), cfg.gguf_file, folder)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(folder)
    else:
        if not cfg.model:
            raise TeacherError("teacher.model or teacher.from_config is required")
        path = resolve_model_name(cfg.model)
        model = AutoModelForCausalLM.from_pretrained(path, revision=cfg.revision, dtype=torch.float32)
        tokenizer = load_tokenizer(cfg)
    identity = model_identity(model, cfg.model or "from_config", cfg.revision)
    if cfg.gguf_file:
        identity["gguf_file"] = cfg.gguf_file
    return model, tokenizer, identity


def convert_gguf(src: str, gguf_file: str, out: Path) -> None:
    """GGUF -> transformers folder (de-quantised to float32), written under a temporary name then renamed."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    if not (Path(src) / gguf_file).is_file():
        raise TeacherError(f"{Path(src) / gguf_file}: GGUF file not found (teacher.model + teacher.gguf_file)")
    try:
        import gguf  # noqa: F401  (transformers needs it to read GGUF)
    except ImportError:
        raise TeacherError("loading a GGUF teacher needs the `gguf` package: pip install gguf "
                           "(or `pip install kdcache[lm]`)") from None
    log.info("converting %s/%s into %s (once)", src, gguf_file, out)
    tok = AutoTokenizer.from_pretrained(src, gguf_file=gguf_file)
    loaded = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf_file, dtype=torch.float32)
    model = AutoModelForCausalLM.from_config(loaded.config)  # save_pretrained refuses the GGUF-loaded object
    model.load_state_dict(loaded.state_dict())
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)


def pack(tokenizer: Any, texts: list[str], seq_len: int) -> np.ndarray:
    """Token ids of every text, each followed by EOS, concatenated and cut into [n, seq_len] (remainder dropped)."""
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    if eos is None:
        raise TeacherError("the teacher's tokenizer has no EOS (or SEP) token to separate packed documents")
    ids = tokenizer(list(texts), add_special_tokens=False, verbose=False)["input_ids"]
    flat = np.fromiter((t for x in ids for t in (*x, eos)), dtype=np.int64)
    n = len(flat) // seq_len
    return flat[: n * seq_len].reshape(n, seq_len)


class LMTeacherRunner:
    """Runs a causal LM over packed sequences and reduces its [B, L, V] logits on the device to the cached
    targets, so only O(k) values per position ever leave the device."""

    def __init__(self, model: torch.nn.Module, cache: C.CacheConfig, precision: str = "auto",
                 device: str = "auto") -> None:
        self.device = pick_device(device)
        self.dtype = pick_dtype(precision, self.device)
        self.model = model.to(self.device).eval()
        self.cache = cache
        if cache.top_k < 1 or not cache.temperatures or min(cache.temperatures) <= 0:
            raise TeacherError("cache.top_k must be >= 1 and cache.temperatures a non-empty list of positive numbers")
        if cache.samples and cache.samples >= 1 << 16:
            raise TeacherError("cache.samples must be below 65,536 (counts are stored as uint16)")

    def _autocast(self):
        if self.dtype != torch.float32:
            return torch.autocast(self.device.type, dtype=self.dtype)
        return contextlib.nullcontext()

    @torch.inference_mode()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Full teacher logits [B, L, V] (float32) for token ids [B, L], refusing NaN/inf."""
        with self._autocast():
            z = self.model(input_ids=x.to(self.device)).logits.float()
        if not torch.isfinite(z).all():
            raise TeacherError("teacher produced NaN/inf logits; nothing was written. Check the teacher weights, "
                               "or use precision fp32")
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
                self._sample(z, c.samples, c.sample_temperature, gen, out)
            failpoint("teacher-batch")
            if on_batch:
                on_batch(len(x))
        return {key: (v if key in ("sample_ids", "sample_counts") else np.concatenate(v)) for key, v in out.items()}

    @staticmethod
    @torch.inference_mode()
    def _sample(z: torch.Tensor, n: int, T: float, gen: torch.Generator, out: dict[str, list]) -> None:
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


def lm_shard_stats(t: dict[str, np.ndarray], seconds: float) -> dict[str, Any]:
    """Sums that add up across shards (teacher next-token loss, top-1 hits, tail mass at the first temperature)."""
    return {"rows": int(t["nll"].shape[0]), "tokens": int(t["tail"].shape[0] * t["tail"].shape[1]),
            "predicted_tokens": int(t["nll"].size), "nll_sum": float(t["nll"].astype(np.float64).sum()),
            "top1_hits": int(t["top1"].sum()), "tail_mass_sum": float(np.exp(t["tail"][..., 0].astype(np.float64)).sum()),
            "seconds": float(seconds)}


def lm_summarise(stats: list[dict[str, Any]]) -> dict[str, Any]:
    tot = {k: sum(s[k] for s in stats) for k in ("rows", "tokens", "predicted_tokens", "nll_sum", "top1_hits",
                                                 "tail_mass_sum", "seconds")}
    pred = max(tot["predicted_tokens"], 1)
    return {"rows": tot["rows"], "tokens": tot["tokens"], "teacher_perplexity": float(np.exp(tot["nll_sum"] / pred)),
            "teacher_top1_accuracy": tot["top1_hits"] / pred,
            "mean_tail_mass": tot["tail_mass_sum"] / max(tot["tokens"], 1),
            "teacher_tokens_per_s": tot["tokens"] / tot["seconds"] if tot["seconds"] else None}


def build_lm_cache(pipeline: C.PipelineConfig, task_name: str, out_dir: Path, teachers_dir: Path,
                   overwrite: bool = False) -> dict[str, Any]:
    """Cache one causal-LM task (called by capture.build_teacher_cache for head `causal-lm`)."""
    from .capture import write_shards
    task = pipeline.tasks[task_name]
    dist = distributed.state()
    data = load_task_data(task.data)
    model, tokenizer, identity = distributed.main_first(
        lambda: prepare_lm_teacher(pipeline.name, task_name, task, teachers_dir))
    device = task.teacher.device if task.teacher.device != "auto" or dist.num_processes == 1 else str(dist.device)
    runner = LMTeacherRunner(model, task.cache, task.teacher.precision, device)
    field = task.data.text_fields[0]
    seq_len = task.cache.max_length
    packed = {split: pack(tokenizer, ds[field][:], seq_len) for split, ds in data.splits.items()}
    for split, p in packed.items():
        if len(p) == 0:
            raise TeacherError(f"task {task_name}: split {split!r} has fewer than {seq_len} tokens of text; lower "
                               "cache.max_length (the packed sequence length) or add data")
    vocab = int(model.get_output_embeddings().weight.shape[0])
    c = task.cache
    lm = {"seq_len": seq_len, "top_k": min(c.top_k, vocab), "temperatures": list(c.temperatures), "vocab_size": vocab,
          "samples": c.samples, "sample_temperature": c.sample_temperature,
          "id_dtype": str(token_id_type(vocab)), "tokenizer_sha256": hash_tokenizer(tokenizer)}
    inputs = {"format_version": FORMAT_VERSION, "task": task_name, "head": "causal-lm", "teacher": identity,
              "tokenizer_sha256": lm["tokenizer_sha256"], "lm": lm, "shard_rows": c.shard_rows,
              "compute_dtype": str(runner.dtype).replace("torch.", ""),
              "data": {"source": task.data.source, "text_field": field,
                       "splits": {s: hash_table(ds.data.table) for s, ds in data.splits.items()}}}
    meta = {"format_version": FORMAT_VERSION, "task": task_name, "fingerprint": hash_obj(inputs)}
    schema = lm_parquet_schema(seq_len, lm["top_k"], len(c.temperatures), vocab, c.samples > 0, meta)
    header = {"pipeline": pipeline.name, "task": task_name, "head": "causal-lm", "label_names": [],
              "text_fields": [], "lm": lm, "fingerprint": meta["fingerprint"], "fingerprint_inputs": inputs,
              "data_origin": data.origin, "features": None, "config": C.to_dict(task), "device": str(runner.device),
              "processes": dist.num_processes}

    def produce(split: str, start: int, stop: int, bar):
        seqs = packed[split][start:stop]
        t0 = time.perf_counter()
        # sampling seed per shard: a resumed or re-dealt shard draws the same samples
        targets = runner.run(seqs, seed=zlib.crc32(f"{meta['fingerprint']}/{split}/{start}".encode()),
                             on_batch=bar.update)
        return lm_shard_table(seqs, targets, start, split, schema), None, lm_shard_stats(targets, time.perf_counter() - t0)

    sizes = {split: len(p) for split, p in packed.items()}
    return write_shards(out_dir, header, task, task_name, sizes, inputs["data"]["splits"], produce, lm_summarise,
                        overwrite)
