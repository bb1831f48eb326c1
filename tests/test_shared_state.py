"""Routing state: local semantics, and two RedisRouterState instances against a real redis-server."""

from __future__ import annotations

import asyncio
import logging
import random
import time
import uuid

from prometheus_client import REGISTRY

from router.messages import ReplicaStats
from router.policy import choose
from router.redis_state import RedisRouterState
from router.shared_state import LocalRouterState

REPLICAS = ["r0", "r1", "r2"]
CHAIN_A = [11, 12, 13, 14]
CHAIN_B = [21, 22, 23]


def gauge(state: RedisRouterState) -> float:
    return REGISTRY.get_sample_value("kvmesh_router_redis_available",
                                     {"namespace": state.namespace, "router_id": state.router_id})


async def test_local_state_counts_dispatch_and_completion():
    state = LocalRouterState()
    state.on_dispatch("r0", 100)
    state.on_dispatch("r0", 50)
    state.insert_blocks("r0", CHAIN_A)
    views = {v.replica_id: v for v in await state.views(CHAIN_A, REPLICAS)}
    assert views["r0"].load.inflight_requests == 2 and views["r0"].load.inflight_tokens == 150
    assert views["r0"].matched_blocks == 4 and views["r1"].matched_blocks == 0
    state.on_complete("r0", 100)
    state.on_complete("r0", 50)
    state.on_complete("r0", 50)  # never negative
    assert state.load_of("r0").inflight_requests == 0 and state.load_of("r0").inflight_tokens == 0


async def test_local_burst_does_not_land_on_one_replica():
    state = LocalRouterState()
    rng = random.Random(0)
    counts = {r: 0 for r in REPLICAS}
    for _ in range(30):  # same prefix, no completion in between
        decision = choose(CHAIN_A, await state.views(CHAIN_A, REPLICAS), rng)
        state.on_dispatch(decision.replica_id, 64)
        state.insert_blocks(decision.replica_id, CHAIN_A)
        counts[decision.replica_id] += 1
    assert max(counts.values()) < 30


async def test_replica_report_corrects_blocks_but_keeps_recent_inserts():
    clock = [1000.0]
    state = LocalRouterState(optimistic_grace_s=10.0, clock=lambda: clock[0])
    state.insert_blocks("r0", CHAIN_A)
    clock[0] += 60.0
    state.insert_blocks("r0", CHAIN_B)  # routed just now: the report cannot show it yet
    state.update_replica_stats("r0", ReplicaStats(num_waiting=3, num_running=2,
                                                  cached_block_hashes=[11, 12]))
    views = {v.replica_id: v for v in await state.views(CHAIN_A, ["r0"])}
    assert views["r0"].matched_blocks == 2  # 13, 14 were evicted by the engine
    assert views["r0"].load.queue_depth == 3 and views["r0"].load.running == 2
    assert state.index.match(CHAIN_B) == {"r0": 3}
    state.remove_replica("r0")
    assert state.index.match(CHAIN_A) == {} and "r0" not in state.loads


def pair(url: str, **kwargs) -> tuple[RedisRouterState, RedisRouterState]:
    namespace = uuid.uuid4().hex[:8]
    return (RedisRouterState(url, namespace, router_id="A", **kwargs),
            RedisRouterState(url, namespace, router_id="B", **kwargs))


