"""``stream_interval``: fewer streamed outputs per request, exactly the same tokens and text."""

from __future__ import annotations

import pytest

from engine import SamplingParams
from engine.async_engine import AsyncLLM
from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from router.config import ReplicaConfig
from tests.engine_helpers import assert_no_leaks


@pytest.fixture(scope="module")
def engine():
    engine = LLMEngine(EngineConfig.create(model="kvmesh-tiny", block_size=16))
    yield engine
    engine.shutdown()


def _run(engine: LLMEngine, requests: dict[str, tuple], stream_interval: int,
         max_outputs_per_step=None) -> dict[str, list]:
    """Adds (prompt, params) per request id, steps to the end; every output per request."""
    for request_id, (prompt, params) in requests.items():
        engine.add_request(request_id, prompt, params, stream_interval=stream_interval,
                           max_outputs_per_step=max_outputs_per_step)
    outputs: dict[str, list] = {request_id: [] for request_id in requests}
    while engine.has_unfinished_requests():
        for out in engine.step():
            outputs[out.request_id].append(out)
    assert_no_leaks(engine)
    return outputs


def _final(outs: list) -> list[tuple]:
    return [(c.text, c.token_ids, c.finish_reason, c.stop_reason, c.logprobs) for c in outs[-1].outputs]


def test_fewer_outputs_same_result(engine):
    prompts = {"plain": ("Once upon a time", SamplingParams(temperature=0.0, max_tokens=23, ignore_eos=True)),
               "n2": ("The capital of France", SamplingParams(temperature=0.8, seed=3, n=2, max_tokens=17,
                                                            ignore_eos=True, logprobs=2)),
               "short": ("Hi", SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True))}
    every = _run(engine, {f"{k}-1": v for k, v in prompts.items()}, stream_interval=1)
    coarse = _run(engine, {f"{k}-4": v for k, v in prompts.items()}, stream_interval=4)
    for key in prompts:
        assert _final(coarse[f"{key}-4"]) == _final(every[f"{key}-1"])
        assert coarse[f"{key}-4"][-1].finished
        assert not any(o.finished for o in coarse[f"{key}-4"][:-1])
    # The first token at once, then every 4 tokens, then the rest at the end.
    assert [len(o.outputs[0].token_ids) for o in coarse["plain-4"]] == [1, 5, 9, 13, 17, 21, 23]
    assert len(every["plain-1"]) >= 23
    # Texts only grow, as with every-token outputs (the replica's deltas rely on it).
    texts = [o.outputs[0].text for o in coarse["plain-4"]]
    assert all(b.startswith(a) for a, b in zip(texts, texts[1:]))


def test_stop_string_found_between_outputs(engine):
    base = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    free = _run(engine, {"free": ("Once upon a time", base)}, 1)["free"][-1].outputs[0]
    stop = free.text[len(free.text) // 2:len(free.text) // 2 + 3]
    assert stop.strip()
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True, stop=[stop])
    every = _run(engine, {"stop-1": ("Once upon a time", params)}, 1)["stop-1"]
    coarse = _run(engine, {"stop-8": ("Once upon a time", params)}, 8)["stop-8"]
    assert _final(coarse) == _final(every)
    assert every[-1].outputs[0].finish_reason == "stop" and len(coarse) < len(every)


def test_abort_flushes_deferred_text(engine):
    params = SamplingParams(temperature=0.0, max_tokens=50, ignore_eos=True)
    engine.add_request("abort-16", "Once upon a time", params, stream_interval=16)
    outs = [engine.step() for _ in range(6)]
    final = engine.abort_request("abort-16")[0].outputs[0]
    assert final.finish_reason == "abort" and len(final.token_ids) >= 5
    assert sum(len(o) for o in outs) == 1  # only the first token went out before the abort
    reference = _run(engine, {"abort-ref": ("Once upon a time", SamplingParams(
        temperature=0.0, max_tokens=len(final.token_ids), ignore_eos=True))}, 1)["abort-ref"]
    assert final.text == reference[-1].outputs[0].text
    assert_no_leaks(engine)


def test_interval_widens_with_load(engine):
    params = SamplingParams(temperature=0.0, max_tokens=13, ignore_eos=True)
    # 8 active prompts, at most 2 outputs a step: each prompt's interval is ceil(8 / 2) = 4.
    loaded = _run(engine, {f"load-{i}": (f"Story {i} begins", params) for i in range(8)}, 1,
                  max_outputs_per_step=2)
    for outs in loaded.values():
        assert [len(o.outputs[0].token_ids) for o in outs] == [1, 5, 9, 13]
    # One prompt alone under the same budget streams every token.
    alone = _run(engine, {"alone": ("Story 0 begins", params)}, 1, max_outputs_per_step=2)["alone"]
    assert [len(o.outputs[0].token_ids) for o in alone] == list(range(1, 14))
    assert _final(alone) == _final(loaded["load-0"])


def test_invalid_interval_rejected(engine):
    with pytest.raises(ValueError, match="stream_interval"):
        engine.add_request("bad", "Hi", SamplingParams(max_tokens=2), stream_interval=0)
    with pytest.raises(ValueError, match="max_outputs_per_step"):
        engine.add_request("bad", "Hi", SamplingParams(max_tokens=2), max_outputs_per_step=0)
    with pytest.raises(ValueError, match="stream_interval"):
        ReplicaConfig(stream_interval=0)
    with pytest.raises(ValueError, match="max_stream_updates_per_step"):
        ReplicaConfig(max_stream_updates_per_step=0)


async def test_async_engine_stream_interval():
    engine = AsyncLLM.from_config(EngineConfig.create(model="kvmesh-tiny", block_size=16))
    try:
        params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
        every = [o async for o in engine.generate("Once upon a time", params, "a-1")]
        coarse = [o async for o in engine.generate("Once upon a time", params, "a-8", stream_interval=8)]
        assert _final(coarse) == _final(every)
        # Coalescing can merge outputs further, never split them: at most 1 + ceil(19 / 8).
        assert len(coarse) <= 4 < len(every)
        with pytest.raises(ValueError, match="stream_interval"):
            async for _ in engine.generate("Hi", params, "a-0", stream_interval=0):
                pass
    finally:
        engine.shutdown()


async def test_replica_streams_deltas_per_its_config():
    from router.config import parse_deployment_config
    from router.messages import GenerateRequest
    from router.replica import LLMServer
    cfg = parse_deployment_config({"model": "kvmesh-tiny", "engine": {"block_size": 16},
                                   "replicas": {"stream_interval": 4, "max_stream_updates_per_step": None}})
    server = LLMServer.__new__(LLMServer)
    await server.__init__(cfg)
    try:
        params = SamplingParams(temperature=0.0, max_tokens=13, ignore_eos=True)
        req = GenerateRequest("replica-4", server.engine.tokenizer.encode("Once upon a time"), params, [])
        deltas = [d async for d in server.generate_deltas(req)]
        assert [len(d.choices[0].token_ids) for d in deltas] == [1, 4, 4, 4]
        assert deltas[-1].finished and deltas[-1].choices[0].finish_reason == "length"
    finally:
        server.engine.shutdown()
