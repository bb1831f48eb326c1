"""The async engine streams outputs, aborts free blocks at once, and bad requests fail alone."""

from __future__ import annotations

import asyncio

import pytest

from engine import SamplingParams
from engine.async_engine import AsyncLLM
from engine.config import EngineConfig
from tests.engine_helpers import assert_no_leaks


@pytest.fixture(scope="module")
def async_engine():
    engine = AsyncLLM.from_config(EngineConfig.create(model="kvmesh-tiny", block_size=16))
    yield engine
    engine.shutdown()


async def _collect(engine, prompt, params, request_id):
    outs = []
    async for out in engine.generate(prompt, params, request_id):
        outs.append(out)
    return outs


async def test_streams_cumulative_outputs_matching_offline(async_engine, tiny_llm):
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    outs = await _collect(async_engine, "Once upon a time", params, "stream-1")
    assert outs[-1].finished and not any(o.finished for o in outs[:-1])
    texts = [o.outputs[0].text for o in outs]
    assert all(texts[i + 1].startswith(texts[i]) for i in range(len(texts) - 1))
    offline = tiny_llm.generate("Once upon a time", params)[0].outputs[0]
    assert outs[-1].outputs[0].token_ids == offline.token_ids
    assert outs[-1].outputs[0].text == offline.text


async def test_concurrent_requests_and_abort_frees_blocks(async_engine):
    long_params = SamplingParams(temperature=0.0, max_tokens=400, ignore_eos=True)
    short_params = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)

    async def consume_some(request_id):
        got = 0
        async for _ in async_engine.generate("A long story " * 20, long_params, request_id):
            got += 1
            if got == 3:
                break  # client goes away: the generator's exit aborts the request

    short = asyncio.create_task(_collect(async_engine, "Hi", short_params, "short-1"))
    await consume_some("long-1")
    explicit = asyncio.create_task(_collect(async_engine, "Another long one " * 10, long_params, "long-2"))
    await asyncio.sleep(0.3)
    await async_engine.abort("long-2")
    aborted = await explicit
    assert aborted[-1].finished and aborted[-1].outputs[0].finish_reason == "abort"
    assert (await short)[-1].outputs[0].finish_reason == "length"
    assert_no_leaks(async_engine.engine)


async def test_bad_request_fails_alone(async_engine):
    with pytest.raises(ValueError, match="max_model_len"):
        await _collect(async_engine, [5] * (async_engine.max_model_len + 1), SamplingParams(), "too-long")
    with pytest.raises(ValueError, match="empty"):
        await _collect(async_engine, "", SamplingParams(), "empty")
    outs = await _collect(async_engine, "still alive", SamplingParams(max_tokens=3, ignore_eos=True), "ok-1")
    assert len(outs[-1].outputs[0].token_ids) == 3
    assert async_engine.get_stats().num_running == 0
