"""The prefix-aware request router inside a real Ray Serve app, with a FAKE engine.

Three replicas of a tiny deployment record which requests they served and
report fake ``ReplicaStats`` (queue depth set by the test through a control
actor). The router shares its state through a real redis-server, so the test
can also watch in-flight counts go back to zero.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter

import pytest

pytest.importorskip("ray.serve")

import ray  # noqa: E402
import redis  # noqa: E402
from ray import serve  # noqa: E402
from prometheus_client import REGISTRY  # noqa: E402

from engine.block_hash import block_hash_chain  # noqa: E402
from engine.sampling_params import SamplingParams  # noqa: E402
from router.messages import GenerateRequest, ReplicaStats  # noqa: E402
from router.policy import RouterPolicyConfig  # noqa: E402
from router.request_router import request_router_config  # noqa: E402

BLOCK_SIZE = 16
APP = "router-test"


@ray.remote(num_cpus=0)
class StatsControl:
    """Fake queue depth per replica, read by the replicas' record_routing_stats."""

    def __init__(self):
        self.num_waiting: dict[str, int] = {}

    def set(self, replica_id: str, num_waiting: int) -> None:
        self.num_waiting[replica_id] = num_waiting

    def get(self, replica_id: str) -> int:
        return self.num_waiting.get(replica_id, 0)


@serve.deployment(num_replicas=3, ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=100)
class FakeEngine:
    def __init__(self, control_name: str):
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self.control = ray.get_actor(control_name)
        self.num_running = 0

    async def generate(self, req: GenerateRequest) -> tuple[str, str]:
        self.num_running += 1
        try:
            await asyncio.sleep(float(req.prompt or 0.01))
        finally:
            self.num_running -= 1
        return self.replica_id, req.request_id

    async def generate_stream(self, req: GenerateRequest):
        for i in range(3):
            await asyncio.sleep(float(req.prompt or 0.01))
            yield self.replica_id, i

    async def ping(self) -> str:
        return self.replica_id

    async def record_routing_stats(self) -> dict:
        num_waiting = await self.control.get.remote(self.replica_id)
        return ReplicaStats(num_waiting=num_waiting, num_running=self.num_running).to_dict()


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0.1})
class FanOut:
    """Like the ingress with a batch of prompts: one call in, several handle calls out.

    The calls share this request's ``internal_request_id`` (Serve copies it from
    the request context), which is what the router must not match decisions on.
    """

    def __init__(self, engine):
        self.engine = engine

    async def fan_out(self, num_calls: int, timeout_s: float) -> list[str]:
        calls = [self.engine.generate.remote(make_request(500 + i, i)) for i in range(num_calls)]
        # A call the router never assigns hangs forever; fail with a clear timeout instead.
        results = await asyncio.wait_for(asyncio.gather(*calls), timeout_s)
        return [request_id for _, request_id in results]


def make_request(prefix_id: int, suffix_id: int, sleep_s: float = 0.01) -> GenerateRequest:
    shared = [prefix_id * 1000 + i for i in range(4 * BLOCK_SIZE)]  # 4 shared blocks
    tokens = shared + [suffix_id * 7 + i for i in range(BLOCK_SIZE + 3)]
    return GenerateRequest(request_id=f"p{prefix_id}-{suffix_id}-{uuid.uuid4().hex[:6]}",
                           prompt_token_ids=tokens, sampling_params=SamplingParams(),
                           block_hashes=block_hash_chain(tokens, BLOCK_SIZE), prompt=str(sleep_s))


@pytest.fixture(scope="module")
def app(ray_cluster, serve_http_port, redis_server):
    namespace = uuid.uuid4().hex[:8]
    control_name = f"stats-control-{namespace}"
    control = StatsControl.options(name=control_name).remote()
    policy = RouterPolicyConfig(imbalance_threshold=8.0, load_weight=1.0)
    deployment = FakeEngine.options(request_router_config=request_router_config(
        policy, redis_url=redis_server.url, namespace=namespace, stats_period_s=0.2))
    handle = serve.run(deployment.bind(control_name), name=APP, route_prefix=None)
    yield handle, control, namespace, redis_server
    serve.delete(APP)
    ray.kill(control)


def inflight_keys(redis_url: str, namespace: str) -> dict:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    return {k: client.hgetall(k) for k in client.scan_iter(f"kvmesh:{namespace}:if:*")}


def wait_for_no_inflight(redis_url: str, namespace: str, timeout_s: float = 10.0) -> dict:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        left = {k: v for k, v in inflight_keys(redis_url, namespace).items() if v}
        if not left:
            return left
        time.sleep(0.1)
    return left


