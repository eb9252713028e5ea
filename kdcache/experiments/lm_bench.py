"""`kdcache bench <causal-lm pipeline>`: storage against fidelity for LM targets, measured side by side in one run.

One teacher pass over packed training and held-out sequences gives, for every k in KS and for sampled targets:
bytes per token of the real Parquet layout; KL(teacher ‖ reconstruction) on held-out positions (the stored top-k
probabilities plus the tail mass spread evenly over the other ids); and the held-out perplexity of the same small
student trained for the same budget on those targets. Baselines in the same run: naive top-128 (int32 ids, float32
logits, pyarrow defaults, tail dropped and the top-k renormalised) and next-token CE alone."""

from __future__ import annotations

import dataclasses
import datetime as _dt
import io
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from .. import config as C, layout
from ..cache.format import lm_parquet_schema, parquet_write_options
from ..capture.lm import LMRunner, Packed, lm_shard_table, pack
from ..capture.teacher import prepare_teacher
from ..data import load_task_data
from ..optim import adamw
from ..students import build_student
from ..train.lm import evaluate_lm, lm_loss
from .docsections import write_section
from .machine import machine

KS = (8, 16, 32, 64, 128)
SAMPLES = 32


def _parquet_bytes(table: pa.Table, tuned: bool = True) -> int:
    buf = io.BytesIO()
    if tuned:
        pq.write_table(table, buf, **parquet_write_options(table.schema, 1 << 20))
    else:
        pq.write_table(table, buf)
    return buf.tell()


def _recon_kl(z: torch.Tensor, t: dict[str, torch.Tensor], k: int) -> torch.Tensor:
    """KL(teacher ‖ reconstruction) per position at T=1: stored top-k probabilities (float16 logits, float32 lse)
    and the exact tail mass spread evenly over the V-k other ids."""
    logp = torch.log_softmax(z.float(), -1)
    V = z.shape[-1]
    ids = t["topk_ids"][..., :k].long()
    rec = (t["tail"][..., :1] - math.log(max(V - k, 1))).expand_as(logp).clone()
    rec.scatter_(-1, ids, t["topk_logits"][..., :k].float() - t["lse"][..., :1])
    return (logp.exp() * (logp - rec)).sum(-1)


def _batches(seqs: np.ndarray, targets: dict[str, np.ndarray], batch_size: int, rng: np.random.Generator):
    order = rng.permutation(len(seqs))
    for b in range(0, len(order), batch_size):
        idx = order[b:b + batch_size]
        batch = {"input_ids": torch.as_tensor(seqs[idx])}
        for key, v in targets.items():
            if key in ("sample_ids", "sample_counts"):
                batch[key] = torch.as_tensor(np.concatenate([v[i] for i in idx]).astype(np.int64))
            else:
                batch[key] = torch.as_tensor(v[idx].astype(np.int64 if key.endswith(("ids", "lengths")) else np.float32))
        yield batch


class _Held(torch.utils.data.IterableDataset):
    """Held-out sequences in the shape CacheDataset yields, for evaluate_lm."""

    def __init__(self, seqs: np.ndarray, t: dict[str, np.ndarray]) -> None:
        self.seqs, self.t, self.url = seqs, t, "held-out"

    def __iter__(self):
        for i in range(len(self.seqs)):
            yield {"row_id": i, "id": str(i), "input_ids": self.seqs[i],
                   **{k: self.t[k][i] for k in ("topk_ids", "topk_logits", "lse", "tail")}}


