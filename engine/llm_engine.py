"""The synchronous engine: one step is schedule, execute, update.

    scheduler_output = scheduler.schedule()                       # which tokens of which requests
    model_output     = executor.execute_model(scheduler_output)   # one flattened forward + sampling
    updated          = scheduler.update_from_output(...)          # append tokens, stops, free blocks
    outputs          = output_processor.process(updated)          # detokenize, stop strings

Requests are validated in ``add_request`` (a bad one raises ``ValueError`` and
never reaches the scheduler). If a step itself fails, the requests of that step
end with ``finish_reason="error"`` and the engine goes on with the others.

With async scheduling (``SchedulerConfig.async_scheduling``; on by default for CUDA
workers in one pipeline stage) the host work of a step overlaps the device's work of the previous
one: ``step()`` schedules and launches step N, then waits for step N-1's sampled
ids and applies them. Outputs therefore come one ``step()`` call after their
tokens were launched; ``has_unfinished_requests`` covers the step in flight::

    host:    sched N | launch N | wait N-1, update, detokenize | sched N+1 | launch N+1 | wait N ...
    device:  ... step N-1 ......|.......... step N ..........................|... step N+1 ...
"""

from __future__ import annotations

import dataclasses
import logging
import random
import time
from typing import Any, Optional, Sequence

from engine.config import EngineConfig
from engine.executor import Executor, make_executor, resolve_device, resolve_max_model_len
from engine.models.spec import ModelSpec
from engine.output_processor import OutputProcessor
from engine.outputs import EngineStats, RequestOutput
from engine.kv_transfer.plan import (DeferredPlan, KVArrival, KVExport, KVReservation, KVTransferPlan,
                                     KVTransferRole, TransferFailurePolicy)
