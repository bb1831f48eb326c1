"""Where each worker of a replica sits, and the size checks done before any worker starts.

A replica's workers form ``pipeline_parallel_size`` stages; every stage is one
*stage group* of ``stage_size = max(tensor_parallel_size, expert_parallel_size)``
ranks that run the same tokens in lock-step and share one communicator::

    global rank = pp_rank * stage_size + stage_rank

    tp=2, pp=2:      stage 0: ranks 0 1        stage 1: ranks 2 3
                     rank r sends its hidden states to rank r + stage_size (same stage_rank)

Inside a stage group, attention and dense MLPs are tensor parallel over
``tp`` ranks, and MoE experts are partitioned over ``ep`` ranks. We allow
``ep == 1``, ``ep == tp``, or ``tp == 1`` (attention replicated on the ``ep``
ranks), so the stage group is the TP group and the EP group at once and one
communicator serves both. Other mixes would need sub-groups; they are refused
with a message.

Plain Python, no torch: the executor validates a config against a ``ModelSpec``
before it reserves any GPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from engine.config import ParallelConfig
from engine.models.spec import ModelSpec


@dataclass(frozen=True)
class ParallelRank:
    """One worker's coordinates. ``tp_*`` and ``ep_*`` both index into its stage group."""

    rank: int  # global rank in the replica
    tp_rank: int
    tp_size: int
    pp_rank: int
    pp_size: int
    ep_rank: int
    ep_size: int

    @property
    def stage_size(self) -> int:
        return max(self.tp_size, self.ep_size)

    @property
    def stage_rank(self) -> int:
        return self.rank - self.pp_rank * self.stage_size

    @property
    def world_size(self) -> int:
        return self.stage_size * self.pp_size

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    @property
    def prev_rank(self) -> Optional[int]:
        """Global rank this worker receives hidden states from (None on the first stage)."""
        return None if self.is_first_stage else self.rank - self.stage_size

    @property
    def next_rank(self) -> Optional[int]:
        """Global rank this worker sends hidden states to (None on the last stage)."""
        return None if self.is_last_stage else self.rank + self.stage_size

    @property
    def stage_ranks(self) -> list[int]:
        """Global ranks of this worker's stage group, in stage-rank order."""
        start = self.pp_rank * self.stage_size
        return list(range(start, start + self.stage_size))

    @property
    def is_output_rank(self) -> bool:
        """The one worker whose ``ModelOutput`` the executor returns (last stage, stage rank 0)."""
        return self.is_last_stage and self.stage_rank == 0

    @property
    def expert_tp_size(self) -> int:
        """Each expert's MLP is TP-sliced only when experts are not partitioned."""
        return self.tp_size if self.ep_size == 1 else 1

    @property
    def expert_tp_rank(self) -> int:
        return self.tp_rank if self.ep_size == 1 else 0


SINGLE_RANK = ParallelRank(rank=0, tp_rank=0, tp_size=1, pp_rank=0, pp_size=1, ep_rank=0, ep_size=1)


def rank_layout(parallel: ParallelConfig) -> list[ParallelRank]:
    """Every worker's coordinates, by global rank."""
    tp, pp, ep = (parallel.tensor_parallel_size, parallel.pipeline_parallel_size,
                  parallel.expert_parallel_size)
    size = parallel.stage_size
    ranks = []
    for rank in range(pp * size):
        pp_rank, stage_rank = divmod(rank, size)
        ranks.append(ParallelRank(rank=rank, tp_rank=stage_rank if tp > 1 else 0, tp_size=tp,
                                  pp_rank=pp_rank, pp_size=pp,
                                  ep_rank=stage_rank if ep > 1 else 0, ep_size=ep))
    return ranks


def stage_layers(num_layers: int, pp_rank: int, pp_size: int) -> range:
    """Decoder layers run by stage ``pp_rank``: contiguous, equal slices (checked by validate)."""
    per_stage = num_layers // pp_size
    return range(pp_rank * per_stage, (pp_rank + 1) * per_stage)


def validate_parallel_sizes(parallel: ParallelConfig, spec: ModelSpec) -> None:
    """Raises ValueError naming the numbers when the sizes do not fit the model."""
    tp, pp, ep = (parallel.tensor_parallel_size, parallel.pipeline_parallel_size,
                  parallel.expert_parallel_size)
    errors = []
    if spec.num_heads % tp:
        errors.append(f"num_attention_heads ({spec.num_heads}) is not divisible by "
                      f"tensor_parallel_size ({tp})")
    kv = spec.num_kv_heads
    if kv % tp and tp % kv:
        errors.append(f"num_key_value_heads ({kv}) and tensor_parallel_size ({tp}) must divide "
                      f"one another (KV heads are split, or replicated when fewer than ranks)")
    has_dense_mlp = spec.moe is None or not all(spec.moe.is_moe_layer(i) for i in range(spec.num_layers))
    if has_dense_mlp and spec.intermediate_size % tp:
        errors.append(f"intermediate_size ({spec.intermediate_size}) is not divisible by "
                      f"tensor_parallel_size ({tp})")
    if spec.num_layers % pp:
        errors.append(f"num_hidden_layers ({spec.num_layers}) is not divisible by "
                      f"pipeline_parallel_size ({pp})")
    if ep > 1:
        if spec.moe is None:
            errors.append(f"expert_parallel_size ({ep}) > 1 needs a mixture-of-experts model; "
                          f"{spec.architecture.value} has no experts")
        elif spec.moe.num_experts % ep:
            errors.append(f"num_experts ({spec.moe.num_experts}) is not divisible by "
                          f"expert_parallel_size ({ep})")
        if tp > 1 and ep != tp:
            errors.append(f"expert_parallel_size ({ep}) must be 1, equal tensor_parallel_size "
                          f"({tp}), or be used with tensor_parallel_size 1")
    elif spec.moe is not None and spec.moe.moe_intermediate_size % tp:
        errors.append(f"moe_intermediate_size ({spec.moe.moe_intermediate_size}) is not divisible "
                      f"by tensor_parallel_size ({tp}); use expert_parallel_size = {tp} instead")
    shared = spec.moe.shared_expert_intermediate_size if spec.moe is not None else None
    if shared and shared % tp:
        errors.append(f"shared_expert_intermediate_size ({shared}) is not divisible by "
                      f"tensor_parallel_size ({tp})")
    if errors:
        raise ValueError("parallel sizes do not fit the model: " + "; ".join(errors))