def run_lm_bench(pipeline_name: str, quick: bool, out_dir: Path, doc: Path | None,
                 teachers_dir: Path | None = None, overrides: list[str] = ()) -> dict[str, Any]:
    pipeline = C.load_pipeline(pipeline_name, list(overrides))
    task_name = next(iter(pipeline.tasks))
    task = pipeline.tasks[task_name]
    student = next((s for s in pipeline.students.values() if s.arch == "llama"), C.StudentConfig(arch="llama"))
    n_train, n_held, epochs = (32, 8, 1) if quick else (160, 32, 3)
    data = load_task_data(task.data)
    model, tok, _ = prepare_teacher(pipeline.name, task_name, task, data, teachers_dir or layout.teachers_dir())
    L = task.cache.max_length
    train_packed = pack(tok, data.splits["train"]["text"][:], L, offsets=True)[:n_train]
    train_seqs = train_packed.ids
    held_seqs = pack(tok, data.splits["validation"]["text"][:], L).ids[:n_held]
    cache_cfg = dataclasses.replace(task.cache, top_k=max(KS), temperatures=(1.0,), samples=SAMPLES,
                                    sample_temperature=1.0)
    runner = LMRunner(model, cache_cfg, task.teacher.precision, task.teacher.device)
    V = int(model.get_output_embeddings().weight.shape[0])

    def capture(seqs: np.ndarray, held: bool):
        """Per k: targets [n, L, ...] as numpy; plus sampled targets and (held-out) reconstruction KL per k."""
        per_k: dict[int, dict[str, list]] = {k: {} for k in KS}
        samples: dict[str, list] = {}
        kl = {k: [] for k in KS}
        gen = torch.Generator(device=runner.device).manual_seed(0)
        t0 = time.perf_counter()
        for b in range(0, len(seqs), cache_cfg.batch_size):
            x = torch.as_tensor(seqs[b:b + cache_cfg.batch_size])
            z = runner.forward(x)
            for k in KS:
                t = runner.targets(z, x, k, (1.0,))  # the tail depends on k: computed per k from the full logits
                for key in ("topk_ids", "topk_logits", "lse", "tail"):
                    per_k[k].setdefault(key, []).append(t[key].cpu().numpy())
                if held:
                    kl[k].append(_recon_kl(z, t, k).cpu())
            runner.sample(z, SAMPLES, 1.0, gen, samples)
        seconds = time.perf_counter() - t0
        out = {k: {key: np.concatenate(v) for key, v in d.items()} for k, d in per_k.items()}
        smp = {"sample_ids": samples["sample_ids"], "sample_counts": samples["sample_counts"],
               "sample_lengths": np.concatenate(samples["sample_lengths"])}
        return out, smp, {str(k): float(torch.cat(v).mean()) for k, v in kl.items()} if held else None, seconds

    train_t, train_s, _, teacher_s = capture(train_seqs, held=False)
    held_t, held_s, recon_kl, _ = capture(held_seqs, held=True)
    tokens = train_seqs.size

    # storage: the real shard layout per k; sampled = the sample columns with input_ids; naive baseline
    storage = {}
    for k in KS:
        schema = lm_parquet_schema(L, k, 1, V, False, {})
        storage[f"top-{k}"] = _parquet_bytes(lm_shard_table(Packed(train_seqs), train_t[k], 0, "train", schema)) / tokens
    s_schema = lm_parquet_schema(L, 1, 1, V, True, {})
    s_table = lm_shard_table(Packed(train_seqs), {**train_t[KS[0]], **{"topk_ids": train_t[KS[0]]["topk_ids"][..., :1],
                                                              "topk_logits": train_t[KS[0]]["topk_logits"][..., :1]},
                                          **train_s}, 0, "train", s_schema)
    storage[f"sampled ({SAMPLES} draws)"] = _parquet_bytes(
        s_table.select(["input_ids", "sample_ids", "sample_counts", "sample_lengths"])) / tokens
    o_table = lm_shard_table(train_packed, train_t[KS[0]], 0, "train", lm_parquet_schema(L, KS[0], 1, V, False, {}, True))
    # what cross-tokenizer students need on top (docs/cross-tokenizer.md): per-position byte counts, and the text
    storage["offsets: token_bytes"] = _parquet_bytes(o_table.select(["token_bytes"])) / tokens
    storage["offsets: row text"] = _parquet_bytes(o_table.select(["text"])) / tokens
    k_max = max(KS)
    naive = pa.table({"input_ids": pa.array(list(train_seqs.astype(np.int32))),
                      "topk_ids": pa.array(list(train_t[k_max]["topk_ids"].reshape(len(train_seqs), -1).astype(np.int32))),
                      "topk_logits": pa.array(list(train_t[k_max]["topk_logits"].reshape(len(train_seqs), -1)
                                                   .astype(np.float32)))})
    storage[f"naive top-{k_max} (int32 + float32, pyarrow defaults)"] = _parquet_bytes(naive, tuned=False) / tokens

    # fidelity: the same student, same seed and batches, per target kind
    lm = {"temperatures": [1.0], "samples": SAMPLES, "sample_temperature": 1.0}
    variants = {f"top-{k}": (C.LossConfig(alpha=0.5, temperature=1.0), train_t[k]) for k in KS}
    variants[f"sampled ({SAMPLES} draws)"] = (C.LossConfig(alpha=0.5, temperature=1.0, targets="sampled"),
                                              {**train_s, **train_t[KS[0]]})
    variants[f"naive top-{k_max} (tail dropped)"] = (C.LossConfig(alpha=0.5, temperature=1.0, targets="topk-renorm"),
                                                     train_t[k_max])
    variants["next-token CE only"] = (C.LossConfig(alpha=1.0), train_t[KS[0]])
    held_ds = _Held(held_seqs, held_t[k_max])
    fidelity = {}
    for name, (loss, targets) in variants.items():
        torch.manual_seed(0)
        net = build_student("llama", student.params, V, L, where="bench student")
        opt = adamw(net.parameters(), student.learning_rate or pipeline.train.learning_rate)
        rng = np.random.default_rng(0)
        t0 = time.perf_counter()
        for _ in range(epochs):
            for batch in _batches(train_seqs, targets, pipeline.train.batch_size, rng):
                net.train()
                value, _ = lm_loss(net(input_ids=batch["input_ids"]).logits, batch, loss, lm)
                value.backward()
                torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
                opt.step()
                opt.zero_grad(set_to_none=True)
        ev = evaluate_lm(net, held_ds, {"temperatures": [1.0]}, 8, torch.device("cpu"))
        fidelity[name] = {"perplexity": ev["perplexity"], "kl_to_teacher": ev["kl_to_teacher"],
                          "train_seconds": round(time.perf_counter() - t0, 1)}

    res = {"date": _dt.date.today().isoformat(), "machine": machine(), "pipeline": pipeline.name,
           "mode": "quick" if quick else "full", "command": f"kdcache bench {pipeline_name}" + (" --quick" if quick else ""),
           "vocab_size": V, "seq_len": L, "train_tokens": int(tokens), "held_out_tokens": int(held_seqs.size),
           "epochs": epochs, "teacher_tokens_per_s": tokens / teacher_s, "student": dataclasses.asdict(student),
           "storage_bytes_per_token": storage, "reconstruction_kl": recon_kl,
           "held_out_tail_mass": {str(k): float(np.exp(held_t[k]["tail"][..., 0]).mean()) for k in KS},
           "fidelity": fidelity}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"bench-lm-{res['mode']}.json").write_text(json.dumps(res, indent=1))
    text = render(res)
    print(text)
    if doc is not None:
        write_section(doc, f"bench:lm-{res['mode']}", text, f"## LM targets: storage against fidelity ({res['mode']} mode)",
                      "# Benchmarks\n")
    return res


