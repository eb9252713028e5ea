"""The `data:` section of a task in the pipeline schema: where a task's rows come from and how they are shaped
(sources, files, splits, limits, languages, extra splits, augmented transfer sets). Part of schema.py's tree."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..typedconfig import ConfigError, at_least, between, build, each, one_of, setting, to_dict

EXTRA_INHERITS = ("text_fields", "label_field", "label_names", "limit")  # what `data.extra` splits take from the task


@dataclass(frozen=True)
class AugmentConfig:
    """A transfer set derived from a split (Tang et al., 2019): unlabelled variants of its rows, labelled once by the
    teacher and kept as their own cached split with each variant's parent id (kdcache/data/augment.py)."""

    split: str = setting("train", help="Split whose rows are augmented (their gold labels are not copied).")
    into: str = setting("transfer", help="Name of the cached split that holds the variants (students read it with "
                                         "`transfer: [<name>]`).")
    n_iter: int = setting(20, help="Variants tried per row; duplicates (of the row or an earlier variant) are dropped.",
                          check=at_least(1))
    p_mask: float = setting(0.1, help="Per word: probability of replacing it by `mask_token`.", check=between(0, 1))
    p_pos: float = setting(0.1, help="Per word: probability of replacing it by a word of the same part of speech, "
                                     "drawn from that tag's unigram distribution in the split.", check=between(0, 1))
    p_ng: float = setting(0.25, help="Per variant: probability of cutting it to one n-gram, n uniform in "
                                     "1..max_ngram.", check=between(0, 1))
    max_ngram: int = setting(5, help="Longest n-gram kept by n-gram sampling.", check=at_least(1))
    mask_token: str = setting("[MASK]", help="What a masked word becomes (the teacher tokenizer's mask token, e.g. "
                                             "`[MASK]` for BERT-style teachers, `<mask>` for RoBERTa).")
    pos_lexicon: str | None = setting(None, help="CoNLL-style file (`WORD POS ...` per line) whose POS column gives "
                                                "each word's most frequent tag. Default: "
                                                "`${KDCACHE_DATA:-../shared/data}/conll2003/train.txt.gz`.")
    seed: int = setting(0, help="Seed of the draws (each row's draws are seeded by it and the row's id).")

    def __post_init__(self) -> None:
        if self.p_mask + self.p_pos > 1:
            raise ConfigError(f"`data.augment`: p_mask + p_pos = {self.p_mask + self.p_pos} exceeds 1 (one draw per "
                              "word picks mask, swap or keep)")
        if self.into == self.split:
            raise ConfigError(f"`data.augment.into` = {self.into!r} is the split it augments; name a new split, "
                              "e.g. `transfer`")


CHAT_ROLES = ("system", "user", "assistant", "tool")


@dataclass(frozen=True)
class GenerateConfig:
    """Responses the teacher writes (sequence-level KD): from each row's prompt alone, the teacher generates the
    assistant's turn once during capture, and the cache keeps it with its targets. Seeded per shard, so a resumed
    capture regenerates only the shards it had not finished, identically."""

    max_new_tokens: int = setting(128, help="Most tokens generated per response (it stops earlier at the end of "
                                            "its turn; a response cut here is counted in `cut_responses`).",
                                  check=at_least(1))
    do_sample: bool = setting(False, help="Sample (true) or greedy decoding (false).")
    temperature: float = setting(1.0, help="Sampling temperature (do_sample).", check=at_least(1e-6))
    top_p: float = setting(1.0, help="Nucleus sampling mass (do_sample; 1 = off).", check=between(1e-6, 1))


