"""One worker of a multi-worker replica: a ``ModelRunner`` on one device, run as a Ray actor.

The executor creates one per GPU (or per CPU slice in CI), in a placement group,
and drives them all with the same calls::

    rendezvous()                         worker 0 only: gloo address or NCCL ids (DistInit)
    init(DistInit)                       every worker at once: join the groups, load its shard
    determine_num_blocks()               every worker; the executor takes the minimum
    initialize_kv_cache(num_blocks)
    execute_model(SchedulerOutput)       every step, every worker; the output rank's result counts
    execute_model_pipelined(SO)          async scheduling: launch this step, return the previous one's
    flush()                              ... and the last one's, when no step follows

This class is plain Python (no Ray import): the executor wraps it with
``ray.remote``, and tests may run it in-process.
"""

from __future__ import annotations

import logging
import os
from typing import Optional

import torch

from engine.config import EngineConfig
from engine.distributed.group import DistInit, WorkerGroups, init_worker_groups, rendezvous
from engine.distributed.topology import ParallelRank
from engine.models.spec import ModelSpec
from engine.scheduler_output import ModelOutput, SchedulerOutput

logger = logging.getLogger(__name__)


class Worker:
    def __init__(self, config: EngineConfig, spec: ModelSpec, model_path: str, rank: ParallelRank,
                 max_model_len: int) -> None:
        """Cheap: nothing is loaded until ``init`` (which needs every worker to exist)."""
        from engine.executor import resolve_device, resolve_dtype

        self.config = config
        self.spec = spec
        self.model_path = model_path
        self.rank = rank
        self.max_model_len = max_model_len
        self.device = resolve_device(config)
        if self.device.type == "cuda":  # Ray gives each actor one GPU through CUDA_VISIBLE_DEVICES
            self.device = torch.device("cuda", 0)
            torch.cuda.set_device(self.device)
        else:
            torch.set_num_threads(1)  # fractional CPU slices: don't oversubscribe the node
        self.dtype = resolve_dtype(config, spec, self.device)
        self.groups: Optional[WorkerGroups] = None
        self.runner = None
        self._pending = None  # StepFuture of the last pipelined step (async scheduling)

    def rendezvous(self, backend) -> DistInit:
        """Worker 0: where the others meet it (a gloo address on this node, or NCCL ids)."""
        return rendezvous(backend, self.rank.world_size, self.rank.pp_size)

    def init(self, dist_init: DistInit) -> None:
        """Joins the replica's groups, then loads this rank's shard of its stage."""
        from engine.model_runner import ModelRunner

        self.groups = init_worker_groups(self.rank, dist_init, self.device)
        self.runner = ModelRunner(self.config, self.spec, self.model_path, self.device, self.dtype,
                                  self.max_model_len, rank=self.rank, stage_comm=self.groups.stage,
                                  world_comm=self.groups.world)

    def determine_num_blocks(self) -> int:
        return self.runner.determine_num_blocks()

    def initialize_kv_cache(self, num_blocks: int) -> None:
        self.runner.initialize_kv_cache(num_blocks)

    def execute_model(self, scheduler_output: SchedulerOutput) -> Optional[ModelOutput]:
        """The step's output on the output rank (last stage, stage rank 0); None elsewhere."""
        output = self.runner.execute_model(scheduler_output)
        return output if self.rank.is_output_rank else None

    def execute_model_pipelined(self, scheduler_output: SchedulerOutput) -> Optional[ModelOutput]:
        """Launches this step, then returns the previous step's output (waiting for its device work
        only), so the GPU has the next step queued before this worker's host work for it ends."""
        future = self.runner.execute_model_async(scheduler_output)
        return self._take_pending(future)

    def flush(self) -> Optional[ModelOutput]:
        """The output of the last pipelined step (no later step to carry it)."""
        return self._take_pending(None)

    def _take_pending(self, future) -> Optional[ModelOutput]:
        previous, self._pending = self._pending, future
        if previous is None:
            return None
        output = previous.result()
        return output if self.rank.is_output_rank else None

    def ping(self) -> int:
        return os.getpid()

    def shutdown(self) -> None:
        if self.groups is not None:
            self.groups.destroy()
            self.groups = None
