"""The OpenAI API end to end with the official ``openai`` client (sync, async, streaming).

One Serve app with the real engine (kvmesh-tiny on CPU) is deployed once for the
session on the private test Ray cluster and shared with ``test_serve_e2e.py``.
Answers are checked against the offline engine's greedy output for the same prompt.
"""

from __future__ import annotations

import time

import httpx
import openai
import pytest

from engine import SamplingParams
from router.config import parse_deployment_config
from router.ingress import INGRESS_HEADER
from tests.fixtures_redis import free_port

API_KEY = "sk-kvmesh-test"
MODEL = "kvmesh-tiny"
MAX_MODEL_LEN = 512
MESSAGES = [{"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Name three colors."}]
PROMPT = "The quick brown fox jumps over the lazy dog because"

# http.direct_port: the ingress also serves the API itself here (router/direct_http.py)
DIRECT_PORT = free_port()
_DEPLOYED: dict = {}


def served_config():
    return parse_deployment_config({
        "name": "kvmesh-test",
        "model": MODEL,
        "engine": {"dtype": "float32", "device": "cpu", "max_model_len": MAX_MODEL_LEN,
                   "block_size": 16, "num_blocks": 256, "max_num_seqs": 16},
        # Autoscaling is wired in but the long upscale delay keeps one replica, so the
        # replica stats the tests read are those of the replica that served them.
        "replicas": {"min_replicas": 1, "max_replicas": 2, "num_cpus": 0.2},
        "autoscaling": {"target_waiting_per_replica": 4, "upscale_delay_s": 600,
                        "downscale_delay_s": 600},
        "routing": {"kind": "prefix_aware", "stats_period_s": 0.25},
        "auth": {"api_keys": [API_KEY]},
        "ingress": {"num_cpus": 0.1},
        "http": {"direct_port": DIRECT_PORT},
    })


def deploy_once(serve_http_port: int) -> str:
    """Deploys the test app the first time it is asked for; returns its base URL."""
    if "url" not in _DEPLOYED:
        from ray import serve

        from router.app import build_app
        cfg = served_config()
        start = time.monotonic()
        serve.run(build_app(cfg), name=cfg.name, route_prefix="/")
        url = f"http://127.0.0.1:{serve_http_port}"
        # The first request also loads the ingress's tokenizer; do it here, not in a test.
        deadline = time.monotonic() + 120
        while True:
            r = httpx.post(f"{url}/v1/completions", headers={"Authorization": f"Bearer {API_KEY}"},
                           json={"model": MODEL, "prompt": "warm up", "max_tokens": 1}, timeout=120)
            if r.status_code != 503 or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert r.status_code == 200, r.text
        print(f"deployed test app in {time.monotonic() - start:.1f}s")
        _DEPLOYED["url"] = url
    return _DEPLOYED["url"]


@pytest.fixture(scope="module")
def base_url(ray_cluster, serve_http_port) -> str:
    return deploy_once(serve_http_port)


@pytest.fixture(scope="module")
def client(base_url) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key=API_KEY, timeout=120, max_retries=0)


@pytest.fixture
def aclient(base_url) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key=API_KEY, timeout=120, max_retries=0)


def greedy(max_tokens: int, **kwargs) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, **kwargs)


# ---- answers match the offline engine ------------------------------------------------------------
def test_models_list(client):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]


def test_chat_matches_offline_greedy(client, tiny_llm):
    ref = tiny_llm.chat(MESSAGES, greedy(12))[0]
    resp = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=12, temperature=0)
    choice = resp.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == ref.outputs[0].text
    assert choice.finish_reason == ref.outputs[0].finish_reason
    assert resp.usage.prompt_tokens == len(ref.prompt_token_ids)
    assert resp.usage.completion_tokens == len(ref.outputs[0].token_ids)
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens
    assert resp.id.startswith("chatcmpl-") and resp.object == "chat.completion"


