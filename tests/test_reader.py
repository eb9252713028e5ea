"""The streaming reader: every row exactly once per epoch across workers and processes, seeded order, bounded
memory, fsspec URLs, and refusal of a cache built for other data."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from kdcache.experiments import bench
from kdcache.cache.format import CacheFormatError
from kdcache.cache.reader import CacheDataset, CacheMismatchError, collate


def synthetic_cache(root, rows: int, text_len: int = 200):
    """A real cache written by the real CacheWriter, with random logits instead of a teacher's."""
    return bench.synthetic_cache(root, rows, shard_rows=500, row_group_rows=100, text_len=text_len, num_labels=3)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return synthetic_cache(tmp_path_factory.mktemp("syn") / "c", rows=1730)


def epoch_ids(cache, epoch, seed=0, ranks=2, workers=2, buffer=64):
    """row_ids seen by every (rank, DataLoader worker) in one epoch, in the order each rank saw them."""
    seen = []
    for rank in range(ranks):
        ds = CacheDataset(cache, "train", shuffle=True, seed=seed, shuffle_buffer=buffer, rank=rank, world_size=ranks)
        ds.set_epoch(epoch)
        loader = torch.utils.data.DataLoader(ds, batch_size=32, num_workers=workers, collate_fn=collate)
        seen.append([int(i) for b in loader for i in b["row_id"]])
    return seen


def test_every_row_exactly_once_across_2_workers_x_2_processes(cache):
    per_rank = epoch_ids(cache, epoch=0)
    flat = [i for r in per_rank for i in r]
    assert sorted(flat) == list(range(1730)), "each row exactly once per epoch"
    assert set(per_rank[0]).isdisjoint(per_rank[1]) and min(map(len, per_rank)) > 700


def test_order_changes_per_epoch_and_repeats_per_seed(cache):
    e0, e1 = epoch_ids(cache, 0), epoch_ids(cache, 1)
    assert e0 != e1 and sorted(e0[0] + e0[1]) == sorted(e1[0] + e1[1])
    assert epoch_ids(cache, 0) == e0, "same seed and epoch, same order"
    assert epoch_ids(cache, 0, seed=1) != e0
    plain = [int(i) for b in torch.utils.data.DataLoader(CacheDataset(cache, "train"), batch_size=100,
                                                          collate_fn=collate) for i in b["row_id"]]
    assert plain == list(range(1730)), "without shuffle, rows come in cache order"


def test_rows_carry_their_own_targets(cache):
    import pyarrow.parquet as pq
    ref = pq.read_table(sorted((cache / "train").glob("*.parquet"))[1])
    by_id = {r["id"]: r for r in CacheDataset(cache, "train", shuffle=True, shuffle_buffer=300)}
    for k in (0, 17, 499):
        row = by_id[ref.column("id")[k].as_py()]
        assert row["text"] == ref.column("text")[k].as_py()
        np.testing.assert_array_equal(row["logits"], np.array(ref.column("logits")[k].as_py(), np.float32))


