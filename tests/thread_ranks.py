"""Ranks as threads of one process, for CPU tests of tensor-parallel layers and models.

``ThreadComm`` is the group's shared state (a barrier and a slot per rank); ``RankComm`` is one
rank's in-process collectives (all-reduce and all-gather meet at the barrier; no fused kernel,
so a norm given ``reduce`` does the all-reduce, then itself). ``run_ranks`` runs one function per
rank in its own thread and returns the results in rank order, aborting the barrier when a rank
fails so the others do not hang.
"""

from __future__ import annotations

import threading
from typing import Any, Callable

import torch


class ThreadComm:
    """In-process collectives for TP tests: one thread per rank, a barrier per call."""

    def __init__(self, world_size: int) -> None:
        self.world_size = world_size
        self.barrier = threading.Barrier(world_size)
        self.slots: list[torch.Tensor] = [None] * world_size  # type: ignore[list-item]

    def for_rank(self, rank: int) -> "RankComm":
        return RankComm(self, rank)


class RankComm:
    def __init__(self, group: ThreadComm, rank: int) -> None:
        self.group, self.rank = group, rank

    def _exchange(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        self.group.slots[self.rank] = tensor
        self.group.barrier.wait()
        parts = list(self.group.slots)
        self.group.barrier.wait()  # nobody overwrites a slot before all have read
        return parts

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        return torch.stack(self._exchange(tensor)).sum(0)

    def all_gather(self, tensor: torch.Tensor, dim: int) -> torch.Tensor:
        return torch.cat(self._exchange(tensor), dim=dim)

    def fused_all_reduce_rms_norm(self, x, residual, weight, eps):
        return None  # no fused kernel: the norm does all_reduce, then itself


def run_ranks(world_size: int, fn: Callable[[int, RankComm], Any], timeout_s: float = 60.0) -> list:
    """``fn(rank, comm)`` in one thread per rank of a new group; the results in rank order.
    The first exception of any rank is raised here."""
    group, results, errors = ThreadComm(world_size), [None] * world_size, []

    def target(rank: int) -> None:
        try:
            results[rank] = fn(rank, group.for_rank(rank))
        except BaseException as exc:  # noqa: BLE001 - raised below; abort so other ranks don't hang
            errors.append(exc)
            group.barrier.abort()

    threads = [threading.Thread(target=target, args=(r,)) for r in range(world_size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=timeout_s)
    if errors:
        raise errors[0]
    return results
