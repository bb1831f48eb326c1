"""Typed engine configuration.

Frozen dataclasses nested by concern, Enums for choices, validated in
``__post_init__`` (no I/O there). ``EngineConfig.create(**kwargs)`` takes the
flat keyword arguments users know from vLLM (``model=``, ``block_size=`` ...)
and sorts them into the nested configs; unknown keys raise ``ValueError``.
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass, field
from typing import Any, Optional


class Dtype(str, enum.Enum):
    AUTO = "auto"  # fp32 on CPU, bf16 on GPU
    FLOAT32 = "float32"
    BFLOAT16 = "bfloat16"
    FLOAT16 = "float16"

    @classmethod
    def parse(cls, value: "str | Dtype") -> "Dtype":
        aliases = {"fp32": "float32", "float": "float32", "bf16": "bfloat16",
                   "fp16": "float16", "half": "float16"}
        if isinstance(value, Dtype):
            return value
        value = str(value).lower()
        value = aliases.get(value, value)
        try:
            return cls(value)
        except ValueError:
            raise ValueError(f"dtype must be one of {[d.value for d in cls]}, got {value!r}") from None


class LoadFormat(str, enum.Enum):
    AUTO = "auto"  # safetensors from the model folder
    SAFETENSORS = "safetensors"
    DUMMY = "dummy"  # random weights at the config's real shapes; no weight files read


class AttentionBackendKind(str, enum.Enum):
    AUTO = "auto"  # TRITON on CUDA when available, else TORCH_REF
    TORCH_REF = "torch_ref"  # plain PyTorch reference path (CPU and GPU)
    TRITON = "triton"  # Triton paged-attention kernels (GPU)


class SchedulingPolicy(str, enum.Enum):
    FCFS = "fcfs"  # arrival order
    PRIORITY = "priority"  # lower ``priority`` value first, then arrival order


class DistributedBackend(str, enum.Enum):
    AUTO = "auto"  # NCCL on GPU, gloo on CPU
    NCCL = "nccl"
    GLOO = "gloo"


class ExecutorBackend(str, enum.Enum):
    """Where a replica's workers run (vLLM's ``distributed_executor_backend``)."""
    AUTO = "auto"  # one worker: in the engine's process; more: Ray actors
    UNI = "uni"  # in the engine's process (one worker only)
    RAY = "ray"  # Ray actors in a placement group, even one worker (the model off the engine's process)


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


@dataclass(frozen=True)
class ModelConfig:
    model: str = "kvmesh-tiny"  # local HF folder, or the built-in "kvmesh-tiny"
    tokenizer: Optional[str] = None  # defaults to ``model``
    dtype: Dtype = Dtype.AUTO
    max_model_len: Optional[int] = None  # None: the model's max_position_embeddings
    load_format: LoadFormat = LoadFormat.AUTO
    seed: int = 0  # seeds dummy weights and unseeded sampling
    served_model_name: Optional[str] = None  # name in the OpenAI API; defaults to ``model``

    def __post_init__(self) -> None:
        object.__setattr__(self, "dtype", Dtype.parse(self.dtype))
        object.__setattr__(self, "load_format", LoadFormat(self.load_format))
        _check(bool(self.model), "model must be a non-empty path or 'kvmesh-tiny'")
        _check(self.max_model_len is None or self.max_model_len > 0,
               f"max_model_len must be > 0, got {self.max_model_len}")


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = 16  # tokens per KV block; also the prefix-hash granularity
    enable_prefix_caching: bool = True
    num_blocks: Optional[int] = None  # None: sized from memory (below)
    gpu_memory_utilization: float = 0.90  # share of GPU memory for weights + activations + KV
    cpu_kv_cache_gib: float = 0.5  # KV pool size on CPU when num_blocks is None
    cache_salt: Optional[str] = None  # mixed into every block hash (tenant isolation)

    def __post_init__(self) -> None:
        _check(self.block_size > 0 and self.block_size & (self.block_size - 1) == 0,
               f"block_size must be a positive power of two, got {self.block_size}")
        _check(self.num_blocks is None or self.num_blocks > 0,
               f"num_blocks must be > 0, got {self.num_blocks}")
        _check(0.0 < self.gpu_memory_utilization <= 1.0,
               f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        _check(self.cpu_kv_cache_gib > 0, f"cpu_kv_cache_gib must be > 0, got {self.cpu_kv_cache_gib}")


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_batched_tokens: int = 2048  # token budget of one step (prefill chunks + decodes)
    max_num_seqs: int = 128  # running requests at once
    enable_chunked_prefill: bool = True  # split long prompts across steps
    policy: SchedulingPolicy = SchedulingPolicy.FCFS
    # Schedule step N+1 while step N runs on the device (hides the host's per-step work).
    # None: on for CUDA workers in one pipeline stage, off otherwise (no gain on CPU).
    async_scheduling: Optional[bool] = None
    # At most this many tokens of one prompt per step (chunked prefill), so short prompts that
    # arrive behind a long one share the step instead of waiting for all its chunks. None: the
    # whole budget (a prefill pool serving long and short prompts wants e.g. a quarter of it).
    long_prefill_token_threshold: Optional[int] = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "policy", SchedulingPolicy(self.policy))
        _check(self.max_num_batched_tokens > 0,
               f"max_num_batched_tokens must be > 0, got {self.max_num_batched_tokens}")
        _check(self.long_prefill_token_threshold is None or self.long_prefill_token_threshold > 0,
               f"long_prefill_token_threshold must be > 0 or null, got {self.long_prefill_token_threshold}")
        _check(self.max_num_seqs > 0, f"max_num_seqs must be > 0, got {self.max_num_seqs}")


@dataclass(frozen=True)
class ParallelConfig:
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    expert_parallel_size: int = 1
    distributed_backend: DistributedBackend = DistributedBackend.AUTO
    distributed_executor_backend: ExecutorBackend = ExecutorBackend.AUTO

    def __post_init__(self) -> None:
        object.__setattr__(self, "distributed_backend", DistributedBackend(self.distributed_backend))
        object.__setattr__(self, "distributed_executor_backend",
                           ExecutorBackend(self.distributed_executor_backend))
        for name in ("tensor_parallel_size", "pipeline_parallel_size", "expert_parallel_size"):
            _check(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        _check(self.distributed_executor_backend is not ExecutorBackend.UNI or self.num_workers == 1,
               f"distributed_executor_backend 'uni' runs one worker in the engine's process, but "
               f"tensor_parallel_size={self.tensor_parallel_size}, pipeline_parallel_size="
               f"{self.pipeline_parallel_size}, expert_parallel_size={self.expert_parallel_size} "
               f"need {self.num_workers}: use 'ray' or 'auto'")

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size

    @property
    def stage_size(self) -> int:
        """Workers of one pipeline stage: the larger of the TP and EP sizes (an MoE stage's EP
        ranks are its TP ranks)."""
        return max(self.tensor_parallel_size, self.expert_parallel_size)

    @property
    def num_workers(self) -> int:
        """Workers (GPUs) of one replica: pipeline stages x stage size."""
        return self.pipeline_parallel_size * self.stage_size

    @property
    def uses_ray_workers(self) -> bool:
        """Whether the workers are Ray actors (engine/executor_ray.py), not a runner in the
        engine's process."""
        backend = self.distributed_executor_backend
        return backend is ExecutorBackend.RAY or (backend is ExecutorBackend.AUTO and self.num_workers > 1)


