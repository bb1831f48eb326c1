"""A decode replica's KV mailbox over the stream channel: a header reaches it in one TCP write.

``RayMailbox`` (engine/kv_transfer/mailbox.py) costs two Ray calls per message: the
prefill replica's ``post`` to the mailbox actor, and the decode replica's pending ``next``
returning. Between two idle actors on the 2-core CPU box that was 1.45 ms p50 from post to
next (``bench/kv_mailbox.py``), paid on every hand-off before the KV bytes may even start.
Here the decode replica listens with the stream channel's ``StreamReceiver`` and each
prefill replica's process keeps one persistent connection to it (``StreamSender``)::

    prefill replica: KVSender ── post(header) ══ frame (one TCP write) ══▶ decode replica:
                                                StreamReceiver ─▶ queue ─▶ KVReceiver.next

Only the address travels in a ``KVTransferPlan`` (``__reduce__``); a mailbox that arrived
that way can post but not read. Order: one sender's frames arrive in the order written,
so a pair's rendezvous comes before its headers. A decode replica that died refuses the
connection, and ``post`` raises ``StreamChannelError`` (the sender drops the pair and
reports a ``KVTransferError``; the decode side's lease covers the request).
"""

from __future__ import annotations

import asyncio
import weakref
from typing import Any, Optional

from engine.kv_transfer.mailbox import Mailbox
from router.stream_channel import ChannelAddress, StreamReceiver
from router.stream_sender import StreamSender

MAILBOX_KEY = "kv-mailbox"  # the one subscription on a mailbox's receiver

# One sender per event loop of the process: a prefill replica posts on its own loop, and every
# mailbox object unpickled there shares its connections.
_senders: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, StreamSender]" = weakref.WeakKeyDictionary()


def _sender() -> StreamSender:
    loop = asyncio.get_running_loop()
    sender = _senders.get(loop)
    if sender is None:
        sender = _senders[loop] = StreamSender()
    return sender


class ChannelMailbox(Mailbox):
    def __init__(self, address: ChannelAddress, receiver: Optional[StreamReceiver] = None) -> None:
        self.address = address
        self._receiver = receiver  # the decode side's own object only
        self._queue: Optional[asyncio.Queue] = receiver.subscribe(MAILBOX_KEY) if receiver else None

    @classmethod
    async def create(cls, host: Optional[str] = None) -> "ChannelMailbox":
        """A mailbox listening on the running loop (the decode replica's), on ``host`` or the node's IP."""
        receiver = StreamReceiver(host)
        return cls(await receiver.start(), receiver)

    def __reduce__(self):  # what travels: the address, never the receiver
        return ChannelMailbox, (self.address,)

    async def post(self, message: Any) -> None:
        await _sender().send(self.address, MAILBOX_KEY, message)

    async def next(self, timeout_s: float) -> Optional[Any]:
        if self._queue is None:
            raise RuntimeError("a mailbox is read only by the replica that created it")
        try:
            return await asyncio.wait_for(self._queue.get(), timeout_s)
        except asyncio.TimeoutError:
            return None

    async def close(self) -> None:
        if self._receiver is not None:
            await self._receiver.close()
