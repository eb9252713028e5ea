"""What stage two reads for one task: its cached splits (the training split verified, checked against what the
pipeline expects, shuffled and shared between processes), its training head, and columns read once."""

from __future__ import annotations

from typing import Any

import torch

from .. import config as C
from ..cache.reader import CacheDataset, open_manifest
from ..cache.verify import refuse_damaged
from .head import Source
from .heads import HEADS


def expectation(pipeline: C.PipelineConfig, task: str) -> dict[str, Any]:
    """What a student of `task` expects of its cache: that task, its teacher's head and its data settings."""
    t = pipeline.tasks[task]
    return {"task": task, "head": t.teacher.head, "data": C.to_dict(t.data),
            # a data setting added after a cache was built counts as its default there (it behaved so then)
            "data_defaults": C.to_dict(C.DataConfig(source=t.data.source))}


def training_split(cache: str, pipeline: C.PipelineConfig, task: str, accelerator: Any,
                   feature_layers: tuple[int, ...] = (), languages: tuple[str, ...] | None = None,
                   transfer: tuple[str, ...] = (), split: str | None = None,
                   companions: tuple[str, ...] = (), labels: tuple[str, ...] = ()) -> CacheDataset:
    """The cached training split a trainer streams: a local cache verified first (`train.verify`), checked against
    what the pipeline expects of `task`, shuffled by `train.seed`, shared between the accelerate processes,
    (multilingual caches) of the chosen languages, mixed by `train.language_mixing`, and with the `transfer` splits
    (unlabelled rows) read as part of it. `split`: another training split than `train.train_split`; `companions`:
    other teachers' caches of the same rows, whose logits come with each row; `labels`: only rows of these classes."""
    train = pipeline.train
    if train.verify and accelerator.is_local_main_process and "://" not in str(cache):
        refuse_damaged(cache)
    accelerator.wait_for_everyone()
    return CacheDataset(cache, split or train.train_split, shuffle=True, seed=train.seed,
                        shuffle_buffer=train.shuffle_buffer,
                        feature_layers=feature_layers, expect=expectation(pipeline, task),
                        rank=accelerator.process_index, world_size=accelerator.num_processes, languages=languages,
                        mixing=train.language_mixing, extra_splits=transfer, companions=companions, labels=labels)


def _require_splits(cache: str, train: C.TrainConfig, transfer: tuple[str, ...], split: str | None) -> None:
    """Each split the training settings name is in the cache, or a message naming the key that picks it."""
    have = open_manifest(cache)[2]["splits"]
    missing = [s for s in (*transfer, *([split] if split else [])) if s not in have]
    if missing:
        raise C.ConfigError(f"{cache}: no cached split {', '.join(map(repr, missing))} for a student's `transfer` or "
                            f"`train_split` (the cache has {', '.join(have)}); give the task's data that split (e.g. "
                            "`data.augment` or `data.extra`) and rebuild the cache, or change the student's setting")
    for key in ("train_split", "eval_split", "test_split"):
        split = getattr(train, key)
        if split is not None and split not in have:
            raise C.ConfigError(
                f"{cache}: no cached split {split!r} for train.{key} (the cache has {', '.join(have)}); set "
                f"train.{key} to one of them (--set train.{key}=...), or give the data that split "
                "(`dev`/`valid` files count as `validation`; data.validation_fraction carves one from train) and "
                "rebuild the cache")


def open_source(pipeline: C.PipelineConfig, task: str, cache: str, accelerator: Any,
                feature_layers: tuple[int, ...] = (), languages: tuple[str, ...] | None = None,
                transfer: tuple[str, ...] = (), train_split: str | None = None,
                teachers: dict[str, tuple[str, float]] | None = None, labels: tuple[str, ...] = ()) -> Source:
    """One task's cache for a pass of the loop; `languages`: read (and evaluate) only these partitions; `transfer`:
    unlabelled splits trained on with the training split; `train_split`: a student's own training split; `teachers`:
    several teachers, task -> (its cache, weight), this task's among them; `labels`: train on rows of these classes."""
    train = pipeline.train
    _require_splits(cache, train, transfer, train_split)
    others = {t: c for t, (c, _) in (teachers or {}).items() if t != task}
    ds = training_split(cache, pipeline, task, accelerator, feature_layers, languages, transfer, train_split,
                        tuple(others.values()), labels)
    head = HEADS[ds.manifest["head"]]
    head.check_cache(ds.manifest, pipeline, task, cache)
    loader = torch.utils.data.DataLoader(ds, batch_size=train.batch_size, collate_fn=ds.collate,
                                         num_workers=train.num_workers, persistent_workers=False)
    def split(name: str) -> CacheDataset:
        return CacheDataset(cache, name, rank=0, world_size=1, languages=languages)
    weights = {t: teachers[t][1] for t in (task, *others)} if teachers else {}
    return Source(task, cache, head, ds, split(train.eval_split), split(train.test_split) if train.test_split else None,
                  loader, languages=languages, teachers={t: w / sum(weights.values()) for t, w in weights.items()})