@dataclass(frozen=True)
class DeviceConfig:
    device: str = "auto"  # "auto" (cuda if available), "cpu", "cuda"
    attention_backend: AttentionBackendKind = AttentionBackendKind.AUTO
    enforce_eager: bool = False  # disable CUDA graphs
    # Steps with a prefill in them (a fresh prompt, chunked prefill mixed with decodes) of at most
    # this many tokens and cuda_graph_max_mixed_reqs requests replay a captured graph too: launching
    # ~900 kernels of a small prefill from Python costs more than running them (0: never).
    cuda_graph_max_prefill_tokens: int = 512
    cuda_graph_max_mixed_reqs: int = 32

    def __post_init__(self) -> None:
        object.__setattr__(self, "attention_backend", AttentionBackendKind(self.attention_backend))
        _check(self.cuda_graph_max_prefill_tokens >= 0,
               f"cuda_graph_max_prefill_tokens must be >= 0, got {self.cuda_graph_max_prefill_tokens}")
        _check(self.cuda_graph_max_mixed_reqs >= 1,
               f"cuda_graph_max_mixed_reqs must be >= 1, got {self.cuda_graph_max_mixed_reqs}")
        _check(self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"),
               f"device must be 'auto', 'cpu' or 'cuda[:N]', got {self.device!r}")


@dataclass(frozen=True)
class EngineConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    device: DeviceConfig = field(default_factory=DeviceConfig)

    def __post_init__(self) -> None:
        _check(not (self.scheduler.async_scheduling and self.parallel.pipeline_parallel_size > 1),
               "async_scheduling needs pipeline_parallel_size 1 (the next step's inputs come from the "
               "last stage's device); set it to false or leave it unset")

    @classmethod
    def create(cls, **kwargs: Any) -> "EngineConfig":
        """Build from flat vLLM-style keyword arguments (``model=``, ``block_size=`` ...)."""
        groups: dict[str, dict[str, Any]] = {}
        owners = {}
        for group_name, group_cls in (("model", ModelConfig), ("cache", CacheConfig),
                                      ("scheduler", SchedulerConfig), ("parallel", ParallelConfig),
                                      ("device", DeviceConfig)):
            for f in dataclasses.fields(group_cls):
                owners[f.name] = group_name
        owners["model"] = "model"
        for key, value in kwargs.items():
            if key not in owners:
                raise ValueError(f"unknown engine option {key!r}; known: {sorted(owners)}")
            groups.setdefault(owners[key], {})[key] = value
        return cls(model=ModelConfig(**groups.get("model", {})),
                   cache=CacheConfig(**groups.get("cache", {})),
                   scheduler=SchedulerConfig(**groups.get("scheduler", {})),
                   parallel=ParallelConfig(**groups.get("parallel", {})),
                   device=DeviceConfig(**groups.get("device", {})))
