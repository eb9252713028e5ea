"""Tokenizers as byte strings, for distillation across tokenizers (docs/cross-tokenizer.md): each id's bytes, and
where each token of a text ends in that text's UTF-8 bytes. Stage one records both in LM caches; stage two uses
them to align a student's own tokens with the teacher's and to map teacher ids onto student ids."""

from __future__ import annotations

import json
import re
import weakref
from functools import lru_cache
from typing import Any, Sequence

import numpy as np

BYTE_TOKEN = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


class VocabularyError(ValueError):
    """A tokenizer whose tokens cannot be turned back into bytes."""


@lru_cache(maxsize=1)
def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level alphabet inverted: the printable character that stands for each byte -> the byte."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def _decoder_steps(tokenizer: Any) -> list[dict[str, Any]]:
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    if backend is None:
        raise VocabularyError(f"{type(tokenizer).__name__} has no `tokenizers` backend; cross-tokenizer "
                              "distillation needs a fast tokenizer")
    dec = json.loads(backend.to_str()).get("decoder") or {}
    return dec.get("decoders", [dec]) if dec.get("type") == "Sequence" else [dec]


_VOCABS: "weakref.WeakKeyDictionary[Any, tuple[list[bytes], list[bool]]]" = weakref.WeakKeyDictionary()


def vocab_bytes(tokenizer: Any) -> tuple[list[bytes], list[bool]]:
    """(each id's bytes, whether the id is special). Special and added control tokens have no bytes (b"").
    Understands byte-level BPE (GPT-2, SmolLM2, Llama 3), SentencePiece-style '▁' with <0xNN> byte fallback
    (Gemma, Llama 2, Mistral) and WordPiece ('##' continuations; a word start gets a leading space). Computed once
    per tokenizer object (about 2 s for Gemma's 262,144 ids; capture packs each language and writes the
    vocabulary file from the same result); treat it as read-only."""
    if tokenizer not in _VOCABS:
        _VOCABS[tokenizer] = _vocab_bytes(tokenizer)
    return _VOCABS[tokenizer]


def _vocab_bytes(tokenizer: Any) -> tuple[list[bytes], list[bool]]:
    steps = _decoder_steps(tokenizer)
    kinds = {s.get("type") for s in steps}
    vocab = tokenizer.get_vocab()
    size = max(max(vocab.values()) + 1, len(tokenizer))
    specials = set(getattr(tokenizer, "all_special_ids", []) or [])
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    specials |= {i for i, t in added.items() if getattr(t, "special", False)}
    out, special = [b""] * size, [False] * size
    if "ByteLevel" in kinds:
        alphabet = _byte_level_alphabet()

        def to_bytes(t: str) -> bytes:
            try:
                return bytes(alphabet[c] for c in t)
            except KeyError:  # an added token written in plain text
                return t.encode()
    elif "WordPiece" in kinds:
        prefix = next(s.get("prefix", "##") for s in steps if s.get("type") == "WordPiece")

        def to_bytes(t: str) -> bytes:
            return t[len(prefix):].encode() if t.startswith(prefix) else (" " + t).encode()
    else:
        replace = [(s["pattern"]["String"], s["content"]) for s in steps
                   if s.get("type") == "Replace" and "String" in s.get("pattern", {})]
        replace += [(s.get("replacement", "▁"), " ") for s in steps if s.get("type") == "Metaspace"]
        fallback = "ByteFallback" in kinds

        def to_bytes(t: str) -> bytes:
            m = BYTE_TOKEN.match(t) if fallback else None
            if m:
                return bytes([int(m.group(1), 16)])
            for a, b in replace:
                t = t.replace(a, b)
            return t.encode()
    for t, i in vocab.items():
        if i in specials:
            special[i] = True
            continue
        out[i] = to_bytes(t)
    return out, special


def char_to_byte_offsets(text: str) -> np.ndarray:
    """[len(text) + 1] int64: the UTF-8 byte offset of each character boundary."""
    cp = np.frombuffer(text.encode("utf-32-le"), dtype="<u4")
    width = 1 + (cp >= 0x80) + (cp >= 0x800) + (cp >= 0x10000)
    return np.concatenate([[0], np.cumsum(width, dtype=np.int64)])


def byte_ends(tokenizer: Any, texts: Sequence[str],
              vocab: Sequence[bytes] | None = None) -> tuple[list[list[int]], list[np.ndarray]]:
    """(token ids, for each token the UTF-8 byte offset in its text where it ends) of each text, without special
    tokens. With `vocab` (`vocab_bytes`), a text whose tokens' bytes spell it exactly gets exact byte ends, also
    for tokens that end inside a character (byte-level BPE splits multi-byte characters); otherwise (a normalising
    tokenizer: lower-casing, an added prefix space) the ends come from its character offsets, and a token inside a
    character ends where the character ends. Bytes between two tokens' ends belong to the second (leading
    whitespace goes with the word after it)."""
    enc = tokenizer(list(texts), add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    ends = []
    for text, ids, offsets in zip(texts, enc["input_ids"], enc["offset_mapping"]):
        if vocab is not None:
            pieces = [vocab[i] for i in ids]
            if b"".join(pieces) == text.encode():
                ends.append(np.cumsum([len(b) for b in pieces], dtype=np.int64))
                continue
        chars = np.fromiter((e for _, e in offsets), dtype=np.int64, count=len(offsets))
        ends.append(np.maximum.accumulate(char_to_byte_offsets(text)[chars]) if len(chars) else chars)
    return [list(x) for x in enc["input_ids"]], ends


def whole_characters(b: bytes) -> tuple[int, int]:
    """(start, stop) of the longest run of whole UTF-8 characters in `b` with at most 3 bytes cut at either end
    (a packed row may begin or end inside a character when the teacher's tokens split it)."""
    start = 0
    while start < min(len(b), 3) and b[start] & 0xC0 == 0x80:
        start += 1
    stop = len(b)
    for i in range(len(b) - 1, max(start, len(b) - 4) - 1, -1):
        if b[i] & 0xC0 != 0x80:  # the last character's first byte
            need = 1 if b[i] < 0x80 else 2 if b[i] < 0xE0 else 3 if b[i] < 0xF0 else 4
            if i + need > len(b):
                stop = i
            break
    return start, stop