def peak_bytes(cache, buffer):
    """Rows read and the peak of Python allocations while streaming the cache with shuffling, measured in a fresh
    interpreter: tracemalloc started and stopped while other tests' threads (fsspec's and zarr's event loops) are
    alive is not thread-safe in CPython 3.11 and crashed the suite (a segfault in a native thread)."""
    read = f"sum(1 for _ in CacheDataset({str(cache)!r}, 'train', shuffle=True, shuffle_buffer={buffer}))"
    code = ("import sys, tracemalloc; from kdcache.cache.reader import CacheDataset\n"
            f"{read}\n"  # a first pass imports and caches what reading needs; the second is measured
            f"tracemalloc.start()\nn = {read}\nprint(n, tracemalloc.get_traced_memory()[1])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    return int(out[0]), int(out[1])


def test_memory_stays_flat_as_the_cache_grows(tmp_path):
    small = synthetic_cache(tmp_path / "s", rows=2000, text_len=2000)
    large = synthetic_cache(tmp_path / "l", rows=8000, text_len=2000)
    n1, p1 = peak_bytes(small, 256)
    n4, p4 = peak_bytes(large, 256)
    assert (n1, n4) == (2000, 8000)
    assert p4 < 1.5 * p1, f"peak {p1 / 1e6:.1f} MB for 1x vs {p4 / 1e6:.1f} MB for 4x: the reader holds too much"
    assert p4 < 8000 * 2000 / 2, "far less than the cache's text must be held at once"


def test_fsspec_url_reads_the_same_rows(cache):
    local = [r["id"] for r in CacheDataset(cache, "train")]
    assert [r["id"] for r in CacheDataset(f"file://{cache}", "train")] == local


def test_mismatched_cache_is_refused_with_the_field(cache):
    with pytest.raises(CacheMismatchError, match=r"task: cache has 't', pipeline expects 'sentiment'.*kdcache cache"):
        CacheDataset(cache, "train", expect={"task": "sentiment"})
    with pytest.raises(CacheMismatchError, match=r"label_names"):
        CacheDataset(cache, "train", expect={"label_names": ["neg", "pos"]})
    with pytest.raises(CacheMismatchError, match=r"data\.source: cache has 'synthetic'"):
        CacheDataset(cache, "train", expect={"data": {"source": "rotten_tomatoes"}})
    with pytest.raises(CacheFormatError, match=r"no split 'dev'"):
        CacheDataset(cache, "dev")
    with pytest.raises(CacheFormatError, match=r"teacher layer\(s\) \[3\] are not cached"):
        CacheDataset(cache, "train", feature_layers=(3,))


def test_a_cache_older_than_a_data_setting_counts_it_at_its_default(tmp_path, tiny_cache):
    """A setting kdcache added later (data.quoting) is absent from an older cache's config: the cache was built as
    its default reads, so a pipeline at the default trains on it and one that changes it is refused."""
    import json
    import shutil

    from conftest import tiny_pipeline
    from kdcache.cache.format import DIGEST_KEY, MANIFEST, manifest_digest
    from kdcache.train.sources import expectation
    old = tmp_path / "old"
    shutil.copytree(tiny_cache, old)
    m = json.loads((old / MANIFEST).read_text())
    del m["config"]["data"]["quoting"]
    m[DIGEST_KEY] = manifest_digest(m)
    (old / MANIFEST).write_text(json.dumps(m))
    CacheDataset(old, "train", expect=expectation(tiny_pipeline(), "topic"))
    with pytest.raises(CacheMismatchError, match=r"data\.quoting: cache has 'minimal', pipeline expects 'none'"):
        CacheDataset(old, "train", expect=expectation(tiny_pipeline("tasks.topic.data.quoting=none"), "topic"))


def buffered_reference(rows, buffer, rng):
    """The shuffle buffer one row at a time: each row past the first `buffer` takes the place of a random one,
    which leaves; the rest leave in a random order."""
    buf, out = [], []
    for row in rows:
        if len(buf) < buffer:
            buf.append(row)
            continue
        i = int(rng.integers(len(buf)))
        out.append(buf[i])
        buf[i] = row
    rng.shuffle(buf)
    return out + buf


@pytest.mark.parametrize("labels", [(), ("a", "c")])
def test_shuffled_order_is_the_row_by_row_buffer(cache, labels):
    """The reader draws a row group's swaps in one call: the order is that of the buffer fed row by row, drawing
    one number per row, over the same row groups (here also with only some classes' rows)."""
    import pyarrow.parquet as pq
    ds = CacheDataset(cache, "train", shuffle=True, seed=3, shuffle_buffer=150, labels=labels)
    ds.set_epoch(2)
    names = ["a", "b", "c"]
    stream = []
    for u in ds.my_units():
        t = pq.ParquetFile(cache / ds.shards[u.shard]["parquet"]).read_row_group(u.row_group)
        stream += [int(i) for i, y in zip(t.column("row_id").to_pylist(), t.column("label").to_pylist())
                   if not labels or (y is not None and names[y] in labels)]
    expected = buffered_reference(stream, 150, np.random.default_rng([3, 2, 0, 0, 1]))
    assert [int(r["row_id"]) for r in ds] == expected
    assert len(expected) == len(ds) and (len(ds) < 1730) == bool(labels)


def test_a_batch_gathers_each_column_as_the_rows_hold_it(tiny_cache):
    """Rows are views into their row group's columns and a batch gathers each column per row group; it equals the
    batch stacked value by value from the same rows as plain dicts (features and shuffled rows from several row
    groups included)."""
    ds = CacheDataset(tiny_cache, "train", shuffle=True, shuffle_buffer=100, feature_layers=(2,))
    rows = list(ds)
    plain = [{k: dict(v) if k == "features" else v for k, v in r.items()} for r in rows]
    assert len({id(r.cols) for r in rows[:32]}) > 1, "a shuffled batch spans row groups"
    for a in range(0, len(rows), 32):
        views, dicts = ds.collate(rows[a:a + 32]), ds.collate(plain[a:a + 32])
        assert views.keys() == dicts.keys() and views["id"] == dicts["id"] and views["text"] == dicts["text"]
        for k in ("row_id", "label", "logits"):
            assert views[k].dtype == dicts[k].dtype and torch.equal(views[k], dicts[k]), k
        assert torch.equal(views["features"]["layer_2"], dicts["features"]["layer_2"])


def test_a_causal_lm_batch_gathers_as_the_rows_hold_it(ml_lm_cache):
    cache, _ = ml_lm_cache
    ds = CacheDataset(cache, "train", shuffle=True, shuffle_buffer=8)
    rows = list(ds)[:12]
    plain = [dict(r) for r in rows]
    views, dicts = ds.collate(rows), ds.collate(plain)
    assert views.keys() == dicts.keys()
    for k, v in views.items():
        assert torch.equal(v, dicts[k]) if torch.is_tensor(v) else v == dicts[k], k
