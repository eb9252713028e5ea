"""How each teacher head presents itself in the report and the CLI: its teacher row, its table, the metric its plot
shows, and the one-line summaries of a cache split and a finished run. A head without an entry gets the generic
presentation built from its `HeadSpec` metric, so a new head reports without one; it may `register` its own."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from .. import heads
from ..cache.reader import open_manifest
from .tables import classification_lines, fmt, gain, in_order, lm_lines, student_cells, token_lines
from .teachers import teacher_fields, teacher_row_classification, teacher_row_lm, teacher_row_tokens


@dataclass(frozen=True)
class Presenter:
    """teacher_row(cache, test split) -> the teacher's row; lines(runs, {task: teacher row}) -> the head's table;
    plot_metric / axis_label / log_scale: its scatter plot; speed_plot: also plot against CPU speed (report.png);
    split_summary / split_info: a split's statistics in `kdcache cache` / `kdcache info`; run_summary: a finished
    run's test metrics in `kdcache train`."""

    teacher_row: Callable[[str, str], dict[str, Any]]
    lines: Callable[[list[dict], dict[str, dict]], list[str]]
    plot_metric: str
    axis_label: str
    split_summary: Callable[[dict], str]
    split_info: Callable[[dict], str]
    run_summary: Callable[[dict], str]
    log_scale: bool = False
    speed_plot: bool = False


PRESENTERS: dict[str, Presenter] = {}


def register(head: str, p: Presenter) -> Presenter:
    PRESENTERS[head] = p
    return p


def presenter(head: str) -> Presenter:
    """The head's presentation, or the generic one of its `HeadSpec` metric."""
    return PRESENTERS.get(head) or generic(head)


def generic(head: str) -> Presenter:
    """A table of the head's metric (`HeadSpec.metric`), the teacher's from its cache's test statistics."""
    m = heads.get(head).metric
    spec = ".4f"

    def teacher_row(cache: str, test_split: str) -> dict[str, Any]:
        man = open_manifest(cache)[2]
        return {**teacher_fields(man), "test": {m.key: man["splits"][test_split]["stats"].get(m.teacher_stat)}}

    def lines(runs: list[dict], teachers: dict[str, dict]) -> list[str]:
        by_run = {r["run"]: r for r in runs}
        sign = 1.0 if m.higher_is_better else -1.0
        out = [f"{head}: {m.words} of each model; KD gain = the KD student's minus its hard-label twin's "
               f"({'higher' if m.higher_is_better else 'lower'} is better).", "",
               f"| model | task | params | {m.words} | train s | KD gain |", "|---|---|---:|---:|---:|---:|"]
        out += [f"| **{t['run']}** | {task} | {t['parameters'] or 0:,} | {fmt(t['test'].get(m.key), spec)} | – | – |"
                for task, t in teachers.items()]
        out += [f"{student_cells(r)} {fmt((r.get('test') or {}).get(m.key), spec)} | {r['train_seconds']:.1f} | "
                f"{fmt(gain(r, by_run, m.key, sign), '+.4f')} |" for r in in_order(runs)]
        return out

    return Presenter(teacher_row, lines, m.key, m.words,
                     split_summary=lambda s: f", teacher {m.key} {fmt(s.get(m.teacher_stat), spec)}",
                     split_info=lambda s: f"teacher {m.key} {fmt(s.get(m.teacher_stat), spec)}",
                     run_summary=lambda t: f"{m.words} {fmt(t.get(m.key), spec)}")


register(heads.SEQUENCE, Presenter(
    teacher_row_classification, classification_lines, "accuracy", "test accuracy",
    split_summary=lambda s: (f", teacher accuracy {s['teacher_accuracy']:.4f}" if s.get("teacher_accuracy") is not None
                             else f", unlabelled, teacher confidence {s['mean_confidence']:.3f}"
                             if s.get("mean_confidence") is not None else ""),
    split_info=lambda s: (f"{s['bytes_per_example']:>8} B/ex  teacher acc {fmt(s['teacher_accuracy'])}  confidence "
                          f"{fmt(s.get('mean_confidence'), '.3f')}  entropy {s['mean_entropy_nats']:.3f}  truncated "
                          f"{s['truncated_rows']}"),
    run_summary=lambda t: (f"test acc {fmt(t.get('accuracy'))}  macro-F1 {fmt(t.get('macro_f1'))}  agreement "
                           f"{fmt(t.get('agreement'))}"),
    speed_plot=True))
