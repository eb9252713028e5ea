"""Source `files`: a user's own csv/tsv/json/jsonl/parquet files per split, text formats optionally compressed."""

from __future__ import annotations

import csv
import io
import json
import lzma
from pathlib import Path
from typing import BinaryIO, Iterator

import datasets
import pyarrow as pa
import pyarrow.parquet as pq

from ..config import DataConfig
from .task import DataError, TaskData


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


