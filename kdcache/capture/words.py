"""Word alignment for token-classification teachers: their sub-token outputs are mapped back to WORDS (each word
takes its first sub-token's outputs), so students with any tokenizer can learn from the cache."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from .models import TeacherError


def align_words(tokenizer: Any, sentences: Sequence[Sequence[str]], max_length: int):
    """Tokenise word lists; returns (input ids per sentence, first sub-token index of each COVERED word, truncated).

    Covered words are the prefix of words whose first sub-token survived truncation to `max_length`; a word that
    yields no sub-token at all ends the prefix too (it has nothing to take logits from). Needs a fast tokenizer.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise TeacherError("token-classification needs a fast (Rust) tokenizer for word alignment; "
                           f"{type(tokenizer).__name__} is not one")
    enc = tokenizer([list(s) for s in sentences], is_split_into_words=True, truncation=True, max_length=max_length,
                    return_attention_mask=False, return_token_type_ids=False)
    ids, first, truncated = enc["input_ids"], [], np.zeros(len(sentences), dtype=bool)
    for i, words in enumerate(sentences):
        pos: dict[int, int] = {}
        for t, w in enumerate(enc.word_ids(i)):
            if w is not None and w not in pos:
                pos[w] = t
        covered = 0
        while covered in pos:
            covered += 1
        first.append([pos[w] for w in range(covered)])
        truncated[i] = covered < len(words)
    return ids, first, truncated


def token_labels(first: list[int], tags: Sequence[int], length: int) -> list[int]:
    """Per sub-token training labels: the word's tag on its first sub-token, -100 (ignored) elsewhere."""
    out = [-100] * length
    for w, t in enumerate(first):
        out[t] = int(tags[w]) if tags[w] >= 0 else -100
    return out
