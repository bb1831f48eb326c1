"""Async scheduling (step N+1 scheduled and launched before step N's tokens are applied).

On CPU the forward is synchronous, so nothing overlaps, but every piece of the
bookkeeping runs: placeholders in the scheduler, the runner taking a pending
token's id from the previous step's sampled ids, outputs one step late, a stop
token found after the next step was launched, preemption of a request whose
token is in flight, and penalties (which force a drain). Outputs must equal the
synchronous engine's exactly, and no KV block may leak.
"""

from __future__ import annotations

import random

import pytest

from engine import LLM, SamplingParams
from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from tests.engine_helpers import assert_no_leaks


def _workload(seed: int = 0):
    rng = random.Random(seed)
    prompts = [[rng.randrange(5, 500) for _ in range(rng.randrange(1, 90))] for _ in range(18)]
    params = []
    for i, prompt in enumerate(prompts):
        kind = i % 6
        if kind == 0:
            p = SamplingParams(temperature=0.0, max_tokens=rng.randrange(1, 30), ignore_eos=True)
        elif kind == 1:
            p = SamplingParams(temperature=0.8, top_p=0.9, seed=i, max_tokens=24)
        elif kind == 2:  # a stop token that some step samples: the next step was already launched
            p = SamplingParams(temperature=0.0, max_tokens=30, stop_token_ids=[prompt[0] % 50 + 100])
        elif kind == 3:  # penalties need the last token on the host: the engine drains first
            p = SamplingParams(temperature=1.0, repetition_penalty=1.3, frequency_penalty=0.2, seed=i,
                               max_tokens=20)
        elif kind == 4:
            p = SamplingParams(temperature=0.7, n=2, seed=i, max_tokens=16, logprobs=2)
        else:
            p = SamplingParams(temperature=0.0, max_tokens=25, logprobs=1, stop=["e"])
        params.append(p)
    return prompts, params


def _run(async_scheduling: bool, **options):
    llm = LLM(model="kvmesh-tiny", async_scheduling=async_scheduling, **options)
    assert llm.engine.async_scheduling is async_scheduling
    prompts, params = _workload()
    outs = llm.generate(prompts, params)
    assert_no_leaks(llm)
    # Under preemption the two runs cut prompts into different chunks, which changes fp32 sums in
    # the last bits: the tokens, finish reasons and texts must match exactly; each position's
    # logprobs are kept as (the sampled token's, all of them sorted), compared within 1e-3. Not
    # the alternatives' ids: two alternatives within a last-bit difference of each other may
    # swap places (seen on an Intel Xeon box: ids 464 and 505, both -6.168, at one position).
    return [[(c.token_ids, c.finish_reason, c.text,
              [(d[t].logprob, sorted(lp.logprob for lp in d.values()))
               for t, d in zip(c.token_ids, c.logprobs or [])])
             for c in o.outputs] for o in outs], llm


def _assert_same_outputs(got, expected) -> None:
    assert len(got) == len(expected)
    for got_req, exp_req in zip(got, expected):
        assert len(got_req) == len(exp_req)
        for (tokens, reason, text, lps), (exp_tokens, exp_reason, exp_text, exp_lps) in zip(got_req, exp_req):
            assert (tokens, reason, text) == (exp_tokens, exp_reason, exp_text)
            assert len(lps) == len(exp_lps)
            for (chosen, values), (exp_chosen, exp_values) in zip(lps, exp_lps):
                assert chosen == pytest.approx(exp_chosen, abs=1e-3)
                assert values == pytest.approx(exp_values, abs=1e-3)


@pytest.mark.parametrize("options", [
    dict(),
    dict(num_blocks=20, max_num_batched_tokens=32),  # chunked prefill and preemption
    dict(max_num_seqs=3),  # a queue: requests join while others' tokens are in flight
], ids=["plain", "preempting", "queued"])
def test_async_scheduling_gives_the_same_outputs_as_sync(options):
    expected, _ = _run(False, **options)
    got, llm = _run(True, **options)
    _assert_same_outputs(got, expected)
    if options.get("num_blocks"):
        assert llm.engine.scheduler.num_preemptions > 0  # the case it is meant to cover happened


def test_outputs_come_one_step_late_and_abort_frees_blocks():
    engine = LLMEngine(EngineConfig.create(model="kvmesh-tiny", async_scheduling=True))
    greedy = SamplingParams(temperature=0.0, max_tokens=50, ignore_eos=True)
    engine.add_request("a", [5, 6, 7], greedy)
    engine.add_request("b", [8, 9], greedy)
    assert engine.step() == []  # step 1 launched; nothing applied yet
    first = engine.step()  # step 2 launched, step 1's tokens applied
    assert sorted(o.request_id for o in first) == ["a", "b"]
    assert all(len(o.outputs[0].token_ids) == 1 for o in first)
    request = engine.scheduler.get_request("a")
    assert request.num_output_placeholders == 1  # step 2's token is in flight
    engine.abort_request("a")  # while its token is in flight
    while engine.has_unfinished_requests():
        for out in engine.step():
            assert out.request_id == "b"  # the aborted request's late token goes nowhere
    assert_no_leaks(engine)


def test_a_reused_request_id_does_not_get_the_old_requests_late_token():
    engine = LLMEngine(EngineConfig.create(model="kvmesh-tiny", async_scheduling=True))
    stop_params = SamplingParams(temperature=0.0, max_tokens=1)
    engine.add_request("x", [5, 6, 7], stop_params)
    outs = []
    while not outs:
        outs = engine.step()
    assert outs[0].finished and len(outs[0].outputs[0].token_ids) == 1
    engine.add_request("x", [9, 10, 11, 12], SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True))
    final = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            final = out
    alone = LLM(model="kvmesh-tiny", async_scheduling=False).generate(
        [[9, 10, 11, 12]], SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True))[0]
    assert final.outputs[0].token_ids == alone.outputs[0].token_ids
    assert_no_leaks(engine)


def test_async_scheduling_needs_one_pipeline_stage():
    with pytest.raises(ValueError, match="async_scheduling needs pipeline_parallel_size 1"):
        LLM(model="kvmesh-tiny", async_scheduling=True, pipeline_parallel_size=2)
