"""Memory of the causal-LM paths at Gemma's vocabulary (262,144 ids) over one sequence of 512 / 2,048 / 8,192
positions, each case in its own process, reporting its peak RSS above what the process held once the model was
built and had run its body over the sequence once, so the figures are the vocabulary-wide part's own:

- `kdcache bench --capture-memory`: capture's reduction, unchunked (the full logits, the path before
  `cache.logit_chunk`) and chunked;
- `kdcache bench --train-memory`: one training step of a chat student whose every position is a response position
  (forward and backward of α·CE + (1-α)·KD on top-32 targets), with dense [N, V] logits and chunked under
  checkpointing (`AtTargets`), and the student's tokens/s.
"""

from __future__ import annotations

import datetime as _dt
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from .docsections import write_section
from .machine import machine

VOCAB = 262_144
POSITIONS = (512, 2048, 8192)
UNCHUNKED_MAX = 2048  # beyond this the unchunked path needs > 24 GiB on this class of machine

_CASE = """
import json, resource, sys, time
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from kdcache.capture.lm import LMRunner
from kdcache.config import CacheConfig
mode, n, vocab, chunk = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
torch.manual_seed(0)
model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                     num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True))
runner = LMRunner(model, CacheConfig(top_k=32, temperatures=(1.0, 2.0), batch_size=1, logit_chunk=chunk), "fp32", "cpu")
x = torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(0))
runner.chunked(x[:, :16])  # the head check and allocator warm-up, before the baseline
with torch.inference_mode():  # the body's own peak at this length (attention mask, activations) is the model's,
    runner.head.hidden(x)     # not the reduction's: it goes into the baseline
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
if mode == "unchunked":
    runner.targets(runner.forward(x), x, 32, (1.0, 2.0))
else:
    runner.chunked(x)
seconds = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"peak_mib": peak / 1024, "above_model_mib": (peak - base) / 1024, "seconds": seconds}))
"""


def cuda_peaks(vocab: int = VOCAB, positions: tuple[int, ...] = POSITIONS, precision: str = "bf16") -> dict[str, Any]:
    """On the GPU (for `make gpu-check`): per length, the CUDA peak above the model and its body's own run (GiB) of
    the chunked reduction and, up to UNCHUNKED_MAX positions, of the unchunked one; one process, the peak counter
    reset before each case (CUDA's allocator reports it exactly, unlike RSS)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from ..capture.lm import LMRunner
    from ..config import CacheConfig
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True))
    runner = LMRunner(model, CacheConfig(top_k=32, temperatures=(1.0, 2.0), batch_size=1), precision, "cuda")
    out: dict[str, Any] = {}
    for n in positions:
        x = torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(0))
        runner.chunked(x[:, :16])
        out[n] = {}
        for mode in ("chunked", "unchunked") if n <= UNCHUNKED_MAX else ("chunked",):
            torch.cuda.synchronize()
            with torch.no_grad(), runner.autocast():
                runner.head.hidden(x.to(runner.device))
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            runner.chunked(x) if mode == "chunked" else runner.targets(runner.forward(x), x, 32, (1.0, 2.0))
            torch.cuda.synchronize()
            out[n][mode] = round((torch.cuda.max_memory_allocated() - base) / 2**30, 3)
    return out


_TRAIN_CASE = """
import json, resource, sys, time
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from kdcache.lmhead import OutputHead
from kdcache.train.lm_losses import AtTargets, LossTerms, chat_loss
mode, n, vocab, chunk = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
torch.manual_seed(0)
model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                     num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True))
head, g = OutputHead(model), torch.Generator().manual_seed(0)
x = torch.randint(0, vocab, (1, n + 1), generator=g)
ids = torch.randint(0, vocab, (n, 32), generator=g)
batch = {"input_ids": x, "target_index": torch.arange(n), "topk_ids": ids,
         "topk_logits": torch.randn(n, 32, generator=g).sort(-1, descending=True).values,
         "lse": torch.full((n, 1), 5.0), "tail": torch.full((n, 1), -0.1)}
loss = LossTerms(kind="kl", temperature=1.0, alpha=0.5)
def step():
    h = head.hidden(x)[0, :n]
    out = AtTargets(h, head) if mode == "chunked" else head.logits(h)
    value, _ = chat_loss(out, batch, loss, {"temperatures": [1.0]}, chunk=chunk)
    value.backward()
head.hidden(x).sum().backward()  # the body's own peak, forward and backward, goes into the baseline
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
step()
seconds = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"peak_mib": peak / 1024, "above_model_mib": (peak - base) / 1024, "seconds": seconds,
                  "tokens_per_s": n / seconds}))
