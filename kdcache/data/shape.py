"""Shaping a source's splits into a task's: normalised columns and labels, standard split names, a validation split
carved from train when there is none, label names inferred from the training split."""

from __future__ import annotations

import logging

import datasets

from ..config import DataConfig
from .task import DataError, stable_bucket

log = logging.getLogger(__name__)


def _normalise(ds: datasets.Dataset, split: str, cfg: DataConfig, label_names: tuple[str, ...],
               origin: str, id_field: str | None) -> datasets.Dataset:
    """Check the columns and labels and return Dataset(id, <text fields>, label) in source order."""
    where = f"{origin} split `{split}`"
    if len(ds) == 0:
        raise DataError(f"{where}: no rows; check the file or the split mapping (data.splits)")
    cols = set(ds.column_names)
    chat = cfg.chat  # chat rows: their conversation columns are kept, and text fields only where present
    text_fields = [c for c in cfg.text_fields if c in cols] if chat is not None else list(cfg.text_fields)
    for c in text_fields + ([cfg.label_field] if cfg.label_field else []) + \
            ([id_field] if id_field else []):
        if c not in cols:
            raise DataError(f"{where}: column `{c}` not found (columns: {', '.join(sorted(cols))}); "
                            "set data.text_fields / data.label_field / data.id_field")
    ids = [str(x) for x in ds[id_field][:]] if id_field else [f"{split}-{i}" for i in range(len(ds))]
    if len(set(ids)) != len(ids):
        raise DataError(f"{where}: example ids in column `{id_field}` are not unique (data.id_field)")
    out = {"id": ids}
    if chat is not None:
        for c in dict.fromkeys((chat.messages, chat.prompt, chat.response, chat.system)):
            if c and c in cols and c not in text_fields:
                out[c] = ds[c][:]
    for c in text_fields:
        texts = ds[c][:]
        for i, t in enumerate(texts):
            if not isinstance(t, str) or not t.strip():
                raise DataError(f"{where}: row {i} (id {ids[i]}) has empty or non-text `{c}` ({t!r}); "
                                "drop or fill such rows before caching")
        out[c] = texts
    if cfg.label_field:
        raw = ds[cfg.label_field][:]
        if cfg.label_map:  # another source's label names: renamed, or their rows dropped (null)
            keep = [i for i, y in enumerate(raw) if not (isinstance(y, str) and y in cfg.label_map
                                                         and cfg.label_map[y] is None)]
            raw = [cfg.label_map.get(raw[i], raw[i]) if isinstance(raw[i], str) else raw[i] for i in keep]
            out = {k: [v[i] for i in keep] for k, v in out.items()}
            ids = out["id"]
            if not raw:
                raise DataError(f"{where}: data.label_map drops every row; map at least one label to a name")
        labels = []
        for i, y in enumerate(raw):
            if isinstance(y, str) and y not in label_names:  # text files: label ids arrive as text, blank = none
                y = None if not y.strip() else int(y) if y.strip().lstrip("-").isdigit() else y
            if isinstance(y, float):
                raise DataError(f"{where}: row {i} (id {ids[i]}) label {y!r} is a float in column "
                                f"`{cfg.label_field}`: labels are names or integer ids; write them as integers or "
                                "names (an unlabelled row: leave the label blank or null, not NaN)")
            if y is None or (isinstance(y, int) and y < 0):
                labels.append(-1)
            elif isinstance(y, str):
                if y not in label_names:
                    raise DataError(f"{where}: row {i} (id {ids[i]}) label {y!r} is not one of "
                                    f"{list(label_names)} (data.label_names)")
                labels.append(label_names.index(y))
            elif isinstance(y, int) and not isinstance(y, bool) and y < len(label_names):
                labels.append(y)
            else:
                raise DataError(f"{where}: row {i} (id {ids[i]}) label {y!r} is outside the label set "
                                f"0..{len(label_names) - 1} {list(label_names)} (data.label_names)")
        out["label"] = labels
    else:
        out["label"] = [-1] * len(ds)
    return datasets.Dataset.from_dict(out)


