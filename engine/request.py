"""The scheduler's view of one request (one sample stream).

Plain Python, no torch. There is no prefill or decode phase: a request has
``num_tokens`` known tokens (prompt + output so far) and ``num_computed_tokens``
whose KV is in the cache; each step the scheduler lets the computed count catch
up with the known count by some tokens. A prompt chunk, a decode step, a prefix
cache hit and a resumed preempted request are all just this.

A prompt with ``n > 1`` becomes ``n`` requests; the first is the leader, the
others name it in ``fork_of`` and, once the leader's prompt is computed, take
its blocks by reference (copy-on-write) instead of recomputing them.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Optional

from engine.kv_transfer.plan import KVTransferRole
from engine.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"  # queued, no blocks (new, or preempted and awaiting recompute)
    RUNNING = "running"  # holds blocks, scheduled each step
    WAITING_FOR_KV = "waiting_for_kv"  # remote prefill: holds reserved blocks under a lease
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    STOP = "stop"  # EOS, stop token id or stop string
    LENGTH = "length"  # max_tokens or max_model_len
    ABORT = "abort"  # client went away or abort() called
    ERROR = "error"  # the request failed; the engine kept going
    TRANSFERRED = "transferred"  # prefill only: its KV went to a decode replica, which continues it


@dataclass
class Request:
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_ids: frozenset[int] = frozenset()
    arrival_time: float = field(default_factory=time.monotonic)
    priority: int = 0  # lower runs first under SchedulingPolicy.PRIORITY
    sample_index: int = 0  # which of the n samples this is
    fork_of: Optional[str] = None  # request_id of the leader whose prompt blocks we share
    cache_salt: Optional[str] = None
    kv_role: Optional[KVTransferRole] = None  # disaggregated serving (engine/kv_transfer); None: local

    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0  # tokens whose KV is in the cache
    # Async scheduling: tokens sampled by a step still in flight, not yet appended. They count
    # as known (the next step computes their KV; the runner takes the ids from the GPU).
    num_output_placeholders: int = 0
    block_ids: list[int] = field(default_factory=list)  # block table: logical block i -> block id
    block_hashes: list[int] = field(default_factory=list)  # hash chain of full blocks (prefix cache)
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: Optional[FinishReason] = None
    stop_reason: Optional[int] = None  # the stop token id that finished it, if any
    error: Optional[str] = None  # why it failed, when finish_reason is ERROR
    num_preemptions: int = 0
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache on first schedule
    first_scheduled_time: Optional[float] = None
    first_token_time: Optional[float] = None

    def __post_init__(self) -> None:
        self.prompt_token_ids = list(self.prompt_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def is_finished(self) -> bool:
        return self.status == RequestStatus.FINISHED

    @property
    def max_tokens(self) -> Optional[int]:
        return self.sampling_params.max_tokens

    def append_output_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        if self.first_token_time is None:
            self.first_token_time = time.monotonic()
