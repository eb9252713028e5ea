"""The GPU check's comparison logic, exercised on CPU: two CPU runs (fp32, and bf16 autocast) pass against fp32,
and outputs that really differ fail."""

from __future__ import annotations

import numpy as np

from kdcache.capture.classification import TeacherOutputs
from kdcache.experiments.gpu_check import TOLERANCE, compare_classifier, compare_lm, run_gpu_check


def test_without_a_gpu_two_cpu_runs_pass_and_it_says_so(tmp_path, capsys):
    res = run_gpu_check(out_dir=tmp_path, doc=None)
    assert not res["gpu"] and res["ok"], res["checks"]
    assert "no GPU here" in capsys.readouterr().out
    fp32 = res["checks"]["classifier cpu fp32 vs cpu fp32"]
    assert fp32["logits"]["max_abs_diff"] == 0.0, "the same CPU run twice is exact"
    bf16 = res["checks"]["lm targets cpu bf16 vs cpu fp32"]
    assert 0.0 < bf16["lse"]["max_abs_diff"] and bf16["ok"], "bf16 autocast differs, within its tolerance"
    for name in ("lm targets cpu fp32, chunks of 37 positions, vs cpu fp32",
                 "lm targets cpu fp32, teacher offloaded to disk, vs cpu fp32"):  # the chunked and placed paths
        assert res["checks"][name]["ok"] and res["checks"][name]["topk_sets_equal"] == 1.0, name
    assert (tmp_path / "gpu-check.json").is_file()


def outputs(logits):
    n = len(logits)
    return TeacherOutputs(np.asarray(logits, np.float32), {"layer_1": np.ones((n, 4), np.float32)},
                          np.zeros(n, np.int64), np.ones(n, np.int32), np.zeros(n, bool))


def test_a_flipped_prediction_or_a_drift_beyond_tolerance_fails():
    tol = TOLERANCE["bf16"]
    ref = outputs([[0.0, 3.0], [1.0, 1.01]])
    assert compare_classifier(ref, outputs([[0.01, 3.01], [1.01, 1.0]]), tol)["ok"], "a near-tie may flip"
    assert not compare_classifier(ref, outputs([[3.0, 0.0], [1.0, 1.01]]), tol)["ok"], "a decisive row flipped"
    assert not compare_classifier(ref, outputs([[0.0, 3.5], [1.0, 1.01]]), tol)["ok"], "logit drift"


def test_top_k_sets_must_match_except_at_ties():
    tol = TOLERANCE["fp32"]
    ref = {"topk_ids": np.array([[[5, 2, 9]]]), "topk_logits": np.array([[[3.0, 2.0, 1.0]]], np.float16),
           "lse": np.zeros((1, 1, 1)), "tail": np.zeros((1, 1, 1))}
    reordered = dict(ref, topk_ids=np.array([[[2, 5, 9]]]))
    assert compare_lm(ref, reordered, tol)["ok"], "the same set in another order"
    tied = dict(ref, topk_ids=np.array([[[5, 2, 7]]]))  # id 7 at the same logit as the dropped id 9: a tie
    assert compare_lm(ref, tied, tol)["ok"]
    other = dict(ref, topk_ids=np.array([[[5, 7, 9]]]), topk_logits=np.array([[[3.0, 1.5, 1.0]]], np.float16))
    assert not compare_lm(ref, other, tol)["ok"], "id 7 replaces id 2 (logit 2.0) well above the k-th logit"


def test_the_chat_check_compares_response_targets_and_generation():
    """On CPU: fp32 against fp32 is exact and writes the same responses; bf16 autocast stays within tolerance."""
    from kdcache.experiments.gpu_check import chat_check
    same = chat_check("cpu", "fp32")
    assert same["ok"] and same["lse"]["max_abs_diff"] == 0.0 and same["greedy_responses_identical"] == 1.0
    bf16 = chat_check("cpu", "bf16")
    assert bf16["ok"] and bf16["lse"]["max_abs_diff"] > 0.0 and 0.0 <= bf16["greedy_responses_identical"] <= 1.0
