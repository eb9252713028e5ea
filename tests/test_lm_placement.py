"""A causal-LM teacher placed by accelerate's big-model inference (`teacher.device_map`): with `max_memory` forcing
its weights out to an offload folder, the cache it writes holds the same targets as the plain run's."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest

from conftest import REPO
from kdcache.cache.format import read_manifest
from kdcache.capture.build import build_teacher_cache
from kdcache.capture.models import build_model
from kdcache.config import ConfigError, load_pipeline

LM_TINY = str(REPO / "pipelines" / "lm-tiny" / "pipeline.yaml")


def table(cache, split="train"):
    m = read_manifest(cache)
    return pq.read_table([str(cache / s["parquet"]) for s in m["splits"][split]["shards"]]), m


def test_a_teacher_offloaded_to_disk_caches_the_targets_of_the_plain_run(tmp_path):
    base = load_pipeline(LM_TINY, ["tasks.news.data.limit=4"])
    model, _ = build_model(base.tasks["news"].teacher, "AutoModelForCausalLM", None)
    model.save_pretrained(tmp_path / "teacher")
    plain = load_pipeline(LM_TINY, ["tasks.news.data.limit=4", "tasks.news.teacher.from_config={}",
                                    f"tasks.news.teacher.model={tmp_path / 'teacher'}"])
    placed = load_pipeline(LM_TINY, ["tasks.news.data.limit=4", "tasks.news.teacher.from_config={}",
                                     f"tasks.news.teacher.model={tmp_path / 'teacher'}",
                                     "tasks.news.teacher.device_map=auto",
                                     "tasks.news.teacher.max_memory={cpu: 200KB}",
                                     f"tasks.news.teacher.offload_folder={tmp_path / 'offload'}"])
    build_teacher_cache(plain, "news", tmp_path / "plain", tmp_path / "teachers")
    build_teacher_cache(placed, "news", tmp_path / "placed", tmp_path / "teachers")
    (want, m1), (got, m2) = table(tmp_path / "plain"), table(tmp_path / "placed")
    assert "disk" in m2["placement"] and "placement" not in m1, "max_memory sent weights to disk"
    assert m1["fingerprint"] == m2["fingerprint"], "where the weights sit does not change what the cache is"
    assert got.num_rows == want.num_rows > 0 and got.column_names == want.column_names
    for name in want.column_names:
        assert got.column(name).equals(want.column(name)), name


@pytest.mark.parametrize("overrides,message", [
    (["tasks.news.teacher.max_memory={cpu: 1GB}"], r"teacher.max_memory.*set `tasks.news.teacher.device_map`"),
    (["tasks.news.teacher.device_map=auto"], r"teacher.device_map.*loaded from `model`"),
    (["tasks.news.teacher.device_map=everywhere"], r"device_map"),
])
def test_placement_settings_that_cannot_work_are_refused_at_load(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_pipeline(LM_TINY, overrides)
