"""Builds a worker's communicators from a ``DistInit`` the executor hands to every worker.

Set-up, driven by the executor (ids and addresses travel through Ray calls)::

    executor ── worker 0: rendezvous() ──▶ gloo: "tcp://<ip of worker 0>:<free port>"
                                           nccl: one NCCL unique id per group
    executor ── every worker: init_worker_groups(rank, DistInit) ── concurrently (collective)

No ports or names are hard-coded: worker 0 picks a free port on its own node.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from typing import Optional

import torch

from engine.config import DistributedBackend
from engine.distributed.communicator import Communicator
from engine.distributed.topology import ParallelRank


CUSTOM_ALLREDUCE_ENV = "KVMESH_CUSTOM_ALLREDUCE"  # "1": try the IPC all-reduce in TP groups


def resolve_backend(backend: DistributedBackend, device: torch.device) -> DistributedBackend:
    """AUTO -> NCCL on CUDA, GLOO on CPU; NCCL on CPU is refused."""
    backend = DistributedBackend(backend)
    if backend == DistributedBackend.AUTO:
        return DistributedBackend.NCCL if device.type == "cuda" else DistributedBackend.GLOO
    if backend == DistributedBackend.NCCL and device.type != "cuda":
        raise ValueError("distributed_backend 'nccl' needs CUDA workers; use 'gloo' on CPU")
    return backend


@dataclass(frozen=True)
class DistInit:
    """What every worker needs to join its groups (picklable)."""

    backend: DistributedBackend  # GLOO or NCCL, resolved
    world_size: int
    pp_size: int
    gloo_init_method: Optional[str] = None  # "tcp://ip:port" of rank 0's store
    nccl_world_id: Optional[tuple] = None  # the replica-wide group (pipeline send/recv)
    nccl_stage_ids: list = field(default_factory=list)  # one per pipeline stage


@dataclass
class WorkerGroups:
    """A worker's groups; ``None`` where the group would have a single member."""

    stage: Optional[Communicator]  # TP / EP collectives (what the model layers get)
    world: Optional[Communicator]  # pipeline send / recv by global rank

    def destroy(self) -> None:
        for comm in {id(c): c for c in (self.stage, self.world) if c is not None}.values():
            comm.destroy()


def rendezvous(backend: DistributedBackend, world_size: int, pp_size: int) -> DistInit:
    """Run on worker 0: a gloo address on its node, or fresh NCCL ids."""
    if backend == DistributedBackend.GLOO:
        ip = _node_ip()
        with socket.socket() as s:  # a free port now; the store binds it right after
            s.bind(("", 0))
            port = s.getsockname()[1]
        return DistInit(backend, world_size, pp_size, gloo_init_method=f"tcp://{ip}:{port}")
    from engine.distributed.nccl import new_unique_id
    return DistInit(backend, world_size, pp_size, nccl_world_id=new_unique_id(),
                    nccl_stage_ids=[new_unique_id() for _ in range(pp_size)])


def init_worker_groups(rank: ParallelRank, init: DistInit, device: torch.device) -> WorkerGroups:
    """Collective: every worker of the replica calls it at the same time."""
    if init.world_size == 1:
        return WorkerGroups(stage=None, world=None)
    if init.backend == DistributedBackend.GLOO:
        from engine.distributed.gloo import GlooCommunicator, init_gloo_world
        init_gloo_world(rank.rank, init.world_size, init.gloo_init_method)
        world = GlooCommunicator(list(range(init.world_size)))
        if rank.pp_size == 1:
            stage = world
        else:  # every rank creates every stage group, in stage order (torch.distributed's rule)
            size = rank.stage_size
            groups = [GlooCommunicator(list(range(p * size, (p + 1) * size))) for p in range(rank.pp_size)]
            stage = groups[rank.pp_rank]
    else:
        from engine.distributed.nccl import NcclCommunicator
        world = NcclCommunicator(init.nccl_world_id, rank.rank, init.world_size, device)
        if rank.pp_size == 1:
            stage = world
        else:
            stage = NcclCommunicator(init.nccl_stage_ids[rank.pp_rank], rank.stage_rank,
                                     rank.stage_size, device)
        if rank.stage_size > 1:
            # The LL all-reduce (engine/distributed/ll_allreduce.py) for decode-sized rows, fused
            # with the residual add + RMSNorm after it. Collective; it checks the ranks share a
            # node and passes a self-check against NCCL, else NCCL does everything.
            stage.enable_ll_all_reduce()
            # The older one-shot IPC all-reduce (custom_allreduce.py), opt-in: the engine's TP=4
            # GPU test gave wrong first tokens with it on once, and it was slower than NCCL's LL
            # inside CUDA graphs (10.3 vs 6.7 µs on H100s).
            if os.environ.get(CUSTOM_ALLREDUCE_ENV, "0") == "1":
                stage.enable_custom_all_reduce()
    return WorkerGroups(stage=stage if rank.stage_size > 1 else None,
                        world=world if rank.pp_size > 1 else None)


def _node_ip() -> str:
    try:
        import ray
        if ray.is_initialized():
            return ray.util.get_node_ip_address()
    except ImportError:
        pass
    return "127.0.0.1"
