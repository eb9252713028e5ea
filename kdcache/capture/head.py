"""What a teacher head supplies to stage one. The build loop (build.py) is the same for every head; a head says
how its teacher runs over a shard's rows and what of its output is kept. Heads are registered in heads.py."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import pyarrow as pa
import torch

from ..config import TaskConfig


class CaptureHead:
    """One teacher head in stage one (subclasses: classification.py, tokens.py, lm.py)."""

    name: str = ""
    auto_class: str = ""     # the transformers auto class that loads the teacher
    labelled: bool = True    # the head predicts label names (the teacher gets a head of that size)

    # -- what the shard loop walks and how the teacher runs over it
    def runner(self, model: torch.nn.Module, tokenizer: Any, task: TaskConfig, device: str) -> Any:
        raise NotImplementedError

    def units(self, data: Any, tokenizer: Any, task: TaskConfig) -> dict[str, Any]:
        """Per split, what shards slice: a `datasets.Dataset` of rows, or an array of packed sequences."""
        return dict(data.splits)

    def run(self, runner: Any, rows: Any, task: TaskConfig, seed: int, on_batch: Callable[[int], None]) -> Any:
        """The teacher's outputs for one shard's rows (`seed`: for any sampling, fixed per shard)."""
        raise NotImplementedError

    def merge_rows(self, parts: list[tuple[Any, Any]], rows: int) -> Any:
        """One output for `rows` rows from (row indices, output) pairs (out-of-fold capture, folds.py)."""
        raise NotImplementedError

    def table(self, rows: Any, out: Any, row_start: int, split: str, schema: pa.Schema,
              task: TaskConfig) -> pa.Table:
        raise NotImplementedError

    def stats(self, rows: Any, out: Any, label_names: Sequence[str]) -> dict[str, Any]:
        """Sums that add up across shards (so statistics survive resumes)."""
        raise NotImplementedError

    def summarise(self, stats: list[dict[str, Any]]) -> dict[str, Any]:
        raise NotImplementedError

    def shard_features(self, out: Any) -> dict[str, Any] | None:
        """Dense feature arrays for the shard's Zarr group, or None."""
        return None

    # -- what goes into the fingerprint and the manifest
    def text_stats(self, data: Any, tokenizer: Any, task: TaskConfig) -> dict[str, Any] | None:
        """Per split, {words, tokens, tokens_per_word} of the text the teacher reads, or None (heads whose shards
        keep no text say what the tokenizer made of it: fertility differs by language)."""
        return None

    def text_columns(self, task: TaskConfig) -> list[str]:
        """The input columns kept in every shard (the manifest's `text_fields`)."""
        return list(task.data.text_fields)

    def settings(self, task: TaskConfig, runner: Any, model: torch.nn.Module, tokenizer: Any) -> dict[str, Any]:
        """Head-specific fingerprint inputs (everything else that changes its targets)."""
        return {"max_length": task.cache.max_length}

    def features(self, task: TaskConfig, runner: Any) -> dict[str, Any] | None:
        """{layers, pooling, dtype} of the cached hidden features, or None."""
        layers = getattr(runner, "feature_layers", [])
        return {"layers": layers, "pooling": task.cache.features.pooling,
                "dtype": task.cache.features.dtype} if layers else None

    def files(self, task: TaskConfig, tokenizer: Any) -> dict[str, bytes]:
        """Side files for the cache root ({name: content}, e.g. the LM teacher's vocabulary), listed with their
        checksums in the manifest's `files`."""
        return {}

    def manifest_extras(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """Head-specific manifest fields besides the common header."""
        return {}

    def quality(self, summary: dict[str, Any]) -> tuple[str, float, str, float, float | None] | None:
        """For the teacher gate (sanity.py), from a split's summary: (metric, score, baseline name, baseline score,
        mean entropy in nats or None); None when the head has no baseline or the split no labels."""
        return None

    # -- fine-tuning a head onto a pretrained encoder (labelled heads)
    def labelled_rows(self, ds: Any) -> list[int]:
        """Indices of the rows of `ds` that `finetune_examples` keeps: they set the number of fine-tuning steps, and
        only they are in the teacher's fine-tune key."""
        raise NotImplementedError

    def finetune_examples(self, tokenizer: Any, ds: Any, task: TaskConfig) -> tuple[list[list[int]], list[Any]]:
        """(input ids, training target) per labelled row of `ds`."""
        raise NotImplementedError

    def finetune_loss(self, logits: torch.Tensor, targets: list[Any]) -> torch.Tensor:
        raise NotImplementedError

    def finetune_eval(self, model: torch.nn.Module, tokenizer: Any, ds: Any, task: TaskConfig,
                      label_names: Sequence[str]) -> dict[str, float]:
        """The fine-tuned teacher on `ds`, in the keys of `summarise` (so `quality` reads both)."""
        raise NotImplementedError
