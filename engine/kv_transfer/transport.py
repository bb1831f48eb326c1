"""Sending and receiving one request's staged KV over pair communicators.

``KVSender`` (prefill side, one per rank): per destination endpoint it keeps one
pair communicator, created on first use through the endpoint's mailbox and
reused; sends to one endpoint are serialized (a pair's bytes are ordered).

``KVReceiver`` (decode side, one per rank): reads its mailbox and hands each
pair's messages, in order, to one task per pair that receives the bytes into a
new staging tensor; every transfer ends in exactly one ``KVArrival`` (with the
tensor, or with an error) passed to ``on_arrival``. What the engine does with
it (scatter into the reserved blocks, or drop it because the lease expired) is
not the transport's business.

With a ``StepTimeline`` (engine/step_timeline.py) the receiver records each
transfer's phases (staging allocation on the event loop, bytes in a thread), so
decode-side stalls can be matched against them.

Fault injection for tests: ``KVSender.stall_s`` sleeps after posting the header
and before sending the bytes, so a transfer can be caught "in flight".
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Optional

import torch

from engine.kv_transfer.base import CommunicatorBackend, KVTransferError, PairCommunicator
from engine.kv_transfer.mailbox import Mailbox
from engine.kv_transfer.plan import (KVArrival, KVTransferHeader, KVTransferPlan, KVTransferStats,
                                     PairRendezvous)
from engine.step_timeline import KVRecv, StepTimeline

logger = logging.getLogger(__name__)

_DTYPES = {str(d).removeprefix("torch."): d for d in (torch.float32, torch.bfloat16, torch.float16,
                                                      torch.float8_e4m3fn, torch.uint8)}


@dataclass
class _Pair:
    pair_id: str
    comm: PairCommunicator


class KVSender:
    def __init__(self, backend: CommunicatorBackend, sender_id: str, tp_rank: int = 0,
                 timeout_s: float = 30.0) -> None:
        self.backend = backend
        self.sender_id = sender_id
        self.tp_rank = tp_rank
        self.timeout_s = timeout_s
        self.stats = KVTransferStats()
        self.stall_s = 0.0  # tests only: pause between header and bytes
        self._pairs: dict[str, _Pair] = {}  # endpoint id -> pair
        self._locks: dict[str, asyncio.Lock] = {}

    async def send(self, plan: KVTransferPlan, kv: torch.Tensor, first_token_id: int,
                   first_token_logprobs: Any = None) -> float:
        """Sends a staged KV tensor to the plan's endpoint; returns the seconds it took.

        Raises ``KVTransferError``; the pair is then dropped and recreated next time.
        """
        endpoint = plan.endpoint
        lock = self._locks.setdefault(endpoint.endpoint_id, asyncio.Lock())
        start = time.perf_counter()
        async with lock:
            pair = await self._pair_for(plan)
            header = KVTransferHeader(
                request_id=plan.request_id, transfer_id=plan.transfer_id, pair_id=pair.pair_id,
                tp_rank=self.tp_rank, shape=tuple(kv.shape), dtype=str(kv.dtype).removeprefix("torch."),
                first_token_id=first_token_id, first_token_logprobs=first_token_logprobs,
                sent_at=time.time())
            try:
                await endpoint.mailbox.post(header)
                if self.stall_s:
                    await asyncio.sleep(self.stall_s)
                await asyncio.to_thread(self._send_bytes, pair.comm, kv)
            except BaseException as exc:
                self._drop(endpoint.endpoint_id)
                self.stats.num_failures += 1
                if isinstance(exc, KVTransferError):
                    raise
                if isinstance(exc, Exception):
                    raise KVTransferError(f"sending KV of {plan.request_id} failed: {exc!r}") from exc
                raise
        seconds = time.perf_counter() - start
        self.stats.add(kv.numel() * kv.element_size(), seconds)
        return seconds

    def _send_bytes(self, comm: PairCommunicator, kv: torch.Tensor) -> None:
        # A CPU transport (gloo) for a GPU engine: the copy to the host is made here, on the
        # sender's thread, not on the engine's.
        comm.send(kv.to(self.backend.device) if kv.device != self.backend.device else kv, self.timeout_s)

    async def _pair_for(self, plan: KVTransferPlan) -> _Pair:
        endpoint = plan.endpoint
        pair = self._pairs.get(endpoint.endpoint_id)
        if pair is not None:
            return pair
        pair_id = f"{self.sender_id}/{self.tp_rank}->{endpoint.endpoint_id}/{uuid.uuid4().hex[:8]}"
        info = self.backend.new_rendezvous()
        await endpoint.mailbox.post(PairRendezvous(pair_id=pair_id, tp_rank=self.tp_rank, info=info))
        comm = await asyncio.to_thread(self.backend.connect, info, 0, self.timeout_s)
        pair = self._pairs[endpoint.endpoint_id] = _Pair(pair_id, comm)
        logger.info("KV pair %s connected (%s)", pair_id, self.backend.kind.value)
        return pair

    def _drop(self, endpoint_id: str) -> None:
        pair = self._pairs.pop(endpoint_id, None)
        if pair is not None:
            pair.comm.close()

    def close(self) -> None:
        for endpoint_id in list(self._pairs):
            self._drop(endpoint_id)


ArrivalCallback = Callable[[KVArrival], Optional[Awaitable[None]]]


class KVReceiver:
    def __init__(self, backend: CommunicatorBackend, mailbox: Mailbox, on_arrival: ArrivalCallback,
                 timeout_s: float = 30.0, timeline: Optional[StepTimeline] = None) -> None:
        self.backend = backend
        self.timeline = timeline  # None: nothing recorded
        self.mailbox = mailbox
        self.on_arrival = on_arrival
        self.timeout_s = timeout_s
        self.stats = KVTransferStats()
        self._queues: dict[str, asyncio.Queue] = {}  # pair id -> its messages, in order
        self._tasks: dict[str, asyncio.Task] = {}
        self._stopped = False

    async def run(self, poll_s: float = 1.0) -> None:
        """Reads the mailbox until ``stop()``; one worker task per pair."""
        while not self._stopped:
            try:
                message = await self.mailbox.next(poll_s)
            except Exception as exc:  # mailbox gone: the replica is shutting down
                logger.warning("KV mailbox read failed: %r", exc)
                await asyncio.sleep(poll_s)
                continue
            if message is None:
                continue
            pair_id = message.pair_id
            if pair_id not in self._queues:
                self._queues[pair_id] = asyncio.Queue()
                self._tasks[pair_id] = asyncio.get_running_loop().create_task(self._serve_pair(pair_id))
            self._queues[pair_id].put_nowait(message)

    def stop(self) -> None:
        self._stopped = True
        for task in self._tasks.values():
            task.cancel()

    async def _serve_pair(self, pair_id: str) -> None:
        comm: Optional[PairCommunicator] = None
        broken: Optional[str] = None
        queue = self._queues[pair_id]
        try:
            while True:
                message = await queue.get()
                if isinstance(message, PairRendezvous):
                    try:
                        comm = await asyncio.to_thread(self.backend.connect, message.info, 1, self.timeout_s)
                    except KVTransferError as exc:
                        broken = f"pair {pair_id} could not connect: {exc}"
                    continue
                if isinstance(message, KVTransferHeader):
                    if comm is None:
                        await self._deliver(KVArrival(message, error=broken or f"unknown pair {pair_id}"))
                        continue
                    arrival = await self._receive(comm, message)
                    if arrival.error is not None:
                        comm.close()
                        comm, broken = None, f"pair {pair_id} broke: {arrival.error}"
                    await self._deliver(arrival)
        finally:
            if comm is not None:
                comm.close()
            self._queues.pop(pair_id, None)
            self._tasks.pop(pair_id, None)

    async def _receive(self, comm: PairCommunicator, header: KVTransferHeader) -> KVArrival:
        started = time.monotonic()  # the timeline's clock, and the transfer's
        dtype = _DTYPES.get(header.dtype)
        if dtype is None:
            return KVArrival(header, error=f"unsupported KV dtype {header.dtype!r}")
        # On this (the event loop's) thread: a device allocation here may block the loop.
        kv = comm.empty(header.shape, dtype, self.backend.device)
        allocated = time.monotonic()
        num_bytes = kv.numel() * kv.element_size()
        try:
            await asyncio.to_thread(comm.recv, kv, self.timeout_s)
        except KVTransferError as exc:
            self.stats.num_failures += 1
            self._record(header, started, allocated, num_bytes, str(exc))
            return KVArrival(header, error=f"receiving the KV failed: {exc}")
        ended = self._record(header, started, allocated, num_bytes, None)
        seconds = ended - started
        self.stats.add(num_bytes, seconds)
        return KVArrival(header, kv=kv, transfer_s=seconds, num_bytes=num_bytes)

    def _record(self, header: KVTransferHeader, started: float, allocated: float, num_bytes: int,
                error: Optional[str]) -> float:
        """Records the receive on the timeline (if any); returns its end (``time.monotonic``)."""
        ended = time.monotonic()
        if self.timeline is not None:
            self.timeline.record(KVRecv(started, ended, allocated, header.request_id, num_bytes, error))
        return ended

    async def _deliver(self, arrival: KVArrival) -> None:
        try:
            result = self.on_arrival(arrival)
            if asyncio.iscoroutine(result):
                await result
        except Exception:  # the engine side logs; the pair keeps serving
            logger.exception("KV arrival handler failed for %s", arrival.header.request_id)
