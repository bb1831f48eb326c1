"""The async engine's plumbing (engine/async_engine.py): the commands its callers queue for the
engine thread, each request's stream of items on its caller's event loop, and the thread
settings (GIL switch interval, OS thread names) shared with the engine-core process.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections import deque
from dataclasses import dataclass
from typing import Any, Optional

from engine.kv_transfer.plan import KVArrival, KVReservation, TransferFailurePolicy
from engine.llm_engine import PromptType
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams


@dataclass
class AddCommand:
    request_id: str
    prompt: PromptType
    params: SamplingParams
    priority: int
    stream: "RequestStream"
    kv_mode: Any = None  # KVTransferPlan (prefill only) or RemotePrefill; None: local
    stream_interval: int = 1  # LLMEngine.add_request's
    max_outputs_per_step: Optional[int] = None  # LLMEngine.add_request's


@dataclass
class AbortCommand:
    request_id: str
    done: "asyncio.Future[None]"
    loop: asyncio.AbstractEventLoop


@dataclass
class RemotePrefill:
    """Decode side: reserve blocks for the prompt's KV instead of computing it."""

    lease_timeout_s: float
    min_remote_tokens: int
    on_failure: TransferFailurePolicy


@dataclass
class Reserved:
    """First stream item of a remote-prefill request: its reservation, or None (computed here)."""

    reservation: Optional[KVReservation]


@dataclass
class DeliverKV:
    arrival: KVArrival


class RequestStream:
    """One request's items (outputs, errors, KV items) on its caller's event loop.

    ``put`` is for the engine thread; ``push`` and ``get`` run on ``loop``.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._items: deque = deque()
        self._waiter: Optional[asyncio.Future] = None

    def put(self, item) -> None:
        call_soon_threadsafe(self.loop, self.push, item)

    def push(self, item) -> None:
        self._items.append(item)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def get(self):
        """The next item; of several waiting cumulative outputs, only the latest."""
        while not self._items:
            self._waiter = self.loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        item = self._items.popleft()
        while (self._items and isinstance(item, RequestOutput) and isinstance(self._items[0], RequestOutput)):
            item = self._items.popleft()  # a later cumulative output holds everything this one does
        return item


def push_all(batch: list[tuple[RequestStream, Any]]) -> None:
    for stream, item in batch:
        stream.push(item)


def call_soon_threadsafe(loop: asyncio.AbstractEventLoop, callback, *args) -> None:
    try:
        loop.call_soon_threadsafe(callback, *args)
    except RuntimeError:  # the caller's loop is closed: nobody is listening any more
        pass


SWITCH_INTERVAL_ENV = "KVMESH_SWITCH_INTERVAL_S"
DEFAULT_SWITCH_INTERVAL_S = 0.0005


def set_switch_interval() -> None:
    """The engine thread shares the GIL with the server's threads (event loop, Serve's
    streaming). Each time it waits on the device it lets the GIL go, and getting it back can
    take a whole switch interval while another thread runs Python (5 ms by default, about a
    decode step): under many streams every step paid it. A short interval bounds that wait.
    ``KVMESH_SWITCH_INTERVAL_S`` overrides it (0: leave Python's)."""
    value = float(os.environ.get(SWITCH_INTERVAL_ENV, DEFAULT_SWITCH_INTERVAL_S))
    if value > 0:
        sys.setswitchinterval(value)


def name_native_thread(name: str) -> None:
    """Gives the calling thread its OS name (Linux; best effort), so per-thread CPU tools
    (``top -H``, ``py-spy``, bench/http_overhead.py) tell the engine loop apart."""
    try:
        import ctypes
        libc = ctypes.CDLL(None)
        libc.prctl(15, name.encode()[:15], 0, 0, 0)  # PR_SET_NAME: 15 bytes and a NUL
    except (OSError, AttributeError):
        pass


def set_result(future: "asyncio.Future[None]") -> None:
    if not future.done():
        future.set_result(None)
