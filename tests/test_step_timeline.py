"""The step timeline: summarize() attributes stalls to what overlapped them; the engine records it.

Synthetic timelines: 6 ms decode steps with one long gap, and an event placed
over (or away from) it. Then the real hooks: an ``AsyncLLM`` on kvmesh-tiny with
``KVMESH_STEP_TIMELINE=1`` records its steps, and two in-process engines joined by
the gloo connectors record the decode side's KV receive and scatter.
"""

from __future__ import annotations

import asyncio
import gc
import json
import time

import pytest

from engine.step_timeline import (STEP_TIMELINE_ENV, GCPause, KVDeliver, KVRecv, LoopLag, StepTimeline,
                                  summarize)

STEP_S = 0.006


def decode_steps(timeline: StepTimeline, n: int, stall_at: int, stall_s: float, t0: float = 100.0) -> tuple[float, float]:
    """``n`` back-to-back decode steps of 6 ms; step ``stall_at`` starts ``stall_s`` late.

    Returns the stalled gap's (start, end): the previous step's end to the stalled step's end."""
    t = t0
    window = (0.0, 0.0)
    for i in range(n):
        if i == stall_at:
            window = (t, t + stall_s + STEP_S)
            t += stall_s
        timeline.record_step(t, t + STEP_S, num_running=4, num_decode_reqs=4, num_prefill_tokens=0,
                             num_outputs=4)
        t += STEP_S
    return window


def test_a_stall_overlapping_a_gc_pause_is_attributed_to_it():
    timeline = StepTimeline()
    start, end = decode_steps(timeline, 50, stall_at=20, stall_s=0.040)
    timeline.record(GCPause(start + 0.002, start + 0.038, generation=2, num_collected=10, thread="kvmesh-engine"))
    timeline.record(GCPause(start - 0.050, start - 0.049, generation=1, num_collected=0, thread="x"))  # elsewhere
    s = summarize(timeline, top=5)
    worst = s["top_gaps"][0]
    assert worst["ms"] == pytest.approx((end - start) * 1000, abs=0.01)
    assert worst["between_ms"] == pytest.approx(40.0, abs=0.01) and worst["step_ms"] == pytest.approx(6.0, abs=0.01)
    assert worst["causes"] == ["gc", "gc_gen2"]
    (gc_event,) = worst["overlaps"]
    assert gc_event["kind"] == "gc" and gc_event["generation"] == 2 and gc_event["ms"] == pytest.approx(36.0, abs=0.01)
    stalls = s["stalls"]["gaps"]
    assert stalls["count"] == 1
    assert stalls["overlap_fraction"]["gc_gen2"] == 1.0 and stalls["overlap_fraction"]["none"] == 0.0
    assert s["gap_ms"]["count"] == 49 and s["gap_ms"]["p50"] == pytest.approx(6.0, abs=0.01)
    assert s["gc"]["gen2"]["count"] == 1 and s["gc"]["gen1"]["count"] == 1
    json.dumps(s)  # plain data


def test_a_stall_overlapping_a_kv_receive_and_its_scatter_is_attributed():
    timeline = StepTimeline()
    start, end = decode_steps(timeline, 50, stall_at=30, stall_s=0.030)
    # The receive started long before the gap (only its bytes phase overlaps); the scatter is inside it.
    timeline.record(KVRecv(start - 0.5, start + 0.010, start - 0.49, "long-1", num_bytes=1 << 30))
    timeline.record(KVDeliver(start + 0.010, start + 0.028, "long-1", num_bytes=1 << 30))
    s = summarize(timeline)
    worst = s["top_gaps"][0]
    assert worst["causes"] == ["kv_deliver", "kv_recv"]  # not kv_alloc: the allocation ended earlier
    recv = next(e for e in worst["overlaps"] if e["kind"] == "kv_recv")
    assert recv["request_id"] == "long-1" and recv["alloc_ms"] == pytest.approx(10.0, abs=0.01)
    assert recv["overlap_ms"] == pytest.approx(10.0, abs=0.01)
    fractions = s["stalls"]["gaps"]["overlap_fraction"]
    assert fractions["kv_recv"] == 1.0 and fractions["kv_deliver"] == 1.0 and fractions["gc"] == 0.0
    assert s["kv_recv"]["count"] == 1 and s["kv_recv"]["num_bytes"] == 1 << 30

    # A receive whose staging allocation (on the event loop) overlaps the gap counts as kv_alloc too.
    timeline2 = StepTimeline()
    start2, _ = decode_steps(timeline2, 10, stall_at=5, stall_s=0.030)
    timeline2.record(KVRecv(start2 + 0.001, start2 + 0.2, start2 + 0.020, "long-2", num_bytes=1))
    assert "kv_alloc" in summarize(timeline2)["top_gaps"][0]["causes"]


