"""The direct stream channel (router/stream_channel.py): replica -> ingress deltas over TCP.

Unit tests (no Ray): frames round-trip, everything sent in one loop turn is one frame, a
wrong token is refused before anything is unpickled, send failures reach the request,
``ChannelStream`` ends on its call's count or error and never hangs.

End to end (the Serve app of test_openai_api.py, where the channel is on by default): the
outputs over the channel equal the offline engine's and the old Serve-streaming path's
(called on the replica handle directly), and a client that disconnects mid-stream frees the
replica's KV blocks and the ingress's subscription.
"""

from __future__ import annotations

import asyncio
import pickle
import time

import httpx
import pytest

from router.stream_channel import (_LENGTH, ChannelAddress, ChannelEnd, ChannelStream, StreamChannelError,
                                   StreamReceiver)
from router.stream_sender import StreamSender

HOST = "127.0.0.1"


async def _receiver() -> StreamReceiver:
    receiver = StreamReceiver(host=HOST)
    await receiver.start()
    return receiver


async def _get(queue: asyncio.Queue, n: int, timeout_s: float = 5.0) -> list:
    return [await asyncio.wait_for(queue.get(), timeout_s) for _ in range(n)]


# ---- framing, batching, tokens --------------------------------------------------------------------
async def test_items_arrive_in_order_per_request_and_unknown_requests_are_dropped():
    receiver, sender = await _receiver(), StreamSender()
    a, b = receiver.subscribe("a"), receiver.subscribe("b")
    for i in range(3):
        sender.send(receiver.address, "a", {"i": i})
        sender.send(receiver.address, "gone", i)  # nobody subscribes: dropped on arrival
        sender.send(receiver.address, "b", f"b{i}")
        await asyncio.sleep(0)
    sink = sender.open(receiver.address, "a")
    sink.put({"i": 3})
    assert await sink.flush() == 1
    assert await _get(a, 4) == [{"i": i} for i in range(4)]
    assert await _get(b, 3) == ["b0", "b1", "b2"]
    receiver.unsubscribe("a")
    sender.send(receiver.address, "a", "late")
    await sender.send(receiver.address, "b", "b3")
    assert await _get(b, 1) == ["b3"] and a.empty()
    assert receiver.num_subscriptions == 1
    sender.close()
    await receiver.close()


async def test_items_sent_in_one_loop_turn_are_one_frame():
    receiver, sender = await _receiver(), StreamSender()
    queues = {rid: receiver.subscribe(rid) for rid in ("r0", "r1", "r2")}
    await sender.send(receiver.address, "r0", "warm")  # connect first
    await _get(queues["r0"], 1)
    frames_before = receiver.num_frames
    # One engine step's outputs: every request's item in the same turn, no await between.
    written = [sender.send(receiver.address, rid, (rid, step)) for step in range(2) for rid in queues]
    assert len({id(w) for w in written}) == 1  # they share one frame
    await written[0]
    for rid, queue in queues.items():
        assert await _get(queue, 2) == [(rid, 0), (rid, 1)]
    assert receiver.num_frames == frames_before + 1
    # Separate turns: separate frames.
    for step in range(3):
        await sender.send(receiver.address, "r1", step)
    assert await _get(queues["r1"], 3) == [0, 1, 2]
    assert receiver.num_frames == frames_before + 4
    sender.close()
    await receiver.close()


class _Boom:
    """Unpickling this runs code: the channel must never unpickle an unauthenticated frame."""

    ran = False

    def __reduce__(self):
        return (_mark_ran, ())


def _mark_ran():
    _Boom.ran = True
    return "ran"


async def test_wrong_token_is_closed_before_anything_is_unpickled():
    receiver = await _receiver()
    queue = receiver.subscribe("x")
    reader, writer = await asyncio.open_connection(HOST, receiver.address.port)
    payload = pickle.dumps([("x", _Boom())], protocol=5)
    writer.write(b"0" * len(receiver.address.token) + _LENGTH.pack(len(payload)) + payload)
    await writer.drain()
    assert await asyncio.wait_for(reader.read(), 5.0) == b""  # the receiver closed the connection
    writer.close()
    assert not _Boom.ran and queue.empty()
    assert receiver.num_rejected == 1 and receiver.num_frames == 0
    # A sender with the wrong token gets nothing through either.
    wrong = ChannelAddress(HOST, receiver.address.port, "f" * len(receiver.address.token))
    sender = StreamSender()
    await sender.send(wrong, "x", "hello")  # written to the socket, then dropped unread
    await asyncio.sleep(0.2)
    assert queue.empty() and receiver.num_rejected == 2 and receiver.num_frames == 0
    sender.close()
    await receiver.close()


