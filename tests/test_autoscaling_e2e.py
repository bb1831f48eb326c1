"""Queue-depth autoscaling end to end: real Serve app, real kvmesh-tiny replicas, real HTTP.

The app runs with ``min_replicas: 1, max_replicas: 2`` and short delays. The
engine runs at most 2 sequences at a time, so a burst of concurrent long
requests leaves most of them waiting (queue depth); ``router.autoscaling``'s
policy must add a replica, and once the burst is gone (the client disconnects,
the replica aborts its requests) remove it again. Replica counts are read from
the Serve controller (``serve.status()``).
"""

from __future__ import annotations

import threading
import time
import uuid

import openai
import pytest

pytest.importorskip("ray.serve")

from router.app import REPLICA_NAME  # noqa: E402
from router.config import parse_deployment_config  # noqa: E402

MODEL = "kvmesh-tiny"
ROUTE_PREFIX = "/autoscaling-e2e"
NUM_BURST = 10
MAX_NUM_SEQS = 2


def autoscaling_config(app_name: str):
    return parse_deployment_config({
        "name": app_name,
        "model": MODEL,
        "engine": {"dtype": "float32", "device": "cpu", "max_model_len": 512, "block_size": 16,
                   "num_blocks": 256, "max_num_seqs": MAX_NUM_SEQS},
        "replicas": {"min_replicas": 1, "max_replicas": 2, "initial_replicas": 1, "num_cpus": 0.2},
        # 10 requests, 2 running: 8 waiting > 1 per replica -> up after 1 s; idle 3 s -> down.
        "autoscaling": {"target_waiting_per_replica": 1, "upscale_delay_s": 1, "downscale_delay_s": 3,
                        "metrics_interval_s": 0.5},
        "routing": {"kind": "prefix_aware", "stats_period_s": 0.25},
        "admission": {"max_waiting_per_replica": None},
        "ingress": {"num_cpus": 0.1},
    })


def num_running_replicas(app_name: str) -> int:
    from ray import serve
    from ray.serve._private.common import ReplicaState
    app = serve.status().applications.get(app_name)
    if app is None or REPLICA_NAME not in app.deployments:
        return 0
    return app.deployments[REPLICA_NAME].replica_states.get(ReplicaState.RUNNING, 0)


def wait_for_replicas(app_name: str, predicate, timeout_s: float, history: list) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        n = num_running_replicas(app_name)
        if not history or history[-1][1] != n:
            history.append((round(time.monotonic(), 1), n))
        if predicate(n):
            return True
        time.sleep(0.25)
    return False


@pytest.fixture(scope="module")
def app(ray_cluster, serve_http_port):
    from ray import serve

    from router.app import build_app
    cfg = autoscaling_config(f"kvmesh-autoscale-{uuid.uuid4().hex[:6]}")
    serve.run(build_app(cfg), name=cfg.name, route_prefix=ROUTE_PREFIX)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{serve_http_port}{ROUTE_PREFIX}/v1",
                           api_key="unused", timeout=120, max_retries=0)
    client.completions.create(model=MODEL, prompt="warm up", max_tokens=1)  # tokenizer loaded
    yield cfg.name, client
    serve.delete(cfg.name)


class Burst:
    """``NUM_BURST`` concurrent long streaming requests, read in threads until ``stop()``."""

    def __init__(self, client: openai.OpenAI) -> None:
        self.client = client
        self.stopping = threading.Event()
        self.errors: list[BaseException] = []
        self.num_chunks = 0
        self.threads = [threading.Thread(target=self._one, args=(i,), daemon=True)
                        for i in range(NUM_BURST)]

    def _one(self, i: int) -> None:
        try:
            stream = self.client.completions.create(
                model=MODEL, prompt=f"Story {i}: once upon a time", max_tokens=400, temperature=0,
                stream=True, extra_body={"ignore_eos": True})
            with stream:  # leaving it closes the connection: the replica aborts the request
                for _ in stream:
                    self.num_chunks += 1
                    if self.stopping.is_set():
                        break
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.errors.append(exc)

    def start(self) -> "Burst":
        for thread in self.threads:
            thread.start()
        return self

    def stop(self) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join(timeout=60)


def test_burst_scales_up_to_two_and_idle_scales_back_to_one(app):
    app_name, client = app
    history: list = []
    assert wait_for_replicas(app_name, lambda n: n == 1, 30, history), history

    burst = Burst(client).start()
    try:
        scaled_up = wait_for_replicas(app_name, lambda n: n >= 2, 60, history)
    finally:
        burst.stop()
    assert scaled_up, history
    assert not burst.errors, burst.errors
    assert burst.num_chunks > 0

    # Idle: nothing waits or runs any more, so after downscale_delay_s one replica goes.
    assert wait_for_replicas(app_name, lambda n: n == 1, 45, history), history
    print(f"running replicas over time (monotonic s, count): {history}")

    # The remaining replica still answers.
    response = client.completions.create(model=MODEL, prompt="Still there?", max_tokens=2)
    assert response.usage.completion_tokens >= 1
