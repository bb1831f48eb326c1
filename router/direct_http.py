"""The OpenAI API served straight from each ingress replica, beside Serve's HTTP proxy.

    client ──HTTP──▶ Serve proxy (one per node) ──gRPC──▶ OpenAIIngress     (http.port)
    client ──HTTP──────────────────────────────────────▶ OpenAIIngress     (http.direct_port)

Every streamed token crosses the proxy once more: on 2 H200s at ~5,000 streamed tokens/s the
proxy process was busy 1.9 cores (bench/disagg_serve.py's CPU per role), and its event loop
is one more place where a token can wait. With ``http.direct_port`` set, each ingress
replica also runs its FastAPI app under its own uvicorn server, on its own event loop, on
that port. The socket is bound with SO_REUSEPORT, so the ingress replicas of a node share
the port and the kernel spreads new connections over them; a replica that dies closes its
socket and gets no more. Serve's port keeps working (health checks, ``kvmesh status``).

The routes are the same objects Serve calls: ``serve.ingress`` makes the endpoint methods'
``self`` a FastAPI dependency that reads the replica's servable object, so the server starts
listening only once Serve has set it (the constructor has returned). What Serve's proxy adds
is not on this path: its request timeout and its per-request metrics; the ingress's own
admission control (429s) and Prometheus counters are.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from typing import Any, Callable, Optional

import uvicorn

logger = logging.getLogger(__name__)


def reuse_port_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket other processes may bind too (SO_REUSEPORT, same user)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        sock.listen(2048)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


class DirectHTTPServer:
    """uvicorn serving ``app`` on ``host:port`` (shared by port reuse) in the running event loop."""

    def __init__(self, app: Any, host: str, port: int) -> None:
        self.app, self.host, self.port = app, host, port
        self._server: Optional[Any] = None
        self._task: Optional[asyncio.Task] = None

    def start(self, ready: Callable[[], bool] = lambda: True, poll_s: float = 0.05) -> asyncio.Task:
        """Listens once ``ready()`` is true (checked every ``poll_s``); returns the serving task."""
        self._task = asyncio.get_running_loop().create_task(self._serve(ready, poll_s))
        return self._task

    async def _serve(self, ready: Callable[[], bool], poll_s: float) -> None:
        while not ready():
            await asyncio.sleep(poll_s)
        try:
            sock = reuse_port_socket(self.host, self.port)
        except OSError as exc:  # e.g. another program holds the port without port reuse
            logger.error("cannot serve the OpenAI API directly on %s:%d (%s); Serve's port still "
                         "serves", self.host, self.port, exc)
            return
        config = uvicorn.Config(self.app, lifespan="off", access_log=False, log_level="warning",
                                timeout_keep_alive=75)
        self._server = _QuietServer(config)
        logger.info("serving the OpenAI API directly on %s:%d", self.host, self.port)
        try:
            await self._server.serve(sockets=[sock])
        finally:
            sock.close()

    async def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(self._task, 5.0)


class _QuietServer(uvicorn.Server):
    """uvicorn's server without its signal handlers: the replica's process owns its signals."""

    @contextlib.contextmanager
    def capture_signals(self):  # type: ignore[override]
        yield
