"""`load_task_data`: a task's rows from its source, selected, checked and normalised (every split with columns `id`,
the text field(s) and `label`, -1 when unlabelled), with extra splits, class filters and an augmented transfer set."""

from __future__ import annotations

import logging

import datasets

from ..config import DataConfig
from .shape import _normalise, canonical_splits, carve_validation, infer_label_names
from .sources import SOURCES, TOKEN_SOURCES, shared_data_root
from .task import DataError, TaskData, of_classes

log = logging.getLogger(__name__)


def _multilingual(cfg: DataConfig) -> TaskData:
    """Each language loaded with its own settings, then one Dataset per split: rows grouped by language in config
    order, a `language` column, and ids `<code>/<id>` (parallel corpora share ids across languages)."""
    parts = {code: load_task_data(cfg.language(code)) for code in cfg.languages}
    first, names = next(iter(parts)), next(iter(parts.values())).label_names
    for code, d in parts.items():
        if d.label_names != names:
            raise DataError(f"data.languages.{code} ({d.origin}): label names {list(d.label_names)} differ from "
                            f"those of `{first}` {list(names)}; every language of a task needs the same labels "
                            "(set data.label_names)")
    splits: dict[str, list[datasets.Dataset]] = {}
    for code, d in parts.items():
        for split, ds in d.splits.items():
            for col in ("id", "parent") if "parent" in ds.column_names else ("id",):  # parent: augmented rows
                prefixed = [f"{code}/{i}" for i in ds[col][:]]
                ds = ds.remove_columns(col).add_column(col, prefixed)
            ds = ds.add_column("language", [code] * len(ds))
            splits.setdefault(split, []).append(ds)
    return TaskData({split: datasets.concatenate_datasets(p) for split, p in splits.items()}, names,
                    "; ".join(f"{code}: {d.origin}" for code, d in parts.items()), "id", tuple(parts))


def load_task_data(cfg: DataConfig) -> TaskData:
    """Load, select, check and normalise a task's splits (see module docstring)."""
    if cfg.languages:
        return _multilingual(cfg)
    if cfg.source not in SOURCES:
        raise DataError(f"unknown data.source {cfg.source!r}; one of: {', '.join(SOURCES)}")
    raw = SOURCES[cfg.source](cfg)
    label_names = tuple(cfg.label_names) or raw.label_names
    if cfg.source in TOKEN_SOURCES:  # already checked and normalised by the reader
        out = {split: ds.select(range(min(cfg.limit, len(ds)))) if cfg.limit is not None else ds
               for split, ds in raw.splits.items()}
        if "train" in out and cfg.labelled_limit is not None:  # tag -1 = word without a gold tag
            tags = [t if i < cfg.labelled_limit else [-1] * len(t) for i, t in enumerate(out["train"]["tags"][:])]
            out["train"] = out["train"].remove_columns("tags").add_column("tags", tags)
        return TaskData(out, label_names, raw.origin, "id")
    selected = raw.splits
    if cfg.splits and cfg.source != "hub":
        missing = [src for src in cfg.splits.values() if src not in raw.splits]
        if missing:
            raise DataError(f"{raw.origin}: split(s) {missing} not found; available: {sorted(raw.splits)} "
                            "(data.splits)")
        selected = {s: raw.splits[src] for s, src in cfg.splits.items()}
    elif not cfg.splits:
        selected = canonical_splits(selected)
    if cfg.label_field and not label_names:
        label_names = infer_label_names(selected, cfg.label_field, raw.origin)
    selected = carve_validation(selected, cfg, raw.origin, cfg.id_field or raw.id_field)
    out = {}
    for split, ds in selected.items():
        if cfg.limit is not None:
            ds = ds.select(range(min(cfg.limit, len(ds))))
        out[split] = _normalise(ds, split, cfg, label_names, raw.origin, cfg.id_field or raw.id_field)
        if split == "train" and cfg.labelled_limit is not None:
            labels = out[split]["label"][:]
            out[split] = out[split].remove_columns("label").add_column(
                "label", labels[:cfg.labelled_limit] + [-1] * max(0, len(labels) - cfg.labelled_limit))
    origin = raw.origin
    for name in cfg.extra:
        if name in out:
            raise DataError(f"{raw.origin}: data.extra.{name}: the data already has a split {name!r}; name it "
                            "otherwise")
        out[name], where = _extra_split(cfg, name, label_names)
        origin += f", {where}"
    if cfg.labels:
        out = {split: of_classes(ds, cfg.labels, label_names, f"{raw.origin}: data.labels")
               for split, ds in out.items()}
    if cfg.augment is not None:
        out[cfg.augment.into] = _transfer_set(out, cfg, raw.origin)
    return TaskData(out, label_names, origin, "id")




def _extra_split(cfg: DataConfig, name: str, label_names: tuple[str, ...]) -> tuple[datasets.Dataset, str]:
    """Split `name` of `data.extra`: one split of another source, its ids `<name>/<id>`, its labels checked to be
    the task's (a teacher's label ids mean the task's names)."""
    sub, split = cfg.extra_source(name)
    d = load_task_data(sub)
    if split not in d.splits:
        raise DataError(f"{d.origin}: data.extra.{name}.split {split!r} is not a split of that source (splits: "
                        f"{', '.join(d.splits)})")
    if sub.label_field and d.label_names != label_names:
        raise DataError(f"{d.origin}: data.extra.{name} has labels {list(d.label_names)}, the task "
                        f"{list(label_names)}; give data.extra.{name}.label_names in the task's order (e.g. "
                        "`[negative, positive]` for fresh/rotten reviews) or `label_field: null` for unlabelled text")
    ds = d.splits[split]
    return ds.remove_columns("id").add_column("id", [f"{name}/{i}" for i in ds["id"][:]]), d.origin


def _transfer_set(splits: dict[str, datasets.Dataset], cfg: DataConfig, origin: str) -> datasets.Dataset:
    """The augmented variants of `cfg.augment.split` (augment.py), a split of their own."""
    from .augment import augment_split
    a = cfg.augment
    if a.split not in splits:
        raise DataError(f"{origin}: data.augment.split {a.split!r} is not a split of this data "
                        f"(splits: {', '.join(splits)})")
    if a.into in splits:
        raise DataError(f"{origin}: data.augment.into {a.into!r} is already a split of this data; name another one")
    lexicon = a.pos_lexicon or str(shared_data_root() / "conll2003" / "train.txt.gz")
    ds, stats = augment_split(splits[a.split], cfg.text_fields[0], a, lexicon)
    log.info("%s: augmented split `%s` (%d rows) into `%s`: %d variants (%.1f per row); the lexicon tags %.0f%% of "
             "its words", origin, a.split, stats.parents, a.into, stats.variants, stats.variants / max(1, stats.parents),
             100 * stats.pos_coverage)
    return ds
