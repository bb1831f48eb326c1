"""Executors run the model runner(s) of one replica.

The engine talks to workers only through this interface: size the KV cache,
allocate it, and execute one ``SchedulerOutput``. ``UniprocExecutor`` runs one
runner in this process; ``RayExecutor`` (``executor_ray.py``: one actor per GPU,
tensor/pipeline/expert parallel) implements the same calls. ``make_executor``
picks one from the parallel config; Ray is imported only when it picks the latter.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch

from engine.config import Dtype, EngineConfig
from engine.models.spec import ModelSpec
from engine.scheduler_output import ModelOutput, SchedulerOutput


def resolve_device(config: EngineConfig) -> torch.device:
    name = config.device.device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was requested but no CUDA GPU is available")
    return torch.device(name)


def resolve_dtype(config: EngineConfig, spec: ModelSpec, device: torch.device) -> torch.dtype:
    dtype = config.model.dtype
    if dtype == Dtype.AUTO:
        if device.type == "cpu":
            return torch.float32
        return torch.float16 if str(spec.torch_dtype) in ("float16", "torch.float16") else torch.bfloat16
    return {Dtype.FLOAT32: torch.float32, Dtype.BFLOAT16: torch.bfloat16,
            Dtype.FLOAT16: torch.float16}[dtype]


def resolve_max_model_len(config: EngineConfig, spec: ModelSpec) -> int:
    limit = spec.max_position_embeddings
    wanted = config.model.max_model_len
    if wanted is None:
        return limit
    if wanted > limit:
        raise ValueError(f"max_model_len {wanted} exceeds the model's max_position_embeddings {limit}")
    return wanted


class Executor(ABC):
    @abstractmethod
    def determine_num_blocks(self) -> int:
        """KV blocks that fit (the minimum over workers)."""

    @abstractmethod
    def initialize_kv_cache(self, num_blocks: int) -> None: ...

    @abstractmethod
    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelOutput: ...

    # Async scheduling: executors that can launch a step and return before it finishes.
    supports_async: bool = False

    def execute_model_async(self, scheduler_output: SchedulerOutput) -> Any:
        """Launches the step; the returned object's ``result()`` gives its ``ModelOutput``."""
        raise NotImplementedError(f"{type(self).__name__} runs steps synchronously")

    def check_health(self) -> None:
        """Raises if the executor can no longer run steps (e.g. a worker died)."""

    def export_kv(self, block_ids: list[int]) -> Any:
        """Disaggregated prefill: the blocks' KV in one staging tensor (engine/kv_transfer/blocks.py).

        Executors with several workers return one tensor per rank (a rank sends its own shard).
        """
        raise NotImplementedError(f"{type(self).__name__} cannot export KV blocks")

    def import_kv(self, block_ids: list[int], kv: Any) -> None:
        """Disaggregated decode: writes a staging tensor from ``export_kv`` into the blocks."""
        raise NotImplementedError(f"{type(self).__name__} cannot import KV blocks")

    def shutdown(self) -> None:
        pass


def make_executor(config: EngineConfig, spec: ModelSpec, model_path: str) -> Executor:
    """One runner in this process for a single-worker replica, else Ray worker actors (also for
    one worker with ``distributed_executor_backend: ray``)."""
    from engine.distributed.topology import validate_parallel_sizes

    validate_parallel_sizes(config.parallel, spec)  # before any worker or GPU is reserved
    if not config.parallel.uses_ray_workers:
        return UniprocExecutor(config, spec, model_path)
    from engine.executor_ray import RayExecutor
    return RayExecutor(config, spec, model_path)


class UniprocExecutor(Executor):
    def __init__(self, config: EngineConfig, spec: ModelSpec, model_path: str) -> None:
        from engine.model_runner import ModelRunner

        if config.parallel.world_size > 1 or config.parallel.expert_parallel_size > 1:
            raise ValueError("tensor/pipeline/expert parallel sizes > 1 need several workers: "
                             "build the executor with make_executor (RayExecutor)")
        device = resolve_device(config)
        self.runner = ModelRunner(config, spec, model_path, device, resolve_dtype(config, spec, device),
                                  resolve_max_model_len(config, spec))

    def determine_num_blocks(self) -> int:
        return self.runner.determine_num_blocks()

    def initialize_kv_cache(self, num_blocks: int) -> None:
        self.runner.initialize_kv_cache(num_blocks)

    supports_async = True

    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelOutput:
        return self.runner.execute_model(scheduler_output)

    def execute_model_async(self, scheduler_output: SchedulerOutput) -> Any:
        return self.runner.execute_model_async(scheduler_output)

    def export_kv(self, block_ids: list[int]) -> Any:
        return self.runner.export_kv(block_ids)

    def import_kv(self, block_ids: list[int], kv: Any) -> None:
        self.runner.import_kv(block_ids, kv)
