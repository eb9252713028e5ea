"""Process-group helpers for stage one under `accelerate launch` (stage two uses `Accelerator` itself).

Built on accelerate's PartialState: on a GPU-less machine it must be created with cpu=True, or accelerate 1.x
reports a single process even when `accelerate launch --multi_gpu` started several.
"""

from __future__ import annotations

from typing import Any, Callable, TypeVar

import torch

from ..errors import KdcacheError

T = TypeVar("T")


class RankFailed(KdcacheError):
    """Another process of the run failed first; its message is included."""


def state():
    from accelerate import PartialState
    return PartialState(cpu=not torch.cuda.is_available())


class Replica:
    """The process group seen by replica when each tensor-parallel teacher spans `tp` processes (ranks
    r*tp .. r*tp+tp-1 hold replica r): shards are dealt between the replicas, every process of a replica runs
    each of its shards, and its first process writes them. tp = 1: plain data parallelism (models.tp_size has
    checked that tp divides the processes)."""

    def __init__(self, st: Any, tp: int) -> None:
        self.process_index, self.num_processes = st.process_index // tp, st.num_processes // tp
        self.writes = st.process_index % tp == 0
        self.is_main_process, self.is_local_main_process = st.is_main_process, st.is_local_main_process


def _broadcast(obj: Any) -> Any:
    from accelerate.utils import broadcast_object_list
    return broadcast_object_list([obj], from_process=0)[0]


def main_first(fn: Callable[[], T]) -> T:
    """Run fn on rank 0, then on the others; a failure on rank 0 is raised on every rank instead of hanging."""
    st = state()
    if st.num_processes == 1:
        return fn()
    result, error = None, None
    if st.is_main_process:
        try:
            result = fn()
        except Exception as e:  # re-raised below after the others are told
            error = e
    message = _broadcast(f"{type(error).__name__}: {error}" if error else None)
    if error is not None:
        raise error
    if message is not None:
        raise RankFailed(f"process 0 failed: {message}")
    return result if st.is_main_process else fn()


def share(value: T) -> T:
    """Rank 0's value, on every rank."""
    return _broadcast(value) if state().num_processes > 1 else value


def barrier() -> None:
    st = state()
    if st.num_processes > 1:
        st.wait_for_everyone()