def test_no_events_means_no_attribution_and_idle_gaps_are_not_stalls():
    timeline = StepTimeline()
    decode_steps(timeline, 20, stall_at=10, stall_s=0.025)
    # The engine went idle (nothing running after a step), then a new request came 2 s later.
    last = timeline.steps[-1]
    timeline.record_step(last.end_s, last.end_s + STEP_S, 0, 1, 0, 1)
    timeline.record_step(last.end_s + 2.0, last.end_s + 2.0 + STEP_S, 1, 0, 64, 1)
    s = summarize(timeline)
    assert s["stalls"]["gaps"]["count"] == 1  # the 25 ms stall; the 2 s idle gap is not one
    assert s["top_gaps"][0]["causes"] == ["none"] and s["top_gaps"][0]["overlaps"] == []
    assert s["stalls"]["gaps"]["overlap_fraction"]["none"] == 1.0
    assert s["top_steps"][0]["ms"] == pytest.approx(6.0, abs=0.01)
    assert summarize(StepTimeline())["num_steps"] == 0  # empty: still a valid summary


def test_prefill_in_the_stalled_step_and_the_window():
    timeline = StepTimeline()
    t = 10.0
    for i in range(10):
        duration = 0.050 if i == 5 else STEP_S  # one step carries a long prompt chunk
        timeline.record_step(t, t + duration, 2, 2, 2048 if i == 5 else 0, 2)
        t += duration
    s = summarize(timeline, stall_ms=20)
    assert s["stalls"]["steps"]["count"] == 1 and s["top_steps"][0]["causes"] == ["prefill_in_step"]
    assert s["top_steps"][0]["num_prefill_tokens"] == 2048
    assert summarize(timeline, start_s=10.0, end_s=10.0 + 4 * STEP_S + 1e-9)["num_steps"] == 4


def test_gc_pauses_and_loop_lag_are_recorded(monkeypatch):
    monkeypatch.delenv(STEP_TIMELINE_ENV, raising=False)
    assert StepTimeline.from_env() is None
    monkeypatch.setenv(STEP_TIMELINE_ENV, "1")
    timeline = StepTimeline.from_env()
    assert timeline is not None
    try:
        gc.collect()
        pauses = [e for e in timeline.events if isinstance(e, GCPause)]
        assert pauses and pauses[-1].generation == 2 and pauses[-1].end_s >= pauses[-1].start_s

        async def block_the_loop():
            probe = asyncio.get_running_loop().create_task(timeline.watch_loop_lag())
            await asyncio.sleep(0.02)
            time.sleep(0.05)  # the loop is blocked: the probe wakes ~50 ms late
            await asyncio.sleep(0.02)
            probe.cancel()

        asyncio.run(block_the_loop())
        lags = [e for e in timeline.events if isinstance(e, LoopLag)]
        assert lags and max(e.end_s - e.start_s for e in lags) > 0.03
    finally:
        timeline.close()
    n = len(timeline.events)
    gc.collect()
    assert len(timeline.events) == n  # closed: no longer a gc callback


