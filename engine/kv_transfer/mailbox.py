"""The decode side's control mailbox: where senders post rendezvous and transfer headers.

Messages are small (``PairRendezvous``, ``KVTransferHeader``); the KV bytes never
pass through here. Messages from one sender keep their order (each sender posts
one at a time, and a Ray actor runs one caller's calls in submission order).

* ``LocalMailbox``: in-process (thread-safe), for tests and single-process use.
* ``RayMailbox``: a picklable handle to a small async Ray actor owned by the
  decode replica (it dies with it, and posting to a dead one fails fast).
  Ray is imported only when one is created.
"""

from __future__ import annotations

import asyncio
import queue
from abc import ABC, abstractmethod
from typing import Any, Optional


class Mailbox(ABC):
    @abstractmethod
    async def post(self, message: Any) -> None:
        """Queues a message for the receiver."""

    @abstractmethod
    async def next(self, timeout_s: float) -> Optional[Any]:
        """The oldest message, waiting up to ``timeout_s``; None if none came."""


class LocalMailbox(Mailbox):
    def __init__(self) -> None:
        self._queue: "queue.Queue[Any]" = queue.Queue()

    async def post(self, message: Any) -> None:
        self._queue.put(message)

    async def next(self, timeout_s: float) -> Optional[Any]:
        try:
            return self._queue.get_nowait()
        except queue.Empty:
            pass
        try:
            return await asyncio.to_thread(self._queue.get, True, timeout_s)
        except queue.Empty:
            return None


class _MailboxActor:
    """The Ray actor behind ``RayMailbox`` (async: ``next`` waits without blocking ``post``)."""

    def __init__(self) -> None:
        self._queue: asyncio.Queue = asyncio.Queue()

    async def post(self, message: Any) -> None:
        self._queue.put_nowait(message)

    async def next(self, timeout_s: float) -> Optional[Any]:
        try:
            return await asyncio.wait_for(self._queue.get(), timeout_s)
        except asyncio.TimeoutError:
            return None


class RayMailbox(Mailbox):
    def __init__(self, actor: Any) -> None:
        self._actor = actor

    @classmethod
    def create(cls) -> "RayMailbox":
        """A new mailbox actor owned by the calling process (the decode replica)."""
        import ray
        actor_cls = ray.remote(num_cpus=0, max_concurrency=64)(_MailboxActor)
        return cls(actor_cls.remote())

    async def post(self, message: Any) -> None:
        await self._actor.post.remote(message)

    async def next(self, timeout_s: float) -> Optional[Any]:
        return await self._actor.next.remote(timeout_s)

    def close(self) -> None:
        import ray
        try:
            ray.kill(self._actor)
        except Exception:
            pass
