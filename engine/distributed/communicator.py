"""The collectives a replica's workers use, behind one small interface.

Two groups per worker (see ``topology.py``):

* ``stage``: the ranks of its pipeline stage; ``all_reduce`` / ``all_gather`` for
  tensor-parallel layers and expert-parallel MoE (this object is what the model
  layers receive as their ``Communicator``);
* ``world``: every rank of the replica; ``send`` / ``recv`` move hidden states from
  one stage to the next by global rank.

Backends (``DistributedBackend``): ``GLOO`` wraps torch.distributed on CPU tensors
(CI runs everything through it); ``NCCL`` wraps CuPy's NCCL bindings on CUDA
tensors, on the current torch stream. Both are built by ``group.init_worker_groups``.

Invariants: every rank of a group calls the same collectives in the same order
with tensors of the same shape and dtype; ``recv`` is given the shape and dtype
the peer sends (the runner derives both from the step's token count).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Optional

import torch


class Communicator(ABC):
    """Collectives over one group of ranks. ``rank`` and peers are ranks *within* the group."""

    rank: int
    world_size: int

    @abstractmethod
    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over the group; returns the reduced tensor (may be ``tensor`` itself, reduced in place)."""

    def fused_all_reduce_rms_norm(self, x: torch.Tensor, residual: Optional[torch.Tensor],
                                  weight: torch.Tensor, eps: float
                                  ) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        """``all_reduce(x)`` then ``RMSNorm(x, residual)`` as one kernel, where the backend has
        one for this shape: (normed, x + residual). None: the caller does the two apart. The
        choice must depend on shapes and dtypes only (every rank takes the same path)."""
        return None

    def linear_for_reduce(self, x: torch.Tensor, weight: torch.Tensor) -> Optional[torch.Tensor]:
        """A row-parallel layer's partial sums x @ weight.T, computed by a kernel that also starts
        sending them to the peers, for the very next ``all_reduce`` or
        ``fused_all_reduce_rms_norm`` of this group, which must take exactly this output. None
        where the backend has no such kernel for these shapes: the caller runs its own linear.
        Unlike the collectives, ranks may differ in which they take."""
        return None

    def ll_stamps(self) -> Optional[list[tuple[int, int, int, int]]]:
        """The fused all-reduce's per-call stamps where the backend records them
        (``KVMESH_LL_STAMPS=1`` on NCCL groups: ``LLAllReduce.read_stamps``), else None."""
        return None

    @abstractmethod
    def all_gather(self, tensor: torch.Tensor, dim: int) -> torch.Tensor:
        """Concatenate the ranks' equally-shaped tensors along ``dim`` in rank order."""

    @abstractmethod
    def send(self, tensor: torch.Tensor, dst: int) -> None:
        """Point-to-point send; returns once ``tensor`` may be reused (stream-ordered on NCCL)."""

    @abstractmethod
    def recv(self, shape: tuple[int, ...], dtype: torch.dtype, src: int) -> torch.Tensor:
        """Point-to-point receive of a tensor of the given shape and dtype."""

    def barrier(self) -> None:
        self.all_reduce(torch.zeros(1, device=self.device))

    @property
    @abstractmethod
    def device(self) -> torch.device: ...

    def destroy(self) -> None:
        pass


def gather_parts(parts: torch.Tensor, dim: int) -> torch.Tensor:
    """(world, *shape) stacked parts -> shape with the parts concatenated along ``dim``."""
    return torch.cat(list(parts.unbind(0)), dim=dim)
