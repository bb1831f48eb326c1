"""Direct stream channel: replicas push a request's ``OutputDelta``s to its ingress over TCP.

This module holds the wire format, the addresses and the ingress's end (``StreamReceiver``,
``ChannelStream``); the replica's end (``StreamSender``, ``ChannelSink``) is in
router/stream_sender.py.

Serve's streaming generator costs a thread hop, a pickle and a gRPC message per item inside
the replica process, where it shares the GIL with the engine loop (~300 us per item on an
H100 host: one replica caps near 2,500 streamed items/s). Here a replica sends everything
its requests produced in one event-loop turn (one engine step's outputs) for one ingress as
one frame on one persistent connection, so the cost per item is a pickle of a small
dataclass. The Serve call stays: it carries the request there, errors back (``ValueError``
-> 400, replica death) and cancellation (client gone -> the replica aborts the request),
and ends with one ``ChannelEnd`` telling how many items the channel carried.

    ingress                                              replica (LLMServer / DecodeServer)
      StreamReceiver.subscribe(request_id) -> queue
      Serve call(GenerateRequest(stream_to=address)) ───▶ engine outputs -> OutputDeltas
      ChannelStream ◀══ frames: [(request_id, delta), ...] ══ StreamSender (one frame per loop turn
            │                                                 and ingress; one connection each)
            ◀── Serve stream: ChannelEnd(num_items) ──────── after the last frame is written
      (ends once num_items arrived, or raises the call's error, or times out: never hangs)

Wire format on a connection: the receiver's token (``ChannelAddress.token``, ASCII) once,
then frames of an 8-byte big-endian length and a pickle (protocol 5) of a list of
``(request_id, item)`` pairs. A connection whose first bytes are not the token is closed
before anything is unpickled: unpickling bytes from an open port would run their code.
Frames from one replica arrive in order; a frame for a request nobody subscribes to any more
(cancelled, finished) is dropped.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import pickle
import secrets
import struct
from dataclasses import dataclass
from typing import Any, AsyncIterator, Optional

logger = logging.getLogger(__name__)

STREAM_CHANNEL_ENV = "KVMESH_STREAM_CHANNEL"  # "0": Serve streaming even where the config enables the channel
_LENGTH = struct.Struct("!Q")  # frame length prefix
MAX_FRAME_BYTES = 1 << 30  # a larger length prefix is a broken peer: drop the connection
TOKEN_TIMEOUT_S = 10.0  # a connection must show its token this soon
CONNECT_TIMEOUT_S = 5.0  # a sender gives up connecting (and fails the frame) after this
WRITE_BUFFER_BYTES = 1 << 20  # above this many unsent bytes a sender waits for the socket (backpressure)
END_TIMEOUT_S = 5.0  # after the Serve call ended, how long the ingress waits for the channel's last items


def stream_channel_from_env() -> bool:
    """False when ``KVMESH_STREAM_CHANNEL`` says off (A/B benchmarks against Serve streaming)."""
    return os.environ.get(STREAM_CHANNEL_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


class StreamChannelError(ConnectionError):
    """A frame could not be delivered, or the items of a request did not all arrive."""


@dataclass(frozen=True)
class ChannelAddress:
    """Where a replica sends a request's items: an ingress's receiver (travels in ``GenerateRequest``)."""

    host: str
    port: int
    token: str  # shared secret; the first bytes a sender writes on a connection


@dataclass(frozen=True)
class ChannelEnd:
    """The last Serve item of a request streamed over the channel: how many items the channel carried."""

    num_items: int


# ---- ingress side ---------------------------------------------------------------------------------
class StreamReceiver:
    """The ingress's end: one TCP server per ingress process, items routed to per-request queues.

    The server starts lazily (``start``) on the running loop, on the node's IP and a free port;
    every queue and callback lives on that loop.
    """

    def __init__(self, host: Optional[str] = None) -> None:
        self._host = host  # None: the Ray node's IP (127.0.0.1 outside Ray)
        self._token = secrets.token_hex(16)
        self._queues: dict[str, asyncio.Queue] = {}
        self._server: Optional[asyncio.AbstractServer] = None
        self._starting: Optional[asyncio.Task] = None
        self._connections: set[asyncio.StreamWriter] = set()
        self._handlers: set[asyncio.Task] = set()  # one per open connection
        self.address: Optional[ChannelAddress] = None  # set once started
        self.num_frames = 0  # frames received (tests check the batching with it)
        self.num_items = 0
        self.num_rejected = 0  # connections closed for a wrong token

    @property
    def is_started(self) -> bool:
        return self.address is not None

    async def start(self) -> ChannelAddress:
        """Listens (once; concurrent callers share the start); raises ``OSError`` if it cannot."""
        if self.address is None:
            if self._starting is None:
                self._starting = asyncio.get_running_loop().create_task(self._listen())
            try:
                await asyncio.shield(self._starting)
            except BaseException:
                if self._starting.done():
                    self._starting = None  # a failed start may be tried again
                raise
        return self.address

    async def _listen(self) -> None:
        host = self._host or _node_ip()
        self._server = await asyncio.start_server(self._serve_connection, host, 0)
        port = self._server.sockets[0].getsockname()[1]
        self.address = ChannelAddress(host, port, self._token)

    def subscribe(self, request_id: str) -> asyncio.Queue:
        """The queue the request's items will be put on (subscribe before the replica may send)."""
        queue: asyncio.Queue = asyncio.Queue()
        self._queues[request_id] = queue
        return queue

    def unsubscribe(self, request_id: str) -> None:
        """Forgets the request; its items still in flight are dropped on arrival."""
        self._queues.pop(request_id, None)

    @property
    def num_subscriptions(self) -> int:
        return len(self._queues)

    def stats(self) -> dict:
        address = self.address
        return {"address": f"{address.host}:{address.port}" if address else None,
                "num_connections": len(self._connections), "num_subscriptions": self.num_subscriptions,
                "num_frames": self.num_frames, "num_items": self.num_items, "num_rejected": self.num_rejected}

    async def close(self) -> None:
        """Stops listening and drops every connection."""
        if self._server is not None:
            self._server.close()
        for writer in list(self._connections):
            writer.close()  # its handler reads end of file and returns
        if self._handlers:
            await asyncio.wait(list(self._handlers), timeout=TOKEN_TIMEOUT_S)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None
        self.address = None

    async def _serve_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        expected = self._token.encode()
        handler = asyncio.current_task()
        self._handlers.add(handler)
        self._connections.add(writer)
        try:
            token = await asyncio.wait_for(reader.readexactly(len(expected)), TOKEN_TIMEOUT_S)
            if not hmac.compare_digest(token, expected):
                self.num_rejected += 1
                logger.warning("stream channel: closed a connection from %s with a wrong token",
                               writer.get_extra_info("peername"))
                return
            while True:
                (size,) = _LENGTH.unpack(await reader.readexactly(_LENGTH.size))
                if size > MAX_FRAME_BYTES:
                    logger.warning("stream channel: frame of %d bytes from %s; dropping the connection",
                                   size, writer.get_extra_info("peername"))
                    return
                self._deliver(pickle.loads(await reader.readexactly(size)))
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.TimeoutError):
            pass  # the sender went away (or never authenticated): its requests' Serve calls tell
        except Exception:  # an authenticated peer sent a frame that does not unpickle
            logger.exception("stream channel: bad frame from %s; dropping the connection",
                             writer.get_extra_info("peername"))
        finally:
            self._connections.discard(writer)
            self._handlers.discard(handler)
            writer.close()

    def _deliver(self, items: list[tuple[str, Any]]) -> None:
        self.num_frames += 1
        self.num_items += len(items)
        queues = self._queues
        for request_id, item in items:
            queue = queues.get(request_id)
            if queue is not None:
                queue.put_nowait(item)