async def test_two_routers_share_index_loads_and_decide_alike(redis_server):
    a, b = pair(redis_server.url)
    try:
        a.insert_blocks("r1", CHAIN_A)
        a.on_dispatch("r1", 100)
        a.on_dispatch("r1", 100)
        b.on_dispatch("r2", 40)
        a.update_replica_stats("r0", ReplicaStats(num_waiting=4, num_running=1))
        await a.flush()
        await b.flush()
        views_a = await a.views(CHAIN_A + [99], REPLICAS)
        views_b = await b.views(CHAIN_A + [99], REPLICAS)
        assert views_a == views_b
        by_id = {v.replica_id: v for v in views_b}
        assert by_id["r1"].matched_blocks == 4 and by_id["r1"].num_cached_blocks == 4
        assert by_id["r1"].load.inflight_requests == 2 and by_id["r1"].load.inflight_tokens == 200
        assert by_id["r2"].load.inflight_requests == 1
        assert by_id["r0"].load.queue_depth == 4 and by_id["r0"].load.running == 1
        decision_a = choose(CHAIN_A, views_a, random.Random(7))
        decision_b = choose(CHAIN_A, views_b, random.Random(7))
        assert decision_a == decision_b and decision_a.replica_id == "r1"
        # Completion and removal propagate too.
        a.on_complete("r1", 100)
        a.remove_replica("r1")
        await a.flush()
        by_id = {v.replica_id: v for v in await b.views(CHAIN_A, REPLICAS)}
        assert by_id["r1"].matched_blocks == 0 and by_id["r1"].load.inflight_requests == 0
    finally:
        await a.close()
        await b.close()


async def test_replica_report_correction_is_shared(redis_server):
    a, b = pair(redis_server.url)
    try:
        a.insert_blocks("r0", CHAIN_A)
        await a.flush()
        a.mirror.optimistic_grace_s = 0.0
        a.update_replica_stats("r0", ReplicaStats(cached_block_hashes=[11, 12]))
        await a.flush()
        by_id = {v.replica_id: v for v in await b.views(CHAIN_A, ["r0"])}
        assert by_id["r0"].matched_blocks == 2 and by_id["r0"].num_cached_blocks == 2
        # A later report pushes only the difference.
        a.update_replica_stats("r0", ReplicaStats(cached_block_hashes=[11, 12, 13]))
        await a.flush()
        by_id = {v.replica_id: v for v in await b.views(CHAIN_A, ["r0"])}
        assert by_id["r0"].matched_blocks == 3 and by_id["r0"].num_cached_blocks == 3
    finally:
        await a.close()
        await b.close()


async def test_redis_outage_serves_from_mirror_and_recovers(fresh_redis_server, caplog):
    a, b = pair(fresh_redis_server.url, max_probe_backoff_s=0.2)
    try:
        a.insert_blocks("r1", CHAIN_A)
        await a.flush()
        await b.views(CHAIN_A, REPLICAS)
        assert a.redis_available and gauge(a) == 1.0

        fresh_redis_server.stop()
        caplog.set_level(logging.WARNING, logger="router.redis_state")
        a.insert_blocks("r2", CHAIN_B)  # while down: mirror only, re-synced later
        for _ in range(5):
            start = time.perf_counter()
            views = await a.views(CHAIN_A, REPLICAS)  # never raises
            assert time.perf_counter() - start < 0.5
        assert not a.redis_available and gauge(a) == 0.0
        assert {v.replica_id: v.matched_blocks for v in views}["r1"] == 4  # from the mirror
        decision = choose(CHAIN_A, views, random.Random(0))
        assert decision.replica_id == "r1"
        warnings = [r for r in caplog.records if "unreachable" in r.getMessage()]
        assert len(warnings) == 1  # one line, not one per request

        fresh_redis_server.start()  # empty: the mirror must be pushed back
        deadline = time.time() + 10
        while not a.redis_available and time.time() < deadline:
            await asyncio.sleep(0.05)
        assert a.redis_available and gauge(a) == 1.0
        for _ in range(100):  # b notices the outage, then recovers too
            views_b = {v.replica_id: v for v in await b.views(CHAIN_B, REPLICAS)}
            if b.redis_available and views_b["r2"].matched_blocks == 3:
                break
            await asyncio.sleep(0.05)
        assert views_b["r2"].matched_blocks == 3  # inserted during the outage, re-synced by a
        assert {v.replica_id: v.matched_blocks for v in await b.views(CHAIN_A, REPLICAS)}["r1"] == 4
    finally:
        await a.close()
        await b.close()
