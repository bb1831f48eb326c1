"""Scheduler on plain Python objects, driven by a fake model (no torch).

``FakeRunner`` applies the scheduler's messages the way ``ModelRunner`` does
(full request once, then diffs) and keeps a fake KV store whose slot holds the
token id written there. A request is sampled from the tokens it *reads back*
through its block table, so a wrong block table, a missed copy-on-write or a bad
prefix hit changes the output. The sampled token is a function of the tokens
only, so every schedule must give the outputs of ``expected_output``.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Optional

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.config import CacheConfig, SchedulerConfig, SchedulingPolicy
from engine.request import FinishReason, Request, RequestStatus
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler
from engine.scheduler_output import ModelOutput, SchedulerOutput

BLOCK_SIZE = 4


def fake_next_token(token_ids: list[int]) -> int:
    h = 17
    for t in token_ids:
        h = (h * 31 + t) % 1_000_003
    return 1 + h % 97


def expected_output(prompt: list[int], num_tokens: int) -> list[int]:
    tokens = list(prompt)
    for _ in range(num_tokens):
        tokens.append(fake_next_token(tokens))
    return tokens[len(prompt):]


@dataclass
class RunnerState:
    token_ids: list[int]
    block_ids: list[int]
    num_computed_tokens: int


class FakeRunner:
    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler
        self.pool = scheduler.kv_cache_manager.block_pool
        self.kv: list[list[Optional[int]]] = [[None] * BLOCK_SIZE for _ in range(self.pool.num_blocks)]
        self.states: dict[str, RunnerState] = {}

    def execute(self, so: SchedulerOutput) -> ModelOutput:
        for request_id in so.finished_req_ids | so.preempted_req_ids:
            self.states.pop(request_id, None)
        for new in so.scheduled_new_reqs:
            assert new.request_id not in self.states
            assert new.num_output_tokens == len(new.token_ids) - new.num_prompt_tokens
            self.states[new.request_id] = RunnerState(list(new.token_ids), list(new.block_ids),
                                                      new.num_computed_tokens)
        for diff in so.scheduled_cached_reqs:
            state = self.states[diff.request_id]
            assert state.num_computed_tokens == diff.num_computed_tokens
            state.token_ids += diff.new_token_ids
            state.block_ids += diff.new_block_ids
            for index, block_id in diff.replaced_blocks:
                state.block_ids[index] = block_id
        sent = [r.request_id for r in so.scheduled_new_reqs] + [r.request_id for r in so.scheduled_cached_reqs]
        assert sorted(sent) == sorted(so.num_scheduled_tokens)
        for src, dst in so.block_copies:
            self.kv[dst] = list(self.kv[src])
        for request_id, num_tokens in so.num_scheduled_tokens.items():
            state, request = self.states[request_id], self.scheduler.get_request(request_id)
            assert state.token_ids == request.all_token_ids and state.block_ids == request.block_ids
            for pos in range(state.num_computed_tokens, state.num_computed_tokens + num_tokens):
                block_id = state.block_ids[pos // BLOCK_SIZE]
                # Copy-on-write: a written block belongs to this request alone and is not cached.
                assert self.pool.ref_cnt(block_id) == 1 and not self.pool.is_cached(block_id)
                self.kv[block_id][pos % BLOCK_SIZE] = state.token_ids[pos]
        out = ModelOutput()
        for request_id, num_tokens in so.num_scheduled_tokens.items():
            state = self.states[request_id]
            state.num_computed_tokens += num_tokens
            assert state.num_computed_tokens <= len(state.token_ids)
            if state.num_computed_tokens == len(state.token_ids):
                seen = [self.kv[state.block_ids[p // BLOCK_SIZE]][p % BLOCK_SIZE] for p in range(len(state.token_ids))]
                assert seen == state.token_ids, request_id
                out.req_ids.append(request_id)
                out.sampled_token_ids.append([fake_next_token(seen)])
        return out


_arrival = itertools.count()


def make_request(request_id: str, prompt: list[int], max_tokens: Optional[int] = 8, **kwargs) -> Request:
    params = {k: kwargs.pop(k) for k in ("stop_token_ids", "ignore_eos", "min_tokens") if k in kwargs}
    return Request(request_id, prompt, SamplingParams(max_tokens=max_tokens, **params),
                   arrival_time=float(next(_arrival)), **kwargs)


def make_scheduler(num_blocks: int = 64, max_num_batched_tokens: int = 32, max_num_seqs: int = 8,
                   enable_chunked_prefill: bool = True, enable_prefix_caching: bool = True,
                   policy: SchedulingPolicy = SchedulingPolicy.FCFS,
                   max_model_len: int = 256,
                   long_prefill_token_threshold: Optional[int] = None) -> tuple[Scheduler, FakeRunner]:
    scheduler = Scheduler(SchedulerConfig(max_num_batched_tokens, max_num_seqs, enable_chunked_prefill, policy,
                                          long_prefill_token_threshold=long_prefill_token_threshold),
                          CacheConfig(block_size=BLOCK_SIZE, enable_prefix_caching=enable_prefix_caching),
                          num_blocks, max_model_len)
    return scheduler, FakeRunner(scheduler)


def step(scheduler: Scheduler, runner: FakeRunner) -> tuple[SchedulerOutput, list[Request]]:
    so = scheduler.schedule()
    if scheduler.config.enable_chunked_prefill:
        assert so.total_num_scheduled_tokens <= scheduler.config.max_num_batched_tokens
    assert len(so.num_scheduled_tokens) <= scheduler.config.max_num_seqs
    updated = scheduler.update_from_output(so, runner.execute(so))
    scheduler.check_invariants()
    return so, updated


def run_all(scheduler: Scheduler, runner: FakeRunner, max_steps: int = 1000) -> list[SchedulerOutput]:
    outputs = []
    while scheduler.has_unfinished_requests():
        assert len(outputs) < max_steps, "scheduler made no progress"
        outputs.append(step(scheduler, runner)[0])
    return outputs


def prompt_of(length: int, seed: int = 0) -> list[int]:
    return [(seed * 7919 + i * 13) % 89 + 1 for i in range(length)]


# ---- chunked prefill, budget, seats ------------------------------------------------------------
def test_chunked_prefill_splits_a_long_prompt_and_mixes_with_decodes():
    scheduler, runner = make_scheduler(max_num_batched_tokens=16)
    short, long = make_request("short", prompt_of(4), max_tokens=6), make_request("long", prompt_of(40, 1))
    scheduler.add_request(short)
    assert step(scheduler, runner)[0].num_scheduled_tokens == {"short": 4}
    scheduler.add_request(long)
    schedule = [step(scheduler, runner)[0].num_scheduled_tokens for _ in range(4)]
    assert schedule == [{"short": 1, "long": 15}, {"short": 1, "long": 15},
                        {"short": 1, "long": 10}, {"short": 1, "long": 1}]
    run_all(scheduler, runner)
    assert short.output_token_ids == expected_output(short.prompt_token_ids, 6)
    assert long.output_token_ids == expected_output(long.prompt_token_ids, 8)


def test_long_prefill_threshold_lets_short_prompts_share_the_step():
    """Without the cap a long prompt's chunks take the whole budget and a short prompt behind it
    waits for all of them; with it, the short prompt is computed in the next step."""
    scheduler, runner = make_scheduler(max_num_batched_tokens=16, long_prefill_token_threshold=8)
    long, short = make_request("long", prompt_of(40, 1)), make_request("short", prompt_of(5, 2), max_tokens=3)
    scheduler.add_request(long)
    assert step(scheduler, runner)[0].num_scheduled_tokens == {"long": 8}
    scheduler.add_request(short)
    assert step(scheduler, runner)[0].num_scheduled_tokens == {"long": 8, "short": 5}
    run_all(scheduler, runner)
    assert short.output_token_ids == expected_output(short.prompt_token_ids, 3)
    assert long.output_token_ids == expected_output(long.prompt_token_ids, 8)
    with pytest.raises(ValueError, match="long_prefill_token_threshold"):
        SchedulerConfig(long_prefill_token_threshold=0)


def test_budget_and_max_num_seqs_are_respected():
    scheduler, runner = make_scheduler(max_num_batched_tokens=10, max_num_seqs=3)
    requests = [make_request(f"r{i}", prompt_of(3 + 2 * i, i), max_tokens=5) for i in range(7)]
    for request in requests:
        scheduler.add_request(request)
    outputs = run_all(scheduler, runner)
    assert max(o.total_num_scheduled_tokens for o in outputs) == 10
    assert max(len(o.num_scheduled_tokens) for o in outputs) == 3
    for request in requests:
        assert request.finish_reason is FinishReason.LENGTH
        assert request.output_token_ids == expected_output(request.prompt_token_ids, 5)


def test_chunked_prefill_disabled_admits_whole_prompts_only():
    scheduler, runner = make_scheduler(max_num_batched_tokens=8, enable_chunked_prefill=False)
    scheduler.add_request(make_request("big", prompt_of(20), max_tokens=2))
    scheduler.add_request(make_request("small", prompt_of(6, 1), max_tokens=2))
    # Over the budget but alone in a fresh step: it runs whole; "small" would overflow, so it waits.
    assert step(scheduler, runner)[0].num_scheduled_tokens == {"big": 20}
    assert step(scheduler, runner)[0].num_scheduled_tokens == {"big": 1, "small": 6}
    run_all(scheduler, runner)


# ---- prefix cache and diffs --------------------------------------------------------------------
def test_prefix_hits_skip_computed_tokens_and_diffs_carry_only_changes():
    scheduler, runner = make_scheduler()
    shared = prompt_of(16)
    first = make_request("first", shared + [5, 6], max_tokens=3)
    scheduler.add_request(first)
    run_all(scheduler, runner)
    second = make_request("second", shared + [7, 8, 9, 10], max_tokens=4)
    scheduler.add_request(second)
    so, _ = step(scheduler, runner)
    (new,) = so.scheduled_new_reqs
    assert new.num_computed_tokens == 16 and so.num_scheduled_tokens == {"second": 4}
    assert second.num_cached_tokens == 16 and scheduler.get_stats().prefix_cache_hits == 16
    so, _ = step(scheduler, runner)  # token 21 starts a new block
    (diff,) = so.scheduled_cached_reqs
    assert diff.new_token_ids == second.output_token_ids[:1] and diff.num_computed_tokens == 20
    assert diff.new_block_ids == [second.block_ids[5]] and diff.replaced_blocks == []
    run_all(scheduler, runner)
    assert second.output_token_ids == expected_output(second.prompt_token_ids, 4)


# ---- preemption --------------------------------------------------------------------------------
def test_preemption_takes_the_newest_and_does_not_change_outputs():
    prompts = [prompt_of(8, i) for i in range(3)]
    free_scheduler, free_runner = make_scheduler()
    tight_scheduler, tight_runner = make_scheduler(num_blocks=9, enable_prefix_caching=False)
    results = []
    for scheduler, runner in ((free_scheduler, free_runner), (tight_scheduler, tight_runner)):
        requests = [make_request(f"r{i}", p, max_tokens=12) for i, p in enumerate(prompts)]
        for request in requests:
            scheduler.add_request(request)
        outputs = run_all(scheduler, runner)
        results.append((requests, outputs))
    (free_requests, _), (tight_requests, tight_outputs) = results
    assert [r.output_token_ids for r in tight_requests] == [r.output_token_ids for r in free_requests]
    assert free_scheduler.num_preemptions == 0 and tight_scheduler.num_preemptions > 0
    first_preempted = next(o.preempted_req_ids for o in tight_outputs if o.preempted_req_ids)
    assert first_preempted == {"r2"}
    # A resumed request is resent in full, with the outputs it had.
    resumed = [n for o in tight_outputs for n in o.scheduled_new_reqs if n.num_output_tokens > 0]
    assert resumed and all(n.num_computed_tokens == 0 for n in resumed)
    assert tight_scheduler.get_stats().num_preemptions == tight_scheduler.num_preemptions


def test_priority_policy_orders_admission_and_preemption():
    for policy, expected_first in ((SchedulingPolicy.FCFS, "low"), (SchedulingPolicy.PRIORITY, "high")):
        scheduler, runner = make_scheduler(max_num_seqs=1, policy=policy)
        scheduler.add_request(make_request("low", prompt_of(4), priority=5))
        scheduler.add_request(make_request("high", prompt_of(4, 1), priority=0))
        assert list(step(scheduler, runner)[0].num_scheduled_tokens) == [expected_first]
    # Under PRIORITY the lowest priority is preempted first, even if it arrived first.
    scheduler, runner = make_scheduler(num_blocks=6, policy=SchedulingPolicy.PRIORITY,
                                       enable_prefix_caching=False)
    old_low, new_high = make_request("old-low", prompt_of(8), priority=9), make_request("new-high", prompt_of(8, 1))
    scheduler.add_request(old_low)
    scheduler.add_request(new_high)
    outputs = run_all(scheduler, runner)
    assert next(o.preempted_req_ids for o in outputs if o.preempted_req_ids) == {"old-low"}
    assert old_low.output_token_ids == expected_output(old_low.prompt_token_ids, 8)


# ---- n > 1 forks -------------------------------------------------------------------------------
def test_fork_children_share_the_leaders_prompt_blocks():
    scheduler, runner = make_scheduler(enable_prefix_caching=False)
    prompt = prompt_of(10)
    leader = make_request("p", prompt)
    children = [make_request(f"p#{i}", prompt, sample_index=i, fork_of="p") for i in (1, 2)]
    for request in [leader, *children]:
        scheduler.add_request(request)
    assert step(scheduler, runner)[0].num_scheduled_tokens == {"p": 10}  # children wait for the prompt
    so, _ = step(scheduler, runner)
    assert so.num_scheduled_tokens == {"p": 1, "p#1": 1, "p#2": 1}
    assert [n.num_computed_tokens for n in so.scheduled_new_reqs] == [9, 9]
    assert len(so.block_copies) == 2  # each child copies the partial last block before writing
    pool = scheduler.kv_cache_manager.block_pool
    for child in children:
        assert child.block_ids[:2] == leader.block_ids[:2] and child.block_ids[2] != leader.block_ids[2]
    assert [pool.ref_cnt(b) for b in leader.block_ids] == [3, 3, 1]
    run_all(scheduler, runner)
    assert all(r.output_token_ids == expected_output(prompt, 8) for r in [leader, *children])


def test_fork_child_runs_alone_when_its_leader_is_gone():
    scheduler, runner = make_scheduler(enable_prefix_caching=False)
    prompt = prompt_of(10)
    scheduler.add_request(make_request("p", prompt))
    child = make_request("p#1", prompt, fork_of="p")
    scheduler.add_request(child)
    scheduler.finish_requests("p", FinishReason.ABORT)
    so, _ = step(scheduler, runner)
    assert so.num_scheduled_tokens == {"p#1": 10} and so.finished_req_ids == {"p"}
    run_all(scheduler, runner)
    assert child.output_token_ids == expected_output(prompt, 8)


def test_copy_on_write_of_a_running_request_is_sent_as_a_replaced_block():
    scheduler, runner = make_scheduler(enable_prefix_caching=False)
    request = make_request("r", prompt_of(6))
    scheduler.add_request(request)
    step(scheduler, runner)
    pool = scheduler.kv_cache_manager.block_pool
    shared = request.block_ids[1]
    pool.touch([shared])  # a second holder of the block being written, as after a fork
    so = scheduler.schedule()
    (diff,) = so.scheduled_cached_reqs
    assert so.block_copies == [(shared, request.block_ids[1])] and shared not in request.block_ids
    assert diff.replaced_blocks == [(1, request.block_ids[1])] and diff.new_block_ids == []
    scheduler.update_from_output(so, runner.execute(so))
    pool.free_blocks([shared])
    scheduler.check_invariants()
    run_all(scheduler, runner)
    assert request.output_token_ids == expected_output(request.prompt_token_ids, 8)


# ---- finishing ---------------------------------------------------------------------------------
def test_abort_frees_blocks_at_once_and_late_outputs_are_ignored():
    scheduler, runner = make_scheduler(num_blocks=16)
    running, waiting = make_request("running", prompt_of(9)), make_request("waiting", prompt_of(5, 1))
    scheduler.add_request(running)
    step(scheduler, runner)
    scheduler.add_request(waiting)
    so = scheduler.schedule()
    model_output = runner.execute(so)
    scheduler.finish_requests(["running", "waiting", "unknown"], FinishReason.ABORT)
    assert scheduler.kv_cache_manager.num_free_blocks == 16 and not scheduler.has_unfinished_requests()
    assert scheduler.update_from_output(so, model_output) == []
    assert running.output_token_ids and len(running.output_token_ids) == 1  # only the pre-abort token
    assert running.finish_reason is FinishReason.ABORT and running.status is RequestStatus.FINISHED
    assert scheduler.schedule().finished_req_ids == {"running", "waiting"}
    scheduler.check_invariants()


def test_stop_token_eos_max_tokens_and_max_model_len():
    prompt = prompt_of(6)
    natural = expected_output(prompt, 10)
    stop_id = natural[2]
    index = natural.index(stop_id)
    cases = {
        "stop": (make_request("stop", prompt, max_tokens=10, stop_token_ids=[stop_id]),
                 FinishReason.STOP, natural[:index + 1]),
        "eos": (make_request("eos", prompt, max_tokens=10, eos_token_ids=frozenset({stop_id})),
                FinishReason.STOP, natural[:index + 1]),
        "ignore-eos": (make_request("ignore-eos", prompt, max_tokens=5, ignore_eos=True,
                                    eos_token_ids=frozenset({stop_id})), FinishReason.LENGTH, natural[:5]),
        "length": (make_request("length", prompt, max_tokens=4), FinishReason.LENGTH, natural[:4]),
        "model-len": (make_request("model-len", prompt, max_tokens=None), FinishReason.LENGTH, natural[:6]),
    }
    min_tokens = make_request("min-tokens", prompt, max_tokens=10, min_tokens=index + 1, stop_token_ids=[stop_id])
    scheduler, runner = make_scheduler(max_model_len=12)
    for request, _, _ in cases.values():
        scheduler.add_request(request)
    scheduler.add_request(min_tokens)
    run_all(scheduler, runner)
    for name, (request, reason, tokens) in cases.items():
        assert (request.finish_reason, request.output_token_ids) == (reason, tokens), name
    assert cases["stop"][0].stop_reason == stop_id and cases["eos"][0].stop_reason is None
    assert len(min_tokens.output_token_ids) > index + 1  # the early stop token did not count
    assert scheduler.kv_cache_manager.block_pool.usage == 0.0


def test_add_request_validates():
    scheduler, _ = make_scheduler(max_model_len=8)
    with pytest.raises(ValueError, match="empty prompt"):
        scheduler.add_request(make_request("empty", []))
    with pytest.raises(ValueError, match="max_model_len"):
        scheduler.add_request(make_request("long", prompt_of(9)))
    scheduler.add_request(make_request("ok", prompt_of(8)))
    with pytest.raises(ValueError, match="already"):
        scheduler.add_request(make_request("ok", prompt_of(3)))


def test_request_too_large_for_the_pool_fails_instead_of_deadlocking():
    scheduler, runner = make_scheduler(num_blocks=4, enable_prefix_caching=False)  # 16 tokens in all
    too_long = make_request("too-long", prompt_of(20))
    grows_too_long = make_request("grows", prompt_of(12), max_tokens=10)
    fine = make_request("fine", prompt_of(3, 1), max_tokens=2)
    for request in (too_long, grows_too_long, fine):
        scheduler.add_request(request)
    so, updated = step(scheduler, runner)
    assert too_long in updated and too_long.finish_reason is FinishReason.ERROR and "4 blocks" in too_long.error
    run_all(scheduler, runner)
    assert grows_too_long.finish_reason is FinishReason.ERROR
    # 16 tokens fill the pool; the 5th sampled token has no room for its KV.
    assert grows_too_long.output_token_ids == expected_output(grows_too_long.prompt_token_ids, 5)
    assert fine.finish_reason is FinishReason.LENGTH
    assert scheduler.kv_cache_manager.num_free_blocks == 4


# ---- random interleavings ----------------------------------------------------------------------
PREFIXES = [prompt_of(8, 100), prompt_of(5, 200), []]

operations = st.lists(st.one_of(
    st.tuples(st.just("add"), st.integers(0, 2), st.integers(1, 14), st.integers(1, 3), st.integers(1, 8),
              st.integers(0, 2)),
    st.tuples(st.just("abort"), st.integers(0, 50)),
    st.tuples(st.just("step")),
), max_size=40)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=operations, policy=st.sampled_from(list(SchedulingPolicy)), chunked=st.booleans())
def test_random_interleavings_keep_invariants_and_outputs(ops, policy, chunked):
    scheduler, runner = make_scheduler(num_blocks=12, max_num_batched_tokens=16, max_num_seqs=4,
                                       enable_chunked_prefill=chunked, policy=policy, max_model_len=40)
    requests: list[Request] = []
    for op in ops:
        if op[0] == "add":
            _, prefix, suffix_len, n, max_tokens, priority = op
            prompt = PREFIXES[prefix] + prompt_of(suffix_len, len(requests))
            leader_id = f"r{len(requests)}"
            for i in range(n):
                request = make_request(leader_id if i == 0 else f"{leader_id}#{i}", prompt, max_tokens=max_tokens,
                                       priority=priority, sample_index=i, fork_of=leader_id if i else None)
                scheduler.add_request(request)
                requests.append(request)
        elif op[0] == "abort" and requests:
            scheduler.finish_requests(requests[op[1] % len(requests)].request_id, FinishReason.ABORT)
        else:
            step(scheduler, runner)
        scheduler.check_invariants()
    if ops and ops[-1][0] == "abort":  # ending on an abort: abort everything; else run to the end
        scheduler.finish_requests([r.request_id for r in requests], FinishReason.ABORT)
    run_all(scheduler, runner, max_steps=2000)
    pool = scheduler.kv_cache_manager.block_pool
    assert all(block.ref_cnt == 0 for block in pool.blocks) and pool.num_free_blocks == pool.num_blocks
    pool.check_invariants()
    for request in requests:
        assert request.is_finished
        expected = expected_output(request.prompt_token_ids, request.num_output_tokens)
        assert request.output_token_ids == expected, request.request_id
        if request.finish_reason is FinishReason.LENGTH:
            assert request.num_output_tokens == request.max_tokens or request.num_tokens == 40
