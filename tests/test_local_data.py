"""Bring-your-own data: every file format and compression reads the same rows, quoting can be turned off, split
names are mapped, and a missing validation split is carved from train without leakage."""

from __future__ import annotations

import bz2
import csv
import gzip
import io
import json
import logging
import lzma

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import require_shared_data
from kdcache.config import DataConfig
from kdcache.data import DataError, load_task_data

ROWS = [{"id": f"r{i}", "text": t, "label": lab} for i, (t, lab) in enumerate([
    ("plain words", "neg"), ('"quoted" at the start', "pos"), ("a, comma and\ttab-free text", "neg"),
    ("unicode: café – 東京", "pos"), ("it's \"inner\" quotes", "neg")])]


def _text(fmt: str) -> str:
    if fmt in ("csv", "tsv"):
        out = io.StringIO()
        w = csv.DictWriter(out, fieldnames=["id", "text", "label"], delimiter="\t" if fmt == "tsv" else ",",
                           lineterminator="\n")
        w.writeheader()
        w.writerows(ROWS)
        return out.getvalue()
    if fmt == "jsonl":
        return "".join(json.dumps(r) + "\n" for r in ROWS)
    return json.dumps(ROWS)


def _write(path, data: bytes, compression: str | None) -> None:
    if compression is None:
        path.write_bytes(data)
    elif compression in ("gzip", "bz2", "xz"):
        path.write_bytes({"gzip": gzip.compress, "bz2": bz2.compress, "xz": lzma.compress}[compression](data))
    else:
        with pa.output_stream(str(path), compression=compression) as f:
            f.write(data)


@pytest.mark.parametrize("fmt", ["csv", "tsv", "json", "jsonl"])
@pytest.mark.parametrize("ext,compression", [("", None), (".gz", "gzip"), (".bz2", "bz2"), (".xz", "xz"),
                                             (".zst", "zstd")])
def test_every_text_format_and_compression_reads_the_same_rows(tmp_path, fmt, ext, compression):
    path = tmp_path / f"train.{fmt}{ext}"
    _write(path, _text(fmt).encode(), compression)
    data = load_task_data(DataConfig(source="files", files={"train": str(path)}, id_field="id",
                                     label_names=("neg", "pos"), validation_fraction=0))
    ds = data.splits["train"]
    assert ds["id"][:] == [r["id"] for r in ROWS]
    assert ds["text"][:] == [r["text"] for r in ROWS], "every character kept"
    assert ds["label"][:] == [("neg", "pos").index(r["label"]) for r in ROWS]


def test_parquet_reads_the_same_rows_and_label_ids_from_text_are_numbers(tmp_path):
    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "train.parquet")
    ds = load_task_data(DataConfig(source="files", files={"train": str(tmp_path / "train.parquet")},
                                   label_names=("neg", "pos"), validation_fraction=0)).splits["train"]
    assert ds["text"][:] == [r["text"] for r in ROWS]
    ids = tmp_path / "ids.csv"  # integer label ids in a text file arrive as text; a blank cell is unlabelled
    ids.write_text("text,label\na,1\nb,0\nc,\n")
    ds = load_task_data(DataConfig(source="files", files={"train": str(ids)}, label_names=("neg", "pos"),
                                   validation_fraction=0)).splits["train"]
    assert ds["label"][:] == [1, 0, -1]


def test_quoting_off_keeps_every_character_and_a_bad_row_is_named(tmp_path):
    path = tmp_path / "train.tsv"
    texts = ['"Quoted" start, then more', 'ends with a quote"', '""double""', "plain"]
    path.write_text("text\tlabel\n" + "".join(f"{t}\t{i % 2}\n" for i, t in enumerate(texts)))
    cfg = dict(source="files", files={"train": str(path)}, label_names=("a", "b"), validation_fraction=0)
    assert load_task_data(DataConfig(**cfg, quoting="none")).splits["train"]["text"][:] == texts
    with pytest.raises(DataError, match=r"train\.tsv: line 2: .* data\.quoting: none"):
        load_task_data(DataConfig(**cfg))  # csv quoting would change such texts: it says so instead
    path.write_text("text\tlabel\nfine\t0\ntoo\tmany\tfields\n")
    with pytest.raises(DataError, match=r"train\.tsv: line 3 has 3 fields, the header 2; check data\.delimiter"):
        load_task_data(DataConfig(**cfg, quoting="none"))
    (tmp_path / "x.txt.gz").write_bytes(gzip.compress(b"a"))
    with pytest.raises(DataError, match=r"x\.txt\.gz: unsupported file type '\.txt\.gz'"):
        load_task_data(DataConfig(source="files", files={"train": str(tmp_path / "x.txt.gz")}, label_names=("a",)))


def test_sib200_read_with_quoting_off_matches_the_raw_lines():
    """The data's own notes prescribe quoting off: 79 texts begin with a quote that default csv reading drops."""
    path = require_shared_data("sib200") / "eng_Latn" / "train.tsv.gz"
    raw = [line.rstrip("\n").split("\t") for line in gzip.open(path, "rt", encoding="utf-8")][1:]
    ds = load_task_data(DataConfig(source="files", files={"train": str(path)}, label_field="category",
                                   id_field="index_id", quoting="none", validation_fraction=0,
                                   label_names=("science/technology", "travel", "politics", "sports", "health",
                                                "entertainment", "geography"))).splits["train"]
    assert ds["text"][:] == [r[2] for r in raw] and len(raw) == 701
    assert sum(t.startswith('"') for t in ds["text"][:]) > 0


def test_dev_means_validation_and_a_missing_validation_split_is_carved_by_group(tmp_path, caplog):
    rows = [{"text": f"row {i}", "label": i % 2, "author": f"a{i // 4}"} for i in range(400)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "dev.jsonl").write_text(json.dumps(rows[0]) + "\n")
    both = load_task_data(DataConfig(source="files", files={"train": str(tmp_path / "train.jsonl"),
                                                            "dev": str(tmp_path / "dev.jsonl")}, label_names=("a", "b")))
    assert set(both.splits) == {"train", "validation"} and len(both.splits["validation"]) == 1
    assert len(both.splits["train"]) == 400, "nothing carved when the data has a validation split"

    cfg = DataConfig(source="files", files={"train": str(tmp_path / "train.jsonl")}, label_names=("a", "b"),
                     group_field="author", validation_fraction=0.2)
    with caplog.at_level(logging.INFO, logger="kdcache.data"):
        carved = load_task_data(cfg)
    train, val = carved.splits["train"], carved.splits["validation"]
    assert len(train) + len(val) == 400 and 40 <= len(val) <= 120
    assert "carved" in caplog.text and "data.validation_fraction" in caplog.text
    by_text = {r["text"]: r["author"] for r in rows}
    authors = lambda ds: {by_text[t] for t in ds["text"][:]}  # noqa: E731
    assert not authors(train) & authors(val), "an author's rows never straddle train and validation"
    assert all(len([r for r in rows if r["author"] == a]) == 4 for a in authors(val)), "whole groups move"
    assert load_task_data(cfg).splits["validation"]["text"][:] == val["text"][:], "the same carve on a rerun"
    off = load_task_data(DataConfig(source="files", files={"train": str(tmp_path / "train.jsonl")},
                                    label_names=("a", "b"), validation_fraction=0))
    assert set(off.splits) == {"train"}
    with pytest.raises(DataError, match=r"column `writer` not found .* data\.group_field"):
        load_task_data(DataConfig(source="files", files={"train": str(tmp_path / "train.jsonl")},
                                  label_names=("a", "b"), group_field="writer"))
