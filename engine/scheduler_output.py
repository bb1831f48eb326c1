"""The contract between the scheduler and the model runner (workers).

The scheduler sends each step a ``SchedulerOutput``; the runner answers with a
``ModelOutput``. These two are all that crosses that boundary, so the runner can
live in another process (Ray actor, one per GPU) and receive only what changed:

* a request is sent in full once (``NewRequestData``) - when first scheduled and
  again when it resumes after preemption (its blocks were freed, it recomputes);
* afterwards only a diff (``CachedRequestData``): blocks appended since the last
  step, blocks replaced by copy-on-write, tokens sampled since the last step, and
  the new computed-token count;
* ``finished_req_ids`` tells the runner to drop its per-request state.

Plain Python, no torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from engine.sampling_params import SamplingParams


@dataclass
class NewRequestData:
    request_id: str
    token_ids: list[int]  # prompt + outputs so far (non-empty outputs when resuming)
    num_prompt_tokens: int
    block_ids: list[int]
    num_computed_tokens: int  # tokens already in the cache (prefix hit / fork)
    sampling_params: SamplingParams
    num_output_tokens: int = 0  # seeded sampling draws depend on the output index


@dataclass
class CachedRequestData:
    request_id: str
    new_token_ids: list[int]  # tokens appended to the request since it was last sent
    new_block_ids: list[int]  # appended to the block table
    replaced_blocks: list[tuple[int, int]]  # (logical index, new block id) after copy-on-write
    num_computed_tokens: int


@dataclass
class SchedulerOutput:
    scheduled_new_reqs: list[NewRequestData] = field(default_factory=list)
    scheduled_cached_reqs: list[CachedRequestData] = field(default_factory=list)
    # request_id -> tokens to compute this step; insertion order is the batch order
    num_scheduled_tokens: dict[str, int] = field(default_factory=dict)
    # (src block id, dst block id): copy the whole block's KV before the forward (copy-on-write)
    block_copies: list[tuple[int, int]] = field(default_factory=list)
    finished_req_ids: set[str] = field(default_factory=set)  # runner drops their state
    preempted_req_ids: set[str] = field(default_factory=set)  # also dropped; resent when resumed
    step_id: int = 0  # increasing; the scheduler matches a step's ModelOutput to it

    @property
    def total_num_scheduled_tokens(self) -> int:
        return sum(self.num_scheduled_tokens.values())

    @property
    def is_empty(self) -> bool:
        return not self.num_scheduled_tokens


@dataclass
class TokenLogprobs:
    """Log-probabilities for one sampled token: the chosen one and the top alternatives."""

    token_id: int
    logprob: float
    rank: int  # 1 = most likely
    top_token_ids: list[int]  # most likely first, len = SamplingParams.logprobs
    top_logprobs: list[float]


@dataclass
class ModelOutput:
    """Tokens sampled this step, for requests whose known tokens are now all computed.

    Requests still mid-prompt (a chunk of a longer prefill) are absent from ``req_ids``.
    ``sampled_token_ids`` is a list per request so speculative decoding can return more.
    """

    req_ids: list[str] = field(default_factory=list)
    sampled_token_ids: list[list[int]] = field(default_factory=list)
    logprobs: list[Optional[list[TokenLogprobs]]] = field(default_factory=list)

    def __post_init__(self) -> None:
        assert len(self.req_ids) == len(self.sampled_token_ids)
