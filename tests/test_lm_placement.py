"""A causal-LM teacher placed by accelerate's big-model inference (`teacher.device_map`): with `max_memory` forcing
its weights out to an offload folder, the cache it writes holds the same targets as the plain run's."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import REPO, undocumented
from kdcache.cache.format import read_manifest
from kdcache.capture.build import build_teacher_cache
from kdcache.capture.models import TeacherError, build_model, replica_gpus, tp_size
from kdcache.config import ConfigError, load_pipeline

LM_TINY = str(REPO / "pipelines" / "lm-tiny" / "pipeline.yaml")


def table(cache, split="train"):
    m = read_manifest(cache)
    return pq.read_table([str(cache / s["parquet"]) for s in m["splits"][split]["shards"]]), m


def launch(over: list[str], out, teachers, processes: int = 2) -> None:
    """`accelerate launch --num_processes N kdcache cache lm-tiny --set ...` as real processes (gloo on CPU)."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
           "-m", "kdcache.cli", "cache", LM_TINY, "--out", str(out), "--teachers-dir", str(teachers),
           *[a for o in over for a in ("--set", o)]]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ), cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    """A saved tiny Llama teacher and its plain (one device, one process) cache of 4 BBC articles in 6 shards."""
    tmp = tmp_path_factory.mktemp("placement")
    base = load_pipeline(LM_TINY, ["tasks.news.data.limit=4"])
    model, _ = build_model(base.tasks["news"].teacher, "AutoModelForCausalLM", None)
    model.save_pretrained(tmp / "teacher")
    sets = ["tasks.news.data.limit=4", "tasks.news.teacher.from_config={}", f"tasks.news.teacher.model={tmp / 'teacher'}",
            "tasks.news.cache.shard_rows=4", "tasks.news.cache.row_group_rows=4"]
    build_teacher_cache(load_pipeline(LM_TINY, sets), "news", tmp / "plain", tmp / "teachers")
    return tmp, sets


def test_a_teacher_offloaded_to_disk_caches_the_targets_of_the_plain_run(plain, tmp_path):
    tmp, sets = plain
    placed = load_pipeline(LM_TINY, [*sets, "tasks.news.teacher.device_map=auto",
                                     "tasks.news.teacher.max_memory={cpu: 200KB}",
                                     f"tasks.news.teacher.offload_folder={tmp_path / 'offload'}"])
    build_teacher_cache(placed, "news", tmp_path / "placed", tmp_path / "teachers")
    (want, m1), (got, m2) = table(tmp / "plain"), table(tmp_path / "placed")
    assert "disk" in m2["placement"] and "placement" not in m1, "max_memory sent weights to disk"
    assert not undocumented(m2), "every manifest field of a placed teacher's cache is in docs/cache-format.md"
    assert m1["fingerprint"] == m2["fingerprint"], "where the weights sit does not change what the cache is"
    assert got.num_rows == want.num_rows > 0 and got.column_names == want.column_names
    for name in want.column_names:
        assert got.column(name).equals(want.column(name)), name