def test_max_completion_tokens_is_honoured(client):
    resp = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_completion_tokens=3,
                                          temperature=0, extra_body={"ignore_eos": True})
    assert resp.usage.completion_tokens == 3 and resp.choices[0].finish_reason == "length"


def test_completion_matches_offline_greedy(client, tiny_llm):
    ref = tiny_llm.generate([PROMPT], greedy(12))[0]
    resp = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0)
    assert resp.choices[0].text == ref.outputs[0].text
    assert resp.usage.prompt_tokens == len(ref.prompt_token_ids)
    assert resp.usage.completion_tokens == len(ref.outputs[0].token_ids)


def test_completion_with_token_ids_and_echo(client, tiny_llm):
    ref = tiny_llm.generate([PROMPT], greedy(6))[0]
    resp = client.completions.create(model=MODEL, prompt=ref.prompt_token_ids, max_tokens=6,
                                     temperature=0, echo=True)
    assert resp.choices[0].text.endswith(ref.outputs[0].text)
    assert resp.usage.prompt_tokens == len(ref.prompt_token_ids)


# ---- streaming -----------------------------------------------------------------------------------
async def test_chat_stream_concatenates_to_full_text(aclient):
    full = await aclient.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=12,
                                                 temperature=0)
    stream = await aclient.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=12,
                                                   temperature=0, stream=True,
                                                   stream_options={"include_usage": True})
    pieces, finish, usage, roles = [], None, None, []
    async for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
            assert chunk.choices == []
            continue
        (choice,) = chunk.choices
        assert choice.index == 0
        if choice.delta.role:
            roles.append(choice.delta.role)
        pieces.append(choice.delta.content or "")
        finish = choice.finish_reason or finish
    assert roles == ["assistant"]
    assert "".join(pieces) == full.choices[0].message.content
    assert finish == full.choices[0].finish_reason
    assert usage == full.usage


async def test_completion_stream_concatenates_to_full_text(aclient):
    full = await aclient.completions.create(model=MODEL, prompt=PROMPT, max_tokens=10, temperature=0)
    stream = await aclient.completions.create(model=MODEL, prompt=PROMPT, max_tokens=10, temperature=0,
                                              stream=True, stream_options={"include_usage": True})
    text, usage = "", None
    async for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            text += choice.text
    assert text == full.choices[0].text
    assert usage.completion_tokens == full.usage.completion_tokens
    assert usage.prompt_tokens == full.usage.prompt_tokens


def test_sync_stream_without_usage(client):
    stream = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4,
                                            temperature=0, stream=True)
    chunks = list(stream)
    assert chunks and all(c.usage is None for c in chunks)
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


# ---- n > 1, seeds, logprobs, batches ---------------------------------------------------------------
async def test_n2_streams_per_choice_and_matches_full(aclient):
    kwargs = dict(model=MODEL, messages=MESSAGES, max_tokens=8, temperature=0.9, seed=1234, n=2,
                  extra_body={"ignore_eos": True})
    full = await aclient.chat.completions.create(**kwargs)
    assert sorted(c.index for c in full.choices) == [0, 1]
    assert full.usage.completion_tokens == 16  # summed over both choices
    stream = await aclient.chat.completions.create(**kwargs, stream=True)
    texts = {0: "", 1: ""}
    async for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
    assert texts == {c.index: c.message.content for c in full.choices}


def test_seed_makes_sampling_reproducible(client):
    kwargs = dict(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=1.0, seed=7)
    a = client.completions.create(**kwargs).choices[0].text
    b = client.completions.create(**kwargs).choices[0].text
    assert a == b


def test_chat_logprobs(client):
    resp = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=5, temperature=0,
                                          logprobs=True, top_logprobs=2)
    content = resp.choices[0].logprobs.content
    assert len(content) == resp.usage.completion_tokens
    assert "".join(t.token for t in content) == resp.choices[0].message.content
    for token in content:
        assert len(token.top_logprobs) == 2
        assert token.logprob <= 0
        # greedy: the chosen token is the most likely one
        assert token.top_logprobs[0].logprob == pytest.approx(token.logprob, abs=1e-5)
        assert token.top_logprobs[0].logprob >= token.top_logprobs[1].logprob


