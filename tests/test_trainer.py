"""Stage two end to end on the tiny pipeline: cached KD equals online KD, students learn, mismatches are
refused, the teacher is never loaded, and the report compares everyone."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import FAST, REPO, build, tiny_pipeline
from kdcache.cache.reader import CacheMismatchError
from kdcache.cache.reader import read_column
from kdcache.report import build_report
from kdcache.train.loop import train_students

STEPS = ["train.epochs=1", "train.batch_size=16", "train.shuffle_buffer=16"]
TINY_PATH = str(REPO / "pipelines" / "tiny" / "pipeline.yaml")


def test_cached_targets_give_the_same_losses_and_weights_as_online_kd(tmp_path, tiny_cache, teachers_dir):
    """Same seed, same batches: exact cached logits and the live teacher must train the same student."""
    pipeline = tiny_pipeline(*STEPS, "students.bilstm.twin=false", "students.textcnn.twin=false")
    seen: dict[str, list[dict]] = {"cache": [], "live": []}
    for mode in ("cache", "live"):
        train_students(pipeline, ["bilstm", "textcnn"], {"topic": str(tiny_cache)}, tmp_path / mode, teacher=mode,
                   teachers_dir=teachers_dir, on_step=lambda run, parts, m=mode: seen[m].append({"run": run, **parts}))
    assert len(seen["cache"]) == len(seen["live"]) == 2 * 4  # 60 rows / 16 = 4 steps, 2 students
    for a, b in zip(seen["cache"], seen["live"]):
        assert a["run"] == b["run"]
        for key in ("loss", "ce", "kd", "feat0"):
            if key in a:
                assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), (a, b)
    for run in ("bilstm", "textcnn"):
        w_cache = torch.load(tmp_path / "cache" / run / "checkpoint" / "student.pt")
        w_live = torch.load(tmp_path / "live" / run / "checkpoint" / "student.pt")
        for k in w_cache:
            torch.testing.assert_close(w_cache[k], w_live[k], atol=1e-5, rtol=1e-4)


@pytest.fixture(scope="module")
def tiny300(tmp_path_factory):
    """The shipped tiny pipeline's data size (300 rows per split), with a quickly fine-tuned teacher."""
    tmp = tmp_path_factory.mktemp("t300")
    out, _ = build(tmp, "tasks.topic.data.limit=300", "tasks.topic.cache.shard_rows=128",
                   "tasks.topic.teacher.finetune.epochs=3")
    return out