def test_prefixes_stick_spread_and_flooded_owner_sheds(app):
    handle, control, namespace, redis_server = app
    num_prefixes, num_rounds = 6, 10
    served: dict[int, list[str]] = {p: [] for p in range(num_prefixes)}
    for round_id in range(num_rounds):
        # One request per prefix per wave: loads stay balanced, the guard stays quiet.
        responses = [handle.generate.remote(make_request(p, round_id)) for p in range(num_prefixes)]
        for p, response in enumerate(responses):
            served[p].append(response.result(timeout_s=30)[0])
        if round_id == 0:
            time.sleep(0.2)  # let the first placements reach Redis-backed state
    owners = {p: replicas[0] for p, replicas in served.items()}
    for p, replicas in served.items():
        share = sum(r == owners[p] for r in replicas) / len(replicas)
        assert share >= 0.9, (p, replicas)
    assert len(set(owners.values())) >= 2, owners  # distinct prefixes spread

    # Flood prefix 0's owner: its prefix traffic must go elsewhere.
    flooded = owners[0]
    ray.get(control.set.remote(flooded, 50))
    deadline = time.time() + 15
    moved = []
    while time.time() < deadline:
        replica_id = handle.generate.remote(make_request(0, 99)).result(timeout_s=30)[0]
        moved.append(replica_id != flooded)
        if len(moved) >= 5 and all(moved[-5:]):
            break
        time.sleep(0.2)
    assert len(moved) >= 5 and all(moved[-5:]), moved
    after = [handle.generate.remote(make_request(0, 100 + i)).result(timeout_s=30)[0]
             for i in range(10)]
    assert sum(r != flooded for r in after) >= 9, after
    ray.get(control.set.remote(flooded, 0))

    assert REGISTRY.get_sample_value("kvmesh_router_decisions_total", {"kind": "affinity"}) > 0
    assert REGISTRY.get_sample_value("kvmesh_router_decisions_total",
                                     {"kind": "load_override"}) > 0
    assert not wait_for_no_inflight(redis_server.url, namespace)


def test_burst_of_one_prefix_spreads_and_inflight_returns_to_zero(app):
    handle, _, namespace, redis_server = app
    responses = [handle.generate.remote(make_request(42, i, sleep_s=0.5)) for i in range(30)]
    counts = Counter(r.result(timeout_s=60)[0] for r in responses)
    assert len(counts) >= 2 and max(counts.values()) < 30, counts
    assert not wait_for_no_inflight(redis_server.url, namespace)


def test_streaming_completion_decrements_inflight(app):
    handle, _, namespace, redis_server = app

    async def consume_all():
        streams = [handle.options(stream=True).generate_stream.remote(make_request(7, i, 0.3))
                   for i in range(4)]
        first = [await stream.__anext__() for stream in streams]
        await asyncio.sleep(0.1)  # the router's flusher writes in-flight counts to Redis
        during = inflight_keys(redis_server.url, namespace)
        rest = [[item async for item in stream] for stream in streams]
        return first, during, rest

    first, during, rest = asyncio.run(consume_all())
    assert all(len(chunks) == 2 for chunks in rest)
    counts = [int(v.split()[0]) for fields in during.values() for v in fields.values()]
    assert sum(counts) == 4, during  # counted in flight while streaming
    assert not wait_for_no_inflight(redis_server.url, namespace)  # released when streams end


def test_calls_without_generate_request_use_load_only(app):
    handle, _, namespace, redis_server = app
    replicas = {handle.ping.remote().result(timeout_s=30) for _ in range(12)}
    assert len(replicas) >= 2
    assert REGISTRY.get_sample_value("kvmesh_router_decisions_total", {"kind": "fallback_p2c"}) > 0


def test_concurrent_calls_of_one_request_all_get_a_replica(app):
    """Calls sharing an internal request id (a batch of prompts) are each routed."""
    _, _, namespace, redis_server = app
    control_name = f"stats-control-{namespace}"
    engine = FakeEngine.options(name="FanOutEngine", num_replicas=2, request_router_config=(
        request_router_config(RouterPolicyConfig(), redis_url=redis_server.url,
                              namespace=f"{namespace}-fanout", stats_period_s=0.2)))
    handle = serve.run(FanOut.bind(engine.bind(control_name)), name=f"{APP}-fanout", route_prefix=None)
    try:
        for num_calls in (2, 2, 5, 8):
            request_ids = handle.fan_out.remote(num_calls, timeout_s=20).result(timeout_s=60)
            assert len(set(request_ids)) == num_calls
    finally:
        serve.delete(f"{APP}-fanout")