async def test_send_to_an_unreachable_receiver_fails_the_request():
    receiver = await _receiver()
    address = receiver.address
    await receiver.close()  # nothing listens on that port now
    sink = StreamSender().open(address, "r")
    sink.put("a")
    with pytest.raises(StreamChannelError):
        await sink.flush()
    with pytest.raises(StreamChannelError):
        sink.put("b")


async def test_sender_reconnects_after_the_receiver_dropped_the_connection():
    receiver, sender = await _receiver(), StreamSender()
    queue = receiver.subscribe("r")
    await sender.send(receiver.address, "r", 1)
    assert await _get(queue, 1) == [1]
    for writer in list(receiver._connections):  # the network drops the connection
        writer.close()
    await asyncio.sleep(0.1)  # the sender sees end of file
    await sender.send(receiver.address, "r", 2)
    assert await _get(queue, 1) == [2]
    sender.close()
    await receiver.close()


# ---- ChannelStream: the ingress's view of one request ---------------------------------------------
class _Call:
    """Stands in for Serve's DeploymentResponseGenerator: yields ``items`` (or raises) after a delay."""

    def __init__(self, items, delay_s: float = 0.0, error: BaseException | None = None):
        self.items, self.delay_s, self.error = items, delay_s, error
        self.cancelled = False

    def __aiter__(self):
        return self._run()

    async def _run(self):
        await asyncio.sleep(self.delay_s)
        if self.error is not None:
            raise self.error
        for item in self.items:
            yield item

    def cancel(self):
        self.cancelled = True


async def _read(stream) -> list:
    return [item async for item in stream]


async def test_channel_stream_waits_for_the_counted_items_then_ends():
    receiver, sender = await _receiver(), StreamSender()
    queue = receiver.subscribe("r")
    stream = ChannelStream(receiver, "r", queue, _Call([ChannelEnd(3)]))  # the call ends first
    reading = asyncio.ensure_future(_read(stream))
    await asyncio.sleep(0.1)
    for i in range(3):
        sender.send(receiver.address, "r", i)
        await asyncio.sleep(0.01)
    assert await asyncio.wait_for(reading, 5.0) == [0, 1, 2]
    assert receiver.num_subscriptions == 0
    sender.close()
    await receiver.close()


async def test_channel_stream_raises_the_call_error_at_once_and_never_hangs():
    receiver = await _receiver()
    stream = ChannelStream(receiver, "bad", receiver.subscribe("bad"), _Call([], error=ValueError("bad prompt")))
    with pytest.raises(ValueError, match="bad prompt"):
        await asyncio.wait_for(_read(stream), 5.0)
    # Items missing after the call ended: an error after end_timeout_s, not a hang.
    stream = ChannelStream(receiver, "short", receiver.subscribe("short"), _Call([ChannelEnd(2)]),
                           end_timeout_s=0.3)
    start = time.monotonic()
    with pytest.raises(StreamChannelError, match="received 0 of 2"):
        await asyncio.wait_for(_read(stream), 5.0)
    assert time.monotonic() - start < 2.0
    # cancel(): the call is cancelled and the request unsubscribed.
    call = _Call([ChannelEnd(0)], delay_s=10.0)
    stream = ChannelStream(receiver, "c", receiver.subscribe("c"), call)
    stream.cancel()
    assert call.cancelled and receiver.num_subscriptions == 0
    await receiver.close()


async def test_cancel_after_the_finished_item_lets_the_call_end_by_itself():
    from router.deltas import OutputDelta
    receiver, sender = await _receiver(), StreamSender()
    call = _Call([ChannelEnd(1)], delay_s=0.2)
    stream = ChannelStream(receiver, "f", receiver.subscribe("f"), call)
    items = stream.__aiter__()
    sender.send(receiver.address, "f", OutputDelta("replica-a", [], finished=True))
    assert (await asyncio.wait_for(items.__anext__(), 5.0)).finished
    stream.cancel()  # what the ingress does once every job finished
    assert not call.cancelled and receiver.num_subscriptions == 0
    sender.close()
    await receiver.close()


# ---- end to end: the Serve app of test_openai_api.py (channel on by default) ----------------------
@pytest.fixture(scope="module")
def base_url(ray_cluster, serve_http_port) -> str:
    from tests.test_openai_api import deploy_once
    return deploy_once(serve_http_port)


@pytest.fixture(scope="module")
def client(base_url):
    import openai

    from tests.test_openai_api import API_KEY
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key=API_KEY, timeout=120, max_retries=0)


def _status(base_url: str) -> dict:
    return httpx.get(f"{base_url}/kvmesh/status", timeout=30).json()


def _replica_request(request_id: str, prompt: list[int], max_tokens: int, stream_to=None):
    from engine import SamplingParams
    from router.messages import GenerateRequest
    return GenerateRequest(request_id=request_id, prompt_token_ids=prompt, block_hashes=[], stream_to=stream_to,
                           sampling_params=SamplingParams(temperature=0.0, max_tokens=max_tokens))


