"""Word-level taggers for token-classification caches: one output per WORD, matching the cache's word-aligned
teacher logits whatever the teacher's tokenizer was. Inputs: word ids, word shapes (case, digits), mask."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .lstm import bilstm
from .tokenizers import NUM_SHAPES


@dataclass(frozen=True)
class BiLSTMTaggerParams:
    embed_dim: int = 100
    shape_dim: int = 16
    hidden: int = 128
    layers: int = 1
    dropout: float = 0.2


class BiLSTMTagger(nn.Module):
    """Embeddings (word + shape) -> BiLSTM -> linear per word."""

    def __init__(self, p: BiLSTMTaggerParams, vocab_size: int, num_labels: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, p.embed_dim, padding_idx=0)
        self.shape = nn.Embedding(NUM_SHAPES, p.shape_dim, padding_idx=0)
        self.lstm = nn.LSTM(p.embed_dim + p.shape_dim, p.hidden, p.layers, batch_first=True, bidirectional=True)
        self.drop = nn.Dropout(p.dropout)
        self.out = nn.Linear(2 * p.hidden, num_labels)
        self.hidden_size = 2 * p.hidden

    def encode(self, ids, shapes, mask):
        """Per-word hidden states [B, W, hidden_size] (what a feature loss is taken on)."""
        x = self.drop(torch.cat([self.embed(ids), self.shape(shapes)], -1))
        return bilstm(self.lstm, x, mask.sum(1))[0]

    def head(self, h):
        """Per-word hidden states -> tag logits."""
        return self.out(self.drop(h))

    def forward(self, ids, shapes, mask):
        return self.head(self.encode(ids, shapes, mask))


@dataclass(frozen=True)
class TransformerTaggerParams:
    dim: int = 128
    shape_dim: int = 16
    layers: int = 2
    heads: int = 4
    ffn: int = 256
    max_words: int = 256
    dropout: float = 0.1


class TransformerTagger(nn.Module):
    """A small word-level transformer encoder (its own word vocabulary) -> linear per word."""

    def __init__(self, p: TransformerTaggerParams, vocab_size: int, num_labels: int) -> None:
        super().__init__()
        self.max_words = p.max_words
        self.embed = nn.Embedding(vocab_size, p.dim - p.shape_dim, padding_idx=0)
        self.shape = nn.Embedding(NUM_SHAPES, p.shape_dim, padding_idx=0)
        self.pos = nn.Embedding(p.max_words, p.dim)
        layer = nn.TransformerEncoderLayer(p.dim, p.heads, p.ffn, p.dropout, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, p.layers, enable_nested_tensor=False)
        self.out = nn.Linear(p.dim, num_labels)
        self.hidden_size = p.dim

    def encode(self, ids, shapes, mask):
        """Per-word hidden states [B, W, dim]; words beyond max_words get zeros (their logits are the output bias)."""
        width = ids.shape[1]  # CoNLL's longest sentence has 124 words
        ids, shapes, mask = ids[:, :self.max_words], shapes[:, :self.max_words], mask[:, :self.max_words]
        x = torch.cat([self.embed(ids), self.shape(shapes)], -1) + self.pos(torch.arange(ids.shape[1], device=ids.device))
        h = self.encoder(x, src_key_padding_mask=mask == 0)
        return nn.functional.pad(h, (0, 0, 0, width - h.shape[1])) if width > h.shape[1] else h

    def head(self, h):
        """Per-word hidden states -> tag logits."""
        return self.out(h)

    def forward(self, ids, shapes, mask):
        return self.head(self.encode(ids, shapes, mask))
