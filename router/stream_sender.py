"""The replica's end of the direct stream channel (router/stream_channel.py has the wire format
and the ingress's end): one persistent connection per ingress, one frame per event-loop turn and
ingress, and ``ChannelSink``, one request's use of it.
"""

from __future__ import annotations

import asyncio
import logging
import pickle
from dataclasses import dataclass, field
from typing import Any, Optional

from router.stream_channel import (_LENGTH, CONNECT_TIMEOUT_S, WRITE_BUFFER_BYTES, ChannelAddress,
                                   StreamChannelError)

logger = logging.getLogger(__name__)


# ---- replica side ---------------------------------------------------------------------------------
@dataclass
class _Destination:
    """One ingress as seen by a sender: its connection and the frame being gathered for it."""

    address: ChannelAddress
    pending: list[tuple[str, Any]] = field(default_factory=list)
    pending_written: Optional[asyncio.Future] = None  # resolves once ``pending``'s frame is written
    writer: Optional[asyncio.StreamWriter] = None
    busy: Optional[asyncio.Task] = None  # connecting or waiting for the socket; flushes again when done
    peer_watch: Optional[asyncio.Task] = None  # reads the connection to see the receiver close it
    is_flush_scheduled: bool = False

    @property
    def is_connected(self) -> bool:
        return self.writer is not None and not self.writer.is_closing()

    def disconnect(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class StreamSender:
    """The replica's end: one persistent connection per ingress, one frame per loop turn per ingress.

    ``send`` only appends the item and schedules a flush with ``loop.call_soon``; every item
    sent during the same loop turn (all requests' outputs of one engine step wake their
    tasks in one turn) goes out in that flush, as one frame. A broken connection is
    reconnected once per frame; if that fails too the frame's future gets a
    ``StreamChannelError`` (``ChannelSink`` raises it to the request, whose Serve call fails).
    """

    def __init__(self) -> None:
        self._destinations: dict[ChannelAddress, _Destination] = {}

    def open(self, address: ChannelAddress, request_id: str) -> "ChannelSink":
        return ChannelSink(self, address, request_id)

    def send(self, address: ChannelAddress, request_id: str, item: Any) -> asyncio.Future:
        """Queues ``item``; the returned future resolves when its frame is written to the socket."""
        dest = self._destinations.get(address)
        if dest is None:
            dest = self._destinations[address] = _Destination(address)
        dest.pending.append((request_id, item))
        if dest.pending_written is None:
            dest.pending_written = asyncio.get_running_loop().create_future()
            dest.pending_written.add_done_callback(_retrieve)
        if not dest.is_flush_scheduled and dest.busy is None:
            dest.is_flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush, dest)
        return dest.pending_written

    def close(self) -> None:
        """Drops every connection; frames still being written fail."""
        for dest in self._destinations.values():
            if dest.busy is not None:
                dest.busy.cancel()
            dest.disconnect()
        self._destinations.clear()

    def _flush(self, dest: _Destination) -> None:
        dest.is_flush_scheduled = False
        if dest.busy is not None or not dest.pending:
            return  # the busy task flushes what gathered meanwhile
        items, written = dest.pending, dest.pending_written
        dest.pending, dest.pending_written = [], None
        try:
            payload = pickle.dumps(items, protocol=5)
        except Exception as exc:  # an unpicklable item fails its frame, not the loop
            written.set_exception(StreamChannelError(f"cannot pickle a stream frame: {exc!r}"))
            return
        frame = [_LENGTH.pack(len(payload)), payload]
        if dest.is_connected:
            dest.writer.writelines(frame)
            if dest.writer.transport.get_write_buffer_size() <= WRITE_BUFFER_BYTES:
                written.set_result(None)
                return
        dest.busy = asyncio.get_running_loop().create_task(self._write(dest, frame, written))

    async def _write(self, dest: _Destination, frame: list[bytes], written: asyncio.Future) -> None:
        """Connects if needed (once more if that fails), writes the frame and waits for the socket."""
        try:
            error: Optional[BaseException] = None
            for _ in range(2):
                try:
                    if not dest.is_connected:
                        await self._connect(dest)
                        dest.writer.writelines(frame)
                    await dest.writer.drain()
                    written.set_result(None)
                    return
                except (OSError, asyncio.TimeoutError) as exc:
                    error = exc
                    dest.disconnect()
            written.set_exception(StreamChannelError(
                f"stream channel to {dest.address.host}:{dest.address.port} failed: {error!r}"))
        except asyncio.CancelledError:
            if not written.done():
                written.set_exception(StreamChannelError("stream channel sender closed"))
            raise
        finally:
            dest.busy = None
            if dest.pending and not dest.is_flush_scheduled:
                dest.is_flush_scheduled = True
                asyncio.get_running_loop().call_soon(self._flush, dest)

    async def _connect(self, dest: _Destination) -> None:
        address = dest.address
        reader, writer = await asyncio.wait_for(asyncio.open_connection(address.host, address.port),
                                                CONNECT_TIMEOUT_S)
        writer.write(address.token.encode())
        dest.writer = writer
        dest.peer_watch = asyncio.get_running_loop().create_task(self._watch_peer(dest, reader, writer))

    @staticmethod
    async def _watch_peer(dest: _Destination, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """The receiver never writes: end of file means it closed, so the next frame reconnects."""
        try:
            while await reader.read(4096):
                pass
        except OSError:
            pass
        if dest.writer is writer:
            dest.disconnect()


class ChannelSink:
    """One request's use of the sender: ``put`` its items, then ``flush`` for the count to report."""

    def __init__(self, sender: StreamSender, address: ChannelAddress, request_id: str) -> None:
        self._sender = sender
        self._address = address
        self._request_id = request_id
        self._written: Optional[asyncio.Future] = None  # the frame of the last item put
        self._error: Optional[BaseException] = None  # the first frame of ours that failed
        self.num_items = 0

    def put(self, item: Any) -> None:
        """Sends ``item`` with this loop turn's frame; raises if an earlier frame of ours failed."""
        if self._error is not None:
            raise self._error
        written = self._sender.send(self._address, self._request_id, item)
        if written is not self._written:
            self._written = written
            written.add_done_callback(self._on_written)
        self.num_items += 1

    async def flush(self) -> int:
        """Waits until every item put is written to the socket; returns how many were put."""
        if self._written is not None:
            await asyncio.shield(self._written)  # shared by the frame's requests: never cancel it
        if self._error is not None:
            raise self._error
        return self.num_items

    def _on_written(self, written: asyncio.Future) -> None:
        if self._error is None and not written.cancelled() and written.exception() is not None:
            self._error = written.exception()


def _retrieve(future: asyncio.Future) -> None:
    """Marks a frame's error as seen (a frame nobody waits on must not log 'never retrieved')."""
    if not future.cancelled():
        future.exception()
