"""Executors run the model runner(s) of one replica.

The engine talks to workers only through this interface: size the KV cache,
allocate it, and execute one ``SchedulerOutput``. ``UniprocExecutor`` runs one
runner in this process; a Ray executor (one actor per GPU, tensor/pipeline
parallel) implements the same three calls.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

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

    def shutdown(self) -> None:
        pass


class UniprocExecutor(Executor):
    def __init__(self, config: EngineConfig, spec: ModelSpec, model_path: str) -> None:
        from engine.model_runner import ModelRunner

        if config.parallel.world_size > 1 or config.parallel.expert_parallel_size > 1:
            raise ValueError("tensor/pipeline/expert parallel sizes > 1 need the Ray executor, "
                             "which is not available in this build")
        device = resolve_device(config)
        self.runner = ModelRunner(config, spec, model_path, device, resolve_dtype(config, spec, device),
                                  resolve_max_model_len(config, spec))

    def determine_num_blocks(self) -> int:
        return self.runner.determine_num_blocks()

    def initialize_kv_cache(self, num_blocks: int) -> None:
        self.runner.initialize_kv_cache(num_blocks)

    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelOutput:
        return self.runner.execute_model(scheduler_output)
