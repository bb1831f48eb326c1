"""The engine-core process (``AsyncLLM.from_config(..., engine_process=True)``) behaves like the
in-process engine: same outputs, aborts free blocks, bad requests fail alone; its death ends
every open stream with ``EngineDeadError`` at once, and shutdown leaves no child behind."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest

from engine import SamplingParams
from engine.async_engine import AsyncLLM, EngineDeadError
from engine.config import EngineConfig
from engine.engine_process import ProcessAsyncLLM
from tests.polling import wait_for_async

CONFIG = EngineConfig.create(model="kvmesh-tiny", block_size=16)


@pytest.fixture(scope="module")
def in_process():
    engine = AsyncLLM.from_config(CONFIG)
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def engine_process():
    engine = AsyncLLM.from_config(CONFIG, engine_process=True)
    assert isinstance(engine, ProcessAsyncLLM)
    yield engine
    engine.shutdown()


async def _collect(engine, prompt, params, request_id, stream_interval=1):
    return [out async for out in engine.generate(prompt, params, request_id, stream_interval=stream_interval)]


def _final(outs: list) -> list[tuple]:
    """Everything of the final output but the logprob values (``_logprobs``)."""
    last = outs[-1]
    assert last.finished and not any(o.finished for o in outs[:-1])
    return [(c.index, c.text, c.token_ids, c.finish_reason, c.stop_reason,
             [{t: (lp.rank, lp.decoded_token) for t, lp in step.items()} for step in c.logprobs or []])
            for c in last.outputs] + [tuple(last.prompt_token_ids)]


def _logprobs(outs: list) -> list[float]:
    return [lp.logprob for c in outs[-1].outputs for step in c.logprobs or [] for lp in step.values()]


def _assert_no_leak(engine) -> None:
    stats = engine.get_stats()
    assert stats.num_running == 0 and stats.num_waiting == 0
    assert stats.kv_usage == 0.0
    assert stats.num_free_blocks == stats.num_blocks  # cached-and-unreferenced blocks count as free


async def _requests(in_process) -> list[tuple]:
    """(prompt, params, stream_interval): greedy, seeded sampling with n=2 and logprobs, stop strings."""
    greedy = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    text = (await _collect(in_process, "Once upon a time", greedy, "probe"))[-1].outputs[0].text
    stop = text[len(text) // 2: len(text) // 2 + 3]  # a string the greedy text reaches mid-way
    assert stop.strip()
    cases = []
    for interval in (1, 4):
        cases += [
            ("Once upon a time", greedy, interval),
            ("The capital of France is", SamplingParams(temperature=0.8, top_p=0.95, seed=7, n=2, logprobs=3,
                                                        max_tokens=20, ignore_eos=True), interval),
            ([5, 6, 7, 8, 9], SamplingParams(temperature=1.0, top_k=20, seed=11, max_tokens=12), interval),
            ("Once upon a time", SamplingParams(temperature=0.0, max_tokens=16, stop=[stop], ignore_eos=True),
             interval),
        ]
    return cases


async def test_same_outputs_as_in_process(in_process, engine_process):
    cases = await _requests(in_process)
    expected = await asyncio.gather(*(_collect(in_process, p, sp, f"in-{i}", si)
                                      for i, (p, sp, si) in enumerate(cases)))
    got = await asyncio.gather(*(_collect(engine_process, p, sp, f"proc-{i}", si)
                                 for i, (p, sp, si) in enumerate(cases)))
    for (prompt, params, interval), want, have in zip(cases, expected, got):
        assert _final(have) == _final(want), (prompt, params, interval)
        # Logprob values move in the last bits with the step's batch shape (which requests share
        # a step depends on timing; two in-process runs differ alike, ~1e-6): equal to 1e-5.
        assert _logprobs(have) == pytest.approx(_logprobs(want), abs=1e-5, rel=0)
    assert any(c.finish_reason == "stop" for outs in got for c in outs[-1].outputs)
    _assert_no_leak(engine_process)


async def test_abort_frees_blocks(engine_process):
    long_params = SamplingParams(temperature=0.0, max_tokens=400, ignore_eos=True)
    got = 0
    async for _ in engine_process.generate("A long story " * 20, long_params, "gone-1"):
        got += 1
        if got == 3:
            break  # the client goes away: the generator's exit aborts the request
    explicit = asyncio.create_task(_collect(engine_process, "Another long one " * 10, long_params, "abort-2"))
    # running within 10 s (a fixed 0.3 s failed once on a busy 2-core box)
    assert await wait_for_async(lambda: engine_process.get_stats().num_running >= 1, timeout_s=10)
    await engine_process.abort("abort-2")
    _assert_no_leak(engine_process)  # the blocks are free when abort returns
    aborted = await explicit
    assert aborted[-1].finished and aborted[-1].outputs[0].finish_reason == "abort"
    await asyncio.sleep(0.05)
    _assert_no_leak(engine_process)


async def test_many_concurrent_streams(engine_process):
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    outs = await asyncio.gather(*(_collect(engine_process, f"Story number {i}:", params, f"many-{i}",
                                           stream_interval=1 + i % 3) for i in range(48)))
    assert all(len(o[-1].outputs[0].token_ids) == 24 and o[-1].outputs[0].finish_reason == "length"
               for o in outs)
    _assert_no_leak(engine_process)


async def test_bad_request_fails_alone(engine_process):
    good = asyncio.create_task(_collect(engine_process, "still alive",
                                        SamplingParams(max_tokens=8, ignore_eos=True), "ok-1"))
    with pytest.raises(ValueError, match="max_model_len"):  # checked in this process
        await _collect(engine_process, [5] * (engine_process.max_model_len + 1), SamplingParams(), "too-long")
    with pytest.raises(ValueError, match="SamplingParams"):  # rejected by the engine process
        await _collect(engine_process, "hi", {"max_tokens": 3}, "bad-params")
    assert len((await good)[-1].outputs[0].token_ids) == 8
    engine_process.check_health()
    _assert_no_leak(engine_process)


async def test_disaggregated_hooks_not_supported(engine_process):
    with pytest.raises(ValueError, match="not supported with the engine process yet"):
        engine_process.generate_with_remote_prefill("hi", SamplingParams(), "r", lease_timeout_s=1.0)
    with pytest.raises(ValueError, match="not supported with the engine process yet"):
        await engine_process.prefill("hi", SamplingParams(), "r", plan=None)
    with pytest.raises(ValueError, match="not supported with the engine process yet"):
        engine_process.deliver_kv(None)


async def test_child_death_ends_streams_with_engine_dead_error():
    engine = AsyncLLM.from_config(CONFIG, engine_process=True)
    try:
        params = SamplingParams(temperature=0.0, max_tokens=2000, ignore_eos=True)
        started = asyncio.Event()

        async def consume(request_id):
            async for _ in engine.generate("A long story " * 10, params, request_id):
                started.set()

        tasks = [asyncio.create_task(consume(f"dead-{i}")) for i in range(4)]
        await asyncio.wait_for(started.wait(), 30)
        os.kill(engine.engine_pid, signal.SIGKILL)
        killed = time.monotonic()
        results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 5)
        assert time.monotonic() - killed < 2.0
        assert all(isinstance(r, EngineDeadError) for r in results), results
        with pytest.raises(EngineDeadError):
            engine.check_health()
        assert not engine.is_running
        with pytest.raises(EngineDeadError):
            await _collect(engine, "hi", SamplingParams(max_tokens=2), "after-death")
        await asyncio.wait_for(engine.abort("dead-0"), 1)  # returns at once, no hang
    finally:
        engine.shutdown()


def _children_of(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    cmd = f.read()
            except (OSError, ValueError, IndexError):
                continue
            if ppid == pid and b"spawn_main" in cmd:  # not multiprocessing's resource tracker
                out.append(int(entry))
    return out


def test_shutdown_leaves_no_child_and_keeps_cuda_visible_devices(monkeypatch):
    before = set(_children_of(os.getpid()))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # CPU: hide GPUs; the child must see the same
    engine = AsyncLLM.from_config(CONFIG, engine_process=True)
    pid = engine.engine_pid
    assert pid in _children_of(os.getpid())
    assert engine.engine_cuda_visible_devices == ""
    engine.check_health()
    engine.shutdown()
    assert set(_children_of(os.getpid())) == before
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    with pytest.raises(EngineDeadError):
        engine.check_health()


def test_env_switches_colocated_replicas_only(monkeypatch):
    from router import disagg
    from router.replica import _default_engine_factory, in_process_engine_factory
    monkeypatch.setenv("KVMESH_ENGINE_PROCESS", "1")
    engine = _default_engine_factory(CONFIG)
    try:
        assert isinstance(engine, ProcessAsyncLLM)
    finally:
        engine.shutdown()
    plain = in_process_engine_factory(CONFIG)
    try:
        assert type(plain) is AsyncLLM
    finally:
        plain.shutdown()
    # The prefill and decode pools pass in_process_engine_factory, not the env-reading default.
    for cls in (disagg.PrefillServer, disagg.DecodeServer):
        assert "in_process_engine_factory" in cls.__init__.__code__.co_names
