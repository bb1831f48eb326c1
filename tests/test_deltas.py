"""Incremental streaming: replica deltas add up to the cumulative output, and a lagging
consumer of ``AsyncLLM`` gets the latest cumulative output instead of a backlog."""

from __future__ import annotations

import asyncio

import pytest

from engine import SamplingParams
from engine.async_engine import AsyncLLM
from engine.async_streams import RequestStream
from engine.config import EngineConfig
from engine.outputs import CompletionOutput, Logprob, RequestOutput
from router.deltas import DeltaTracker


def _output(choices: list[tuple[str, list[int], str | None]], logprobs: bool = False) -> RequestOutput:
    outs = [CompletionOutput(index=i, text=text, token_ids=list(ids), finish_reason=finish,
                             logprobs=[{t: Logprob(-0.5)} for t in ids] if logprobs else None)
            for i, (text, ids, finish) in enumerate(choices)]
    return RequestOutput("r", None, [1, 2, 3], outs, finished=all(f for _, _, f in choices))


def test_deltas_concatenate_to_the_final_output():
    steps = [
        _output([("He", [5], None), ("", [7], None)], logprobs=True),
        _output([("Hello", [5, 6], None), ("Bo", [7, 8], None)], logprobs=True),
        _output([("Hello", [5, 6], None), ("Bo", [7, 8], None)], logprobs=True),  # nothing new
        _output([("Hello!", [5, 6, 9], "stop"), ("Boo", [7, 8, 4], None)], logprobs=True),
        _output([("Hello!", [5, 6, 9], "stop"), ("Boom", [7, 8, 4, 3], "length")], logprobs=True),
    ]
    tracker = DeltaTracker("replica-a")
    deltas = [tracker.update(out) for out in steps]
    assert deltas[2] is None  # an output that changed nothing sends nothing
    deltas = [d for d in deltas if d is not None]
    assert [d.finished for d in deltas] == [False, False, False, True]
    assert all(d.replica_id == "replica-a" for d in deltas)
    final = steps[-1]
    for c in final.outputs:
        mine = [cd for d in deltas for cd in d.choices if cd.index == c.index]
        assert "".join(cd.text for cd in mine) == c.text
        assert [t for cd in mine for t in cd.token_ids] == c.token_ids
        assert len([e for cd in mine for e in cd.logprobs]) == len(c.logprobs)
        assert [cd.finish_reason for cd in mine if cd.finish_reason] == [c.finish_reason]  # once
    # a finished choice is not repeated in later deltas
    assert [cd.index for cd in deltas[-1].choices] == [1]


def test_revised_text_sends_what_follows_the_common_prefix():
    tracker = DeltaTracker("r")
    tracker.update(_output([("abc", [1], None)]))
    delta = tracker.update(_output([("abXY", [1, 2], None)]))
    assert delta.choices[0].text == "XY" and delta.choices[0].token_ids == [2]


async def test_stream_hands_a_lagging_consumer_only_the_latest_output():
    stream = RequestStream(asyncio.get_running_loop())
    first, second, third = (_output([(t, ids, None)]) for t, ids in (("a", [1]), ("ab", [1, 2]),
                                                                       ("abc", [1, 2, 3])))
    for item in (first, second, ValueError("boom"), third):
        stream.push(item)
    assert await stream.get() is second  # first is superseded by second (cumulative)
    with pytest.raises(ValueError):
        raise await stream.get()  # an error is never skipped
    assert await stream.get() is third
    waiter = asyncio.ensure_future(stream.get())
    await asyncio.sleep(0)
    assert not waiter.done()
    stream.put(first)  # the engine thread's way in
    assert await asyncio.wait_for(waiter, 5) is first


@pytest.fixture(scope="module")
def async_engine():
    engine = AsyncLLM.from_config(EngineConfig.create(model="kvmesh-tiny", block_size=16))
    yield engine
    engine.shutdown()


async def test_slow_consumer_gets_fewer_outputs_with_the_same_result(async_engine, tiny_llm):
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    outs = []
    async for out in async_engine.generate("Once upon a time", params, "slow-1"):
        outs.append(out)
        await asyncio.sleep(0.05)  # several engine steps pass meanwhile
    assert outs[-1].finished and len(outs) < 24
    counts = [len(o.outputs[0].token_ids) for o in outs]
    assert counts == sorted(counts)
    offline = tiny_llm.generate("Once upon a time", params)[0].outputs[0]
    assert outs[-1].outputs[0].token_ids == offline.token_ids
    assert outs[-1].outputs[0].text == offline.text


def test_trimmer_merges_sources_without_repeats():
    """Prefill reply (token 0), then a decode stream from token 0 whose first delta carries two
    tokens, then a retry's stream from 0 again: the client gets each token and character once."""
    from router.deltas import ChoiceDelta, DeltaTrimmer, OutputDelta

    def d(ids, text, finish=None, lps=None):
        return OutputDelta("r", [ChoiceDelta(0, text, ids, lps, finish)], finish is not None)

    trimmer = DeltaTrimmer()
    out = [trimmer.new_source().trim(d([5], "He", lps=[{5: 0.0}]))]
    decode = trimmer.new_source()
    out += [decode.trim(d([5, 6], "Hello", lps=[{5: 0.0}, {6: 0.0}])), decode.trim(d([7], " w", lps=[{7: 0.0}]))]
    retry = trimmer.new_source()
    out += [retry.trim(d([5], "He", lps=[{5: 0.0}])), retry.trim(d([6, 7, 8], "llo wo", lps=[{6: 0.0}, {7: 0.0}, {8: 0.0}])),
            retry.trim(d([], "", finish="stop"))]
    sent = [x for x in out if x is not None]
    assert out[3] is None  # the retry's first token: the client has it
    assert [t for x in sent for c in x.choices for t in c.token_ids] == [5, 6, 7, 8]
    assert "".join(c.text for x in sent for c in x.choices) == "Hello wo"
    assert [lp for x in sent for c in x.choices for lp in c.logprobs or []] == [{5: 0.0}, {6: 0.0}, {7: 0.0}, {8: 0.0}]
    assert sent[-1].finished and sent[-1].choices[0].finish_reason == "stop"
