"""The synchronous engine: one step is schedule, execute, update.

    scheduler_output = scheduler.schedule()                       # which tokens of which requests
    model_output     = executor.execute_model(scheduler_output)   # one flattened forward + sampling
    updated          = scheduler.update_from_output(...)          # append tokens, stops, free blocks
    outputs          = output_processor.process(updated)          # detokenize, stop strings

Requests are validated in ``add_request`` (a bad one raises ``ValueError`` and
never reaches the scheduler). If a step itself fails, the requests of that step
end with ``finish_reason="error"`` and the engine goes on with the others.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import time
from typing import Optional, Sequence

from engine.config import EngineConfig
from engine.executor import Executor, UniprocExecutor, resolve_max_model_len
from engine.models.spec import ModelSpec
from engine.output_processor import OutputProcessor
from engine.outputs import EngineStats, RequestOutput
from engine.request import FinishReason, Request
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler
from engine.tiny_model import resolve_model_path
from engine.tokenizer import eos_token_ids, load_tokenizer

logger = logging.getLogger(__name__)

PromptType = str | Sequence[int]


class LLMEngine:
    def __init__(self, config: EngineConfig, executor: Optional[Executor] = None) -> None:
        self.config = config
        model_path = resolve_model_path(config.model.model)
        self.model_path = model_path
        self.spec = ModelSpec.from_hf_config(model_path)
        self.max_model_len = resolve_max_model_len(config, self.spec)
        self.tokenizer = load_tokenizer(config.model.tokenizer or model_path)
        self.eos_token_ids = eos_token_ids(self.tokenizer, self.spec.eos_token_ids)
        start = time.monotonic()
        self.executor = executor or UniprocExecutor(config, self.spec, model_path)
        self.num_blocks = self.executor.determine_num_blocks()
        self.executor.initialize_kv_cache(self.num_blocks)
        logger.info("engine ready in %.1fs: %d KV blocks of %d tokens, max_model_len %d, "
                    "max concurrency at full length %.1f", time.monotonic() - start, self.num_blocks,
                    config.cache.block_size, self.max_model_len,
                    self.num_blocks * config.cache.block_size / self.max_model_len)
        self.scheduler = Scheduler(config.scheduler, config.cache, self.num_blocks, self.max_model_len)
        self.output_processor = OutputProcessor(self.tokenizer)
        self._seed_rng = random.Random(config.model.seed)
        self.num_prompt_tokens_total = 0
        self.num_generation_tokens_total = 0

    # ---- requests -----------------------------------------------------------------------------
    def tokenize_prompt(self, prompt: PromptType) -> tuple[Optional[str], list[int]]:
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt is empty")
            from engine.tokenizer import encode_prompt
            return prompt, encode_prompt(self.tokenizer, prompt)
        token_ids = list(prompt)
        if any(not isinstance(t, int) for t in token_ids):
            raise ValueError("prompt token ids must be integers")
        return None, token_ids

    def add_request(self, request_id: str, prompt: PromptType, params: Optional[SamplingParams] = None,
                    priority: int = 0, arrival_time: Optional[float] = None) -> None:
        """Validates and queues one prompt (``params.n`` samples). Raises ValueError on bad input."""
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling params must be SamplingParams, got {type(params).__name__}")
        if request_id in self.output_processor.prompts:
            raise ValueError(f"request id {request_id!r} is already in use")
        text, prompt_ids = self.tokenize_prompt(prompt)
        self._validate_prompt(prompt_ids)
        if params.seed is None:  # every request gets a seed: reproducible and batch-independent
            params = dataclasses.replace(params, seed=self._seed_rng.randrange(1 << 31))
        arrival = arrival_time if arrival_time is not None else time.monotonic()
        child_ids = [request_id if i == 0 else f"{request_id}#{i}" for i in range(params.n)]
        self.output_processor.add(request_id, text, prompt_ids, params, child_ids, arrival)
        for i, child_id in enumerate(child_ids):
            child_params = dataclasses.replace(params, n=1, seed=params.seed + i)
            self.scheduler.add_request(Request(
                request_id=child_id, prompt_token_ids=prompt_ids, sampling_params=child_params,
                eos_token_ids=self.eos_token_ids, arrival_time=arrival, priority=priority,
                sample_index=i, fork_of=request_id if i > 0 else None,
                cache_salt=self.config.cache.cache_salt))
        self.num_prompt_tokens_total += len(prompt_ids)

    def _validate_prompt(self, prompt_ids: list[int]) -> None:
        if not prompt_ids:
            raise ValueError("prompt is empty")
        if len(prompt_ids) >= self.max_model_len:
            raise ValueError(f"prompt has {len(prompt_ids)} tokens but max_model_len is "
                             f"{self.max_model_len}; it must be shorter to leave room for output")
        vocab = self.spec.vocab_size
        bad = next((t for t in prompt_ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise ValueError(f"prompt token id {bad} is outside the vocabulary [0, {vocab})")

    def abort_request(self, request_ids: str | Sequence[str]) -> list[RequestOutput]:
        """Ends the prompts' samples at once; their KV blocks are freed before this returns."""
        ids = [request_ids] if isinstance(request_ids, str) else list(request_ids)
        outputs = []
        for request_id in ids:
            self.scheduler.finish_requests(self.output_processor.child_ids(request_id), FinishReason.ABORT)
            out = self.output_processor.finish(request_id, FinishReason.ABORT)
            if out is not None:
                outputs.append(out)
        return outputs

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    # ---- the step -----------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        scheduler_output = self.scheduler.schedule()
        try:
            model_output = self.executor.execute_model(scheduler_output)
        except Exception as exc:  # a broken batch must not take the engine down
            logger.exception("step failed; failing its %d requests", len(scheduler_output.num_scheduled_tokens))
            return self._fail_requests(list(scheduler_output.num_scheduled_tokens), exc)
        updated = self.scheduler.update_from_output(scheduler_output, model_output)
        logprobs = {rid: lp for rid, lp in zip(model_output.req_ids, model_output.logprobs) if lp}
        outputs, stopped = self.output_processor.process(updated, logprobs)
        if stopped:
            self.scheduler.finish_requests(stopped, FinishReason.STOP)
        self.num_generation_tokens_total += sum(len(t) for t in model_output.sampled_token_ids)
        return outputs

    def _fail_requests(self, child_ids: list[str], exc: Exception) -> list[RequestOutput]:
        parents = {self.output_processor.parent_of[c] for c in child_ids if c in self.output_processor.parent_of}
        outputs = []
        for parent in parents:
            self.scheduler.finish_requests(self.output_processor.child_ids(parent), FinishReason.ERROR)
            out = self.output_processor.finish(parent, FinishReason.ERROR, error=f"{type(exc).__name__}: {exc}")
            if out is not None:
                outputs.append(out)
        return outputs

    def get_stats(self, with_block_hashes: bool = False) -> EngineStats:
        stats = self.scheduler.get_stats()
        stats.num_prompt_tokens = self.num_prompt_tokens_total
        stats.num_generation_tokens = self.num_generation_tokens_total
        if not with_block_hashes:
            stats.cached_block_hashes = []
        return stats

    def shutdown(self) -> None:
        self.executor.shutdown()