def _text(deltas) -> str:
    return "".join(c.text for d in deltas for c in d.choices)


async def _direct_calls(prompt: list[int], max_tokens: int, too_long: list[int]) -> tuple[list, list]:
    """The replica called from here: Serve streaming, then the channel into a receiver of our own."""
    from ray import serve

    from router.app import REPLICA_NAME
    from tests.test_openai_api import served_config
    handle = serve.get_deployment_handle(REPLICA_NAME, served_config().name).options(stream=True)
    over_serve = [d async for d in handle.generate_deltas.remote(_replica_request("direct-serve", prompt, max_tokens))]
    receiver = StreamReceiver()  # this node's IP, as in the ingress
    address = await receiver.start()
    req = _replica_request("direct-channel", prompt, max_tokens, address)
    queue = receiver.subscribe(req.request_id)
    over_channel = await _read(ChannelStream(receiver, req.request_id, queue, handle.generate_deltas.remote(req)))
    assert receiver.num_frames >= 1 and receiver.num_subscriptions == 0
    # A request the engine rejects: the Serve call's ValueError, promptly, nothing on the channel.
    bad = _replica_request("direct-bad", too_long, 4, address)
    stream = ChannelStream(receiver, bad.request_id, receiver.subscribe(bad.request_id),
                           handle.generate_deltas.remote(bad))
    with pytest.raises(ValueError):
        await asyncio.wait_for(_read(stream), 60)
    await receiver.close()
    return over_serve, over_channel


def test_channel_outputs_equal_serve_streaming_and_offline(client, base_url, tiny_llm):
    from engine import SamplingParams

    from tests.test_openai_api import MAX_MODEL_LEN, MODEL
    channel = _status(base_url)["stream_channel"]
    assert channel is not None and channel["address"], "the test app should stream over the channel"
    prompt = tiny_llm.get_tokenizer().encode("The quick brown fox jumps over the lazy dog")
    want = tiny_llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=24))[0].outputs[0].text

    full = client.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0)
    chunks = client.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0, stream=True)
    streamed = "".join(c.choices[0].text for c in chunks if c.choices)
    over_serve, over_channel = asyncio.run(_direct_calls(prompt, 24, [5] * (MAX_MODEL_LEN + 8)))
    assert full.choices[0].text == streamed == _text(over_serve) == _text(over_channel) == want
    # The same tokens in the same order; how they group into deltas depends on timing (a slow
    # reader gets two steps' tokens in one delta), so the grouping is not compared.
    assert [t for d in over_channel for c in d.choices for t in c.token_ids] == \
        [t for d in over_serve for c in d.choices for t in c.token_ids]
    assert over_channel[-1].finished and over_channel[-1].choices[-1].finish_reason == "length"

    after = _status(base_url)["stream_channel"]
    assert after["num_items"] > channel["num_items"] and after["num_subscriptions"] == 0
    assert after["num_rejected"] == 0


def test_client_disconnect_mid_stream_frees_kv_blocks_and_subscription(base_url):
    from tests.test_openai_api import API_KEY, MAX_MODEL_LEN, MODEL
    from tests.polling import wait_for

    def replicas():
        return _status(base_url)["replicas"]

    body = {"model": MODEL, "messages": [{"role": "user", "content": "Tell me a long story."}], "stream": True,
            "max_tokens": MAX_MODEL_LEN - 64, "ignore_eos": True, "temperature": 0}
    with httpx.Client(base_url=base_url, timeout=60) as http:
        with http.stream("POST", "/v1/chat/completions", json=body,
                         headers={"Authorization": f"Bearer {API_KEY}"}) as r:
            assert r.status_code == 200 and r.headers["x-kvmesh-replica"]
            lines = r.iter_lines()  # kept: closing this generator would close the stream now
            received = [line for _, line in zip(range(6), lines) if line]
            assert received and received[0].startswith("data: ")
            busy = wait_for(lambda: [s for s in replicas() if s["num_running"] == 1
                                     and s["num_free_blocks"] < s["num_blocks"]], timeout_s=10)
            assert busy, replicas()
            assert _status(base_url)["stream_channel"]["num_subscriptions"] == 1
        # Leaving the `with` closes the connection mid-stream.
    freed = wait_for(lambda: all(s["num_running"] == 0 and s["num_waiting"] == 0 and s["kv_usage"] == 0
                                 and s["num_free_blocks"] == s["num_blocks"] for s in replicas()), timeout_s=20)
    assert freed, replicas()
    assert wait_for(lambda: _status(base_url)["stream_channel"]["num_subscriptions"] == 0, timeout_s=10)