"""


def _case(mode: str, n: int, vocab: int, chunk: int, script: str = _CASE) -> dict[str, Any]:
    out = subprocess.run([sys.executable, "-c", script, mode, str(n), str(vocab), str(chunk)], check=True,
                         capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _measure(kind: str, script: str, other: str, render_fn, out_dir: Path, doc: Path | None, vocab: int,
             positions: tuple[int, ...], chunk: int) -> dict[str, Any]:
    """Every (path, positions) case of one benchmark: the chunked path, and `other` (the unchunked one) up to
    UNCHUNKED_MAX; JSON `<kind>.json` to `out_dir`, the `bench:<kind>` section to `doc`."""
    from ..lmhead import chunk_positions
    import torch
    res: dict[str, Any] = {"date": _dt.date.today().isoformat(), "machine": machine(), "vocab": vocab,
                           "chunk": chunk_positions(chunk, vocab, torch.device("cpu")), "rows": {}}
    for n in positions:
        res["rows"][n] = {"chunked": _case("chunked", n, vocab, chunk, script)}
        if n <= UNCHUNKED_MAX:
            res["rows"][n][other] = _case(other, n, vocab, chunk, script)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{kind}.json").write_text(json.dumps(res, indent=1))
    text = render_fn(res)
    print(text)
    if doc is not None:
        write_section(doc, f"bench:{kind}", text)
    return res


def run_capture_memory(out_dir: Path, doc: Path | None, vocab: int = VOCAB,
                       positions: tuple[int, ...] = POSITIONS, chunk: int = 0) -> dict[str, Any]:
    """Capture's reduction, chunked and unchunked (`_measure`)."""
    return _measure("capture-memory", _CASE, "unchunked", render, out_dir, doc, vocab, positions, chunk)


def run_train_memory(out_dir: Path, doc: Path | None, vocab: int = VOCAB,
                     positions: tuple[int, ...] = POSITIONS, chunk: int = 0) -> dict[str, Any]:
    """One chat training step, chunked and with dense logits (`_measure`)."""
    return _measure("train-memory", _TRAIN_CASE, "dense", render_train, out_dir, doc, vocab, positions, chunk)


def _rows(r: dict[str, Any], other: str, speed) -> list[str]:
    """Table rows: positions, logits size, `other`'s and the chunked peak, then `speed(case)` of each."""
    lines = []
    for n, v in r["rows"].items():
        o = v.get(other)
        lines.append(f"| {int(n):,} | {int(n) * r['vocab'] * 4 / 2**30:.2f} GiB | "
                     + (f"{o['above_model_mib'] / 1024:.2f} GiB" if o else "not run") + " | "
                     + f"{v['chunked']['above_model_mib'] / 1024:.2f} GiB | "
                     + (speed(o) if o else "–") + f" | {speed(v['chunked'])} |")
    return lines


def render_train(r: dict[str, Any]) -> str:
    lines = ["## Chat student training memory at Gemma's vocabulary", "",
             f"`kdcache bench --train-memory` on {r['date']} ({r['machine']}): one training step (forward and "
             f"backward of 0.5·CE + 0.5·KL on top-32 targets + tail) of a one-layer Llama student with a "
             f"{r['vocab']:,}-id vocabulary (tied embeddings) over one sequence whose every position is a response "
             "position; peak RSS above the body's own forward and backward, each case in its own process. Dense: "
             f"the [N, V] logits at once (the path before chunking); chunked: {r['chunk']} positions at a time "
             "under checkpointing (`ChatModel`, the training path), the same loss and gradients (tests/"
             f"test_chat_lm.py). Dense is not run above {UNCHUNKED_MAX:,} positions.", "",
             "| positions | logits (float32) | dense: peak above the body | chunked: peak above the body | dense "
             "tokens/s | chunked tokens/s |", "|---:|---:|---:|---:|---:|---:|"]
    return "\n".join(lines + _rows(r, "dense", lambda c: f"{c['tokens_per_s']:.0f}") + [""])


def render(r: dict[str, Any]) -> str:
    lines = ["## Causal-LM capture memory at Gemma's vocabulary", "",
             f"`kdcache bench --capture-memory` on {r['date']} ({r['machine']}): one sequence through a one-layer "
             f"Llama with a {r['vocab']:,}-id vocabulary (tied embeddings), top-k 32, temperatures 1 and 2; peak RSS "
             f"of the capture above the model's own peak (built, and its body run once over the sequence: attention memory is "
             f"the model's), each case in its own process. Chunked: {r['chunk']} positions "
             "per chunk (`cache.logit_chunk: 0`, auto). The unchunked path (the full [B, L, V] logits reduced in one "
             f"piece, as before) is not run above {UNCHUNKED_MAX:,} positions.", "",
             "| positions | full logits (float32) | unchunked: peak above the body | chunked: peak above the body | "
             "unchunked s | chunked s |", "|---:|---:|---:|---:|---:|---:|"]
    return "\n".join(lines + _rows(r, "unchunked", lambda c: f"{c['seconds']:.1f}") + [""])
