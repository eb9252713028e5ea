"""The report's tables: one per head's students (with the teacher and a baseline first), cross-task runs, and the
per-language table; `fmt` is the one number formatter every report and doc section uses."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..cache.format import CacheFormatError
from ..cache.reader import open_manifest


CROSS = "cross-task"  # the `head` of a cross-task run's metrics (its students have a head per task)


def fmt(v: Any, spec: str = ".4f") -> str:
    """A number for a table cell: `spec`-formatted, or – when missing."""
    return "–" if v is None else format(v, spec)


def gain(r: dict[str, Any], by_run: dict[str, dict], key: str, sign: float = 1.0) -> float | None:
    """The KD run's test `key` minus its hard-label twin's (times `sign`)."""
    twin = by_run.get(f"{r['run']}-hard")
    mine, theirs = (r.get("test") or {}).get(key), ((twin or {}).get("test") or {}).get(key)
    return None if not r["kd"] or mine is None or theirs is None else sign * (mine - theirs)


def classification_lines(runs: list[dict], teachers: dict[str, dict]) -> list[str]:
    by_run = {r["run"]: r for r in runs}
    device = next(iter(teachers.values()), {}).get("device", "?")
    lines = ["Test split metrics. Agreement = share of test rows where the student's prediction equals the teacher's. "
             "KD gain = test accuracy of the KD student minus its hard-label twin (same architecture, seed and data). "
             "CPU speed: student examples/s on ONE CPU thread of this machine, tokenisation included, warmed up, "
             "the median of 3 passes over 256 test texts (teacher: all threads of the capture, measured while "
             f"caching, on {device}). The majority class predicts the training split's most frequent label.", "",
             "| model | task | params | size MB | test acc | macro-F1 | agreement | CPU ex/s | train s | KD gain |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for task, t in teachers.items():
        lines.append(f"| **{t['run']}** | {task} | {t['parameters'] or 0:,} | – | {fmt(t['test']['accuracy'])} | "
                     f"{fmt(t['test']['macro_f1'])} | 1.0000 | {fmt(t['inference_examples_per_s_cpu'], '.0f')} | – | – |")
        if t.get("baseline"):
            b = t["baseline"]["test"]
            lines.append(f"| {t['baseline']['run']} | {task} | 0 | – | {fmt(b['accuracy'])} | {fmt(b['macro_f1'])} | "
                         "– | – | – | – |")
    for r in in_order(runs):
        test = r.get("test", {})
        lines.append(f"{student_cells(r)} {fmt((r.get('size_bytes') or 0) / 1e6, '.2f')} | "
                     f"{fmt(test.get('accuracy'))} | {fmt(test.get('macro_f1'))} | {fmt(test.get('agreement'))} | "
                     f"{fmt(r.get('inference_examples_per_s_cpu'), '.0f')} | {fmt(r['train_seconds'], '.1f')} | "
                     f"{fmt(gain(r, by_run, 'accuracy'), '+.4f')} |")
    return lines


def in_order(runs: list[dict]) -> list[dict]:
    """By task and student, each KD run just before its hard-label twin."""
    return sorted(runs, key=lambda r: (r["task"], r["student"], not r["kd"]))


def student_cells(r: dict[str, Any]) -> str:
    """The cells every head's table starts a student row with: name (arch, KD or hard labels), task, params."""
    flag = " ⚠ at chance" if r.get("at_chance") else ""
    return (f"| {r['run']} ({r['arch']}{', KD' if r['kd'] else ', hard labels'}){flag} | {r['task']} | "
            f"{r['parameters']:,} |")


