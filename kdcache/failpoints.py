"""Crash injection for the kill -9 tests: `KDCACHE_FAILPOINT=<name>[@<n>]` makes the n-th pass (default 1st)
through `failpoint(name)` SIGKILL its own process, so tests can kill a real run at an exact point.
`KDCACHE_FAILPOINT_RANK=<r>` limits it to one process of a multi-process run. Unset, it costs a dict lookup."""

from __future__ import annotations

import os
import signal

_hits: dict[str, int] = {}


def failpoint(name: str) -> None:
    spec = os.environ.get("KDCACHE_FAILPOINT")
    if not spec:
        return
    target, _, nth = spec.partition("@")
    if target != name:
        return
    rank = os.environ.get("KDCACHE_FAILPOINT_RANK")
    if rank is not None and rank != os.environ.get("RANK", "0"):
        return
    _hits[name] = _hits.get(name, 0) + 1
    if _hits[name] == int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)
