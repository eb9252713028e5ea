"""`kdcache bench --capture-memory`: peak memory of causal-LM capture at Gemma's vocabulary (262,144 ids), one
sequence of 512 / 2,048 / 8,192 positions, through the unchunked reduction of the full logits (the path before
`cache.logit_chunk`) and the chunked one. Each case runs in its own process and reports its peak RSS above what
the process held once the model was built and had run its body over the sequence once, so the figures are the
reduction's own."""

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


def _case(mode: str, n: int, vocab: int, chunk: int) -> dict[str, Any]:
    out = subprocess.run([sys.executable, "-c", _CASE, mode, str(n), str(vocab), str(chunk)], check=True,
                         capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_capture_memory(out_dir: Path, doc: Path | None, vocab: int = VOCAB,
                       positions: tuple[int, ...] = POSITIONS, chunk: int = 0) -> dict[str, Any]:
    """Measure every (path, positions) case; JSON to `out_dir`, a `bench:capture-memory` section to `doc`."""
    from ..capture.logits import chunk_positions
    import torch
    res: dict[str, Any] = {"date": _dt.date.today().isoformat(), "machine": machine(), "vocab": vocab,
                           "chunk": chunk_positions(chunk, vocab, torch.device("cpu")), "rows": {}}
    for n in positions:
        res["rows"][n] = {"chunked": _case("chunked", n, vocab, chunk)}
        if n <= UNCHUNKED_MAX:
            res["rows"][n]["unchunked"] = _case("unchunked", n, vocab, chunk)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "capture-memory.json").write_text(json.dumps(res, indent=1))
    text = render(res)
    print(text)
    if doc is not None:
        write_section(doc, "bench:capture-memory", text)
    return res


def render(r: dict[str, Any]) -> str:
    lines = ["## Causal-LM capture memory at Gemma's vocabulary", "",
             f"`kdcache bench --capture-memory` on {r['date']} ({r['machine']}): one sequence through a one-layer "
             f"Llama with a {r['vocab']:,}-id vocabulary (tied embeddings), top-k 32, temperatures 1 and 2; peak RSS "
             f"of the capture above the model's own peak (built, and its body run once over the sequence: attention memory is "
             "the model's), each case in its own process. Chunked: {r['chunk']} positions "
             "per chunk (`cache.logit_chunk: 0`, auto). The unchunked path (the full [B, L, V] logits reduced in one "
             f"piece, as before) is not run above {UNCHUNKED_MAX:,} positions.", "",
             "| positions | full logits (float32) | unchunked: peak above the body | chunked: peak above the body | "
             "unchunked s | chunked s |", "|---:|---:|---:|---:|---:|---:|"]
    for n, v in r["rows"].items():
        un = v.get("unchunked")
        lines.append(f"| {int(n):,} | {int(n) * r['vocab'] * 4 / 2**30:.2f} GiB | "
                     + (f"{un['above_model_mib'] / 1024:.2f} GiB" if un else "not run") + " | "
                     + f"{v['chunked']['above_model_mib'] / 1024:.2f} GiB | "
                     + (f"{un['seconds']:.1f}" if un else "–") + f" | {v['chunked']['seconds']:.1f} |")
    return "\n".join(lines + [""])
