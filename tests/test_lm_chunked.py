"""Causal-LM capture a chunk of positions at a time (capture/logits.py) against the unchunked reduction of the
model's own full forward, for Llama and Gemma 3 (tied embeddings, final logit soft-capping), chunks of 1, 7 and all
positions, k = 5 and k = V: the same top-k ids, hits and draws for the same seed; log-sum-exp, tails and loss within
one float32 ulp, the float16 top-k logits within one float16 step (a chunk's matmul can round its last bit apart
from the full batch's)."""

from __future__ import annotations

import pytest
import torch
from transformers import Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM

from kdcache.capture.lm import LMRunner
from kdcache.capture.logits import OutputHead, chunk_positions
from kdcache.config import CacheConfig

V = 301


def llama(tied: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied))


def gemma3() -> torch.nn.Module:
    torch.manual_seed(0)
    # a soft-cap of 2 bends every logit: a head that skipped it would give other targets
    return Gemma3ForCausalLM(Gemma3TextConfig(vocab_size=V, hidden_size=32, intermediate_size=64,
                                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
                                              head_dim=8, sliding_window=8, final_logit_softcapping=2.0))


def reference(runner: LMRunner, x: torch.Tensor, seed: int) -> dict[str, torch.Tensor]:
    """Today's unchunked path: the model's full forward [B, L, V], reduced in one piece, sampled in one call."""
    c = runner.cache
    z = runner.forward(x)
    out = runner.targets(z, x, c.top_k, c.temperatures)
    gen = torch.Generator().manual_seed(seed)
    draws: dict[str, list] = {}
    if c.samples:
        runner.sample(z, c.samples, c.sample_temperature, gen, draws)
    return out, draws


@pytest.mark.parametrize("make", [lambda: llama(False), lambda: llama(True), gemma3], ids=["llama", "llama-tied",
                                                                                            "gemma3-softcap"])
@pytest.mark.parametrize("chunk,k", [(1, 5), (7, 5), (10_000, 5), (7, V)], ids=["1", "7", "all", "7-k=V"])
def test_chunked_capture_equals_the_unchunked_reduction_of_the_full_forward(make, chunk, k):
    model = make()
    cache = CacheConfig(top_k=k, temperatures=(1.0, 2.0, 4.0), samples=6, sample_temperature=1.5, batch_size=3,
                        logit_chunk=chunk)
    runner = LMRunner(model, cache, "fp32", "cpu")
    x = torch.randint(0, V, (3, 19), generator=torch.Generator().manual_seed(1))
    want, want_draws = reference(runner, x, seed=4)
    got, draws = runner.chunked(x, torch.Generator().manual_seed(4))
    assert runner.head, "Llama and Gemma 3 split their output layer off exactly"
    assert set(got) == set(want)
    for key in want:  # a chunk's float32 logits can differ from the full forward's by one ulp (BLAS blocks by rows)
        assert got[key].shape == want[key].shape, key
        if key == "topk_logits":  # stored as float16: at most one float16 rounding step apart
            torch.testing.assert_close(got[key], want[key], rtol=1e-3, atol=1e-6, msg=key)
        else:
            torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-6, msg=key)
    assert torch.equal(got["topk_ids"], want["topk_ids"]) and torch.equal(got["top1"], want["top1"])
    packed: dict[str, list] = {}
    from kdcache.capture.logits import pack_draws
    pack_draws(draws.numpy(), *x.shape, packed)
    for key in ("sample_ids", "sample_counts"):
        assert all((a == b).all() for a, b in zip(packed[key], want_draws[key]))
    assert (packed["sample_lengths"][0] == want_draws["sample_lengths"][0]).all()


def test_the_soft_cap_is_what_the_chunks_apply_and_it_matters():
    """Gemma's head is linear then tanh soft-capping: the split head has it, and without it the targets differ."""
    model = gemma3()
    head = OutputHead(model)
    assert head.softcap == 2.0 and head.usable
    x = torch.randint(0, V, (1, 9), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        assert head.check(model, x)
        capped = head.logits(head.hidden(x))
        head.softcap = None
        assert not torch.allclose(head.logits(head.hidden(x)), capped)
        assert not head.check(model, x)


def test_a_head_that_cannot_be_split_is_captured_from_the_full_forward():
    """A model whose output layer does more than kdcache knows (here: a scaled head) falls back to the full
    forward, still reduced chunk by chunk, and its targets are still the model's own."""
    model = llama(False)
    inner = model.forward

    def scaled(*a, **k):
        out = inner(*a, **k)
        out.logits = out.logits * 3.0
        return out
    model.forward = scaled
    runner = LMRunner(model, CacheConfig(top_k=4, temperatures=(1.0,), batch_size=2, logit_chunk=5), "fp32", "cpu")
    x = torch.randint(0, V, (2, 11), generator=torch.Generator().manual_seed(3))
    want, _ = reference(runner, x, seed=0)
    got, _ = runner.chunked(x)
    assert runner.head is False
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-6, msg=key)  # one float32 ulp at most


def test_the_automatic_chunk_fits_the_device_budget():
    cpu = torch.device("cpu")
    assert chunk_positions(64, 262_144, cpu) == 64
    n = chunk_positions(0, 262_144, cpu)
    assert 1 <= n and n * 262_144 * 4 <= 128 << 20 < (n + 1) * 262_144 * 4
    assert chunk_positions(0, 10**12, cpu) == 1


def test_the_capture_memory_bench_measures_both_paths_in_their_own_processes(tmp_path):
    """`kdcache bench --capture-memory` at a small size: both paths where the unchunked one is run, a doc section."""
    from kdcache.experiments.lm_memory import run_capture_memory
    doc = tmp_path / "benchmarks.md"
    r = run_capture_memory(tmp_path, doc, vocab=2048, positions=(48,), chunk=16)
    case = r["rows"][48]
    assert set(case) == {"chunked", "unchunked"} and r["chunk"] == 16
    assert all(v["peak_mib"] > v["above_model_mib"] >= 0 and v["seconds"] > 0 for v in case.values())
    assert "<!-- bench:capture-memory -->" in doc.read_text() and "| 48 |" in doc.read_text()
    assert "Chunked: 16 positions" in doc.read_text()


def test_the_train_memory_bench_measures_a_chat_step_both_ways(tmp_path):
    """`kdcache bench --train-memory` at a small size: dense and chunked training steps, memory and tokens/s."""
    from kdcache.experiments.lm_memory import run_train_memory
    doc = tmp_path / "benchmarks.md"
    r = run_train_memory(tmp_path, doc, vocab=2048, positions=(48,), chunk=16)
    case = r["rows"][48]
    assert set(case) == {"chunked", "dense"} and r["chunk"] == 16
    assert all(v["peak_mib"] > v["above_model_mib"] >= 0 and v["tokens_per_s"] > 0 for v in case.values())
    text = doc.read_text()
    assert "<!-- bench:train-memory -->" in text and "| 48 |" in text and "chunked: 16 positions" in text
