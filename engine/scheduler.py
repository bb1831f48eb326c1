"""Continuous batching: which tokens of which requests the model computes each step.

Plain Python, no torch. There is no prefill phase and no decode phase. Each
request has ``num_tokens`` known tokens (prompt + sampled so far) and
``num_computed_tokens`` whose KV is cached; a step lets the computed count catch
up with the known count by some tokens. A decode is 1 token, a long prompt is
split into chunks (chunked prefill), a prefix-cache hit or a fork starts the
computed count above 0, a preempted request restarts it at 0. One rule covers all.

One ``schedule()`` under the token budget ``max_num_batched_tokens`` and at most
``max_num_seqs`` running requests:

1. Running requests, in order, get ``min(num_tokens - num_computed_tokens, budget)``
   tokens. If their blocks cannot be allocated, the last running request is
   preempted by recompute (blocks freed, computed count 0, outputs kept, back to
   the front of the waiting queue) and the allocation retried. The running list
   is kept in policy order, so the last one is the newest (FCFS) or the lowest
   priority, then newest (PRIORITY).
2. Waiting requests, only if nothing was preempted this step, in FCFS order or
   by ``(priority, arrival_time)``: prefix-cache lookup, then allocation; the
   first one that does not fit stops admission (no overtaking).
   A fork (``fork_of``, n > 1 sampling) waits while its leader is on its first
   pass through the prompt, then shares the leader's prompt blocks and computes
   only the last prompt token (copy-on-write). If the leader was preempted or is
   gone, the fork runs as a plain request.
3. ``num_computed_tokens`` advances by the scheduled amount at once: the runner
   computes those tokens in this step's forward.

Disaggregated serving (``self.remote_kv``, engine/kv_transfer/leases.py): a
decode replica's request may hold reserved blocks in ``WAITING_FOR_KV`` (a seat
under ``max_num_seqs``) until its prompt's KV arrives from a prefill replica; a
prefill replica's request (``KVTransferRole.EXPORT``) ends after its first token.

Chunked prefill disabled: a waiting request is admitted only with all its tokens.
If they exceed the remaining budget it waits, unless nothing has been scheduled
yet this step: then it runs alone over the budget (it could never fit otherwise).

A request that cannot fit in the whole KV pool (alone, with every other request
preempted) is finished with ``FinishReason.ERROR`` instead of looping forever.
Such requests, with ``error`` set, come back from the next ``update_from_output``.

The runner receives each request in full once (``NewRequestData``), again after
a preemption, and otherwise only diffs against what it was last sent
(``RunnerMirror``, engine/runner_mirror.py).

Async scheduling (the engine schedules step N+1 while step N runs on the GPU):
a step that samples a request's next token leaves a *placeholder* on it
(``num_output_placeholders``); until that step's output comes back the
placeholder counts as a known token, so the request is scheduled for one more
decode token whose id the runner takes from the previous step's sampled ids on
the device. A request is not scheduled past a placeholder that certainly ends
it (``max_tokens``, ``max_model_len``, a prefill-only export); a stop token
found later wastes one token of compute, whose output is then dropped. Each
step's requests are remembered by ``step_id``, so a late output never lands on
a request that was preempted or finished (or on a new one reusing the id).
Without async scheduling the output of step N is applied before step N+1 is
scheduled and placeholders are always 0 at ``schedule()``.
"""

from __future__ import annotations

import bisect
import enum
import logging
import time
from typing import Iterable, Optional

from engine.config import CacheConfig, SchedulerConfig, SchedulingPolicy
from engine.kv_cache.block_pool import BlockPool
from engine.kv_cache.manager import KVCacheManager
from engine.kv_transfer.plan import KVTransferRole
from engine.kv_transfer.leases import RemoteKVManager
from engine.outputs import EngineStats
from engine.request import FinishReason, Request, RequestStatus
from engine.runner_mirror import BlockCopies, RunnerMirror
from engine.scheduler_output import ModelOutput, NewRequestData, SchedulerOutput