@dataclass(frozen=True)
class ChatConfig:
    """How each row becomes one conversation for a `chat-lm` teacher, rendered with its chat template
    (kdcache/data/chat.py): a `messages` column, or a prompt and a response (columns, or templates over the row's
    columns), and the roles whose tokens the cache keeps targets for."""

    messages: str = setting("messages", help="Column holding a list of {role, content} turns (used when present).")
    prompt: str = setting("prompt", help="Column holding the user's prompt (with `response`: one user and one "
                                         "assistant turn).")
    response: str = setting("response", help="Column holding the assistant's response.")
    system: str | None = setting(None, help="Column holding a system message put first (null: the template's "
                                            "default, if it has one).")
    prompt_template: str | None = setting(None, help="Build the prompt from the row: a Python format string over "
                                                     "its columns, `{label}` being the gold label's name and "
                                                     "`{Label}` the same capitalised; `{text:.600}` keeps the first "
                                                     "600 characters (e.g. "
                                                     "`\"Topic of this article? {text}\"`).")
    response_template: str | None = setting(None, help="Build the response the same way (e.g. `\"{label}\"`: the "
                                                       "gold answer, for checkable tasks).")
    generate: GenerateConfig | None = setting(None, help="The teacher writes each response from the prompt "
                                                        "(see below); the data's own responses are not read.")
    roles: tuple[str, ...] = setting(("assistant",), help="Turns whose tokens a student learns: targets are cached "
                                                          "only where the next token belongs to one of them.",
                                     check=each(one_of(*CHAT_ROLES)))


