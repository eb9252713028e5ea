"""Causal-LM student: a small Llama-style `transformers` model built from a config, with the teacher's vocabulary
(it reads the cache's token ids, so it shares the teacher's tokenizer by construction)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LlamaParams:
    hidden: int = 128
    layers: int = 2
    heads: int = 4
    intermediate: int = 384
    tie_embeddings: bool = True


def llama_student(p: LlamaParams, vocab_size: int, seq_len: int) -> torch.nn.Module:
    """LlamaForCausalLM sized by `p` (see docs/students.md)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=p.hidden, num_hidden_layers=p.layers,
                      num_attention_heads=p.heads, num_key_value_heads=p.heads, intermediate_size=p.intermediate,
                      max_position_embeddings=seq_len, tie_word_embeddings=p.tie_embeddings)
    return LlamaForCausalLM(cfg)
