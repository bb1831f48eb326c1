"""One replica's side of disaggregated serving: its ``AsyncLLM`` plus a sender or a receiver.

    PrefillConnector.prefill(plan) ── AsyncLLM.prefill ──▶ first output ──▶ returned at once (TTFT)
                                                      └──▶ staged KV ──▶ KVSender.send (background)
    DecodeConnector.generate()  ── AsyncLLM.generate_with_remote_prefill ──▶ reservation, outputs
    DecodeConnector's KVReceiver (mailbox loop) ──KVArrival──▶ AsyncLLM.deliver_kv

The prefill side answers as soon as the first token is sampled; the bytes
follow on the pair while the client already reads that token. A send that
fails is only logged here: the decode side's lease covers it (recompute or fail).

With a ``DeferredPlan`` (the ingress ran the decode side's reservation alongside the
prefill, ``disaggregation.overlap_prefill``) the staged KV of every prompt block is
parked until ``deliver_plan`` brings the plan, then sent from the plan's first block.
A parked export whose plan does not come within ``timeout_s`` is dropped.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import Any, AsyncIterator, Optional

from engine.kv_transfer.base import CommunicatorBackend, KVTransferError
from engine.kv_transfer.blocks import blocks_from
from engine.kv_transfer.mailbox import Mailbox
from engine.kv_transfer.plan import (DeferredPlan, KVEndpoint, KVExport, KVReservation, KVTransferPlan,
                                     PrefillTimings, TransferFailurePolicy)
from engine.kv_transfer.transport import KVReceiver, KVSender

logger = logging.getLogger(__name__)


class PrefillConnector:
    def __init__(self, engine: Any, backend: CommunicatorBackend, sender_id: Optional[str] = None,
                 timeout_s: float = 30.0) -> None:
        self.engine = engine  # AsyncLLM
        self.sender = KVSender(backend, sender_id or f"prefill-{uuid.uuid4().hex[:8]}", timeout_s=timeout_s)
        self.timeout_s = timeout_s
        self._sends: set[asyncio.Task] = set()
        self._parked: dict[str, tuple[KVExport, float]] = {}  # deferred: request id -> (export, deadline)

    async def prefill(self, prompt: Any, params: Any, request_id: str, plan: "KVTransferPlan | DeferredPlan",
                      priority: int = 0) -> tuple[Any, PrefillTimings]:
        """The first output (final if the first token ended the request) and where the time went."""
        output, export = await self.engine.prefill(prompt, params, request_id, plan, priority=priority)
        metrics = output.metrics
        timings = PrefillTimings()
        if metrics is not None and metrics.first_scheduled_time is not None:
            timings.queue_s = metrics.first_scheduled_time - metrics.arrival_time
            timings.prefill_s = (metrics.first_token_time or time.monotonic()) - metrics.first_scheduled_time
            timings.num_cached_tokens = metrics.num_cached_tokens
        self.drop_expired()
        if export is not None and isinstance(export.plan, DeferredPlan):
            self._parked[request_id] = (export, time.monotonic() + self.timeout_s)
        elif export is not None:
            self._start_send(export)
        return output, timings

    def deliver_plan(self, plan: KVTransferPlan) -> bool:
        """Sends a parked export's blocks from the plan's first one on; False if none is parked
        (its plan came too late, or its first token ended the request)."""
        parked = self._parked.pop(plan.request_id, None)
        if parked is None:
            logger.info("plan for %s: no KV parked for it", plan.request_id)
            return False
        export, first = parked[0], plan.reservation.first_block_index
        if export.kv.shape[2] - first != plan.reservation.num_blocks:
            logger.warning("plan for %s wants %d blocks from %d; %d are parked", plan.request_id,
                           plan.reservation.num_blocks, first, export.kv.shape[2])
            return False  # the decode side's lease covers it
        self._start_send(KVExport(plan, export.kv, export.first_token_id, export.first_token_logprobs), first)
        return True

    def drop_expired(self) -> None:
        now = time.monotonic()
        for request_id in [r for r, (_, deadline) in self._parked.items() if deadline < now]:
            del self._parked[request_id]
            logger.info("dropped the parked KV of %s: no plan came within %.1fs", request_id, self.timeout_s)

    @property
    def num_parked(self) -> int:
        return len(self._parked)

    def _start_send(self, export: KVExport, first_block: int = 0) -> None:
        task = asyncio.get_running_loop().create_task(self._send(export, first_block))
        self._sends.add(task)
        task.add_done_callback(self._sends.discard)

    async def _send(self, export: KVExport, first_block: int = 0) -> None:
        try:
            kv = await asyncio.to_thread(blocks_from, export.kv, first_block) if first_block else export.kv
            await self.sender.send(export.plan, kv, export.first_token_id, export.first_token_logprobs)
        except KVTransferError as exc:
            logger.warning("KV of %s not delivered: %s", export.plan.request_id, exc)

    @property
    def num_sends_in_flight(self) -> int:
        return len(self._sends)

    def close(self) -> None:
        for task in self._sends:
            task.cancel()
        self._parked.clear()
        self.sender.close()


class DecodeConnector:
    def __init__(self, engine: Any, backend: CommunicatorBackend, mailbox: Mailbox,
                 endpoint_id: Optional[str] = None, timeout_s: float = 30.0) -> None:
        self.engine = engine  # AsyncLLM
        self.endpoint = KVEndpoint(endpoint_id or f"decode-{uuid.uuid4().hex[:8]}", mailbox)
        self.receiver = KVReceiver(backend, mailbox, engine.deliver_kv, timeout_s=timeout_s,
                                   timeline=getattr(engine, "timeline", None))  # AsyncLLM's, if on
        self._task: Optional[asyncio.Task] = None

    def start(self) -> None:
        """Starts reading the mailbox on the running event loop."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self.receiver.run())

    async def generate(self, prompt: Any, params: Any, request_id: str, lease_timeout_s: float,
                       min_remote_tokens: int = 1,
                       on_failure: TransferFailurePolicy = TransferFailurePolicy.RECOMPUTE,
                       priority: int = 0, stream_interval: int = 1,
                       max_outputs_per_step: Optional[int] = None) -> AsyncIterator[Optional[KVTransferPlan] | Any]:
        """First the ``KVTransferPlan`` to hand to a prefill replica (None: computed here), then outputs
        (every ``stream_interval`` tokens, widened under load; ``AsyncLLM.generate``'s)."""
        async for item in self.engine.generate_with_remote_prefill(
                prompt, params, request_id, lease_timeout_s, min_remote_tokens, on_failure, priority,
                stream_interval=stream_interval, max_outputs_per_step=max_outputs_per_step):
            if item is None or isinstance(item, KVReservation):
                yield KVTransferPlan(item, self.endpoint) if item is not None else None
            else:
                yield item

    def close(self) -> None:
        self.receiver.stop()
        if self._task is not None:
            self._task.cancel()
