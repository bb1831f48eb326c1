"""The served app over raw HTTP: error bodies, health, metrics, disconnects, and `kvmesh serve`.

Shares the deployed app of ``test_openai_api.py`` (real engine, real Ray Serve).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
import pytest

from tests.fixtures_redis import free_port
from tests.polling import wait_for
from tests.test_openai_api import API_KEY, MAX_MODEL_LEN, MODEL, deploy_once

REPO = Path(__file__).resolve().parent.parent
AUTH = {"Authorization": f"Bearer {API_KEY}"}
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 4}


@pytest.fixture(scope="module")
def base_url(ray_cluster, serve_http_port) -> str:
    return deploy_once(serve_http_port)


@pytest.fixture(scope="module")
def http(base_url):
    with httpx.Client(base_url=base_url, timeout=120) as client:
        yield client


def assert_openai_error(response: httpx.Response, status: int, param=None, code=None) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    if param is not None:
        assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error
    return error


def replica_stats(http) -> list[dict]:
    return http.get("/kvmesh/status").json()["replicas"]


# ---- bad requests ------------------------------------------------------------------------------
@pytest.mark.parametrize("path, body, status, param, code", [
    ("/v1/chat/completions", b"{not json", 400, None, "invalid_json"),
    ("/v1/chat/completions", b"", 400, None, "invalid_json"),
    ("/v1/chat/completions", {"model": MODEL}, 400, "messages", "missing_field"),
    ("/v1/chat/completions", {"messages": CHAT["messages"]}, 400, "model", "missing_field"),
    ("/v1/chat/completions", {**CHAT, "messages": "hi"}, 400, "messages", "invalid_value"),
    ("/v1/chat/completions", {**CHAT, "messages": []}, 400, "messages", "invalid_value"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "wizard", "content": "x"}]}, 400,
     "messages.0.role", "invalid_value"),
    ("/v1/chat/completions", {**CHAT, "max_tokens": "5"}, 400, "max_tokens", "invalid_value"),
    ("/v1/chat/completions", {**CHAT, "max_tokens": -3}, 400, "max_tokens", "invalid_value"),
    ("/v1/chat/completions", {**CHAT, "temperature": "hot"}, 400, "temperature", "invalid_value"),
    ("/v1/chat/completions", {**CHAT, "stream": "yes"}, 400, "stream", "invalid_value"),
    ("/v1/chat/completions", {**CHAT, "top_k": -5}, 400, "top_k", "invalid_value"),
    ("/v1/completions", {"model": MODEL}, 400, "prompt", "missing_field"),
    ("/v1/completions", {"model": MODEL, "prompt": ""}, 400, "prompt", None),
    ("/v1/completions", {"model": MODEL, "prompt": []}, 400, "prompt", None),
    ("/v1/completions", {"model": MODEL, "prompt": 42}, 400, "prompt", "invalid_value"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "logprobs": 50}, 400, "logprobs", "invalid_value"),
    ("/v1/completions", {"model": MODEL, "prompt": "word " * (2 * MAX_MODEL_LEN)}, 400, "prompt",
     "context_length_exceeded"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": MAX_MODEL_LEN}, 400,
     "max_tokens", "context_length_exceeded"),
    ("/v1/completions", {"model": "nope", "prompt": "hi"}, 404, "model", "model_not_found"),
    ("/v1/nowhere", {"model": MODEL}, 404, None, None),
])
def test_bad_requests_get_openai_errors(http, path, body, status, param, code):
    if isinstance(body, bytes):
        response = http.post(path, content=body, headers={**AUTH, "Content-Type": "application/json"})
    else:
        response = http.post(path, json=body, headers=AUTH)
    assert_openai_error(response, status, param, code)


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"},
                                     {"Authorization": API_KEY}, {"Authorization": f"Basic {API_KEY}"}])
def test_missing_or_bad_key_is_401(http, headers):
    for path in ("/v1/chat/completions", "/v1/completions"):
        error = assert_openai_error(http.post(path, json=CHAT, headers=headers), 401, code="invalid_api_key")
        assert error["type"] == "authentication_error"
    assert http.get("/v1/models", headers=headers).status_code == 401


def test_server_keeps_serving_after_bad_requests(http):
    for _ in range(3):
        http.post("/v1/chat/completions", content=b"{{{", headers=AUTH)
        http.post("/v1/chat/completions", json={**CHAT, "max_tokens": -1}, headers=AUTH)
    response = http.post("/v1/chat/completions", json=CHAT, headers=AUTH)
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] >= 1


def test_stream_bad_request_is_an_http_error_not_a_stream(http):
    response = http.post("/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 0,
                                                  "stream": True}, headers=AUTH)
    assert_openai_error(response, 400, "max_tokens")


def test_raw_sse_format(http):
    with http.stream("POST", "/v1/completions", headers=AUTH,
                     json={"model": MODEL, "prompt": "Hello", "max_tokens": 5, "stream": True}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in events)
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(line[len("data: "):]) for line in events[:-1]]
    assert all(c["object"] == "text_completion" for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")


# ---- health, status, metrics ---------------------------------------------------------------------
def test_health_and_status(http):
    health = http.get("/health")
    assert health.status_code == 200 and health.json()["num_healthy_replicas"] >= 1
    (replica,) = replica_stats(http)
    assert replica["is_healthy"] and replica["num_blocks"] == 256


def test_metrics_expose_kvmesh_series(http):
    assert http.post("/v1/chat/completions", json=CHAT, headers=AUTH).status_code == 200
    http.post("/v1/chat/completions", json={**CHAT, "model": "nope"}, headers=AUTH)
    text = http.get("/metrics").text
    for name in ("kvmesh_num_requests_running{replica=", "kvmesh_num_requests_waiting{replica=",
                 "kvmesh_kv_cache_usage_ratio{replica=", "kvmesh_prefix_cache_hit_rate{replica=",
                 "kvmesh_num_replicas 1.0",
                 'kvmesh_time_to_first_token_seconds_count{endpoint="chat"}',
                 'kvmesh_inter_token_latency_seconds_bucket{endpoint="chat"',
                 'kvmesh_e2e_request_latency_seconds_count{endpoint="chat"}',
                 'kvmesh_prompt_tokens_total{endpoint="chat"}',
                 'kvmesh_generation_tokens_total{endpoint="chat"}',
                 'kvmesh_requests_finished_total{endpoint="chat",finish_reason=',
                 'kvmesh_http_requests_total{method="POST",path="/v1/chat/completions",status="200"}',
                 'kvmesh_http_requests_total{method="POST",path="/v1/chat/completions",status="404"}',
                 "kvmesh_router_decisions_total"):
        assert name in text, name


def test_prefix_cache_hits_show_in_status(http):
    shared = "You are a helpful assistant. " * 12  # several full blocks, identical each time
    for i in range(2):
        r = http.post("/v1/completions", headers=AUTH,
                      json={"model": MODEL, "prompt": shared + f"Question {i}?", "max_tokens": 2})
        assert r.status_code == 200
    time.sleep(0.6)
    (replica,) = replica_stats(http)
    assert replica["prefix_cache_hit_rate"] > 0


# ---- client disconnect frees KV blocks ---------------------------------------------------------
def test_client_disconnect_mid_stream_frees_kv_blocks(http, base_url):
    body = {"model": MODEL, "prompt": "Tell me a very long story about a dragon.", "stream": True,
            "max_tokens": MAX_MODEL_LEN - 64, "ignore_eos": True, "temperature": 0}
    with httpx.Client(base_url=base_url, timeout=60) as client:
        with client.stream("POST", "/v1/completions", json=body, headers=AUTH) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            received = [line for _, line in zip(range(6), lines) if line]
            assert received and received[0].startswith("data: ")
            # While streaming, the replica holds the request and its blocks.
            busy = wait_for(lambda: [s for s in replica_stats(http) if s["num_running"] == 1
                                     and s["num_free_blocks"] < s["num_blocks"]], timeout_s=10)
            assert busy, replica_stats(http)
        # Leaving the `with` closes the connection mid-stream.
    freed = wait_for(lambda: all(s["num_running"] == 0 and s["num_waiting"] == 0 and s["kv_usage"] == 0
                                 and s["num_free_blocks"] == s["num_blocks"] for s in replica_stats(http)),
                     timeout_s=20)
    assert freed, replica_stats(http)
    # generation stopped long before max_tokens: the engine's totals stop growing
    total = replica_stats(http)[0]["num_generation_tokens"]
    time.sleep(1.0)
    assert replica_stats(http)[0]["num_generation_tokens"] == total


def test_kvmesh_status_command(base_url):
    out = subprocess.run([sys.executable, "-m", "cluster.cli", "status", "--address", base_url],
                         cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "kvmesh-test" in out.stdout and "prefix_hit" in out.stdout
    as_json = subprocess.run([sys.executable, "-m", "cluster.cli", "status", "--address", base_url, "--json"],
                             cwd=REPO, capture_output=True, text=True, timeout=60)
    assert json.loads(as_json.stdout)["replicas"][0]["is_healthy"] is True


# ---- kvmesh serve as a process -------------------------------------------------------------------
def test_kvmesh_serve_subprocess_answers_and_exits_on_sigint(tmp_path):
    """`kvmesh serve` answers, then a double SIGINT shuts it down cleanly (exit 0)."""
    port = free_port()
    config = tmp_path / "serve.yaml"
    config.write_text(textwrap.dedent(f"""\
        name: kvmesh-cli
        model: kvmesh-tiny
        engine: {{dtype: float32, device: cpu, max_model_len: 256, num_blocks: 64}}
        replicas: {{min_replicas: 1, max_replicas: 1, num_cpus: 0.2}}
        routing: {{kind: prefix_aware}}
        ingress: {{num_cpus: 0.1}}
        http: {{host: 127.0.0.1, port: {port}}}
        """))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1")
    log = (tmp_path / "serve.log").open("w")
    direct_port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "cluster.cli", "serve", str(config),
                             "--direct-port", str(direct_port)], cwd=REPO,
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url, direct_url = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{direct_port}"
    try:
        def answer(base=url):
            try:
                r = httpx.post(f"{base}/v1/completions", timeout=60,
                               json={"model": MODEL, "prompt": "Hi", "max_tokens": 3})
                return r if r.status_code == 200 else None
            except httpx.HTTPError:
                return None
        response = wait_for(answer, timeout_s=180, interval_s=1.0)
        assert response is not None, (tmp_path / "serve.log").read_text()[-3000:]
        assert response.json()["usage"]["completion_tokens"] >= 1
        assert f"serving 'kvmesh-tiny' at {url}/v1" in (tmp_path / "serve.log").read_text()
        # --direct-port: the ingress answers on it too, and the log says where
        direct = wait_for(lambda: answer(direct_url), timeout_s=30, interval_s=0.5)
        assert direct is not None and direct.json()["usage"]["completion_tokens"] >= 1
        assert f"also serve it at {direct_url}/v1" in (tmp_path / "serve.log").read_text()
        # Twice, back to back: what Ctrl-C pressed twice or `timeout` forwarding its own SIGINT does
        # (the old handler's Event.set could deadlock when the second landed inside the first).
        proc.send_signal(signal.SIGINT)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=90) == 0, (tmp_path / "serve.log").read_text()[-3000:]
        assert "shutting down" in (tmp_path / "serve.log").read_text()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # our own process group only
            proc.wait()
        log.close()


# ---- admission and error mapping (unit level: the ingress with stand-in handles) ----------------
class _Call:
    def __init__(self, value):
        self.value = value

    def remote(self):
        async def result():
            return self.value
        return result()


class _Board:
    def __init__(self, snapshot):
        self.snapshot = _Call(snapshot)


async def _ingress(snapshot, **admission):
    from router.config import parse_deployment_config
    from router.ingress import OpenAIIngress
    cfg = parse_deployment_config({"admission": admission} if admission else {})
    ingress = OpenAIIngress.__new__(OpenAIIngress)
    ingress.cfg = cfg
    ingress.board = _Board(snapshot)
    ingress._stats, ingress._stats_time, ingress._stats_lock = {}, 0.0, None
    return ingress


def _replica(num_waiting=0, is_healthy=True):
    return {"is_healthy": is_healthy, "num_waiting": num_waiting}


@pytest.mark.parametrize("snapshot, status", [
    ({}, 503),
    ({"a": _replica(is_healthy=False)}, 503),
    ({"a": _replica(num_waiting=40), "b": _replica(num_waiting=30)}, 429),
    ({"a": _replica(num_waiting=40), "b": _replica(num_waiting=0)}, None),
    ({"a": _replica(num_waiting=40), "b": _replica(num_waiting=0, is_healthy=False)}, 429),
])
async def test_admission_sheds_load_and_needs_a_healthy_replica(snapshot, status):
    from router.protocol import APIError
    ingress = await _ingress(snapshot, max_waiting_per_replica=32)
    if status is None:
        await ingress._admit()
        return
    with pytest.raises(APIError) as info:
        await ingress._admit()
    assert info.value.status_code == status


async def test_admission_can_be_disabled():
    ingress = await _ingress({"a": _replica(num_waiting=10_000)}, max_waiting_per_replica=None)
    await ingress._admit()


def test_replica_errors_map_to_http_status():
    from ray.exceptions import RayActorError
    from ray.serve.exceptions import BackPressureError

    from router.replica_calls import api_error_from
    assert api_error_from(ValueError("prompt is empty")).status_code == 400
    assert api_error_from(BackPressureError(num_queued_requests=5, max_queued_requests=5)).status_code == 429
    assert api_error_from(RayActorError()).status_code == 503
    dead = type("EngineDeadError", (RuntimeError,), {})("engine loop died")
    assert api_error_from(dead).status_code == 503
    assert api_error_from(RuntimeError("boom")).status_code == 500