# ---- the engine's hooks -----------------------------------------------------------------------
async def test_async_engine_records_its_steps(monkeypatch):
    from engine import SamplingParams
    from engine.async_engine import AsyncLLM
    from engine.config import EngineConfig

    monkeypatch.setenv(STEP_TIMELINE_ENV, "1")
    engine = AsyncLLM.from_config(EngineConfig.create(model="kvmesh-tiny", block_size=16))
    try:
        params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
        before = time.monotonic()

        async def one(i):
            return [out async for out in engine.generate(f"Once upon a time {i}", params, f"tl-{i}")]

        results = await asyncio.gather(*(one(i) for i in range(3)))
        after = time.monotonic()
        assert all(r[-1].finished for r in results)
        steps = list(engine.timeline.steps)
        assert len(steps) >= 16
        assert all(before <= s.start_s <= s.end_s <= after for s in steps)
        assert all(a.end_s <= b.start_s for a, b in zip(steps, steps[1:]))  # one thread, in order
        assert sum(s.num_prefill_tokens for s in steps) > 0 and max(s.num_decode_reqs for s in steps) == 3
        assert steps[-1].num_running == 0 and sum(s.num_outputs for s in steps) >= 3 * 16
        summary = summarize(engine.timeline, top=5)
        json.dumps(summary)
        assert summary["num_steps"] == len(steps) and len(summary["top_gaps"]) == 5
    finally:
        engine.shutdown()


def test_async_engine_without_the_env_records_nothing(monkeypatch):
    from engine.async_engine import AsyncLLM
    from engine.config import EngineConfig

    monkeypatch.delenv(STEP_TIMELINE_ENV, raising=False)
    engine = AsyncLLM.from_config(EngineConfig.create(model="kvmesh-tiny", block_size=16))
    try:
        assert engine.timeline is None
    finally:
        engine.shutdown()


def test_decode_side_records_kv_receive_and_scatter(monkeypatch):
    """Two in-process engines, gloo connectors (tests/test_kv_transfer.py's setup): the decode
    engine's timeline holds each transfer's receive and its scatter into blocks."""
    from engine import EngineConfig, SamplingParams
    from tests.engine_helpers import gloo_connector_pair

    monkeypatch.setenv(STEP_TIMELINE_ENV, "1")
    config = EngineConfig.create(model="kvmesh-tiny", dtype="float32", device="cpu", block_size=8,
                                 num_blocks=64, max_model_len=256, max_num_batched_tokens=32)
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)

    async def main():
        async with gloo_connector_pair(config) as (prefill, decode):
            stream = decode.generate(list(range(10, 50)), params, "kv-1", lease_timeout_s=30.0)
            plan = await stream.__anext__()
            assert plan is not None
            await prefill.prefill(list(range(10, 50)), params, "kv-1", plan)
            outputs = [out async for out in stream]
            assert outputs[-1].finished
            return prefill.engine, decode.engine

    p_engine, d_engine = asyncio.run(main())
    try:
        events = list(d_engine.timeline.events)
        (recv,) = [e for e in events if isinstance(e, KVRecv)]
        (deliver,) = [e for e in events if isinstance(e, KVDeliver)]
        assert recv.request_id == deliver.request_id == "kv-1" and recv.error is None
        assert recv.num_bytes > 0 and deliver.num_bytes == recv.num_bytes
        assert recv.start_s <= recv.alloc_end_s <= recv.end_s <= deliver.start_s <= deliver.end_s
        summary = summarize(d_engine.timeline)
        assert summary["kv_recv"]["count"] == 1 and summary["kv_deliver"]["count"] == 1
        assert summary["num_steps"] >= 7  # the decode side computed tokens 2..8
    finally:
        p_engine.shutdown()
        d_engine.shutdown()


def test_benchmark_prints_a_summary(capsys):
    from bench.stall_attribution import print_timelines

    timeline = StepTimeline()
    start, _ = decode_steps(timeline, 30, stall_at=10, stall_s=0.030)
    timeline.record(GCPause(start, start + 0.025, 2, 5, "kvmesh-engine"))
    timeline.record(KVRecv(start, start + 0.1, start + 0.002, "r1", num_bytes=1 << 20))
    print_timelines("disaggregated", {"decode:r0": {**summarize(timeline), "replica_id": "r0", "pool": "decode"},
                                      "prefill:r1": {"enabled": False}})
    out = capsys.readouterr().out
    assert "decode:r0: 30 steps" in out and "gc gen2 25.0ms" in out and "kv_recv 100.0ms (alloc 2.0) 1MiB" in out
    assert "prefill:r1: step timeline off" in out