@pytest.mark.parametrize("overrides,message", [
    (["tasks.news.teacher.max_memory={cpu: 1GB}"], r"teacher.max_memory.*set `tasks.news.teacher.device_map`"),
    (["tasks.news.teacher.device_map=auto"], r"teacher.device_map.*loaded from `model`"),
    (["tasks.news.teacher.device_map=everywhere"], r"device_map"),
    (["tasks.news.teacher.tp_size=2"], r"teacher.tp_size.*with `tasks.news.teacher.tp_plan: auto`"),
])
def test_placement_settings_that_cannot_work_are_refused_at_load(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_pipeline(LM_TINY, overrides)


def test_two_processes_each_with_a_placed_teacher_write_the_plain_cache(plain, tmp_path):
    """Data parallelism composes with placement: `accelerate launch --num_processes 2` with a disk-offloaded
    teacher per process deals the shards between two real processes and writes the one-process plain cache."""
    tmp, sets = plain
    over = [*sets, "tasks.news.teacher.device_map=sequential", "tasks.news.teacher.max_memory={cpu: 200KB}",
            f"tasks.news.teacher.offload_folder={tmp_path / 'offload'}"]
    launch(over, tmp_path / "mp", tmp_path / "teachers")
    (want, m1), (got, m2) = table(tmp / "plain"), table(tmp_path / "mp" / "news")
    assert m2["processes"] == 2 and len(m2["splits"]["train"]["shards"]) > 1 and "disk" in m2["placement"]
    for name in want.column_names:
        assert got.column(name).equals(want.column(name)), name


@pytest.mark.parametrize("n,rank,local,want", [(8, 0, 2, [0, 1, 2, 3]), (8, 1, 2, [4, 5, 6, 7]), (4, 3, 4, [3]),
                                               (3, 1, 2, [1]), (0, 0, 2, [])])
def test_each_replica_gets_its_own_contiguous_gpus(n, rank, local, want):
    assert replica_gpus(n, rank, local) == want


@pytest.mark.parametrize("tp,world", [(3, 4), (8, 4)])
def test_replicas_that_do_not_divide_the_processes_are_refused(tp, world):
    cfg = load_pipeline(LM_TINY, ["tasks.news.teacher.from_config={}", "tasks.news.teacher.model=somewhere",
                                  "tasks.news.teacher.tp_plan=auto", f"tasks.news.teacher.tp_size={tp}"])
    with pytest.raises(TeacherError, match=f"tp_size = {tp} with {world} process"):
        tp_size(cfg.tasks["news"].teacher, world)


def test_more_replicas_than_gpus_is_refused():
    with pytest.raises(TeacherError, match="2 processes per node share 1 GPU"):
        replica_gpus(1, 0, 2)


@pytest.mark.parametrize("processes,tp", [(2, None), (4, 2)])
def test_a_tensor_parallel_teacher_writes_the_plain_cache(plain, tmp_path, processes, tp):
    """`teacher.tp_plan: auto` under `accelerate launch` (gloo on CPU): 2 processes holding half of every layer each,
    or 4 processes as 2 replicas × 2 (`teacher.tp_size: 2`: the replicas take different shards, each replica's
    first process writes). The cache holds the plain run's targets (ids and hits exactly, values to float32
    rounding: the split matmuls sum in another order)."""
    tmp, sets = plain
    over = [*sets, "tasks.news.teacher.tp_plan=auto", *([f"tasks.news.teacher.tp_size={tp}"] if tp else [])]
    launch(over, tmp_path / "tp", tmp_path / "teachers", processes)
    (want, m1), (got, m2) = table(tmp / "plain"), table(tmp_path / "tp" / "news")
    per = tp or processes
    assert m2["placement"] == {"tensor_parallel": per, "replicas": processes // per}
    assert m2["fingerprint"] == m1["fingerprint"] and m2["processes"] == processes
    total = sum(v["rows"] for v in m2["splits"].values())
    if processes > per:  # process 0's replica ran its share of the shards only; the other replica wrote the rest
        assert 0 < m2["capture"]["rows"] < total, (m2["capture"], total)
    assert got.num_rows == want.num_rows and got.column_names == want.column_names
    for name in want.column_names:
        a, b = want.column(name), got.column(name)
        if name in ("sample_ids", "sample_counts", "sample_lengths"):
            continue  # below: draws from distributions equal to float32 rounding
        if name in ("topk_logits", "lse", "tail", "nll"):
            x, y = (np.concatenate(c.to_numpy(zero_copy_only=False)).astype(np.float64) for c in (a, b))
            np.testing.assert_allclose(np.nan_to_num(y, neginf=-1e9), np.nan_to_num(x, neginf=-1e9),
                                       rtol=1e-3, atol=1e-4, err_msg=name)
        else:
            assert a.equals(b), name
    draws = [[np.repeat(i, c) for i, c in zip(np.concatenate(t.column("sample_ids").to_numpy(zero_copy_only=False)),
                                              np.concatenate(t.column("sample_counts").to_numpy(zero_copy_only=False)))]
             for t in (want, got)]
    a, b = (np.concatenate(d) for d in draws)
    # a draw within float32 rounding of a bucket edge of the cumulative distribution may land in the neighbour
    assert a.shape == b.shape and (a == b).mean() > 0.99, (a == b).mean()