@dataclass
class _CallEnded:
    """Queue marker: the request's Serve call ended (with its ``ChannelEnd``, or an error)."""

    num_items: int = 0
    error: Optional[BaseException] = None


class ChannelStream:
    """One request's items from the channel, ended by its Serve call (what ``_pump`` iterates).

    The Serve call yields only a ``ChannelEnd``; a task waits for it and puts a marker on the
    request's queue, so reading stays one ``queue.get`` per item. An error of the call (a
    ``ValueError`` before any output, the replica died) ends the stream at once; after a
    normal end the stream waits at most ``end_timeout_s`` for the items still on the wire.
    ``cancel()`` cancels the call (the replica aborts the request) and unsubscribes; once an
    item with ``finished`` set came, the call is left to end by itself (it is about to: the
    replica only writes its last frame and yields ``ChannelEnd``), so finished requests do
    not cost a cancellation round trip and do not show as cancelled calls.
    """

    def __init__(self, receiver: StreamReceiver, request_id: str, queue: asyncio.Queue, call: Any,
                 end_timeout_s: float = END_TIMEOUT_S) -> None:
        self._receiver = receiver
        self._request_id = request_id
        self._queue = queue
        self._call = call
        self._end_timeout_s = end_timeout_s
        self._is_finished = False  # an item with ``finished`` set was yielded
        self._watcher = asyncio.get_running_loop().create_task(self._watch_call())

    def __aiter__(self) -> AsyncIterator[Any]:
        return self._run()

    def cancel(self) -> None:
        if not self._is_finished:
            self._call.cancel()
        self._close()

    def _close(self) -> None:
        if not self._is_finished:
            self._watcher.cancel()
        self._receiver.unsubscribe(self._request_id)

    async def _watch_call(self) -> None:
        try:
            end: Optional[ChannelEnd] = None
            async for item in self._call:
                if not isinstance(item, ChannelEnd):
                    raise StreamChannelError(f"request {self._request_id}: the replica sent "
                                             f"{type(item).__name__} over Serve, expected ChannelEnd")
                end = item
            if end is None:
                raise StreamChannelError(f"request {self._request_id}: the replica's call ended "
                                         "without ChannelEnd")
            self._queue.put_nowait(_CallEnded(num_items=end.num_items))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # delivered to the reader, which raises it
            self._queue.put_nowait(_CallEnded(error=exc))

    async def _run(self) -> AsyncIterator[Any]:
        queue = self._queue
        num_received = 0
        try:
            while True:
                item = await queue.get()
                if type(item) is not _CallEnded:
                    num_received += 1
                    if getattr(item, "finished", False):
                        self._is_finished = True
                    yield item
                    continue
                if item.error is not None:
                    raise item.error
                # The call ended after the replica wrote its last frame; that frame may still be
                # on the wire (another connection than Serve's).
                deadline = asyncio.get_running_loop().time() + self._end_timeout_s
                while num_received < item.num_items:
                    timeout = deadline - asyncio.get_running_loop().time()
                    try:
                        late = await asyncio.wait_for(queue.get(), max(timeout, 0.0))
                    except asyncio.TimeoutError:
                        raise StreamChannelError(
                            f"request {self._request_id}: received {num_received} of {item.num_items} "
                            f"items over the stream channel within {self._end_timeout_s}s") from None
                    num_received += 1
                    if getattr(late, "finished", False):
                        self._is_finished = True
                    yield late
                return
        finally:
            self._close()


def _node_ip() -> str:
    try:
        import ray
        return ray.util.get_node_ip_address()
    except Exception:  # outside Ray
        return "127.0.0.1"
