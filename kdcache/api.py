"""The public Python API (docs/api.md): open a cached split as a streaming dataset, batch it, read a column and
apply the KD losses, from a plain PyTorch loop or a Hugging Face `Trainer`; no pipeline file, no CLI. The names
kdcache exports are listed once, in kdcache/__init__.py (which imports this module on first use)."""

from __future__ import annotations

from typing import Any

from .cache.format import MANIFEST, CacheFormatError
from .cache.reader import CacheDataset, collate, open_manifest, read_column as _read_column
from .train.losses import (SampledTargets, TopKTargets, dense_kd_loss_per_row, distillation_loss, feature_loss,
                           kd_loss_per_row)



def find_cache(path: str, task: str | None = None) -> str:
    """The cache of one task: `path` itself when it is a task's cache, else its sub-folder `task` (a pipeline's
    cache folder, e.g. data/cache/default), or its only task. Local folders and fsspec URLs (s3://...) alike."""
    import fsspec
    path = str(path).rstrip("/")
    fs, root = fsspec.core.url_to_fs(path)
    if fs.isfile(f"{root}/{MANIFEST}"):
        if task is not None and root.rstrip("/").rsplit("/", 1)[-1] != task:
            _, _, m = open_manifest(path)
            if m["task"] != task:
                raise CacheFormatError(f"{path}: a cache of task {m['task']!r}, not {task!r}")
        return path
    if not fs.isdir(root):
        raise CacheFormatError(f"{path}: no such cache folder; build it with `kdcache cache <pipeline>`")
    tasks = sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)
                   if fs.isfile(f"{p.rstrip('/')}/{MANIFEST}"))
    if not tasks:
        raise CacheFormatError(f"{path}: no finished kdcache cache here (no {MANIFEST} in it or in its sub-folders)")
    if task is None and len(tasks) > 1:
        raise CacheFormatError(f"{path} holds the caches of several tasks ({', '.join(tasks)}); pass task=...")
    chosen = task or tasks[0]
    if chosen not in tasks:
        raise CacheFormatError(f"{path}: no cache of task {chosen!r} (tasks here: {', '.join(tasks)})")
    return f"{path}/{chosen}"


def open_split(path: str, split: str = "train", *, task: str | None = None, shuffle: bool = True, seed: int = 0,
               shuffle_buffer: int = 2048, feature_layers: tuple[int, ...] = (), rank: int | None = None,
               world_size: int | None = None, languages: tuple[str, ...] | None = None,
               mixing: str = "proportional", generation: int | None = None) -> CacheDataset:
    """A streaming `torch` dataset of one cached split, shuffled by default (pass shuffle=False to evaluate).
    Call `ds.set_epoch(e)` at the start of each epoch for a new order; batch with `ds.collate` (or `collate`).
    Under `accelerate`/`torchrun` each process reads its own share of row groups (rank/world_size default to
    the running process group). Multilingual caches: `languages` reads only those partitions; `mixing` is each
    language's share of an epoch (`proportional`, `uniform` or `temperature:T`). A grown cache: `generation` reads
    it as it was then (`kdcache info` lists the generations)."""
    return CacheDataset(find_cache(path, task), split, shuffle=shuffle, seed=seed, shuffle_buffer=shuffle_buffer,
                        feature_layers=tuple(feature_layers), rank=rank, world_size=world_size,
                        languages=tuple(languages) if languages else None, mixing=mixing, generation=generation)


def read_column(path: str, split: str, column: str, *, task: str | None = None,
                languages: tuple[str, ...] | None = None) -> list[Any]:
    """One column of a cached split, in row order (e.g. the texts, to build a student's vocabulary); with
    `languages`, of those languages only."""
    return _read_column(find_cache(path, task), split, column, tuple(languages) if languages else None)


def manifest(path: str, *, task: str | None = None) -> dict[str, Any]:
    """The checked manifest of a cache: labels, splits, statistics, teacher fingerprint (docs/cache-format.md)."""
    return open_manifest(find_cache(path, task))[2]


def lm_distillation_loss(student_logits: Any, batch: dict[str, Any], cache_manifest: dict[str, Any], *,
                         temperature: float = 1.0, alpha: float = 0.5, targets: str = "topk") -> tuple[Any, dict]:
    """α·next-token CE + (1-α)·KD (top-k + exact tail, or `targets="sampled"`) of a causal-LM student on a batch of
    an LM cache (`ds.collate`), with T² scaling and the student normalised over its whole vocabulary; `student_logits`
    [B, L, V] for the batch's `input_ids`. A chat cache's batch counts its response positions only; a packed one,
    every position. `temperature` must be one the cache stores (`manifest["lm"]["temperatures"]`). Returns
    (loss, {"ce": ..., "kd": ...})."""
    from .train.lm_losses import LossTerms, chat_loss, lm_loss
    loss = LossTerms(temperature=temperature, alpha=alpha, targets=targets)
    lm = cache_manifest["lm"]
    if alpha < 1.0 and targets != "sampled" and temperature not in lm["temperatures"]:
        raise ValueError(f"temperature {temperature} is not cached (the cache has {lm['temperatures']}): the exact "
                         "tail exists only at the temperatures the teacher pass stored")
    return (chat_loss if "target_index" in batch else lm_loss)(student_logits, batch, loss, lm)