@dataclass(frozen=True)
class DataConfig:
    """Where a task's rows come from and which columns hold text, label and id."""

    source: str = setting(help="Row source: `rotten_tomatoes`, `bbc_news`, `sst2`, `conll2003`, `conll2002` (subset "
                               "`esp`/`ned`; word-level NER rows) (built in, offline), `files` "
                               "(local csv/json/jsonl/parquet per split) or `hub` (a Hugging Face `datasets` name).")
    name: str | None = setting(None, help="Data set name on the hub (source `hub`), e.g. `stanfordnlp/imdb`.")
    subset: str | None = setting(None, help="Hub configuration name (source `hub`), e.g. `sst2` of `glue`.")
    revision: str | None = setting(None, help="Hub data set revision to pin (source `hub`).")
    path: str | None = setting(None, help="Folder of a built-in source that reads shared data files (`sst2`); "
                                          "`${VAR:-default}` is expanded. Defaults to `${KDCACHE_DATA:-../shared/data}/<source>`.")
    files: dict[str, str] = setting({}, help="Source `files`: split name -> file path: csv, tsv, json (a list of "
                                             "objects), jsonl or parquet, text formats optionally compressed "
                                             "(`.gz`, `.bz2`, `.xz`, `.zst`). Split names `dev`, `valid`, `val` "
                                             "mean `validation`.")
    delimiter: str | None = setting(None, help="Field separator of csv/tsv files; default `,` for .csv, tab for .tsv.")
    quoting: str = setting("minimal", help="Quote handling of csv/tsv files: `minimal` (a field may be wrapped in "
                                           "`\"`) or `none` (every character is text; for data whose texts start "
                                           "with `\"`, e.g. SIB-200).", check=one_of("minimal", "none"))
    splits: dict[str, str] = setting({}, help="Split to cache -> split of the source (hub slicing such as "
                                             "`train[:90%]` allowed). Empty: every split the source has.")
    text_fields: tuple[str, ...] = setting(("text",), help="Column(s) fed to the teacher; two columns make a text pair.")
    label_field: str | None = setting("label", help="Gold label column (int or string); null for unlabelled data.")
    id_field: str | None = setting(None, help="Stable example id column; default `<split>-<row index>`.")
    label_names: tuple[str, ...] = setting((), help="Label names in id order; taken from the source when it has them, "
                                                     "else inferred from the `train` split (the distinct names "
                                                     "sorted, or integer ids 0..max named \"0\", \"1\", ...).")
    limit: int | None = setting(None, help="Keep at most this many rows per split (first rows), for quick runs.",
                                check=at_least(1))
    validation_fraction: float = setting(0.1, help="When the source has a `train` split but no `validation`, carve "
                                                   "this fraction of train (a seeded hash of the id or `group_field`, "
                                                   "so reruns agree) into `validation`; 0 turns it off.",
                                         check=between(0, 0.5))
    group_field: str | None = setting(None, help="Column whose rows must stay together when a validation split is "
                                                 "carved from train (e.g. a movie or an author: no leakage).")
    labelled_limit: int | None = setting(None, help="Keep gold labels for only the first N training rows; the rest "
                                                   "become unlabelled (label-scarce experiments: only KD learns from them). "
                                                   "0 in a language's settings: that language has no training labels.",
                                                  check=at_least(0))
    languages: dict[str, dict[str, Any]] = setting({}, help="Multilingual data: language code -> that language's own "
                                                            "settings of this section (e.g. its `files`, `subset` or "
                                                            "`labelled_limit: 0`), over the shared ones. Every row gets "
                                                            "a `language` and an id `<code>/<id>`; the cache stores each "
                                                            "split as `language=<code>/` partitions. Empty: one "
                                                            "unnamed language.")
    extra: dict[str, dict[str, Any]] = setting({}, help="More cached splits from other sources: split name -> that "
                                                        "source's data settings over this section's text_fields, "
                                                        "label_field, label_names and limit (e.g. `{source: "
                                                        "rotten_tomatoes, split: train, label_field: null}`), `split` "
                                                        "picking the source's split (default `train`). For unlabelled "
                                                        "or other-domain text the teacher labels once (students read "
                                                        "it with `transfer:`), or another domain's labelled rows to "
                                                        "fine-tune the teacher on (`teacher.finetune.train_split`). "
                                                        "Ids become `<name>/<id>`; labels must use the task's names.")
    augment: AugmentConfig | None = setting(None, help="Derive a transfer set of augmented, unlabelled variants "
                                                       "from a split (see below; sequence classification, one text "
                                                       "field).")
    chat: ChatConfig | None = setting(None, help="Chat rows, required by a `chat-lm` teacher (see below; `{}`: a "
                                                 "`messages` column, else `prompt`/`response` columns). Their "
                                                 "columns are kept, and `text_fields` only where the data has them.")
    label_map: dict[str, str | None] = setting({}, help="Rename the source's label strings before they are read "
                                                       "as `label_names` (e.g. another domain's `{science/technology: "
                                                       "tech}`); a label mapped to null drops its rows (topics the "
                                                       "task does not have). Unmapped labels are read as they are.")
    labels: tuple[str, ...] = setting((), help="Keep only the rows whose gold label is one of these names, in every "
                                               "split (the classes that have arrived so far, in class-incremental "
                                               "rounds: `kdcache lifelong`); the label set stays whole, so a later "
                                               "round's cache has the same classes. Rows without a label are kept. "
                                               "Empty: every row. Sequence classification.")

    def __post_init__(self) -> None:
        if self.augment is not None and len(self.text_fields) != 1:
            raise ConfigError(f"`data.augment`: augmentation works on one text field; this data has "
                              f"{list(self.text_fields)} (data.text_fields)")
        for name in self.extra:
            self.extra_source(name)  # each extra split's settings are checked at load
        for code in self.languages:
            if not code or "/" in code or "=" in code or code != code.strip():
                raise ConfigError(f"`data.languages`: language code {code!r} must be a plain name such as `de` "
                                  "(it names a folder `language=<code>/`)")
            self.language(code)  # each language's settings are checked at load

    def extra_source(self, name: str) -> tuple["DataConfig", str]:
        """(the data settings, the source's split) of extra split `name`: its own settings over this section's
        `EXTRA_INHERITS` (another source's folder, files or ids are its own)."""
        own = self.extra[name]
        where = f"data.extra.{name}"
        if not name or "/" in name or "=" in name or name != name.strip():
            raise ConfigError(f"`data.extra`: split name {name!r} must be a plain name such as `unlabelled`")
        if not isinstance(own, dict) or {"extra", "languages", "augment"} & set(own):
            raise ConfigError(f"`{where}` must be a mapping of data settings with a `split` (not `extra`, `languages` "
                              "or `augment`)")
        own = dict(own)
        split = own.pop("split", "train")
        shared = {k: v for k, v in to_dict(self).items() if k in EXTRA_INHERITS}
        return build(DataConfig, {**shared, **own}, where), str(split)

    def language(self, code: str) -> "DataConfig":
        """The settings of one language: the shared ones with the language's own on top."""
        own = self.languages[code]
        if not isinstance(own, dict) or "languages" in own:
            raise ConfigError(f"`data.languages.{code}` must be a mapping of data settings (not `languages`)")
        shared = {k: v for k, v in to_dict(self).items() if k != "languages"}
        return build(DataConfig, {**shared, **own}, f"data.languages.{code}")
