"""Disaggregated serving end to end on CPU: Ray Serve, gloo KV transport, kvmesh-tiny.

One app: 1 prefill replica and 2 decode replicas (mode ``disaggregated``, lease
and transfer timeouts of a few seconds). Checked:

* output equals the colocated engine's, token for token (greedy), streaming or not;
* a shared prefix is found in the prefill replica's prefix cache;
* faults: the prefill actor killed mid-transfer, a transfer stalled past its
  timeout, the decode actor killed mid-stream (deltas as Serve stream items, and
  over the stream channel): every request ends with the right tokens (recompute,
  retry) and no KV block stays referenced anywhere.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
import time

import httpx
import openai
import pytest

from engine import LLM, SamplingParams
from router.config import parse_deployment_config

APP = "kvmesh-disagg"
PREFIX = "/disagg"
MODEL = "kvmesh-tiny"
ENGINE = {"dtype": "float32", "device": "cpu", "max_model_len": 512, "block_size": 16, "num_blocks": 128,
          "max_num_seqs": 8, "max_num_batched_tokens": 64}
TIMEOUT_S = 3.0

_DEPLOYED: dict = {}


def disagg_config():
    pool = {"replicas": {"min_replicas": 1, "max_replicas": 1, "num_cpus": 0.1}}
    return parse_deployment_config({
        "name": APP, "model": MODEL, "engine": ENGINE,
        "disaggregation": {"mode": "disaggregated", "transport": "gloo", "lease_timeout_s": TIMEOUT_S,
                           "transfer_timeout_s": TIMEOUT_S, "on_transfer_failure": "recompute",
                           "max_decode_retries": 1,
                           "prefill": pool,
                           "decode": {"replicas": {"min_replicas": 2, "max_replicas": 2, "num_cpus": 0.1}}},
        "routing": {"kind": "prefix_aware", "stats_period_s": 0.25},
        "ingress": {"num_cpus": 0.05},
    })


@pytest.fixture(scope="module")
def base_url(ray_cluster, serve_http_port) -> str:
    if "url" not in _DEPLOYED:
        from ray import serve

        from router.app import build_app
        cfg = disagg_config()
        start = time.monotonic()
        serve.run(build_app(cfg), name=APP, route_prefix=PREFIX)
        url = f"http://127.0.0.1:{serve_http_port}{PREFIX}"
        wait_healthy(url, num_replicas=3)
        r = httpx.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": "warm up", "max_tokens": 2},
                       timeout=120)
        assert r.status_code == 200, r.text
        print(f"deployed disaggregated app in {time.monotonic() - start:.1f}s")
        _DEPLOYED["url"] = url
    return _DEPLOYED["url"]


@pytest.fixture(scope="module")
def client(base_url) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="none", timeout=120, max_retries=0)


@pytest.fixture(scope="module")
def colocated():
    return LLM(model=MODEL, **ENGINE)


def status(url: str) -> list[dict]:
    return httpx.get(f"{url}/kvmesh/status", timeout=30).json()["replicas"]


def wait_healthy(url: str, num_replicas: int, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            replicas = status(url)
            if sum(1 for r in replicas if r.get("is_healthy")) >= num_replicas:
                return
        except Exception:
            pass
        time.sleep(0.5)
    raise AssertionError(f"fewer than {num_replicas} healthy replicas after {timeout_s}s")


def assert_no_leaks(url: str, timeout_s: float = 20) -> None:
    """Every replica idle with all blocks free (cached-and-free counts as free)."""
    deadline = time.monotonic() + timeout_s
    while True:
        replicas = status(url)
        busy = [r for r in replicas if r["num_running"] or r["num_waiting"] or r.get("num_waiting_for_kv")
                or r["num_free_blocks"] != r["num_blocks"]]
        if not busy:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"replicas still hold blocks or requests: {busy}")
        time.sleep(0.3)


def random_prompt(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(10, 500) for _ in range(n)]


def expected(colocated, prompt: list[int], max_tokens: int) -> str:
    return colocated.generate([prompt], SamplingParams(temperature=0.0, max_tokens=max_tokens))[0].outputs[0].text


# ---- equality and prefix cache ------------------------------------------------------------------
@pytest.mark.parametrize("length", [5, 40, 150])
def test_disaggregated_equals_colocated(client, base_url, colocated, length):
    prompt = random_prompt(length, seed=length)
    want = expected(colocated, prompt, 24)
    out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0)
    assert out.choices[0].text == want
    chunks = client.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want
    assert_no_leaks(base_url)


def test_chat_and_max_tokens_one(client, base_url):
    messages = [{"role": "user", "content": "Name three colors."}]
    a = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0)
    b = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=1, temperature=0)
    assert a.choices[0].message.content.startswith(b.choices[0].message.content)
    assert b.choices[0].finish_reason == "length" and b.usage.completion_tokens == 1
    assert_no_leaks(base_url)


def test_prefill_side_prefix_cache_is_used(client, base_url, colocated):
    shared = random_prompt(96, seed=77)
    before = {r["replica_id"]: r for r in status(base_url) if r["pool"] == "prefill"}
    for tail in ([1, 2, 3], [4, 5, 6, 7]):
        out = client.completions.create(model=MODEL, prompt=shared + tail, max_tokens=8, temperature=0)
        assert out.choices[0].text == expected(colocated, shared + tail, 8)
    deadline = time.monotonic() + 10  # replicas report every stats_period_s
    while True:
        after = [r for r in status(base_url) if r["pool"] == "prefill"]
        hits = sum(r["prefix_cache_hits"] - before.get(r["replica_id"], {}).get("prefix_cache_hits", 0)
                   for r in after)
        if hits >= 96 or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert hits >= 96  # the second prompt's 6 shared blocks came from the prefill replica's cache
    assert_no_leaks(base_url)


def test_metrics_show_transfers_and_pools(client, base_url):
    client.completions.create(model=MODEL, prompt=random_prompt(60, 5), max_tokens=4, temperature=0)
    text = httpx.get(f"{base_url}/metrics", timeout=30).text
    assert 'kvmesh_pool_num_requests_waiting{pool="prefill"}' in text
    assert 'kvmesh_pool_num_replicas{pool="decode"} 2.0' in text
    assert 'kvmesh_ttft_phase_seconds_count{phase="prefill"}' in text
    assert 'kvmesh_disagg_requests_total{path="remote"}' in text
    transferred = [line for line in text.splitlines() if line.startswith("kvmesh_kv_transfer_bytes_total")]
    assert transferred and float(transferred[0].split()[-1]) > 0


# ---- faults -------------------------------------------------------------------------------------
def handles():
    from ray import serve
    from router.app import DECODE_NAME, PREFILL_NAME
    return serve.get_deployment_handle(PREFILL_NAME, APP), serve.get_deployment_handle(DECODE_NAME, APP)


def kill_replica(deployment: str, replica_id: str | None = None) -> None:
    import ray
    for actor in ray.util.list_named_actors(all_namespaces=True):
        name = actor["name"]
        if name.startswith("SERVE_REPLICA::") and f"#{deployment}#" in name and (
                replica_id is None or name.endswith(replica_id)):
            ray.kill(ray.get_actor(name, namespace=actor["namespace"]), no_restart=False)
            return
    raise AssertionError(f"no replica of {deployment} {replica_id or ''}")


def run_flow(prompt: list[int], max_tokens: int, on_output=None,
             channel: bool = False, overlap: bool = False) -> tuple[list[int], str, object]:
    """One request through DisaggregatedFlow from this process; returns (token ids, finish reason, stream).

    ``channel``: the decode deltas come over a stream channel into a receiver in this process
    (router/stream_channel.py), as they do into the ingress; else as Serve stream items.
    """
    from engine.sampling_params import SamplingParams as SP
    from router.disagg import DisaggregatedFlow
    from router.messages import GenerateRequest
    from router.stream_channel import StreamReceiver

    prefill, decode = handles()
    cfg = disagg_config().disaggregation
    flow = DisaggregatedFlow(dataclasses.replace(cfg, overlap_prefill=overlap), prefill, decode)
    req = GenerateRequest(request_id=f"fault-{random.randrange(1 << 30)}", prompt_token_ids=prompt,
                          sampling_params=SP(temperature=0.0, max_tokens=max_tokens, ignore_eos=True),
                          block_hashes=[])

    async def main():
        # The flow streams OutputDeltas with nothing repeated: their concatenation is the output.
        receiver = StreamReceiver() if channel else None
        if receiver is not None:
            await receiver.start()
        stream = flow.start(req, receiver)
        ids, reason = [], None
        async for delta in stream:
            for choice in delta.choices:
                ids += choice.token_ids
                reason = choice.finish_reason or reason
            if on_output is not None:
                await on_output(stream, ids)
        if receiver is not None:
            assert receiver.num_items > 0 and receiver.num_subscriptions == 0
            await receiver.close()
        return ids, reason, stream

    return asyncio.run(main())


@pytest.mark.parametrize("max_tokens", [12, 1])
def test_overlapped_prefill_equals_colocated(base_url, colocated, max_tokens):
    """overlap_prefill: the reservation runs alongside the prefill and the plan follows to the
    prefill replica's mailbox; same tokens, nothing parked or leaked (max_tokens 1: the first
    token ends the request and the reservation is cancelled)."""
    prompt = random_prompt(70, seed=77 + max_tokens)
    ids, reason, stream = run_flow(prompt, max_tokens, overlap=True)
    assert ids == greedy_ids(colocated, prompt, max_tokens) and reason == "length"
    if max_tokens > 1:  # the KV came over the pair (a lost plan would give the same tokens,
        assert stream.plan is not None  # computed again on the decode side after the lease)
        assert stream.kv_transfer is not None and stream.kv_transfer[0] > 0
    deadline = time.time() + 20
    while (parked := sum(r.get("kv_parked", 0) for r in status(base_url))) and time.time() < deadline:
        time.sleep(0.2)
    assert parked == 0 or max_tokens == 1  # max_tokens 1: its KV was never asked for
    assert_no_leaks(base_url)


def greedy_ids(colocated, prompt, max_tokens):
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    return colocated.generate([prompt], params)[0].outputs[0].token_ids


def test_transfer_stalled_past_its_timeout_recomputes(base_url, colocated):
    prefill, _ = handles()
    prefill.inject_transfer_stall.remote(2 * TIMEOUT_S).result()
    try:
        prompt = random_prompt(70, seed=1)
        start = time.monotonic()
        ids, reason, _ = run_flow(prompt, 16)
        assert ids == greedy_ids(colocated, prompt, 16) and reason == "length"
        assert time.monotonic() - start >= TIMEOUT_S - 0.5  # it waited for the transfer, then recomputed
    finally:
        prefill.inject_transfer_stall.remote(0.0).result()
    assert_no_leaks(base_url)
    decode_stats = [r for r in status(base_url) if r["pool"] == "decode"]
    assert sum(r["kv_recomputes"] for r in decode_stats) >= 1


def test_prefill_killed_mid_transfer(base_url, colocated):
    prefill, _ = handles()
    prefill.inject_transfer_stall.remote(30.0).result()  # header posted, bytes held back
    prompt = random_prompt(90, seed=2)
    killed = []

    async def on_output(stream, ids):
        if not killed and len(ids) == 1:  # prefill answered; transfer in flight
            await asyncio.sleep(0.3)
            kill_replica("PrefillServer")
            killed.append(True)

    ids, reason, _ = run_flow(prompt, 16, on_output)
    assert killed and ids == greedy_ids(colocated, prompt, 16) and reason == "length"
    wait_healthy(base_url, num_replicas=3)  # Serve replaces the prefill replica (no stall there)
    assert_no_leaks(base_url, timeout_s=60)


@pytest.mark.parametrize("channel", [False, True], ids=["serve_stream", "stream_channel"])
def test_decode_killed_mid_stream_retries_on_another(base_url, colocated, channel):
    prompt = random_prompt(30, seed=3)
    for _ in range(3):  # the kill is asynchronous: if the stream finished first, try again
        killed: list[str] = []

        async def on_output(stream, ids):
            if not killed and len(ids) >= 5:
                killed.append(stream.decode_replica_id)
                kill_replica("DecodeServer", stream.decode_replica_id)

        ids, reason, stream = run_flow(prompt, 400, on_output, channel=channel)
        assert killed and ids == greedy_ids(colocated, prompt, 400) and reason == "length"
        wait_healthy(base_url, num_replicas=3)
        if stream.num_retries:
            break
    assert stream.num_retries == 1 and stream.decode_replica_id != killed[0]  # finished on another one
    assert_no_leaks(base_url, timeout_s=60)
