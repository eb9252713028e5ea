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
                   feature_layers: tuple[int, ...] = (), languages: tuple[str, ...] | None = None) -> CacheDataset:
    """The cached training split a trainer streams: a local cache verified first (`train.verify`), checked against
    what the pipeline expects of `task`, shuffled by `train.seed`, shared between the accelerate processes, and
    (multilingual caches) of the chosen languages, mixed by `train.language_mixing`."""
    train = pipeline.train
    if train.verify and accelerator.is_local_main_process and "://" not in str(cache):
        refuse_damaged(cache)
    accelerator.wait_for_everyone()
    return CacheDataset(cache, train.train_split, shuffle=True, seed=train.seed, shuffle_buffer=train.shuffle_buffer,
                        feature_layers=feature_layers, expect=expectation(pipeline, task),
                        rank=accelerator.process_index, world_size=accelerator.num_processes, languages=languages,
                        mixing=train.language_mixing)


def _require_splits(cache: str, train: C.TrainConfig) -> None:
    """Each split the training settings name is in the cache, or a message naming the key that picks it."""
    have = open_manifest(cache)[2]["splits"]
    for key in ("train_split", "eval_split", "test_split"):
        split = getattr(train, key)
        if split is not None and split not in have:
            raise C.ConfigError(
                f"{cache}: no cached split {split!r} for train.{key} (the cache has {', '.join(have)}); set "
                f"train.{key} to one of them (--set train.{key}=...), or give the data that split "
                "(`dev`/`valid` files count as `validation`; data.validation_fraction carves one from train) and "
                "rebuild the cache")


def open_source(pipeline: C.PipelineConfig, task: str, cache: str, accelerator: Any,
                feature_layers: tuple[int, ...] = (), languages: tuple[str, ...] | None = None) -> Source:
    """One task's cache for a pass of the loop; `languages`: read (and evaluate) only these partitions."""
    train = pipeline.train
    _require_splits(cache, train)
    ds = training_split(cache, pipeline, task, accelerator, feature_layers, languages)
    head = HEADS[ds.manifest["head"]]
    head.check_cache(ds.manifest, pipeline, task, cache)
    loader = torch.utils.data.DataLoader(ds, batch_size=train.batch_size, collate_fn=ds.collate,
                                         num_workers=train.num_workers, persistent_workers=False)
    def split(name: str) -> CacheDataset:
        return CacheDataset(cache, name, rank=0, world_size=1, languages=languages)
    return Source(task, cache, head, ds, split(train.eval_split), split(train.test_split) if train.test_split else None,
                  loader, languages=languages)