register(heads.TOKEN, Presenter(
    teacher_row_tokens, token_lines, "f1", "test entity F1",
    split_summary=lambda s: (f", {s['words']} words ({s['uncovered_words']} beyond max_length), teacher entity F1 "
                             f"{s['teacher_entity_f1']:.4f}"),
    split_info=lambda s: (f"{s['bytes_per_example']:>8} B/ex  teacher entity F1 {s['teacher_entity_f1']:.4f}  words "
                          f"{s['words']}  truncated {s['truncated_rows']} ({s['uncovered_words']} words)"),
    run_summary=lambda t: (f"test entity F1 {fmt(t.get('f1'))}  precision {fmt(t.get('precision'))}  recall "
                           f"{fmt(t.get('recall'))}")))
register(heads.CAUSAL_LM, Presenter(
    teacher_row_lm, lm_lines, "perplexity", "test perplexity (log)",
    split_summary=lambda s: (f", {s['tokens']} tokens, teacher perplexity {s['teacher_perplexity']:.2f}"
                             + (f", {s['teacher_bits_per_byte']:.3f} bits/byte" if s.get("teacher_bits_per_byte")
                                else "")),
    split_info=lambda s: (f"{s['bytes_per_token']:>8} B/token  teacher ppl {s['teacher_perplexity']:.2f}  top-1 "
                          f"{s['teacher_top1_accuracy']:.3f}  tail mass {s['mean_tail_mass']:.4f}"
                          + (f"  {s['teacher_bits_per_byte']:.3f} bits/byte" if s.get("teacher_bits_per_byte") else "")
                          + (f"  {s['tokens_per_word']:.2f} tokens/word" if s.get("tokens_per_word") else "")),
    run_summary=lambda t: (f"test perplexity {fmt(t.get('perplexity'), '.2f')}  KL to teacher "
                           f"{fmt(t.get('kl_to_teacher'))}"
                           + (f"  bits/byte {t['bits_per_byte']:.4f}" if t.get("bits_per_byte") is not None else "")
                           + (f"  aligned {t['aligned_share']:.2f}" if t.get("aligned_share") is not None else "")),
    log_scale=True))
register(heads.CHAT_LM, Presenter(
    teacher_row_lm, lm_lines, "answer_accuracy", "test answer accuracy",
    split_summary=lambda s: (f", {s['tokens']} tokens, {s['response_tokens']} in responses, teacher perplexity "
                             f"{s['teacher_perplexity']:.2f}, {s['teacher_bits_per_byte']:.3f} bits/byte, "
                             f"{s['truncated_rows']} rows cut (max_length, or a response at max_new_tokens)"),
    split_info=lambda s: (f"{s['bytes_per_response_token']:>8} B/response token  teacher ppl "
                          f"{s['teacher_perplexity']:.2f}  top-1 {s['teacher_top1_accuracy']:.3f}  tail mass "
                          f"{s['mean_tail_mass']:.4f}  {s['teacher_bits_per_byte']:.3f} bits/byte  answers "
                          f"{fmt(s.get('teacher_answer_accuracy'), '.3f')}  truncated "
                          f"{s['truncated_rows']}"),
    run_summary=lambda t: (f"test perplexity {fmt(t.get('perplexity'), '.2f')}  bits/byte "
                           f"{fmt(t.get('bits_per_byte'))}  answer acc {fmt(t.get('answer_accuracy'))}"
                           + (f"  generated acc {fmt(t['generated_accuracy'])}" if t.get("generated_accuracy")
                              is not None else "") + "  top-1 "
                           f"agreement {fmt(t.get('top1_agreement'))}  KL to teacher {fmt(t.get('kl_to_teacher'))}"),
    log_scale=False))
