"""The decode pool's routing: load-aware, and only onto replicas with free KV blocks for the prompt.

Policy and ledger on plain objects; the Serve request router with fake replicas
(no Ray cluster): reports of ``num_free_blocks`` decide where a long prompt goes.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass, field

import pytest

from router.policy import (DecisionKind, DecodeReplicaView, FreeBlockLedger, ReplicaLoad,
                           RouterPolicyConfig, choose_decode, num_blocks_needed)


def view(replica_id, free=None, inflight=0, queue_depth=0):
    return DecodeReplicaView(replica_id, ReplicaLoad(queue_depth=queue_depth, inflight_requests=inflight), free)


# ---- policy -------------------------------------------------------------------------------------
def test_blocks_needed_counts_the_first_token():
    assert num_blocks_needed(15, 16) == 1
    assert num_blocks_needed(16, 16) == 2  # the 17th slot holds the first sampled token
    assert num_blocks_needed(4096, 16) == 257


def test_least_loaded_replica_without_room_is_passed_over():
    # "a" is idle but has 10 free blocks; a 4k prompt needs 257: "b" (busier, room) wins.
    replicas = [view("a", free=10, inflight=0), view("b", free=2000, inflight=3)]
    decision = choose_decode(num_blocks_needed(4096, 16), replicas, random.Random(0))
    assert decision.kind is DecisionKind.KV_ROOM
    assert decision.ranked_replica_ids == ["b", "a"]  # "a" stays last, for Serve's fallback


def test_short_prompt_goes_to_least_loaded_replica():
    replicas = [view("a", free=10, inflight=0), view("b", free=2000, inflight=3)]
    decision = choose_decode(num_blocks_needed(100, 16), replicas, random.Random(0))
    assert decision.kind is DecisionKind.KV_ROOM and decision.replica_id == "a"


def test_among_replicas_with_room_load_decides_then_free_blocks():
    replicas = [view("a", free=900, inflight=2), view("b", free=400, inflight=1), view("c", free=800, inflight=1)]
    decision = choose_decode(300, replicas, random.Random(0))
    assert decision.ranked_replica_ids == ["c", "b", "a"]


def test_all_short_falls_back_to_least_loaded():
    replicas = [view("a", free=50, inflight=4), view("b", free=20, inflight=1), view("c", free=90, inflight=1)]
    decision = choose_decode(300, replicas, random.Random(0))
    assert decision.kind is DecisionKind.KV_SHORT
    assert decision.ranked_replica_ids == ["c", "b", "a"]  # load first, ties to more free blocks


def test_unreported_replica_counts_as_having_room():
    replicas = [view("a", free=10), view("new", free=None, inflight=1)]
    assert choose_decode(100, replicas, random.Random(0)).replica_id == "new"


def test_saturated_and_empty():
    cfg = RouterPolicyConfig(max_load_per_replica=2)
    decision = choose_decode(1, [view("a", free=100, inflight=3), view("b", free=100, inflight=2)],
                             random.Random(0), cfg)
    assert decision.kind is DecisionKind.SATURATED and decision.replica_id == "b"
    assert choose_decode(1, [], random.Random(0)).kind is DecisionKind.NO_REPLICAS


# ---- free-block ledger --------------------------------------------------------------------------
class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_ledger_subtracts_routed_requests_until_a_report_shows_them():
    clock = Clock()
    ledger = FreeBlockLedger(grace_s=1.0, clock=clock)
    assert ledger.num_free_blocks("a") is None
    ledger.report("a", 500)
    ledger.on_dispatch("a", "r1", 300)
    ledger.on_dispatch("a", "r2", 100)
    assert ledger.num_free_blocks("a") == 100
    ledger.on_complete("a", "r2")
    assert ledger.num_free_blocks("a") == 200
    clock.now += 0.5
    ledger.report("a", 210)  # may predate r1's reservation: r1 stays counted
    assert ledger.num_free_blocks("a") == 0
    clock.now += 2.0
    ledger.report("a", 210)  # r1 routed long before: the report includes it
    assert ledger.num_free_blocks("a") == 210
    ledger.remove("a")
    assert ledger.num_free_blocks("a") is None


# ---- the Serve request router, with fake replicas ------------------------------------------------
@dataclass(frozen=True)
class FakeReplicaID:
    unique_id: str


@dataclass
class FakeReplica:
    name: str
    routing_stats: dict = field(default_factory=dict)

    @property
    def replica_id(self):
        return FakeReplicaID(self.name)

    async def get_queue_len(self, *, deadline_s: float) -> int:  # Serve probes new replicas
        return 0


def test_decode_router_routes_long_prompt_by_reported_free_blocks():
    pytest.importorskip("ray.serve")
    from ray.serve._private.common import DeploymentHandleSource, DeploymentID
    from ray.serve._private.request_router.common import RequestRoutingContext

    from engine.sampling_params import SamplingParams
    from router.messages import GenerateRequest
    from router.request_router import DecodeRequestRouter

    class Pending:  # the parts of Serve's PendingRequest the router reads
        def __init__(self, num_tokens):
            self.args = [GenerateRequest("r", list(range(num_tokens)), SamplingParams(), [])]
            self.kwargs = {}
            self.metadata = type("Metadata", (), {"internal_request_id": f"req-{num_tokens}"})()
            self.future = asyncio.get_running_loop().create_future()
            self.routing_context = RequestRoutingContext()

    async def main():
        router = DecodeRequestRouter(DeploymentID("DecodeServer", "app"), DeploymentHandleSource.UNKNOWN)
        router.initialize_state(block_size=16, stats_period_s=0.5, seed=0)
        a = FakeReplica("a", {"num_waiting": 0, "num_running": 0, "num_free_blocks": 10, "num_blocks": 2048})
        b = FakeReplica("b", {"num_waiting": 0, "num_running": 3, "num_free_blocks": 1500, "num_blocks": 2048})
        router.update_replicas([a, b])
        assert router.ledger.num_free_blocks("a") == 10

        async def route(num_tokens):
            ranked = await router.choose_replicas([a, b], None if num_tokens is None else Pending(num_tokens))
            return [r[0].name for r in ranked]

        assert await route(4096) == ["b", "a"]  # the idle replica lacks the blocks
        # Serve gives the call replica "b": its estimate drops by the prompt's 257 blocks at once.
        routed = Pending(4096)
        await router.choose_replicas([a, b], routed)
        routed.future.set_result(b)
        await asyncio.sleep(0)
        assert router.ledger.num_free_blocks("b") == 1500 - 257
        router.on_request_completed(b.replica_id, "req-4096")
        assert router.ledger.num_free_blocks("b") == 1500
        assert await route(64) == ["a", "b"]  # a short prompt fits: least loaded
        assert await route(None) == ["a", "b"]  # no GenerateRequest (model_info etc.): by load
        # "a" reports more room: now the long prompt fits on the idle replica.
        a.routing_stats = {**a.routing_stats, "num_free_blocks": 600}
        router.update_replicas([a, b])
        assert await route(4096) == ["a", "b"]

    asyncio.run(main())
