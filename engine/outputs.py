"""User-facing outputs, shaped like vLLM's ``RequestOutput``/``CompletionOutput``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass
class Logprob:
    logprob: float
    rank: Optional[int] = None
    decoded_token: Optional[str] = None


# One dict per generated token: token id -> Logprob (the chosen token plus top alternatives).
SampleLogprobs = list[dict[int, Logprob]]


@dataclass
class CompletionOutput:
    index: int  # which of the n samples
    text: str
    token_ids: list[int]
    logprobs: Optional[SampleLogprobs] = None
    finish_reason: Optional[str] = None  # "stop", "length", "abort", "error"; None while running
    stop_reason: Optional[int | str] = None  # the stop string or stop token id that ended it

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: Optional[float] = None
    first_token_time: Optional[float] = None
    finished_time: Optional[float] = None
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    # Disaggregated serving (decode side): the prompt's KV came from a prefill replica.
    kv_transfer_bytes: int = 0
    kv_transfer_s: Optional[float] = None  # header taken -> bytes received
    kv_transfer_started: Optional[float] = None  # sender's time.time() when it posted the header


@dataclass
class RequestOutput:
    request_id: str
    prompt: Optional[str]
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: Optional[RequestMetrics] = None
    error: Optional[str] = None  # set when finish_reason is "error"

    @property
    def num_cached_tokens(self) -> int:
        return self.metrics.num_cached_tokens if self.metrics else 0


@dataclass
class EngineStats:
    """What a replica reports to the router and to /metrics."""

    num_waiting: int = 0
    num_running: int = 0
    kv_usage: float = 0.0  # share of KV blocks referenced by requests
    num_blocks: int = 0
    num_free_blocks: int = 0
    prefix_cache_queries: int = 0  # prompt tokens looked up
    prefix_cache_hits: int = 0  # of which found cached
    num_preemptions: int = 0
    num_waiting_for_kv: int = 0  # decode side: requests holding reserved blocks for remote KV
    num_prompt_tokens: int = 0  # totals since start
    num_generation_tokens: int = 0
    cached_block_hashes: list[int] = field(default_factory=list)

    @property
    def prefix_cache_hit_rate(self) -> float:
        return self.prefix_cache_hits / self.prefix_cache_queries if self.prefix_cache_queries else 0.0