from engine.request import FinishReason, Request
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler
from engine.scheduler_output import ModelOutput, SchedulerOutput
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
        self.executor = executor or make_executor(config, self.spec, model_path)
        self.num_blocks = self.executor.determine_num_blocks()
        self.executor.initialize_kv_cache(self.num_blocks)
        logger.info("engine ready in %.1fs: %d KV blocks of %d tokens, max_model_len %d",
                    time.monotonic() - start, self.num_blocks, config.cache.block_size, self.max_model_len)
        self.scheduler = Scheduler(config.scheduler, config.cache, self.num_blocks, self.max_model_len)
        self.output_processor = OutputProcessor(self.tokenizer)
        self._seed_rng = random.Random(config.model.seed)
        self.num_prompt_tokens_total = 0
        self.num_generation_tokens_total = 0
        # Disaggregated serving: plans of prefill-only requests, and their staged KV after a step.
        self._export_plans: dict[str, KVTransferPlan | DeferredPlan] = {}
        self._kv_exports: list[KVExport] = []
        self.num_kv_recomputes = 0  # decode side: leases that fell back to computing the prompt
        self.async_scheduling = self._resolve_async_scheduling()
        self._in_flight: Optional[tuple[SchedulerOutput, Any]] = None  # (step, its StepFuture)
        # What the last step() scheduled (None: it only finished the in-flight step); read by
        # AsyncLLM's step timeline (engine/step_timeline.py).
        self.last_scheduled: Optional[SchedulerOutput] = None

    def _resolve_async_scheduling(self) -> bool:
        wanted = self.config.scheduler.async_scheduling
        if wanted is None:
            return self.executor.supports_async and resolve_device(self.config).type == "cuda"
        if wanted and not self.executor.supports_async:
            raise ValueError("async_scheduling needs pipeline_parallel_size 1; set it to false or "
                             "leave it unset")
        return bool(wanted)

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
                    priority: int = 0, arrival_time: Optional[float] = None,
                    kv_role: Optional[KVTransferRole] = None, stream: bool = True,
                    stream_interval: int = 1, max_outputs_per_step: Optional[int] = None) -> None:
        """Validates and queues one prompt (``params.n`` samples). Raises ValueError on bad input.

        ``stream=False``: only the final output is wanted, so text is decoded once at the end
        (unless stop strings must be watched for) and no intermediate outputs are built.
        ``stream_interval``: a streamed prompt gets an output at its first token, then once a
        sample has this many new tokens, and at the end (1: every step); the tokens and
        text are the same whatever the interval. ``max_outputs_per_step``: under load the
        interval widens to ceil(active prompts / this), so a step yields about this many outputs.
        """
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
        self.output_processor.add(request_id, text, prompt_ids, params, child_ids, arrival, stream=stream,
                                  stream_interval=stream_interval, max_outputs_per_step=max_outputs_per_step)
        for i, child_id in enumerate(child_ids):
            child_params = dataclasses.replace(params, n=1, seed=params.seed + i)
            self.scheduler.add_request(Request(
                request_id=child_id, prompt_token_ids=prompt_ids, sampling_params=child_params,
                eos_token_ids=self.eos_token_ids, arrival_time=arrival, priority=priority,
                sample_index=i, fork_of=request_id if i > 0 else None,
                cache_salt=self.config.cache.cache_salt, kv_role=kv_role))
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
        return self.scheduler.has_unfinished_requests() or self._in_flight is not None

    # ---- the step -----------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        self.last_scheduled = None
        if not self.async_scheduling:
            scheduler_output = self.last_scheduled = self.scheduler.schedule()
            try:
                model_output = self.executor.execute_model(scheduler_output)
            except Exception as exc:  # a broken batch must not take the engine down
                return self._fail_step(scheduler_output, exc)
            return self._apply(scheduler_output, model_output)
        if self._in_flight is not None and self._needs_sampled_ids_on_host():
            return self._finish_in_flight()  # penalties read the in-flight token: no overlap this step
        scheduler_output = self.last_scheduled = self.scheduler.schedule()
        outputs: list[RequestOutput] = []
        try:
            future = self.executor.execute_model_async(scheduler_output)
        except Exception as exc:
            future = None
            outputs += self._fail_step(scheduler_output, exc)
        if self._in_flight is not None:
            outputs += self._finish_in_flight()
        if future is not None and scheduler_output.is_empty:  # nothing in flight: apply it now
            outputs += self._apply(scheduler_output, future.result())
        elif future is not None:
            self._in_flight = (scheduler_output, future)
        return outputs

    def _needs_sampled_ids_on_host(self) -> bool:
        return any(r.num_output_placeholders and r.sampling_params.needs_history for r in self.scheduler.running)

    def _finish_in_flight(self) -> list[RequestOutput]:
        scheduler_output, future = self._in_flight
        self._in_flight = None
        try:
            model_output = future.result()
        except Exception as exc:
            return self._fail_step(scheduler_output, exc)
        return self._apply(scheduler_output, model_output)

    def _fail_step(self, scheduler_output: SchedulerOutput, exc: Exception) -> list[RequestOutput]:
        logger.error("step failed; failing its %d requests", len(scheduler_output.num_scheduled_tokens),
                     exc_info=exc)
        return self._fail_requests(list(scheduler_output.num_scheduled_tokens), exc)

    def _apply(self, scheduler_output: SchedulerOutput, model_output: ModelOutput) -> list[RequestOutput]:
        """Update: the step's tokens into the scheduler, then stops and text (the output processor)."""
        updated = self.scheduler.update_from_output(scheduler_output, model_output)
        logprobs = {rid: lp for rid, lp in zip(model_output.req_ids, model_output.logprobs) if lp}
        outputs, stopped = self.output_processor.process(updated, logprobs)
        if stopped:
            self.scheduler.finish_requests(stopped, FinishReason.STOP)
        self._export_finished_prefills(logprobs)
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

    # ---- disaggregated serving (engine/kv_transfer) --------------------------------------------
    def add_prefill_request(self, request_id: str, prompt: PromptType, params: Optional[SamplingParams],
                            plan: "KVTransferPlan | DeferredPlan", priority: int = 0) -> None:
        """Prefill only: compute the prompt, sample the first token, export the prompt's KV
        (every prompt block when the plan is deferred).

        After the step that samples the first token, the staged KV of the blocks the
        plan asks for is in ``take_kv_exports()`` and the request is gone from this
        engine (its blocks stay in the prefix cache). If that token already ends
        the request (a stop, ``max_tokens=1``) its output is final and nothing is exported.
        """
        params = params or SamplingParams()
        if params.n != 1:
            raise ValueError("disaggregated prefill supports n == 1 only")
        _, prompt_ids = self.tokenize_prompt(prompt)
        num_blocks = self.scheduler.kv_cache_manager.num_blocks_for(len(prompt_ids))
        reservation = plan.reservation if isinstance(plan, KVTransferPlan) else None
        if reservation is not None and (reservation.num_prompt_tokens != len(prompt_ids)
                or reservation.first_block_index + reservation.num_blocks != num_blocks):
            raise ValueError(f"the KV reservation for {request_id} ({reservation.first_block_index} cached "
                             f"+ {reservation.num_blocks} reserved blocks, {reservation.num_prompt_tokens} "
                             f"tokens) does not match this prompt ({len(prompt_ids)} tokens, {num_blocks} "
                             "blocks): do both pools use the same block size?")
        self.add_request(request_id, prompt_ids, params, priority, kv_role=KVTransferRole.EXPORT)
        self._export_plans[request_id] = plan

    def take_kv_exports(self) -> list[KVExport]:
        """Staged KV of prefill-only requests finished since the last call."""
        exports, self._kv_exports = self._kv_exports, []
        return exports

    def _export_finished_prefills(self, logprobs: dict) -> None:
        manager = self.scheduler.kv_cache_manager
        for request in self.scheduler.remote_kv.take_exports():
            plan = self._export_plans.pop(request.request_id)
            first = plan.reservation.first_block_index if isinstance(plan, KVTransferPlan) else 0
            block_ids = request.block_ids[first:manager.num_blocks_for(request.num_prompt_tokens)]
            kv = self.executor.export_kv(block_ids)
            token_logprobs = logprobs.get(request.request_id)
            self._kv_exports.append(KVExport(plan, kv, request.output_token_ids[0],
                                             token_logprobs[0] if token_logprobs else None))
            self.scheduler.finish_requests(request.request_id, FinishReason.TRANSFERRED)
            self.output_processor.drop(request.request_id)
        for request_id in [r for r in self._export_plans if self.scheduler.get_request(r) is None]:
            del self._export_plans[request_id]  # finished by its first token, aborted or failed

    def add_remote_prefill_request(self, request_id: str, prompt: PromptType,
                                   params: Optional[SamplingParams], lease_timeout_s: float,
                                   min_remote_tokens: int = 1,
                                   on_failure: TransferFailurePolicy = TransferFailurePolicy.RECOMPUTE,
                                   priority: int = 0, stream_interval: int = 1,
                                   max_outputs_per_step: Optional[int] = None) -> Optional[KVReservation]:
        """Remote prefill: reserve blocks for the prompt's KV under a lease of ``lease_timeout_s``.

        Returns the reservation a prefill replica fills (``import_remote_kv``), or
        None when the prompt is computed here instead, queued like ``add_request``'s:
        n > 1, fewer than ``min_remote_tokens`` uncached prompt tokens, or no room.
        """
        params = params or SamplingParams()
        self.add_request(request_id, prompt, params, priority, stream_interval=stream_interval,
                         max_outputs_per_step=max_outputs_per_step)
        if params.n != 1:
            return None
        request = self.scheduler.get_request(request_id)
        return self.scheduler.remote_kv.reserve(request, lease_timeout_s, min_remote_tokens, on_failure)

    def import_remote_kv(self, arrival: KVArrival) -> list[RequestOutput]:
        """Writes arrived KV into its lease's blocks; the request decodes from the next step.

        A failed arrival releases the lease (recompute here, or fail, per its
        policy); an arrival for a lease that is gone is dropped untouched.
        """
        header = arrival.header
        lease = self.scheduler.remote_kv.get(header.request_id, header.transfer_id)
        if lease is None:
            logger.info("dropping KV of %s: its lease is gone", header.request_id)
            return []
        if arrival.error is not None:
            return self._release_kv_lease(header.request_id, f"KV transfer failed: {arrival.error}")
        try:
            self.executor.import_kv(list(lease.reservation.dst_block_ids), arrival.kv)
        except Exception as exc:  # noqa: BLE001 - a bad payload fails this request only
            return self._release_kv_lease(header.request_id, f"KV import failed: {exc}")
        request = self.scheduler.remote_kv.admit(header.request_id, header.first_token_id)
        metrics = self.output_processor.prompts[header.request_id].metrics
        metrics.kv_transfer_bytes = arrival.num_bytes
        metrics.kv_transfer_s = arrival.transfer_s
        metrics.kv_transfer_started = header.sent_at
        first_logprobs = {request.request_id: [header.first_token_logprobs]} if header.first_token_logprobs else {}
        outputs, stopped = self.output_processor.process([request], first_logprobs)
        if stopped:
            self.scheduler.finish_requests(stopped, FinishReason.STOP)
        return outputs

    def expire_kv_leases(self) -> list[RequestOutput]:
        """Releases leases whose KV did not arrive in time (outputs of requests failed by it)."""
        outputs = []
        for request_id in self.scheduler.remote_kv.expired():
            timeout = self.scheduler.remote_kv.leases[request_id].reservation.lease_timeout_s
            outputs += self._release_kv_lease(
                request_id, f"the prompt's KV did not arrive from the prefill replica within the "
                            f"lease of {timeout:g}s")
        return outputs

    def _release_kv_lease(self, request_id: str, reason: str) -> list[RequestOutput]:
        lease = self.scheduler.remote_kv.release(request_id)
        if lease is None:
            return []
        if lease.on_failure is TransferFailurePolicy.RECOMPUTE:
            logger.warning("request %s: %s; computing its prompt here instead", request_id, reason)
            self.num_kv_recomputes += 1
            return []
        self.scheduler.finish_requests(request_id, FinishReason.ERROR)
        out = self.output_processor.finish(request_id, FinishReason.ERROR,
                                           error=f"disaggregated prefill failed: {reason}")
        return [out] if out is not None else []

    def get_stats(self, with_block_hashes: bool = False) -> EngineStats:
        stats = self.scheduler.get_stats()
        stats.num_prompt_tokens = self.num_prompt_tokens_total
        stats.num_generation_tokens = self.num_generation_tokens_total
        if not with_block_hashes:
            stats.cached_block_hashes = []
        return stats

    def check_health(self) -> None:
        """Raises if the replica can no longer serve (its executor lost a worker)."""
        self.executor.check_health()

    def shutdown(self) -> None:
        self._in_flight = None
        self.executor.shutdown()
