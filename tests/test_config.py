"""Configs: every shipped YAML parses, misspelled keys name the key, the file and the closest valid key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from kdcache.config import ConfigError, PipelineConfig, config_reference, load_pipeline

REPO = Path(__file__).resolve().parent.parent
PIPELINES = sorted(p.parent.name for p in (REPO / "pipelines").glob("*/pipeline.yaml"))


@pytest.mark.parametrize("name", PIPELINES)
def test_every_shipped_pipeline_parses(name):
    cfg = load_pipeline(name)
    assert isinstance(cfg, PipelineConfig) and cfg.name == name and cfg.tasks
    first = (REPO / "pipelines" / name / "pipeline.yaml").read_text().splitlines()[0]
    assert first.startswith("#"), "each pipeline YAML starts with a comment saying what it is and how to run it"


def write(tmp_path, text):
    p = tmp_path / "pipeline.yaml"
    p.write_text(text)
    return p


BASE = """name: t
tasks:
  a:
    data: {source: bbc_news}
    teacher: {model: x}
"""


def test_misspelled_key_names_key_file_and_closest(tmp_path):
    p = write(tmp_path, BASE + "    cache: {max_lenght: 12}\n")
    with pytest.raises(ConfigError) as e:
        load_pipeline(str(p))
    msg = str(e.value)
    assert str(p) in msg and "`tasks.a.cache.max_lenght`" in msg and "did you mean `tasks.a.cache.max_length`" in msg


def test_wrong_type_and_missing_key(tmp_path):
    with pytest.raises(ConfigError, match=r"tasks\.a\.cache\.batch_size` must be int"):
        load_pipeline(str(write(tmp_path, BASE + "    cache: {batch_size: many}\n")))
    with pytest.raises(ConfigError, match=r"missing required key `tasks\.a\.teacher`"):
        load_pipeline(str(write(tmp_path, "name: t\ntasks:\n  a:\n    data: {source: bbc_news}\n")))


def test_dotted_overrides_are_validated(tmp_path):
    p = write(tmp_path, BASE)
    cfg = load_pipeline(str(p), ["tasks.a.cache.batch_size=7", "tasks.a.cache.features.layers=[1, -1]"])
    assert cfg.tasks["a"].cache.batch_size == 7 and cfg.tasks["a"].cache.features.layers == (1, -1)
    with pytest.raises(ConfigError, match=r"with --set overrides.*did you mean `tasks\.a\.cache\.batch_size`"):
        load_pipeline(str(p), ["tasks.a.cache.batchsize=7"])


def test_env_expansion(tmp_path, monkeypatch):
    monkeypatch.setenv("KDC_TEST_DIR", "/somewhere")
    cfg = load_pipeline(str(write(tmp_path, BASE.replace("{source: bbc_news}",
                                                         "{source: sst2, path: '${KDC_TEST_DIR}/sst2'}"))))
    assert cfg.tasks["a"].data.path == "/somewhere/sst2"


def test_unknown_pipeline_lists_known_ones():
    with pytest.raises(ConfigError, match=r"known pipelines: .*default.*tiny"):
        load_pipeline("no-such-pipeline")


def test_configuration_doc_is_up_to_date():
    doc = (REPO / "docs" / "configuration.md").read_text()
    assert config_reference() in doc, "regenerate with: .venv/bin/kdcache config --reference > docs/configuration.md"


def test_help_explains_every_command():
    out = subprocess.run([sys.executable, "-m", "kdcache.cli", "--help"], capture_output=True, text=True).stdout
    for cmd in ("cache", "teacher-finetune", "train", "report", "bench", "fidelity", "verify", "info", "config", "push",
                "pull", "drift", "refresh", "lifelong"):
        assert cmd in out
        sub = subprocess.run([sys.executable, "-m", "kdcache.cli", cmd, "--help"], capture_output=True, text=True)
        assert sub.returncode == 0 and len(sub.stdout) > 200


def test_example_pipelines_in_the_docs_parse(tmp_path):
    """Every ```yaml block in README.md and docs/ that is a whole pipeline must load with the real config code."""
    import re
    found = 0
    for doc in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        for block in re.findall(r"```yaml\n(.*?)```", doc.read_text(), re.S):
            if re.search(r"^name:", block, re.M) and re.search(r"^tasks:", block, re.M):
                path = tmp_path / f"example{found}.yaml"
                path.write_text(block)
                assert load_pipeline(str(path)).tasks, f"{doc.name}: example pipeline does not load"
                found += 1
    assert found >= 1


def test_report_without_runs_says_which_command_makes_them(tmp_path, capsys):
    from kdcache.cli import main
    assert main(["report", "tiny", "--runs", str(tmp_path / "runs"), "--cache", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert "no run folders" in err and "kdcache train" in err


@pytest.mark.parametrize("override, message", [
    ("tasks.topic.cache.features.pooling=words", r"`tasks.topic.cache.features.pooling` = 'words': a "
                                                 r"sequence-classification teacher keeps cls or mean or tokens"),
    ("students.bow.arch=bilstm-tagger", r"`students.bow.arch`: 'bilstm-tagger' cannot learn from task 'topic'"),
    ("students.bow.arch=nope", r"`students.bow.arch`: unknown architecture 'nope'"),
    ("tasks.topic.teacher.head=causal", r"`tasks.topic.teacher.head` = 'causal' must be one of"),
])
def test_head_specific_keys_are_checked_at_load(override, message):
    with pytest.raises(ConfigError, match=message):
        load_pipeline("tiny", [override])


@pytest.mark.parametrize("override, message", [
    ("train.loss.temperature=0", r"`train.loss.temperature` = 0.0 must be > 0"),
    ("train.loss.temperature=.inf", r"`train.loss.temperature` = inf must be > 0"),
    ("tasks.topic.cache.batch_size=0", r"`tasks.topic.cache.batch_size` = 0 must be >= 1"),
    ("train.loss.kind=klx", r"`train.loss.kind` = 'klx' must be one of kl, reverse_kl, jsd, soft_ce, mse"),
    ("tasks.topic.cache.shard_rows=-5", r"`tasks.topic.cache.shard_rows` = -5 must be >= 1"),
    ("train.loss.alpha=1.5", r"`train.loss.alpha` = 1.5 must be in \[0, 1\]"),
    ("train.batch_size=0", r"`train.batch_size` = 0 must be >= 1"),
    ("train.epochs=0", r"`train.epochs` = 0 must be >= 1"),
    ("train.learning_rate=-1", r"`train.learning_rate` = -1.0 must be > 0"),
    ("tasks.topic.cache.temperatures=[]", r"`tasks.topic.cache.temperatures` = \(\) must not be empty"),
    ("tasks.topic.cache.temperatures=[1, -2]", r"item 1 \(-2.0\) must be > 0"),
    ("tasks.topic.teacher.finetune.epochs=0", r"`tasks.topic.teacher.finetune.epochs` = 0.0 must be > 0"),
    ("tasks.topic.data.limit=0", r"`tasks.topic.data.limit` = 0 must be >= 1"),
    ("tasks.topic.teacher.precision=fp8", r"`tasks.topic.teacher.precision` = 'fp8' must be one of"),
    ("train.loss={kind: jsd, beta: 1.0}", r"`train.loss.beta` = 1.0: the jsd loss needs 0 < beta < 1"),
    ("students.bow.loss.features=[{teacher_layer: 1, kind: l1}]", r"features\[0\].kind` = 'l1' must be one of"),
])
def test_values_out_of_range_are_refused_at_load(override, message):
    with pytest.raises(ConfigError, match=message):
        load_pipeline("tiny", [override])