SPLIT_ALIASES = {"dev": "validation", "valid": "validation", "val": "validation", "development": "validation"}


def canonical_splits(splits: dict[str, datasets.Dataset]) -> dict[str, datasets.Dataset]:
    """`dev`, `valid`, `val` are called `validation` (unless the source also has a `validation`)."""
    out = {}
    for name, ds in splits.items():
        canon = SPLIT_ALIASES.get(name.lower(), name)
        out[name if canon != name and canon in splits else canon] = ds
    return out


def carve_validation(splits: dict[str, datasets.Dataset], cfg: DataConfig, origin: str,
                     id_field: str | None) -> dict[str, datasets.Dataset]:
    """A `validation` split carved from `train` when the source has none: rows whose key (`group_field`, else the
    id, else the row index) hashes below `validation_fraction`, so a group never straddles the two and reruns agree."""
    if "validation" in splits or "train" not in splits or cfg.validation_fraction == 0:
        return splits
    train = splits["train"]
    key_field = cfg.group_field or id_field
    if key_field and key_field not in train.column_names:
        raise DataError(f"{origin} split `train`: column `{key_field}` not found for carving a validation split "
                        f"(columns: {', '.join(train.column_names)}); set data.group_field or data.id_field")
    keys = [str(k) for k in train[key_field][:]] if key_field else [str(i) for i in range(len(train))]
    cut = cfg.validation_fraction * 10_000
    held = [i for i, k in enumerate(keys) if stable_bucket(k, "kdcache-validation", 10_000) < cut]
    if not held or len(held) == len(keys):
        log.warning("%s: no validation split, and %d training rows are too few to carve one (data.validation_fraction"
                    " %s); give the data a `validation` split", origin, len(keys), cfg.validation_fraction)
        return splits
    held_set = set(held)
    log.info("%s: no validation split; carved %d of %d training rows (data.validation_fraction %s, by %s) into "
             "`validation`; set data.validation_fraction=0 to turn this off", origin, len(held), len(keys),
             cfg.validation_fraction, f"column `{key_field}`" if key_field else "row index")
    return {**splits, "train": train.select([i for i in range(len(keys)) if i not in held_set]),
            "validation": train.select(held)}




def infer_label_names(splits: dict[str, datasets.Dataset], field: str, origin: str) -> tuple[str, ...]:
    """Label names read from the whole `train` split when `data.label_names` is not given: integer ids 0..max as
    "0", "1", ... (their own order), otherwise the distinct names sorted, so every run and row order agrees.
    Blank, null and negative labels are unlabelled rows."""
    if "train" not in splits or field not in splits["train"].column_names:
        raise DataError(f"{origin}: label names unknown and no `train` split with column `{field}` to infer them "
                        "from; list them in data.label_names")
    seen = [y for y in splits["train"][field][:]
            if y is not None and not (isinstance(y, str) and not y.strip()) and not (isinstance(y, int) and y < 0)]
    ids = [y for y in seen if isinstance(y, int) and not isinstance(y, bool)
           or isinstance(y, str) and y.strip().isdigit()]
    if not seen:
        raise DataError(f"{origin} split `train`: no labelled rows in column `{field}` to infer the label names "
                        "from; list them in data.label_names")
    floats = [y for y in seen if isinstance(y, float)]
    if floats:
        raise DataError(f"{origin} split `train`: column `{field}` holds floats ({floats[0]!r}): labels are names or "
                        "integer ids; write them as integers or names (an unlabelled row: blank or null, not NaN)")
    if len(ids) == len(seen):
        names = tuple(str(i) for i in range(max(int(y) for y in ids) + 1))
    elif not ids and all(isinstance(y, str) for y in seen):
        names = tuple(sorted(set(seen)))
    else:
        odd = next(y for y in seen if not isinstance(y, str) or y.strip().isdigit())
        raise DataError(f"{origin} split `train`: column `{field}` mixes label names and other values ({odd!r}); "
                        "labels are names or integer ids: list the names in data.label_names")
    log.info("%s: label names inferred from split `train` (%s): %s; set data.label_names to choose another order",
             origin, "integer ids" if ids else "sorted", list(names))
    return names