logger = logging.getLogger(__name__)

class _ForkDecision(enum.Enum):
    FORK = "fork"  # share the leader's computed prompt blocks
    WAIT = "wait"  # the leader is still on its first pass through the prompt
    ALONE = "alone"  # no usable leader: compute the prompt like any request


class Scheduler:
    def __init__(self, scheduler_config: SchedulerConfig, cache_config: CacheConfig,
                 num_blocks: int, max_model_len: int) -> None:
        if max_model_len <= 0:
            raise ValueError(f"max_model_len must be > 0, got {max_model_len}")
        self.config = scheduler_config
        self.cache_config = cache_config
        self.max_model_len = max_model_len
        self.kv_cache_manager = KVCacheManager(BlockPool(num_blocks), cache_config.block_size,
                                               cache_config.enable_prefix_caching, cache_config.cache_salt)
        self.requests: dict[str, Request] = {}  # unfinished requests by id
        self.waiting: list[Request] = []  # queue order; preempted requests go to the front
        self.running: list[Request] = []  # policy order: the last one is preempted first
        self.num_preemptions = 0  # total since start
        self._runner = RunnerMirror()  # what the runner holds: the diffs it is sent
        self._finished_req_ids: set[str] = set()  # finished since the last schedule()
        self._failed: list[Request] = []  # failed in schedule(); reported by update_from_output
        # step_id -> {request_id: (request, computed tokens after that step)} until its output is in
        self._in_flight: dict[int, dict[str, tuple[Request, int]]] = {}
        self._next_step_id = 0
        # Disaggregated serving: leases of requests waiting for remote KV, and exports.
        self.remote_kv = RemoteKVManager(self)

    # ---- requests -----------------------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        """Queues a request. Raises ValueError for an empty, too long or duplicate request."""
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already scheduled")
        if request.num_prompt_tokens == 0:
            raise ValueError(f"request {request.request_id!r} has an empty prompt")
        if request.num_tokens > self.max_model_len:
            raise ValueError(f"request {request.request_id!r} has {request.num_tokens} tokens but "
                             f"max_model_len is {self.max_model_len}")
        request.status = RequestStatus.WAITING
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def get_request(self, request_id: str) -> Optional[Request]:
        """The unfinished request with this id, or None."""
        return self.requests.get(request_id)

    def finish_requests(self, request_ids: str | Iterable[str], reason: FinishReason) -> None:
        """Ends requests now (abort, stop string), waiting or running; frees their blocks at once.

        Unknown or already finished ids are ignored.
        """
        ids = [request_ids] if isinstance(request_ids, str) else list(request_ids)
        for request_id in ids:
            request = self.requests.get(request_id)
            if request is not None:
                self._finish(request, reason)

    def has_unfinished_requests(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def get_stats(self) -> EngineStats:
        manager = self.kv_cache_manager
        pool = manager.block_pool
        return EngineStats(num_waiting=self.num_waiting, num_running=self.num_running,
                           kv_usage=pool.usage, num_blocks=pool.num_blocks,
                           num_free_blocks=pool.num_free_blocks,
                           prefix_cache_queries=manager.prefix_cache_queries,
                           prefix_cache_hits=manager.prefix_cache_hits,
                           num_preemptions=self.num_preemptions,
                           num_waiting_for_kv=self.remote_kv.num_waiting_for_kv,
                           cached_block_hashes=pool.cached_block_hashes())

    # ---- schedule -----------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        """Picks this step's tokens; see the module docstring for the rules."""
        self._next_step_id += 1
        out = SchedulerOutput(step_id=self._next_step_id)
        self._in_flight[out.step_id] = {}
        while len(self._in_flight) > 4:  # steps whose output never came (a failed step)
            del self._in_flight[next(iter(self._in_flight))]
        budget = self._schedule_running(out, self.config.max_num_batched_tokens)
        if not out.preempted_req_ids:
            self._schedule_waiting(out, budget)
        out.finished_req_ids, self._finished_req_ids = self._finished_req_ids, set()
        return out

    def _schedule_running(self, out: SchedulerOutput, budget: int) -> int:
        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            if request.num_output_placeholders and self._ends_at_placeholder(request):
                i += 1  # its in-flight token is its last: nothing more to compute
                continue
            num_known = request.num_tokens + request.num_output_placeholders
            num_new = min(num_known - request.num_computed_tokens, budget, self._chunk_cap)
            if num_new <= 0:  # nothing known beyond the computed tokens (no sample came back)
                i += 1
                continue
            copies = self._allocate_or_preempt(request, num_new, out)
            if copies is None:  # this request was preempted or failed: it left self.running
                continue
            self._emit(out, request, num_new, copies)
            budget -= num_new
            i += 1
        return budget

    @property
    def _chunk_cap(self) -> int:
        """Most tokens one request computes in a step (``long_prefill_token_threshold``)."""
        cap = self.config.long_prefill_token_threshold
        return cap if cap is not None and self.config.enable_chunked_prefill else 1 << 62

    def _ends_at_placeholder(self, request: Request) -> bool:
        """True if the request's in-flight sampled token certainly finishes it."""
        num_output = request.num_output_tokens + request.num_output_placeholders
        max_tokens = request.sampling_params.max_tokens
        return (request.kv_role is KVTransferRole.EXPORT
                or (max_tokens is not None and num_output >= max_tokens)
                or request.num_tokens + request.num_output_placeholders >= self.max_model_len)

    def _allocate_or_preempt(self, request: Request, num_new: int,
                             out: SchedulerOutput) -> Optional[BlockCopies]:
        """Allocates, preempting from the back of ``self.running`` until it fits.

        Everything after ``request`` in ``self.running`` is unscheduled this step,
        so a victim never has tokens in ``out``. None if ``request`` itself went.
        """
        while True:
            copies = self.kv_cache_manager.allocate_slots(request, num_new)
            if copies is not None:
                return copies
            victim = self.running[-1]
            if victim is request and len(self.running) == 1:
                self._fail(request, self._too_large_message(request, request.num_computed_tokens + num_new))
                return None
            self._preempt(victim, out)
            if victim is request:
                return None

    def _schedule_waiting(self, out: SchedulerOutput, budget: int) -> None:
        manager = self.kv_cache_manager
        for request in self._waiting_order():
            num_seats_taken = len(self.running) + self.remote_kv.num_waiting_for_kv
            if budget <= 0 or num_seats_taken >= self.config.max_num_seqs:
                break
            decision, leader = self._fork_decision(request, out)
            if decision is _ForkDecision.WAIT:
                continue  # do not hold up the requests behind it
            if decision is _ForkDecision.FORK:
                copies = self._fork(leader, request)
                if copies is None:
                    break
                num_new = 1
            else:
                if manager.num_blocks_for(request.num_tokens) > manager.block_pool.num_blocks:
                    self._fail(request, self._too_large_message(request, request.num_tokens))
                    continue
                hit_blocks, num_hit_tokens = manager.get_computed_blocks(request)
                num_new = request.num_tokens - num_hit_tokens
                if self.config.enable_chunked_prefill:
                    num_new = min(num_new, budget, self._chunk_cap)
                elif num_new > budget and out.num_scheduled_tokens:
                    break  # whole prompts only; over-budget ones run alone in a fresh step
                copies = manager.allocate_slots(request, num_new, hit_blocks)
                if copies is None:
                    break
                request.num_computed_tokens = num_hit_tokens
                if request.first_scheduled_time is None:
                    request.num_cached_tokens = num_hit_tokens
            self._admit(request)
            self._emit(out, request, num_new, copies)
            budget -= num_new

    def _waiting_order(self) -> list[Request]:
        if self.config.policy is SchedulingPolicy.PRIORITY:
            return sorted(self.waiting, key=self._priority_key)  # stable: ties keep queue order
        return list(self.waiting)

    @staticmethod
    def _priority_key(request: Request) -> tuple[int, float]:
        return request.priority, request.arrival_time

    def _fork_decision(self, request: Request, out: SchedulerOutput) -> tuple[_ForkDecision, Optional[Request]]:
        if request.fork_of is None or request.num_output_tokens or request.num_preemptions:
            return _ForkDecision.ALONE, None
        leader = self.requests.get(request.fork_of)
        if leader is None:
            return _ForkDecision.ALONE, None
        # Only KV computed by an earlier step can be shared: this step's copies run before its forward.
        num_computed_before_step = leader.num_computed_tokens - out.num_scheduled_tokens.get(leader.request_id, 0)
        if leader.status is RequestStatus.RUNNING and num_computed_before_step >= leader.num_prompt_tokens:
            return _ForkDecision.FORK, leader
        if leader.num_preemptions == 0:
            return _ForkDecision.WAIT, None
        return _ForkDecision.ALONE, None

    def _fork(self, leader: Request, child: Request) -> Optional[BlockCopies]:
        """Shares the leader's prompt blocks; the child recomputes its last prompt token."""
        manager = self.kv_cache_manager
        manager.fork(leader, child)
        child.num_computed_tokens = child.num_prompt_tokens - 1
        copies = manager.allocate_slots(child, 1)
        if copies is None:  # undo: only references were taken, the leader still holds the blocks
            manager.free(child)
            child.num_computed_tokens = 0
        return copies

    def _admit(self, request: Request) -> None:
        self.waiting.remove(request)
        self._add_running(request)

    def _add_running(self, request: Request) -> None:
        request.status = RequestStatus.RUNNING
        if request.first_scheduled_time is None:
            request.first_scheduled_time = time.monotonic()
        if self.config.policy is SchedulingPolicy.PRIORITY:
            bisect.insort_right(self.running, request, key=self._priority_key)
        else:
            self.running.append(request)

    def _emit(self, out: SchedulerOutput, request: Request, num_new: int, copies: BlockCopies) -> None:
        """Records the request's tokens, diff and copies in ``out``; advances its computed count."""
        request_id = request.request_id
        data = self._runner.request_data(request, copies)
        if isinstance(data, NewRequestData):
            out.scheduled_new_reqs.append(data)
        else:
            out.scheduled_cached_reqs.append(data)
        out.num_scheduled_tokens[request_id] = num_new
        out.block_copies.extend(copies)
        request.num_computed_tokens += num_new
        self._in_flight[out.step_id][request_id] = (request, request.num_computed_tokens)
        if request.num_computed_tokens == request.num_tokens + request.num_output_placeholders:
            request.num_output_placeholders += 1  # this step samples its next token

    def _preempt(self, request: Request, out: SchedulerOutput) -> None:
        """Preemption by recompute: free the blocks, keep the tokens, requeue at the front."""
        self.running.remove(request)
        self.kv_cache_manager.free(request)
        request.num_computed_tokens = 0
        request.num_output_placeholders = 0  # an in-flight token is dropped; recompute draws it again
        request.status = RequestStatus.WAITING
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.insert(0, request)
        self._runner.forget(request.request_id)
        out.preempted_req_ids.add(request.request_id)

    # ---- finishing ----------------------------------------------------------------------------
    def _finish(self, request: Request, reason: FinishReason) -> None:
        if request.status is RequestStatus.RUNNING:
            self.running.remove(request)
        elif request.status is RequestStatus.WAITING:
            self.waiting.remove(request)
        elif request.status is RequestStatus.WAITING_FOR_KV:
            self.remote_kv.drop(request)
        self.kv_cache_manager.free(request)
        request.num_output_placeholders = 0
        request.status = RequestStatus.FINISHED
        request.finish_reason = reason
        self.requests.pop(request.request_id, None)
        self._runner.forget(request.request_id)
        self._finished_req_ids.add(request.request_id)

    def _fail(self, request: Request, message: str) -> None:
        logger.warning("failing request %s: %s", request.request_id, message)
        request.error = message  # the output processor puts it on the RequestOutput
        self._finish(request, FinishReason.ERROR)
        self._failed.append(request)

    def _too_large_message(self, request: Request, num_tokens: int) -> str:
        pool = self.kv_cache_manager.block_pool
        return (f"request needs {self.kv_cache_manager.num_blocks_for(num_tokens)} KV blocks for "
                f"{num_tokens} tokens but the pool has only {pool.num_blocks} blocks of "
                f"{self.cache_config.block_size} tokens")

    # ---- update -------------------------------------------------------------------------------
    def update_from_output(self, scheduler_output: SchedulerOutput, model_output: ModelOutput) -> list[Request]:
        """Appends sampled tokens, caches newly full blocks, finishes stopped requests.

        Returns the requests that got tokens (finished ones included) and those
        failed during the last ``schedule()``. Outputs of requests finished or
        preempted since that step was scheduled are ignored. Blocks are cached
        (up to what this step computed) before finished requests free theirs, so a
        finished request's prefix stays hittable until evicted.
        """
        manager = self.kv_cache_manager
        updated, self._failed = self._failed, []
        scheduled = self._in_flight.pop(scheduler_output.step_id, {})

        def still_running(request_id: str) -> Optional[Request]:
            entry = scheduled.get(request_id)
            request = self.requests.get(request_id)
            if entry is None or request is not entry[0] or request.status is not RequestStatus.RUNNING:
                return None
            return request

        for request_id, (_, num_computed_after) in scheduled.items():
            request = still_running(request_id)
            if request is not None:
                manager.cache_blocks(request, num_computed_after)
        for request_id, token_ids in zip(model_output.req_ids, model_output.sampled_token_ids):
            request = still_running(request_id)
            if request is None or not token_ids:
                continue
            request.num_output_placeholders = max(request.num_output_placeholders - 1, 0)
            for token_id in token_ids:
                request.append_output_token(token_id)
                reason = self._check_stop(request)
                if reason is not None:
                    self._finish(request, reason)
                    break
            updated.append(request)
        return updated

    def _check_stop(self, request: Request) -> Optional[FinishReason]:
        """Why the request ends after its last sampled token, or None.

        EOS and stop token ids count only from output index ``min_tokens`` on;
        they win over a length limit reached by the same token.
        """
        params = request.sampling_params
        token_id = request.output_token_ids[-1]
        if request.num_output_tokens > params.min_tokens:
            if not params.ignore_eos and token_id in request.eos_token_ids:
                request.stop_reason = None
                return FinishReason.STOP
            if token_id in params.stop_token_ids:
                request.stop_reason = token_id
                return FinishReason.STOP
        if params.max_tokens is not None and request.num_output_tokens >= params.max_tokens:
            return FinishReason.LENGTH
        if request.num_tokens >= self.max_model_len:
            return FinishReason.LENGTH
        return None

    # ---- checks -------------------------------------------------------------------------------
    def check_invariants(self) -> None:
        """Asserts the pool's invariants and that block references match the requests (tests)."""
        pool = self.kv_cache_manager.block_pool
        pool.check_invariants()
        expected = [0] * pool.num_blocks
        waiting_for_kv = [lease.request for lease in self.remote_kv.leases.values()]
        for request in self.running + waiting_for_kv:
            assert request.status in (RequestStatus.RUNNING, RequestStatus.WAITING_FOR_KV), request.request_id
            for block_id in request.block_ids:
                expected[block_id] += 1
        for request in self.waiting:
            assert request.status is RequestStatus.WAITING and not request.block_ids, request.request_id
            assert request.num_computed_tokens == 0, request.request_id
        assert [b.ref_cnt for b in pool.blocks] == expected
        assert len(self.running) + len(waiting_for_kv) <= self.config.max_num_seqs
        assert set(self.requests) == {r.request_id for r in self.running + self.waiting + waiting_for_kv}
