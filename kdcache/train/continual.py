"""Continual students (`init_from:`): a student starts from an earlier run's best weights and its tokenizer (the
vocabulary its embeddings were trained with), then is distilled again, e.g. on a grown or refreshed cache. The
earlier run must be of the same architecture and settings: anything else is refused before training starts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import yaml

from .. import config as C
from ..students import HFTokenizer, WordTokenizer


def _folders(st: C.StudentConfig, where: str) -> tuple[Path, Path]:
    """(the run folder, its checkpoint folder) that `init_from` names (either may be given)."""
    path = Path(st.init_from or "")
    run = path.parent if path.name == "checkpoint" else path
    ckpt = run / "checkpoint"
    if not (ckpt / "student.pt").is_file() or not (run / "config.yaml").is_file():
        raise C.ConfigError(f"`{where}.init_from` = {st.init_from!r}: not a finished kdcache run (expected "
                            f"{run}/config.yaml and {ckpt}/student.pt, as `kdcache train` writes them)")
    return run, ckpt


def init_tokenizer(st: C.StudentConfig, where: str) -> Any:
    """The tokenizer the earlier run's weights were trained with (its word vocabulary, or its saved tokenizer)."""
    _, ckpt = _folders(st, where)
    return WordTokenizer.load(ckpt) if (ckpt / WordTokenizer.FILE).is_file() else HFTokenizer(str(ckpt))


def init_weights(core: torch.nn.Module, st: C.StudentConfig, where: str) -> None:
    """Load the earlier run's best weights into `core`, refusing another architecture or other settings by name."""
    run, ckpt = _folders(st, where)
    was = (yaml.safe_load((run / "config.yaml").read_text()) or {}).get("student_config") or {}
    if was.get("arch") != st.arch or (was.get("params") or {}) != dict(st.params):
        raise C.ConfigError(f"`{where}.init_from`: {run} is a `{was.get('arch')}` student with params "
                            f"{was.get('params') or {}}, this one a `{st.arch}` with {dict(st.params)}; a student "
                            "starts only from a run of the same architecture and settings")
    state = torch.load(ckpt / "student.pt", map_location="cpu", weights_only=True)
    try:
        core.load_state_dict(state)
    except RuntimeError as e:
        raise C.ConfigError(f"`{where}.init_from`: the weights in {ckpt} do not fit this student ({str(e)[:300]}); "
                            "start from a run of the same architecture, settings and tokenizer") from None
