"""Gloo collectives through torch.distributed, for CPU workers (and CI).

One process group per worker process covers the replica (the world); stage
groups are ``new_group`` sub-groups. Ranks and peers given to this class are
ranks within its group; ``send``/``recv`` translate them to global ranks.
"""

from __future__ import annotations

import datetime

import torch
import torch.distributed as dist

from engine.distributed.communicator import Communicator

GLOO_TIMEOUT = datetime.timedelta(seconds=120)  # a dead peer surfaces as an error, not a hang


def init_gloo_world(rank: int, world_size: int, init_method: str) -> None:
    """Joins this process to the replica's gloo world (``init_method`` "tcp://ip:port" from rank 0)."""
    if not dist.is_initialized():
        dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world_size,
                                timeout=GLOO_TIMEOUT)


class GlooCommunicator(Communicator):
    def __init__(self, global_ranks: list[int]) -> None:
        """``global_ranks``: the group's members in group-rank order. Every world rank must call
        this for every group, in the same order (torch.distributed's rule for new_group)."""
        self.global_ranks = list(global_ranks)
        if len(global_ranks) == dist.get_world_size():
            self.group = dist.group.WORLD
        else:
            self.group = dist.new_group(global_ranks, backend="gloo", timeout=GLOO_TIMEOUT)
        me = dist.get_rank()
        self.rank = self.global_ranks.index(me) if me in self.global_ranks else None
        self.world_size = len(global_ranks)

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(tensor, group=self.group)
        return tensor

    def all_gather(self, tensor: torch.Tensor, dim: int) -> torch.Tensor:
        tensor = tensor.contiguous()
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(parts, tensor, group=self.group)
        return torch.cat(parts, dim=dim)

    def send(self, tensor: torch.Tensor, dst: int) -> None:
        dist.send(tensor.contiguous(), self.global_ranks[dst], group=self.group)

    def recv(self, shape: tuple[int, ...], dtype: torch.dtype, src: int) -> torch.Tensor:
        out = torch.empty(shape, dtype=dtype)
        dist.recv(out, self.global_ranks[src], group=self.group)
        return out

    def destroy(self) -> None:
        if dist.is_initialized() and self.group is dist.group.WORLD:
            dist.destroy_process_group()
