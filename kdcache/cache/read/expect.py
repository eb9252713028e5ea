"""What a student's pipeline expects of a cache it reads (task, head, label set, data settings), and the error
when the cache was built for something else."""

from __future__ import annotations

from typing import Any

from ...fingerprint import diff_fields
from ..format import CacheFormatError


class CacheMismatchError(CacheFormatError):
    """The cache was built for other data, another task or another label set than the student expects."""


def check_expected(manifest: dict[str, Any], expect: dict[str, Any], where: str) -> None:
    """Refuse a cache whose task, head, labels or data config differ from what the student's pipeline expects (a
    cache made by `kdcache import` has no data config of the pipeline's: its task and head must match)."""
    expect = dict(expect)
    if "imported" in manifest:
        expect = {k: expect.get(k) for k in ("task", "head")}
    data = (manifest.get("config") or {}).get("data")
    defaults = expect.pop("data_defaults", None)
    if isinstance(data, dict) and defaults:  # settings newer than the cache: it was built with their defaults
        data = {**{k: v for k, v in defaults.items() if k not in data}, **data}
    got = {"task": manifest["task"], "head": manifest["head"], "label_names": manifest["label_names"], "data": data}
    wanted = {k: v for k, v in expect.items() if v is not None}
    changed = diff_fields({k: got.get(k) for k in wanted}, wanted)
    if changed:
        detail = "; ".join(f"{k}: cache has {_dig(got, k)!r}, pipeline expects {_dig(wanted, k)!r}" for k in changed[:4])
        fix = ("import it again with that `--task`" if "imported" in manifest
               else "rebuild the cache for this pipeline with `kdcache cache`")
        raise CacheMismatchError(f"{where}: cache was built for other data or labels than this student expects "
                                 f"({detail}); {fix}")


def _dig(d: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        d = d.get(part) if isinstance(d, dict) else None
    return d