def render(r: dict[str, Any]) -> str:
    k_max = max(KS)
    lines = [f"### {r['date']} — `{r['command']}`", "",
             f"Machine: {r['machine']}. Teacher vocabulary {r['vocab_size']:,}; {r['train_tokens']:,} training and "
             f"{r['held_out_tokens']:,} held-out tokens in {r['seq_len']}-token sequences; teacher at "
             f"{r['teacher_tokens_per_s']:.0f} tokens/s. Student: {r['student']['params']} trained {r['epochs']} "
             "epoch(s), same seed and batches for every row, α = 0.5, T = 1.", "",
             "Reconstruction KL: KL(teacher ‖ stored top-k probabilities + the tail mass spread evenly over the other "
             "ids) on held-out positions, nats. Student columns: held-out perplexity and KL(teacher ‖ student) over "
             "the top-128 ids + tail.", "",
             "| targets | bytes/token | held-out tail mass | reconstruction KL | student ppl | student KL | train s |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    fid, st = r["fidelity"], r["storage_bytes_per_token"]
    for k in KS:
        name = f"top-{k}"
        lines.append(f"| {name} + exact tail | {st[name]:.1f} | {r['held_out_tail_mass'][str(k)]:.4f} | "
                     f"{r['reconstruction_kl'][str(k)]:.4f} | "
                     f"{fid[name]['perplexity']:.1f} | {fid[name]['kl_to_teacher']:.4f} | {fid[name]['train_seconds']} |")
    sname = f"sampled ({SAMPLES} draws)"
    lines.append(f"| {sname} | {st[sname]:.1f} | – | – (an unbiased estimator, not a reconstruction) | "
                 f"{fid[sname]['perplexity']:.1f} | {fid[sname]['kl_to_teacher']:.4f} | {fid[sname]['train_seconds']} |")
    nname = f"naive top-{k_max} (tail dropped)"
    naive_bytes = next(v for key, v in st.items() if key.startswith("naive"))
    lines.append(f"| {nname} | {naive_bytes:.1f} | dropped | ∞ (the tail gets probability 0) | "
                 f"{fid[nname]['perplexity']:.1f} | {fid[nname]['kl_to_teacher']:.4f} | {fid[nname]['train_seconds']} |")
    ce = fid["next-token CE only"]
    lines.append(f"| next-token CE only | 0 | – | – | {ce['perplexity']:.1f} | {ce['kl_to_teacher']:.4f} | "
                 f"{ce['train_seconds']} |")
    lines.append("")
    return "\n".join(lines)


def id_layouts(cache: str, doc: Path | None, out_dir: Path, reps: int = 5) -> dict[str, Any]:
    """A causal-LM cache's own top-k ids stored two ways, side by side: int32 (what kdcache writes above 65,536
    ids) and packed to the fewest bits the vocabulary needs; Parquet (zstd) bytes per token and the time to read
    and decode them (median of `reps`), with a round-trip check."""
    from ..cache.format import pack_ids, unpack_ids
    from ..cache.reader import open_manifest, read_column
    m = open_manifest(cache)[2]
    lm = m["lm"]
    bits = max(1, int(lm["vocab_size"] - 1).bit_length())
    ids = np.stack([np.asarray(r, np.int64) for r in read_column(cache, "train", "topk_ids")])
    n, per_row = ids.shape
    tokens = n * lm["seq_len"]
    packed = [pack_ids(r, bits) for r in ids]
    width = len(packed[0])
    tables = {"int32": pa.table({"topk_ids": pa.FixedSizeListArray.from_arrays(pa.array(ids.ravel(), pa.int32()),
                                                                                 per_row)}),
              f"packed {bits}-bit": pa.table({"topk_ids": pa.array([p.tobytes() for p in packed],
                                                                    pa.binary(width))})}

    def decode(name: str, data: bytes) -> np.ndarray:
        col = pq.read_table(io.BytesIO(data)).column("topk_ids").combine_chunks()
        if name == "int32":
            return col.values.to_numpy().astype(np.int64).reshape(n, per_row)
        raw = np.frombuffer(col.buffers()[1], np.uint8)
        if per_row * bits % 8 == 0:  # rows end on byte boundaries: the column is one stream
            return unpack_ids(raw, n * per_row, bits).reshape(n, per_row)
        return np.stack([unpack_ids(r, per_row, bits) for r in raw.reshape(n, width)])

    rows = {}
    for name, table in tables.items():
        sink = io.BytesIO()
        pq.write_table(table, sink, compression="zstd")
        data = sink.getvalue()
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            got = decode(name, data)
            times.append(time.perf_counter() - t0)
        assert np.array_equal(got, ids), f"{name}: ids did not round-trip"
        rows[name] = {"bytes_per_token": len(data) / tokens, "read_decode_s": float(np.median(times)),
                      "tokens_per_s": tokens / float(np.median(times))}
    results = {"date": _dt.date.today().isoformat(), "machine": machine(), "cache": str(cache),
               "vocab_size": lm["vocab_size"], "top_k": lm["top_k"], "tokens": tokens, "bits": bits, "rows": rows}
    return _publish(results, out_dir, "id-layouts", render_id_layouts, doc)


def _publish(results: dict[str, Any], out_dir: Path, name: str, render, doc: Path | None) -> dict[str, Any]:
    """`<out_dir>/<name>.json`, the rendered table on stdout and, with `doc`, its `bench:<name>` section."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.json").write_text(json.dumps(results, indent=1))
    text = render(results)
    print(text)
    if doc is not None:
        write_section(doc, f"bench:{name}", text)
    return results


def render_id_layouts(r: dict[str, Any]) -> str:
    base = r["rows"]["int32"]
    lines = ["## Top-k id layouts above 65,536 ids: int32 against packed", "",
             f"`kdcache bench --id-layouts {r['cache']}` on {r['date']} ({r['machine']}): the cache's own training "
             f"top-{r['top_k']} ids ({r['tokens']} tokens, vocabulary {r['vocab_size']}: {r['bits']} bits each), "
             "written alone as Parquet (zstd) in each layout, then read and decoded to int64 (median of 5, "
             "round-trip checked).", "",
             "| layout | bytes / token (ids only) | vs int32 | read + decode, tokens/s | vs int32 |",
             "|---|---:|---:|---:|---:|"]
    for name, v in r["rows"].items():
        lines.append(f"| {name} | {v['bytes_per_token']:.1f} | {v['bytes_per_token'] / base['bytes_per_token']:.2f} | "
                     f"{v['tokens_per_s']:,.0f} | {v['tokens_per_s'] / base['tokens_per_s']:.2f} |")
    return "\n".join(lines + [""])


def column_costs(cache: str, doc: Path | None, out_dir: Path) -> dict[str, Any]:
    """What each column of a causal-LM cache costs, as written (compressed Parquet column chunks from the shards'
    footers), in bytes per token, per language and overall; with offsets, the side file (the teacher's vocabulary)
    too. Shows what the cross-tokenizer columns (`text`, `token_bytes`) add."""
    from ..cache.reader import open_manifest
    fs, root, m = open_manifest(cache)
    seq_len = m["lm"]["seq_len"]
    per: dict[str, dict[str, float]] = {}
    tokens: dict[str, int] = {}
    for split in m["splits"].values():
        for sh in split["shards"]:
            lang = sh.get("language") or "all"
            with fs.open(f"{root}/{sh['parquet']}", "rb") as f:
                meta = pq.ParquetFile(f).metadata
            for g in range(meta.num_row_groups):
                rg = meta.row_group(g)
                for c in range(rg.num_columns):
                    col = rg.column(c)
                    name = col.path_in_schema.split(".")[0]
                    per.setdefault(lang, {}).setdefault(name, 0)
                    per[lang][name] += col.total_compressed_size
            tokens[lang] = tokens.get(lang, 0) + sh["rows"] * seq_len
    total_tokens = sum(tokens.values())
    names = list(next(iter(per.values())))
    rows = {lang: {n: cols.get(n, 0) / tokens[lang] for n in names} for lang, cols in per.items()}
    if len(rows) > 1:
        rows["all"] = {n: sum(per[lang].get(n, 0) for lang in per) / total_tokens for n in names}
    results = {"date": _dt.date.today().isoformat(), "machine": machine(), "cache": str(cache), "tokens": tokens,
               "rows": rows, "files": {k: v["bytes"] for k, v in (m.get("files") or {}).items()},
               "vocab_size": m["lm"]["vocab_size"]}
    return _publish(results, out_dir, "columns", render_column_costs, doc)


def render_column_costs(r: dict[str, Any]) -> str:
    cols = [n for n in next(iter(r["rows"].values())) if n not in ("row_id", "id", "input_hash", "language")]
    lines = ["## What each column of an LM cache costs, per language", "",
             f"`kdcache bench --columns {r['cache']}` on {r['date']} ({r['machine']}): compressed Parquet bytes per "
             f"token of each column, from the shards' footers (all splits; vocabulary {r['vocab_size']:,}). "
             "`text` and `token_bytes` are what students with their own tokenizer need (docs/cross-tokenizer.md)"
             + (f"; the teacher's vocabulary as bytes adds {', '.join(f'{k} {v:,} B' for k, v in r['files'].items())}"
                " once per cache" if r["files"] else "") + ".", "",
             "| language | tokens | " + " | ".join(f"`{c}`" for c in cols) + " | all columns |",
             "|---|---:|" + "---:|" * (len(cols) + 1)]
    for lang, v in r["rows"].items():
        n = r["tokens"].get(lang, sum(r["tokens"].values()))
        lines.append(f"| {lang} | {n:,} | " + " | ".join(f"{v[c]:.2f}" for c in cols) + f" | {sum(v.values()):.1f} |")
    return "\n".join(lines + [""])
