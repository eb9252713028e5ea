"""Continual students (`init_from:`): a student starts from an earlier run's best weights and its tokenizer (the
vocabulary its embeddings were trained with), then is distilled again, e.g. on a grown or refreshed cache. The
earlier run must be of the same architecture and settings: anything else is refused before training starts."""

from __future__ import annotations

from typing import Any

import torch

from .. import config as C
from ..students.saved import find_run


def init_tokenizer(st: C.StudentConfig, where: str) -> Any:
    """The tokenizer the earlier run's weights were trained with (its word vocabulary, or its saved tokenizer)."""
    return find_run(st.init_from or "", f"{where}.init_from").tokenizer()


def init_weights(core: torch.nn.Module, st: C.StudentConfig, where: str) -> None:
    """Load the earlier run's best weights into `core`, refusing another architecture or other settings by name."""
    saved = find_run(st.init_from or "", f"{where}.init_from")
    was = saved.student
    if was.get("arch") != st.arch or (was.get("params") or {}) != dict(st.params):
        raise C.ConfigError(f"`{where}.init_from`: {saved.run} is a `{was.get('arch')}` student with params "
                            f"{was.get('params') or {}}, this one a `{st.arch}` with {dict(st.params)}; a student "
                            "starts only from a run of the same architecture and settings")
    try:
        core.load_state_dict(saved.state())
    except RuntimeError as e:
        raise C.ConfigError(f"`{where}.init_from`: the weights in {saved.checkpoint} do not fit this student "
                            f"({str(e)[:300]}); start from a run of the same architecture, settings and "
                            "tokenizer") from None
