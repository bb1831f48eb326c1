"""router/direct_http.py without Serve: a shared port, and no listening before the app is ready.

The Serve path (the ingress on ``http.direct_port``, through the official client) is in
tests/test_openai_api.py.
"""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import pytest

from router.config import parse_deployment_config
from router.direct_http import DirectHTTPServer
from tests.fixtures_redis import free_port


def named_app(name: str):
    """An ASGI app answering every request with ``name``."""
    async def app(scope, receive, send):
        assert scope["type"] == "http"
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": name.encode()})
    return app


class LoopThread:
    """A DirectHTTPServer on an event loop of its own thread, as an ingress replica runs one."""

    def __init__(self, name: str, port: int, ready=lambda: True) -> None:
        self.loop = asyncio.new_event_loop()
        self.server = DirectHTTPServer(named_app(name), "127.0.0.1", port)
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._start(ready), self.loop).result(5)

    async def _start(self, ready) -> None:
        self.server.start(ready=ready, poll_s=0.02)

    def stop(self) -> None:
        if not self.loop.is_running():
            return
        asyncio.run_coroutine_threadsafe(self.server.stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


def get(port: int) -> str:
    """One request on a fresh connection (port reuse spreads connections, not requests)."""
    with httpx.Client(timeout=5) as c:
        return c.get(f"http://127.0.0.1:{port}/").text


def wait_listening(port: int, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            get(port)
            return
        except httpx.TransportError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def test_servers_share_the_port_and_connections_reach_each():
    port = free_port()
    servers = [LoopThread(name, port) for name in ("a", "b")]
    try:
        wait_listening(port)
        time.sleep(0.2)  # both bound
        seen = {get(port) for _ in range(40)}
        assert seen == {"a", "b"}  # 40 connections all on one socket: odds 2 ** -39
        servers[0].stop()  # a replica that goes away gets no more connections
        assert {get(port) for _ in range(10)} == {"b"}
    finally:
        for s in servers:
            s.stop()


def test_not_listening_until_ready():
    port = free_port()
    ready = threading.Event()
    server = LoopThread("late", port, ready=ready.is_set)
    try:
        time.sleep(0.3)
        with pytest.raises(httpx.ConnectError):
            get(port)
        ready.set()
        wait_listening(port)
        assert get(port) == "late"
    finally:
        server.stop()


def test_a_port_taken_without_reuse_is_logged_not_raised(caplog):
    import socket
    port = free_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        server = LoopThread("never", port)
        try:
            task = server.server._task  # the serving task ends at once, without an exception
            asyncio.run_coroutine_threadsafe(asyncio.wait_for(asyncio.shield(task), 5), server.loop).result(10)
            assert task.exception() is None
            assert "cannot serve the OpenAI API directly" in caplog.text
        finally:
            server.stop()


@pytest.mark.parametrize("http, fragment", [
    ({"port": 8000, "direct_port": 8000}, "must differ"),
    ({"direct_port": 0}, "direct_port must be in"),
    ({"direct_port": 70000}, "direct_port must be in"),
])
def test_bad_direct_port_is_refused_at_load(http, fragment):
    with pytest.raises(ValueError, match=fragment):
        parse_deployment_config({"name": "x", "model": "m", "http": http})
