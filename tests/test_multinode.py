"""Multi-node behaviour on one machine: several raylets with ``ray.cluster_utils.Cluster``.

- A replica's pipeline stages land on different nodes (RayExecutor's PACK placement group,
  with each node holding room for one stage) and generate the same greedy tokens as one
  in-process worker.
- Serve replicas spread across nodes (``max_replicas_per_node=1``); removing a node makes
  Serve start a replacement on the spare node and the prefix-aware router forget the dead
  replica: its entries leave the router state shared in Redis.

Each scenario runs in its own Python process (``python -m tests.test_multinode NAME``):
a Cluster is its own Ray, which must not meet the session's ``ray_cluster`` fixture.
The process prints one ``RESULT {json}`` line; the test asserts on it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCENARIO_TIMEOUT_S = 300


def run_scenario(name: str, *args: str) -> dict:
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", RAY_DEDUP_LOGS="0")
    env.pop("RAY_ADDRESS", None)
    try:
        proc = subprocess.run([sys.executable, "-m", "tests.test_multinode", name, *args], cwd=REPO,
                              env=env, capture_output=True, text=True, timeout=SCENARIO_TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"scenario {name} ran over {SCENARIO_TIMEOUT_S}s:\n{str(exc.stdout)[-4000:]}"
                    f"\n{str(exc.stderr)[-4000:]}")
    results = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and results, \
        f"scenario {name} failed (rc {proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    return json.loads(results[-1][len("RESULT "):])


@pytest.mark.slow
def test_pipeline_stages_on_two_nodes_match_one_worker():
    result = run_scenario("pp_across_nodes")
    assert len(set(result["stage_nodes"])) == 2, result
    assert result["pp_tokens"] == result["single_tokens"]


@pytest.mark.slow
def test_replicas_spread_and_node_loss_is_replaced_and_forgotten(redis_server):
    result = run_scenario("serve_node_loss", redis_server.url)
    before, after = result["replica_nodes_before"], result["replica_nodes_after"]
    assert len(before) == 2 and len(set(before.values())) == 2, "replicas must be on 2 nodes"
    assert result["head_node"] not in before.values()
    dead = result["dead_replica"]
    assert before[dead] == result["removed_node"]
    assert dead not in after and len(after) == 2, "Serve must replace the dead replica"
    assert result["spare_node"] in after.values()
    assert result["dead_in_redis_before"], "the router had state for the replica before"
    assert result["dead_in_redis_after"] == [], "the router must forget the dead replica"
    assert result["requests_after"] == 4 and set(result["served_by_after"]) <= set(after)


# ---- scenarios (subprocesses) ----------------------------------------------------------------
def _blocker_class():
    import ray

    @ray.remote
    class Blocker:  # holds CPU on one node so a placement group must use other nodes
        def ready(self) -> bool:
            return True
    return Blocker


def scenario_pp_across_nodes() -> dict:
    """Three raylets with 1 CPU each, 0.75 of it held: only one 0.2-CPU stage fits per node."""
    import ray
    from ray.cluster_utils import Cluster
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from engine import LLM, SamplingParams

    options = dict(dtype="float32", device="cpu", block_size=16, num_blocks=64, max_model_len=256,
                   max_num_seqs=4, max_num_batched_tokens=64)
    prompts = [[5, 6, 7, 8, 9, 10, 11], list(range(30, 70))]
    greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    single = LLM(model="kvmesh-tiny", **options)
    single_tokens = [o.outputs[0].token_ids for o in single.generate(prompts, greedy)]

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        nodes = [cluster.head_node] + [cluster.add_node(num_cpus=1) for _ in range(2)]
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False)
        blocker_cls = _blocker_class()
        blockers = [blocker_cls.options(num_cpus=0.75, scheduling_strategy=NodeAffinitySchedulingStrategy(
            node.node_id, soft=False)).remote() for node in nodes]
        ray.get([b.ready.remote() for b in blockers])
        llm = LLM(model="kvmesh-tiny", pipeline_parallel_size=2, distributed_backend="gloo", **options)
        table = ray.util.placement_group_table(llm.engine.executor.placement_group)
        stage_nodes = [table["bundles_to_node_id"][i] for i in range(2)]
        pp_tokens = [o.outputs[0].token_ids for o in llm.generate(prompts, greedy)]
        llm.engine.shutdown()
        return {"stage_nodes": stage_nodes, "pp_tokens": pp_tokens, "single_tokens": single_tokens}
    finally:
        ray.shutdown()
        cluster.shutdown()


def scenario_serve_node_loss(redis_url: str) -> dict:
    """Head (no replica slots) + 3 workers with one replica slot each; 2 replicas, 1 per node."""
    import asyncio

    import ray
    import redis
    from ray import serve
    from ray.cluster_utils import Cluster

    from engine.sampling_params import SamplingParams
    from router.messages import GenerateRequest, ReplicaOutput, ReplicaStats
    from router.request_router import request_router_config
    from tests.fixtures_redis import free_port

    namespace = f"mn-{os.getpid()}"
    registry = f"kvmesh-test:{namespace}:replicas"

    class FakeReplica:
        """Answers at once; reports the prompts' blocks as cached (what a real engine would)."""

        def __init__(self, redis_url: str, registry: str) -> None:
            self.replica_id = serve.get_replica_context().replica_id.unique_id
            self.cached: list[int] = []
            redis.Redis.from_url(redis_url).hset(registry, self.replica_id,
                                                 ray.get_runtime_context().get_node_id())

        async def generate(self, req: GenerateRequest):
            self.cached = sorted(set(self.cached) | set(req.block_hashes))
            yield ReplicaOutput(replica_id=self.replica_id, output=None)

        def record_routing_stats(self) -> dict:
            return ReplicaStats(cached_block_hashes=self.cached).to_dict()

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        workers = [cluster.add_node(num_cpus=1, resources={"replica_slot": 1}) for _ in range(3)]
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False)
        serve.start(http_options={"host": "127.0.0.1", "port": free_port()})
        deployment = serve.deployment(
            FakeReplica, name="FakeReplica", num_replicas=2, max_replicas_per_node=1,
            ray_actor_options={"num_cpus": 0.1, "resources": {"replica_slot": 0.5}},
            health_check_period_s=1, graceful_shutdown_timeout_s=1,
            request_router_config=request_router_config(redis_url=redis_url, namespace=namespace,
                                                        stats_period_s=0.2))
        handle = serve.run(deployment.bind(redis_url, registry), name=namespace, route_prefix=None)

        async def send(i: int) -> str:
            hashes = [1000 * i + k for k in range(4)]
            req = GenerateRequest(request_id=f"r{i}", prompt_token_ids=list(range(64)),
                                  sampling_params=SamplingParams(max_tokens=1), block_hashes=hashes)
            async for out in handle.options(stream=True).generate.remote(req):
                return out.replica_id
            raise AssertionError("no output")

        def send_all(first: int, count: int) -> list[str]:
            async def go():
                return [await send(i) for i in range(first, first + count)]
            return asyncio.run(go())

        def mentions(replica_id: str) -> list[str]:
            """Router-state keys in Redis that name the replica (key or hash field or member)."""
            found = []
            for key in client.scan_iter(f"kvmesh:{namespace}:*"):
                kind = client.type(key)
                members = (client.hkeys(key) if kind == "hash" else client.smembers(key) if kind == "set"
                           else client.zrange(key, 0, -1) if kind == "zset" else [])
                if replica_id in key or replica_id in members:
                    found.append(key)
            return found

        def wait_for(what, check, timeout_s=90.0):
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline:
                value = check()
                if value:
                    return value
                time.sleep(0.25)
            raise TimeoutError(f"{what} after {timeout_s}s")

        def running_replicas() -> dict[str, str]:
            """Replica id -> node id, for the deployment's replicas Serve reports RUNNING."""
            status = serve.status().applications[namespace].deployments["FakeReplica"]
            registered = client.hgetall(registry)
            alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
            if status.replica_states.get("RUNNING", 0) != 2:
                return {}
            return {r: n for r, n in registered.items() if n in alive}

        before = wait_for("2 running replicas", lambda: len(running_replicas()) == 2 and running_replicas())
        served = send_all(0, 8)
        assert set(served) <= set(before), (served, before)
        dead = served[0]
        wait_for("the router's Redis state for the replica", lambda: mentions(dead), 30)
        dead_in_redis_before = mentions(dead)
        removed = next(w for w in workers if w.node_id == before[dead])
        spare = next(w for w in workers if w.node_id not in before.values())
        cluster.remove_node(removed, allow_graceful=False)
        after = wait_for("a replacement replica", lambda: (r := running_replicas()) and dead not in r
                         and len(r) == 2 and r, 120)
        served_after = send_all(100, 4)
        wait_for("the router to forget the dead replica", lambda: not mentions(dead), 60)
        return {"head_node": cluster.head_node.node_id, "replica_nodes_before": before,
                "replica_nodes_after": after, "dead_replica": dead, "removed_node": removed.node_id,
                "spare_node": spare.node_id, "dead_in_redis_before": dead_in_redis_before,
                "dead_in_redis_after": mentions(dead), "requests_after": len(served_after),
                "served_by_after": served_after}
    finally:
        try:
            serve.shutdown()
        except Exception:  # noqa: BLE001 - best effort; the cluster goes next
            pass
        ray.shutdown()
        cluster.shutdown()
        for key in client.scan_iter(f"kvmesh*:{namespace}*"):
            client.delete(key)


if __name__ == "__main__":
    scenario = {"pp_across_nodes": scenario_pp_across_nodes,
                "serve_node_loss": scenario_serve_node_loss}[sys.argv[1]]
    start = time.monotonic()
    result = scenario(*sys.argv[2:])
    result["wall_s"] = round(time.monotonic() - start, 1)
    print("RESULT " + json.dumps(result), flush=True)
