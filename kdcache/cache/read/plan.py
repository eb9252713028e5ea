"""Planning an epoch over a cache's row groups: which row groups (`Unit`s) an epoch reads, in what order, and which
of them each (process, DataLoader worker) pair gets; how languages are mixed (their shares of an epoch)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from ..format import CacheFormatError


@dataclass(frozen=True)
class Unit:
    """One row group: the smallest piece of work a worker reads."""

    shard: int
    row_group: int
    start: int  # first row inside the shard
    rows: int
    language: str | None = None


MIXINGS = ("proportional", "uniform", "temperature:<T>")


def mixing_weights(rows: dict[str, int], mixing: str) -> dict[str, float]:
    """Each language's share of an epoch: `proportional` to its rows (every row once per epoch), `uniform`, or
    `temperature:T` (p ∝ rows^(1/T), as in multilingual pre-training: T=1 proportional, large T near uniform)."""
    if mixing == "proportional":
        w = {k: float(n) for k, n in rows.items()}
    elif mixing == "uniform":
        w = {k: 1.0 for k in rows}
    elif mixing.startswith("temperature:"):
        try:
            t = float(mixing.split(":", 1)[1])
        except ValueError:
            t = 0.0
        if not t > 0:
            raise CacheFormatError(f"language mixing {mixing!r}: the temperature must be a number > 0, e.g. "
                                   "`temperature:3`")
        w = {k: float(n) ** (1.0 / t) for k, n in rows.items()}
    else:
        raise CacheFormatError(f"language mixing {mixing!r}: use one of {', '.join(MIXINGS)}")
    total = sum(w.values())
    return {k: v / total for k, v in w.items()}



def dist_info() -> tuple[int, int]:
    """(rank, world size) of this process: torch.distributed when initialised, else accelerate's env vars."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def epoch_units(units: list[Unit], languages: list[str], budgets: dict[str, int], seed: int, shuffle: bool,
                epoch: int) -> list[Unit]:
    """The row groups of epoch `epoch`: all of them, or each language's row budget of them (mixing), taken from a
    seeded stream of its row groups (so a smaller share walks through all of its rows over several epochs)."""
    if not budgets:
        return list(units)
    out: list[Unit] = []
    for li, code in enumerate(languages):
        mine = [u for u in units if u.language == code]
        if not mine:
            continue
        cycles: dict[int, np.ndarray] = {}  # the language's stream: one seeded permutation of it per cycle
        pos, taken = 0, []
        for _ in range(epoch + 1):  # replay earlier epochs to find where this one starts
            taken, rows = [], 0
            while rows < budgets[code]:
                cycle, at = divmod(pos, len(mine))
                if cycle not in cycles:
                    cycles[cycle] = (np.random.default_rng([seed, li, cycle]).permutation(len(mine))
                                     if shuffle else np.arange(len(mine)))
                taken.append(mine[cycles[cycle][at]])
                rows += taken[-1].rows
                pos += 1
        out += taken
    return out


def deal(units: list[Unit], seed: int, epoch: int, shuffle: bool, slot: int, slots: int) -> list[Unit]:
    """The epoch's row groups of reading slot `slot` of `slots` (rank * workers + worker), in reading order: the
    epoch's permutation (when shuffling) dealt round-robin, so each row is read once per epoch across all slots."""
    order = np.random.default_rng([seed, epoch]).permutation(len(units)) if shuffle else np.arange(len(units))
    return [units[i] for i in order[slot::slots]]