def test_a_student_learns_and_the_run_directory_is_complete(tmp_path, tiny300):
    pipeline = tiny_pipeline("tasks.topic.data.limit=300", "tasks.topic.cache.shard_rows=128",
                             "tasks.topic.teacher.finetune.epochs=3", "train.epochs=10",
                             # the same bow with row-sparse embedding gradients (its own optimiser and schedule)
                             "students.textcnn.arch=bow", "students.textcnn.params={sparse_embedding: true}",
                             "students.textcnn.loss=null", "students.textcnn.twin=false")
    results = {r["run"]: r for r in train_students(pipeline, ["bow", "textcnn"], {"topic": str(tiny300)}, tmp_path)}
    assert results.pop("textcnn")["test"]["accuracy"] > 0.45, "a sparse-embedding student learns too"
    assert set(results) == {"bow", "bow-hard"}
    for name, r in results.items():
        # 5 balanced-ish topics: chance is ~0.2
        assert r["test"]["accuracy"] > 0.45, (name, r["test"])
        assert len(r["epochs"]) == 10 and r["best_epoch"] in range(1, 11)
        run_dir = tmp_path / name
        assert json.loads((run_dir / "metrics.json").read_text())["test"] == r["test"]
        assert json.loads((run_dir / "cache.json").read_text())["fingerprint"] == r["cache_fingerprint"]
        assert (run_dir / "config.yaml").is_file() and (run_dir / "checkpoint" / "student.pt").is_file()
        assert r["size_bytes"] == (run_dir / "checkpoint" / "student.pt").stat().st_size
        assert r["inference_examples_per_s_cpu"] > 0
        assert "at_chance" not in r, "a student that learned is not flagged"
    assert results["bow"]["kd"] and not results["bow-hard"]["kd"]

    report = build_report(tmp_path, tiny300.parent)
    text = report.read_text()
    for name in ("teacher (from_config)", "bow (bow, KD)", "bow-hard (bow, hard labels)", "KD gain", "ONE CPU thread"):
        assert name in text
    assert (tmp_path / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the majority-class row: the training split's commonest label, scored on test (a dense count here)
    train_labels, test_labels = (read_column(str(tiny300), s, "label") for s in ("train", "test"))
    common = max(set(train_labels), key=train_labels.count)
    row = next(line for line in text.splitlines() if line.startswith("| majority class ("))
    assert float(row.split("|")[5]) == pytest.approx(test_labels.count(common) / len(test_labels), abs=1e-4)


def test_plot_labels_never_overlap_and_baselines_are_drawn():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from kdcache.report.plots import scatter as _scatter
    runs = [{"run": name, "kd": not name.endswith("hard"), "parameters": 1000 + i, "test": {"accuracy": 0.70}}
            for i, name in enumerate(["bow", "bow-hard", "bilstm", "bilstm-hard"])]
    teacher = {"run": "teacher (x)", "parameters": 5000, "test": {"accuracy": 0.9},
               "baseline": {"run": "majority class (a)", "test": {"accuracy": 0.31}}}
    fig, ax = plt.subplots()
    _scatter(ax, runs, [teacher], "parameters", "accuracy")
    renderer = fig.canvas.get_renderer()
    labels = [t for t in ax.texts if t.get_text() in {"bow", "bow-hard", "bilstm", "bilstm-hard", "teacher"}]
    assert len(labels) == 5
    boxes = [t.get_window_extent(renderer) for t in labels]
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:]), "labels overprint"
    assert [line.get_ydata()[0] for line in ax.lines] == [0.31], "the majority-class line"
    assert not any(t.get_text() for t in ax.xaxis.get_minorticklabels()), "minor tick labels overprint"
    plt.close(fig)


def test_training_is_reproducible(tmp_path, tiny_cache):
    pipeline = tiny_pipeline(*STEPS, "students.bow.twin=false")
    a = train_students(pipeline, ["bow"], {"topic": str(tiny_cache)}, tmp_path / "a")[0]
    b = train_students(pipeline, ["bow"], {"topic": str(tiny_cache)}, tmp_path / "b")[0]
    assert a["epochs"] == b["epochs"] and a["test"] == b["test"]


def test_a_cache_of_other_data_is_refused(tmp_path, tiny_cache):
    pipeline = tiny_pipeline("tasks.topic.data.limit=61", *STEPS)
    with pytest.raises(CacheMismatchError, match=r"data\.limit: cache has 60, pipeline expects 61"):
        train_students(pipeline, ["bow"], {"topic": str(tiny_cache)}, tmp_path)


