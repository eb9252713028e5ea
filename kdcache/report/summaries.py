"""The one-line summaries the CLI prints: a cache split (`kdcache cache`, `kdcache info`) and a finished run
(`kdcache train`), by head (kdcache/report/heads.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .. import heads
from .heads import presenter
from .tables import CROSS, fmt


def cache_summary(root: Path, manifest: dict[str, Any]) -> list[str]:
    """What `kdcache cache` prints per split of a finished cache."""
    return [f"{root}: {split}: {s['rows']} rows in {len(s['shards'])} shard(s)"
            + presenter(manifest["head"]).split_summary(s["stats"]) for split, s in manifest["splits"].items()]


def info_lines(i: dict[str, Any]) -> list[str]:
    """What `kdcache info` prints for one cache (`cache.verify.cache_info`)."""
    t = i["teacher"]
    out = [f"{i['cache']}  task={i['task']}  head={i['head']}  format v{i['format_version']}",
           f"  teacher      {t['name']} ({t['class']}, weights {t['weights_sha256'][:12]})",
           f"  fingerprint  {i['fingerprint']}"]
    if i.get("lm"):
        lm = i["lm"]
        out.append(f"  targets      top-{lm['top_k']} of {lm['vocab_size']} ({lm['id_dtype']} ids, float16 logits), "
                   f"lse + exact tail at T={lm['temperatures']}, {lm['samples']} samples/position, "
                   f"{lm['seq_len']} tokens/row")
    else:
        out.append(f"  labels       {', '.join(i['labels'])}")
    if i["features"]:
        f = i["features"]
        out.append(f"  features     layers {f['layers']} pooled {f['pooling']} as {f['dtype']} (hidden {f['hidden_size']})")
    out.append(f"  total        {i['rows']} rows, {i['bytes'] / 1e6:.2f} MB, {i['bytes_per_example']} B/example")
    c = i.get("capture")
    if c and c.get("seconds"):
        rate = c["rows"] / c["seconds"]
        tokens = f", {rate * i['lm']['seq_len']:,.0f} tokens/s" if i.get("lm") else ""
        out.append(f"  capture      {c['rows']} rows in {c['seconds']:.1f} s ({rate:.{0 if rate >= 10 else 2}f} rows/s"
                   f"{tokens}, everything included) on {i['device']} x {i['processes']} process(es), last run")
    for g in i.get("generations") or []:  # a grown cache: rows per split as of each generation
        rows = ", ".join(f"{split} {v['rows']}" for split, v in g["splits"].items())
        out.append(f"  generation {g['generation']}  {rows}  ({g.get('created_at') or 'before growing'})")
    for split, s in i["splits"].items():
        out.append(f"  {split:<12} {s['rows']:>8} rows {s['shards']:>3} shards {presenter(i['head']).split_info(s)}")
        for code, lang in (s.get("languages") or {}).items():
            out.append(f"    {code:<10} {lang['rows']:>8} rows {lang['shards']:>3} shards {presenter(i['head']).split_info(lang)}")
    return out


def run_summary(r: dict[str, Any]) -> str:
    """What `kdcache train` prints for one finished run."""
    head, test = r.get("head", heads.DEFAULT_HEAD), r.get("test", {})
    metrics = cross_summary(test) if head == CROSS else presenter(head).run_summary(test)
    return f"{r['run']:<24} {metrics}  {r['parameters']:,} params  {r['train_seconds']:.1f} s"


def cross_summary(t: dict[str, Any]) -> str:
    """A cross-task run's test metric per task."""
    return "  ".join(f"{task} {'entity F1' if 'f1' in m else 'test acc'} {fmt(m.get('f1', m.get('accuracy')))}"
                     for task, m in t.items())
