"""Transfer sets by augmentation (Tang et al., 2019, "Distilling task-specific knowledge from BERT into simple
neural networks", section 3.3): each row of a split gives up to `n_iter` unlabelled variants for the teacher to
label once, kept as their own cached split with each variant's parent id.

Per word, one uniform draw X: X < p_mask masks it; p_mask <= X < p_mask + p_pos replaces it by a word of the same
part of speech drawn from that tag's unigram distribution in the split; then, with probability p_ng, the variant is
cut to one n-gram (n uniform in 1..max_ngram). Variants equal to their parent or to an earlier variant are dropped.

Part-of-speech tags come from a word -> tag lexicon read from the POS column of CoNLL-2003 (each lowercased word's
most frequent Penn tag): it installs with nothing, works offline, and a unigram tagger is ~90% right on English
news; a word it does not know is never replaced (`AugmentStats.pos_coverage` says how many that is).
"""

from __future__ import annotations

import functools
import gzip
import random
import re
from collections import Counter, defaultdict
from dataclasses import dataclass
from itertools import accumulate
from pathlib import Path
from typing import Any

import datasets

from ..errors import KdcacheError

TOKEN = re.compile(r"\w+(?:['’]\w+)*|[^\w\s]")  # words (with inner apostrophes) and single punctuation marks
CONLL_MARKERS = ("-DOCSTART-",)


class AugmentError(KdcacheError):
    """Augmentation settings or inputs that cannot work; the message names the setting or file."""


def tokens(text: str) -> list[str]:
    """The words and punctuation marks augmentation works on (variants are these, joined by single spaces)."""
    return TOKEN.findall(text)


@functools.lru_cache(maxsize=4)
def pos_lexicon(path: str) -> dict[str, str]:
    """Lowercased word -> its most frequent part-of-speech tag in a CoNLL-2003-style file (`WORD POS CHUNK NER` per
    line, gzip or plain); punctuation tags are left out (those words are never replaced)."""
    p = Path(path)
    if not p.is_file():
        raise AugmentError(f"{p}: part-of-speech lexicon file not found (data.augment.pos_lexicon); it is CoNLL-2003's "
                           "train.txt.gz under ../shared/data/conll2003, or any file with `WORD POS ...` per line")
    counts: dict[str, Counter] = defaultdict(Counter)
    opener = gzip.open if p.suffix == ".gz" else open
    with opener(p, "rt", encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            parts = line.split()
            if not parts or parts[0] in CONLL_MARKERS:
                continue
            if len(parts) < 2:
                raise AugmentError(f"{p}:{n}: expected `WORD POS ...`, got {line.strip()!r} "
                                   "(data.augment.pos_lexicon needs a part-of-speech column)")
            if parts[1][0].isalpha():  # Penn tags of punctuation are symbols: `.`, `,`, `''`, `(` ...
                counts[parts[0].lower()][parts[1]] += 1
    if not counts:
        raise AugmentError(f"{p}: no tagged words found (data.augment.pos_lexicon)")
    return {w: c.most_common(1)[0][0] for w, c in counts.items()}


@dataclass(frozen=True)
class Sampler:
    """Per tag, the split's words with that tag and their cumulative counts (its unigram distribution)."""

    words: dict[str, list[str]]
    cum: dict[str, list[int]]

    @classmethod
    def build(cls, texts: list[list[str]], lexicon: dict[str, str]) -> "Sampler":
        by_tag: dict[str, Counter] = defaultdict(Counter)
        for toks in texts:
            for t in toks:
                tag = lexicon.get(t.lower())
                if tag is not None:
                    by_tag[tag][t] += 1
        words = {tag: sorted(c) for tag, c in by_tag.items()}  # sorted: the same draws whatever the row order
        return cls(words, {tag: list(accumulate(by_tag[tag][w] for w in ws)) for tag, ws in words.items()})

    def draw(self, tag: str, rng: random.Random) -> str:
        return rng.choices(self.words[tag], cum_weights=self.cum[tag])[0]


def variant(toks: list[str], rng: random.Random, settings: Any, lexicon: dict[str, str], sampler: Sampler) -> list[str]:
    """One augmented copy of a row's tokens (see the module docstring)."""
    out = []
    for t in toks:
        x = rng.random()
        if not (t[0].isalnum() or t[0] == "_"):  # punctuation is kept as it is
            out.append(t)
        elif x < settings.p_mask:
            out.append(settings.mask_token)
        elif x < settings.p_mask + settings.p_pos and lexicon.get(t.lower()) in sampler.words:
            out.append(sampler.draw(lexicon[t.lower()], rng))
        else:
            out.append(t)
    if out and rng.random() < settings.p_ng:
        n = min(rng.randint(1, settings.max_ngram), len(out))
        start = rng.randrange(len(out) - n + 1)
        out = out[start:start + n]
    return out


@dataclass(frozen=True)
class AugmentStats:
    """What an augmentation made: rows in, variants out, and the share of word tokens the lexicon tags."""

    parents: int
    variants: int
    pos_coverage: float


def augment_split(ds: datasets.Dataset, field: str, settings: Any, lexicon_path: str) -> tuple[datasets.Dataset,
                                                                                              AugmentStats]:
    """Dataset(id, <field>, label = -1, parent) of up to `settings.n_iter` variants per row of `ds`, in row order,
    ids `<parent id>~<j>`. Each row's draws are seeded by (seed, its id): the same variants whatever else the split
    holds, and other ones for another seed."""
    lexicon = pos_lexicon(lexicon_path)
    texts = [tokens(t) for t in ds[field][:]]
    sampler = Sampler.build(texts, lexicon)
    words = [t for toks in texts for t in toks if t[0].isalnum()]
    coverage = sum(t.lower() in lexicon for t in words) / max(1, len(words))
    ids, out, parents = [], [], []
    for pid, toks in zip(ds["id"][:], texts):
        rng = random.Random(f"kdcache-augment/{settings.seed}/{pid}")
        seen = {tuple(toks)}
        for j in range(settings.n_iter):
            v = variant(toks, rng, settings, lexicon, sampler)
            if v and tuple(v) not in seen:
                seen.add(tuple(v))
                ids.append(f"{pid}~{j}")
                out.append(" ".join(v))
                parents.append(pid)
    table = datasets.Dataset.from_dict({"id": ids, field: out, "label": [-1] * len(ids), "parent": parents},
                                       features=datasets.Features({"id": datasets.Value("string"),
                                                                   field: datasets.Value("string"),
                                                                   "label": datasets.Value("int64"),
                                                                   "parent": datasets.Value("string")}))
    return table, AugmentStats(len(ds), len(ids), coverage)