def test_stage_two_never_imports_or_loads_the_teacher(tmp_path, tiny_cache):
    """In a fresh interpreter: train from the cache with model loading booby-trapped, then check the modules."""
    script = textwrap.dedent(f"""
        import sys, transformers
        def trap(*a, **k):
            raise AssertionError("stage two tried to load a pretrained model")
        for name in dir(transformers):
            if name.startswith("AutoModel"):
                setattr(getattr(transformers, name), "from_pretrained", trap)
        from kdcache.config import load_pipeline
        from kdcache.train.loop import train_students
        p = load_pipeline({str(REPO / "pipelines" / "tiny" / "pipeline.yaml")!r},
                          {FAST!r} + ["train.epochs=1", "students.bow.twin=false"])
        train_students(p, ["bow", "bilstm"], {{"topic": {str(tiny_cache)!r}}}, __import__("pathlib").Path({str(tmp_path)!r}))
        loaded = sorted(m for m in sys.modules if m.startswith("kdcache.capture"))
        print("TEACHER_MODULES", loaded)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "TEACHER_MODULES []" in proc.stdout
    assert (tmp_path / "bow" / "metrics.json").is_file()


def test_two_processes_read_disjoint_parts_of_the_cache(tmp_path, tiny_cache):
    """A real 2-process `accelerate launch` (gloo on CPU): every row once per epoch, split between the ranks."""
    import shutil
    root = tmp_path / "caches"
    shutil.copytree(tiny_cache, root / "topic")
    sets = [a for o in FAST for a in ("--set", o)]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
           "-m", "kdcache.cli", "train", str(REPO / "pipelines" / "tiny" / "pipeline.yaml"), "--cache", str(root),
           "--runs", str(tmp_path / "runs"), "--students", "bow", *sets, "--set", "train.epochs=2",
           "--set", "students.bow.twin=false"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((tmp_path / "runs" / "bow" / "metrics.json").read_text())
    for epoch in metrics["epochs"]:
        per_process = epoch["train_rows_per_process"]
        assert len(per_process) == 2 and min(per_process) > 0
        assert sum(per_process) == epoch["train_rows_distinct"] == 60
    assert proc.stdout.count("test acc") == 1, "only rank 0 reports"


def test_bench_quick_runs_and_reports_every_figure(tmp_path):
    """A smoke check that `kdcache bench --quick` still runs end to end (speed goals live in its output, not here)."""
    from kdcache.experiments.bench import run_bench
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n\nhand-written notes stay\n")
    res = run_bench("tiny", quick=True, out_dir=tmp_path / "bench", doc=doc, repeats=2)
    assert set(res) >= {"stage_one", "loader", "stage_two", "online_kd", "storage", "load_before", "load_after"}
    assert res["loader"]["headroom"] > 0
    for spread in (res["stage_one"]["ratio"], res["stage_two"]["ratio"], res["online_kd"]["bilstm"]["ideal"]):
        assert len(spread["values"]) == 2 and spread["min"] <= spread["median"] <= spread["max"]
    assert set(res["online_kd"]) == {"bow", "bilstm"}
    text = doc.read_text()
    assert "hand-written notes stay" in text and "<!-- bench:quick -->" in text and "online KD" in text
    run_bench("tiny", quick=True, out_dir=tmp_path / "bench", doc=doc, repeats=1)
    assert doc.read_text().count("<!-- bench:quick -->") == 1, "a rerun replaces its section"
    assert json.loads((tmp_path / "bench" / "bench-quick.json").read_text())["mode"] == "quick"


def test_the_bench_probe_sees_every_capture_batch_and_changes_nothing_in_the_cache(tmp_path, tiny_cache, teachers_dir):
    """Stage one's overhead is timed batch by batch: the probe (the bare forward) runs on each of the capture's own
    batches, every row once, and what the capture writes is the cache built without it, byte for byte."""
    import pyarrow.parquet as pq
    from kdcache.cache.format import read_manifest
    from kdcache.capture.runner import probe_batches
    from kdcache.experiments.bench import stage_one_overhead
    seen = []
    with probe_batches(lambda runner, ids, mask: seen.append((ids.shape[0], int(mask.sum())))):
        out, m = build(tmp_path, teachers=teachers_dir)
    shards = lambda man: [sh for _, s in sorted(man["splits"].items()) for sh in s["shards"]]  # noqa: E731
    tokens = sum(pq.read_table(out / sh["parquet"], columns=["num_tokens"])["num_tokens"].to_numpy().sum()
                 for sh in shards(m))
    assert sum(b for b, _ in seen) == m["capture"]["rows"] and max(b for b, _ in seen) == 8  # cache.batch_size
    assert sum(t for _, t in seen) == tokens
    assert [sh["sha256"] for sh in shards(m)] == [sh["sha256"] for sh in shards(read_manifest(tiny_cache))]
    n = len(seen)
    capture, bare = stage_one_overhead(tiny_pipeline(), "topic", tmp_path / "again", teachers_dir)
    assert capture > 0 and bare > 0 and len(seen) == n, "a closed probe runs no more"


def test_fidelity_runs_both_settings_and_pairs_kd_with_hard(tmp_path):
    """`kdcache fidelity` on the tiny pipeline: both settings, paired KD/hard results per seed, a markdown table."""
    from kdcache.experiments.fidelity import run_fidelity
    doc = tmp_path / "fidelity.md"
    res = run_fidelity(TINY_PATH, [0], ["bow"], 40, tmp_path / "fid", doc, teachers_dir=tmp_path / "teachers",
                       cache_root=tmp_path / "caches", overrides=[*FAST, "train.epochs=2"])
    scarce = res["settings"]["40 labelled training rows"]
    assert scarce["labelled_train_rows"] == 40 < scarce["train_rows"]
    for s in res["settings"].values():
        assert len(s["students"]["bow"]["kd"]) == len(s["students"]["bow"]["hard"]) == 1
    assert "| bow |" in doc.read_text() and "KD gain" in doc.read_text()


def test_a_rerun_of_fidelity_keeps_the_cells_it_finished_and_retrains_changed_ones(tmp_path, monkeypatch):
    """A long `kdcache fidelity` resumes: a (setting, seed) cell finished with the same settings and cache is read
    back, not retrained; a cell whose settings changed is trained again."""
    from kdcache.experiments import fidelity, seeded
    args = (TINY_PATH, [0, 1], ["bow"], 0, tmp_path / "fid", None)
    kw = dict(teachers_dir=tmp_path / "teachers", cache_root=tmp_path / "caches", overrides=[*FAST, "train.epochs=1"])
    first = fidelity.run_fidelity(*args, **kw)
    trained = []
    real = seeded.train_students
    monkeypatch.setattr(seeded, "train_students", lambda *a, **k: trained.append(a[0].train.seed) or real(*a, **k))
    again = fidelity.run_fidelity(*args, **kw)
    assert trained == []
    assert again["settings"]["all labels"]["students"] == first["settings"]["all labels"]["students"]
    (tmp_path / "fid" / "runs" / "tiny" / "all-labels" / "1" / "bow-hard" / "metrics.json").unlink()  # a cell cut short
    fidelity.run_fidelity(*args, **kw)
    assert trained == [1]
    kw["overrides"] = [*FAST, "train.epochs=2"]
    fidelity.run_fidelity(*args, **kw)
    assert trained == [1, 0, 1]


def test_fidelity_doc_keeps_other_pipelines_sections():
    """Each pipeline owns one marked section of docs/fidelity.md; a rerun replaces it and leaves the others."""
    from kdcache.experiments.docsections import replace_section
    doc = replace_section("# hand-written", "fidelity:default", "## default v1")
    doc = replace_section(doc, "fidelity:sst2", "## sst2 v1")
    doc = replace_section(doc, "fidelity:default", "## default v2")
    assert "default v2" in doc and "default v1" not in doc and "sst2 v1" in doc and "# hand-written" in doc
    assert doc.count("<!-- fidelity:default -->") == 1 and doc.index("default v2") < doc.index("sst2 v1")


def test_sweep_trains_every_variant_with_its_own_loss(tmp_path):
    """`kdcache fidelity --sweep`: temperature, α and feature-loss variants of one student in one pass, each run
    recording the loss it was trained with; the feature row appears because the tiny cache holds features."""
    from kdcache.experiments.fidelity import SWEEP, run_sweep
    doc = tmp_path / "fidelity.md"
    res = run_sweep(TINY_PATH, "bow", [0], tmp_path / "fid", doc, teachers_dir=tmp_path / "teachers",
                    cache_root=tmp_path / "caches", overrides=[*FAST, "train.epochs=1"])
    assert list(res["rows"]) == list(SWEEP) and all(len(v) == 1 for v in res["rows"].values())
    runs = [json.loads(p.read_text()) for p in sorted((tmp_path / "fid" / "runs" / "sweep" / "0").glob("*/metrics.json"))]
    got = sorted((r["loss"]["temperature"], r["loss"]["alpha"], bool(r["loss"]["features"])) for r in runs)
    want = sorted((c["temperature"], c["alpha"], "features" in c) for c in SWEEP.values())
    assert got == want
    assert "<!-- fidelity:tiny-sweep-bow -->" in doc.read_text() and "| T=4 |" in doc.read_text()


def test_a_student_alone_equals_the_same_student_in_company(tmp_path, tiny_cache):
    """Each run draws dropout (and anything random) from its own seeded stream: bow trained alone or next to
    other students (in another order) gives identical losses, validation curves and test metrics."""
    pipeline = tiny_pipeline("train.epochs=3", "train.batch_size=16")
    alone = {r["run"]: r for r in train_students(pipeline, ["bow"], {"topic": str(tiny_cache)}, tmp_path / "a")}
    crowd = {r["run"]: r for r in train_students(pipeline, ["textcnn", "bilstm", "bow"], {"topic": str(tiny_cache)},
                                                 tmp_path / "b")}
    for name in ("bow", "bow-hard"):
        a, b = alone[name], crowd[name]
        assert [e["train_loss"] for e in a["epochs"]] == [e["train_loss"] for e in b["epochs"]], name
        assert [e["eval"] for e in a["epochs"]] == [e["eval"] for e in b["epochs"]] and a["test"] == b["test"], name


def test_a_non_finite_loss_stops_that_run_naming_epoch_and_step(tmp_path, tiny_cache, capsys):
    """A learning rate that blows the weights up: the run stops at the first non-finite loss with a message naming
    run, epoch and step; the other runs finish and are saved and reported."""
    from kdcache.cli import main
    (tmp_path / "caches").mkdir()
    (tmp_path / "caches" / "topic").symlink_to(tiny_cache)
    sets = [a for o in FAST for a in ("--set", o)]
    code = main(["train", TINY_PATH, "--cache", str(tmp_path / "caches"), "--runs", str(tmp_path / "runs"),
                 "--students", "bow,textcnn", *sets, "--set", "train.epochs=2", "--set", "train.grad_clip=0",
                 "--set", "students.bow.learning_rate=1e30", "--set", "students.bow.twin=false",
                 "--set", "students.textcnn.twin=false"])
    err = capsys.readouterr()
    assert code == 2
    assert "run bow: the training loss is nan at epoch 1, step 2" in err.err or \
        "run bow: the training loss is inf at epoch 1, step 2" in err.err, err.err[-2000:]
    assert (tmp_path / "runs" / "textcnn" / "metrics.json").is_file() and not (tmp_path / "runs" / "bow").exists()
    assert "textcnn" in err.out and "report:" in err.out


def test_train_takes_the_limit_its_cache_was_built_with(tmp_path, tiny_cache, capsys):
    """`kdcache cache --limit N` then `kdcache train --limit N`: the same data settings, so the cache is accepted;
    without --limit the mismatch names data.limit."""
    from kdcache.cli import main
    (tmp_path / "caches").mkdir()
    (tmp_path / "caches" / "topic").symlink_to(tiny_cache)
    limit = next(o for o in FAST if o.startswith("tasks.topic.data.limit=")).split("=")[1]
    sets = [a for o in FAST if not o.startswith("tasks.topic.data.limit=") for a in ("--set", o)]
    args = ["train", TINY_PATH, "--cache", str(tmp_path / "caches"), "--runs", str(tmp_path / "runs"),
            "--students", "bow", *sets, "--set", "train.epochs=1", "--set", "students.bow.twin=false"]
    assert main([*args, "--limit", limit]) == 0
    assert (tmp_path / "runs" / "bow" / "metrics.json").is_file()
    assert main(args) == 2
    assert "data.limit: cache has " + limit in capsys.readouterr().err


def test_fidelity_trains_a_transfer_students_twin_once(tmp_path):
    """`x-transfer`'s hard-label twin reads no transfer rows, so it is `x`'s twin: fidelity trains it once and pairs
    both KD students with it (a student differing in more than `transfer` keeps its own twin)."""
    from kdcache.config import load_pipeline
    from kdcache.experiments import fidelity
    over = [*FAST, "train.epochs=1", "tasks.topic.data.augment.n_iter=2",
            "students.bow-transfer={arch: bow, vocab_size: 5000, transfer: [transfer], twin: false}",
            "students.bow-wide={arch: bow, vocab_size: 5000, params: {embed_dim: 48}, transfer: [transfer]}"]
    assert fidelity.shared_twins(load_pipeline(TINY_PATH, over), ["bow", "bow-transfer", "bow-wide"]) == \
        {"bow-transfer": "bow"}
    res = fidelity.run_fidelity(TINY_PATH, [0], ["bow", "bow-transfer"], 0, tmp_path / "fid", None,
                                teachers_dir=tmp_path / "teachers", cache_root=tmp_path / "caches", overrides=over)
    runs = sorted(p.parent.name for p in (tmp_path / "fid" / "runs").rglob("metrics.json"))
    assert runs == ["bow", "bow-hard", "bow-transfer"], runs
    got = res["settings"]["all labels"]["students"]
    assert got["bow-transfer"]["hard"] == got["bow"]["hard"] and len(got["bow"]["hard"]) == 1
    assert "bow-transfer's hard labels are bow's twin" in fidelity.render(res)