def test_completion_logprobs(client):
    resp = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5, temperature=0, logprobs=3)
    lp = resp.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == resp.usage.completion_tokens
    assert "".join(lp.tokens) == resp.choices[0].text
    assert all(len(top) <= 3 for top in lp.top_logprobs)
    assert lp.text_offset[0] == 0


def test_batch_of_prompts(client, tiny_llm):
    prompts = [PROMPT, "Once upon a time"]
    refs = tiny_llm.generate(prompts, greedy(4))
    resp = client.completions.create(model=MODEL, prompt=prompts, max_tokens=4, temperature=0)
    by_index = {c.index: c.text for c in resp.choices}
    assert by_index == {0: refs[0].outputs[0].text, 1: refs[1].outputs[0].text}
    assert resp.usage.prompt_tokens == sum(len(r.prompt_token_ids) for r in refs)


# ---- errors through the official client ----------------------------------------------------------
def test_bad_key_is_authentication_error(base_url):
    bad = openai.OpenAI(base_url=f"{base_url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as info:
        bad.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2)
    assert info.value.status_code == 401


def test_unknown_model_is_not_found(client):
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="gpt-17", messages=MESSAGES, max_tokens=2)
    assert "gpt-17" in str(info.value)


@pytest.mark.parametrize("kwargs, fragment", [
    ({"max_tokens": -1}, "max_tokens"),
    ({"temperature": -0.5}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"n": 0}, "n"),
    ({"top_logprobs": 2}, "top_logprobs"),
])
def test_bad_sampling_values_are_bad_request(client, kwargs, fragment):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, **kwargs)
    assert fragment in str(info.value)


def test_prompt_too_long_is_bad_request(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt="word " * (MAX_MODEL_LEN * 2), max_tokens=4)
    assert "maximum context length" in str(info.value)
    # and the server keeps serving
    assert client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2).choices


# ---- the same API on the ingress's direct port (no Serve proxy) ---------------------------------
@pytest.fixture(scope="module")
def direct_client(base_url) -> openai.OpenAI:
    url = f"http://127.0.0.1:{DIRECT_PORT}"
    deadline = time.monotonic() + 30  # listens once Serve has made the ingress object its replica's
    while True:
        try:
            httpx.get(f"{url}/health", timeout=5)
            break
        except httpx.TransportError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    return openai.OpenAI(base_url=f"{url}/v1", api_key=API_KEY, timeout=120, max_retries=0)


def test_direct_port_answers_like_the_proxy(direct_client, client, tiny_llm):
    ref = tiny_llm.chat(MESSAGES, greedy(12))[0]
    raw = direct_client.chat.completions.with_raw_response.create(model=MODEL, messages=MESSAGES,
                                                                  max_tokens=12, temperature=0)
    assert raw.headers.get(INGRESS_HEADER)  # the ingress answered itself
    assert raw.parse().choices[0].message.content == ref.outputs[0].text
    stream = direct_client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=10, temperature=0,
                                              stream=True)
    text = "".join(choice.text for chunk in stream for choice in chunk.choices)
    assert text == client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=10, temperature=0).choices[0].text


def test_direct_port_errors_are_openai_errors(direct_client):
    with pytest.raises(openai.NotFoundError) as info:
        direct_client.chat.completions.create(model="gpt-17", messages=MESSAGES, max_tokens=2)
    assert info.value.status_code == 404 and "gpt-17" in str(info.value)
    bad = openai.OpenAI(base_url=str(direct_client.base_url), api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    with pytest.raises(openai.BadRequestError):
        direct_client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=-1)
    assert direct_client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2).choices  # still serving