def token_lines(runs: list[dict], teachers: dict[str, dict]) -> list[str]:
    by_run = {r["run"]: r for r in runs}
    lines = ["Token classification: entity-level F1 on the test split (exact type and boundaries, conlleval "
             "rules); agreement = share of words tagged as the teacher tags them. KD gain = F1 of the KD student "
             "minus its hard-label twin (same architecture, seed and batches).", "",
             "| model | task | params | test entity F1 | precision | recall | teacher agreement | train s | KD gain |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for task, t in teachers.items():
        lines.append(f"| **{t['run']}** | {task} | {t['parameters'] or 0:,} | {t['test']['f1']:.4f} | – | – | 1.0000 | "
                     "– | – |")
        lines.append(f"| {t['baseline']['run']} | {task} | 0 | 0.0000 | – | – | – | – | – |")
    for r in in_order(runs):
        test = r.get("test", {})
        lines.append(f"{student_cells(r)} {fmt(test.get('f1'))} | {fmt(test.get('precision'))} | "
                     f"{fmt(test.get('recall'))} | {fmt(test.get('teacher_agreement'))} | "
                     f"{r['train_seconds']:.1f} | {fmt(gain(r, by_run, 'f1'), '+.4f')} |")
    return lines


def lm_lines(runs: list[dict], teachers: dict[str, dict]) -> list[str]:
    by_run = {r["run"]: r for r in runs}
    answers = any("answer_accuracy" in t["test"] for t in teachers.values())  # a chat cache's checkable answers
    written = any((r.get("test") or {}).get("generated_accuracy") is not None for r in runs)  # checked by generating
    lines = ["Causal-LM students: test perplexity on next tokens and KL(teacher ‖ student) over the cached top-k "
             "ids plus the exact tail bucket (T = 1). Gain = CE twin's perplexity minus the KD student's. Perplexity "
             "counts each model's own tokens; bits per byte (caches with offsets) compare any tokenizers. A student "
             "with its own tokenizer (docs/cross-tokenizer.md) learns from the teacher at its aligned positions "
             "(their share in `aligned`), and its KL is on the projected targets there."
             + (" Chat cache: every figure is over response tokens only; answer acc = the share of test "
                "conversations whose cached responses greedy decoding reproduces exactly." if answers else "")
             + (" Generated acc = the share of test prompts the model answers (greedy) with the data's own answer."
                if written else ""), "",
             "| model | task | params | tokenizer | targets | test ppl | bits/byte | aligned | KL to teacher |"
             + (" answer acc |" if answers else "") + (" generated acc |" if written else "")
             + " train s | ppl gain vs CE twin |",
             "|---|---|---:|---|---|---:|---:|---:|---:|" + ("---:|" if answers else "") + ("---:|" if written else "")
             + "---:|---:|"]
    for task, t in teachers.items():
        lines.append(f"| **{t['run']}** | {task} | {t['parameters'] or 0:,} | teacher's | – | "
                     f"{t['test']['perplexity']:.2f} | {fmt(t['test'].get('bits_per_byte'))} | – | 0 | "
                     + (f"{fmt(t['test'].get('answer_accuracy'))} | " if answers else "")
                     + (f"{fmt(t['test'].get('generated_accuracy'))} | " if written else "") + "– | – |")
    for r in in_order(runs):
        test = r.get("test", {})
        targets = (("ULD" if r["loss"].get("kind") == "uld" else r["loss"].get("targets", "topk"))
                   if r["kd"] else "next-token CE")
        tok = r.get("tokenizer", "teacher's")
        if tok != "teacher's" and r.get("student_vocab_size"):
            tok = f"{tok} ({r['student_vocab_size']:,} ids)"
        lines.append(f"| {r['run']} | {r['task']} | {r['parameters']:,} | {tok} | {targets} | "
                     f"{fmt(test.get('perplexity'), '.2f')} | {fmt(test.get('bits_per_byte'))} | "
                     f"{fmt(test.get('aligned_share'), '.2f')} | {fmt(test.get('kl_to_teacher'))} | "
                     + (f"{fmt(test.get('answer_accuracy'))} | " if answers else "")
                     + (f"{fmt(test.get('generated_accuracy'))} | " if written else "")
                     + f"{r['train_seconds']:.1f} | {fmt(gain(r, by_run, 'perplexity', -1.0), '+.2f')} |")
    return lines


def cross_lines(runs: list[dict[str, Any]]) -> list[str]:
    """One row per cross-task run: each task's test metric (accuracy or entity F1) and its KD gain over the twin."""
    by_run = {r["run"]: r for r in runs}
    tasks = sorted({t for r in runs for t in r["tasks"]})

    def metric(r, t):
        m = ((r or {}).get("test") or {}).get(t)
        return None if m is None else (m["f1"] if "f1" in m else m.get("accuracy"))

    lines = ["Cross-task students: one shared encoder, a head per task, trained on every listed task's cache. "
             "Test accuracy (classification) or entity F1 (token classification) per task; KD gain against the "
             "hard-label twin.", "",
             "| model | task weights | params | " + " | ".join(f"{t} test | {t} KD gain" for t in tasks) + " |",
             "|---|---|---:|" + "---:|---:|" * len(tasks)]
    teacher = []
    for t in tasks:  # each task's own teacher, from its cache's statistics
        cache = next(r["cache"][t] for r in runs if t in r["cache"])
        try:
            st = open_manifest(cache)[2]["splits"]["test"]["stats"]
            v = st.get("teacher_entity_f1", st.get("teacher_accuracy"))
        except (KeyError, FileNotFoundError, CacheFormatError):
            v = None
        teacher += [fmt(v), "–"]
    lines.append("| **teachers** (one per task) | – | – | " + " | ".join(teacher) + " |")
    for r in sorted(runs, key=lambda r: (r["student"], not r["kd"])):
        twin = by_run.get(f"{r['run']}-hard") if r["kd"] else None
        cells = []
        for t in tasks:
            v, w = metric(r, t), metric(twin, t)
            cells += [fmt(v), "–" if v is None or w is None else f"{v - w:+.4f}"]
        weights = ", ".join(f"{t} {w:g}" for t, w in sorted(r["tasks"].items()))
        lines.append(f"| {r['run']} ({'KD' if r['kd'] else 'hard labels'}) | {weights} | {r['parameters']:,} | "
                     + " | ".join(cells) + " |")
    return lines




def per_language_rows(runs: list[dict[str, Any]], key: str) -> dict[str, dict[str, float | None]]:
    """Per student family (per-language students gathered in one row): test `key` per language."""
    rows: dict[str, dict[str, float | None]] = {}
    for r in in_order(runs):
        family = r["student"].split("@")[0]
        kind = "one per language" if "@" in r["student"] else "multilingual"
        got = rows.setdefault(f"{family} ({kind}, {'KD' if r['kd'] else 'hard labels'})", {})
        if len(r["languages"]) == 1:
            got[r["languages"][0]] = (r.get("test") or {}).get(key)
        else:
            got.update({c: v.get(key) for c, v in (r.get("test_by_language") or {}).items()})
    return rows


def language_table(rows: dict[str, dict[str, float | None]], codes: list[str]) -> list[str]:
    lines = ["| model | " + " | ".join(codes) + " | mean |", "|---|" + "---:|" * (len(codes) + 1)]
    for label, vals in rows.items():
        have = [vals[c] for c in codes if vals.get(c) is not None]
        lines.append(f"| {label} | " + " | ".join(fmt(vals.get(c)) for c in codes) +
                     f" | {fmt(float(np.mean(have)) if len(have) == len(codes) else None)} |")
    return lines + [""]

