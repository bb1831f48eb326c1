"""Disaggregated serving in the Serve app: the two pool deployments and the ingress-side flow.

    ingress (DisaggregatedFlow, one per request)
      1 ──GenerateRequest──▶ DecodeServer.generate_remote   (decode pool: Serve's load-aware router)
        ◀── KVTransferPlan (blocks reserved under a lease), or None: "computed here"
      2 ──(GenerateRequest, plan)──▶ PrefillServer.prefill   (prefill pool: prefix-aware router)
        ◀── PrefillReply: first token (streamed to the client now: TTFT), queue/prefill times
             └─ the prefill replica sends the KV to the decode replica's pair (gloo / NCCL)
      (``overlap_prefill``: 1 and 2 start together, the prefill with no plan; its KV is parked
       until the ingress posts the plan to the reply's ``plan_mailbox``, so TTFT does not
       include the reservation's round trip)
      3 ◀── decode stream: OutputDeltas from token 0 (the first token again), until finished
             (over the ingress's stream channel when it has one, router/stream_channel.py;
              Serve's stream then ends with ChannelEnd(number of deltas))

Outputs reach the client in order through one stream of ``OutputDelta``s: the
prefill reply becomes the first delta, and a ``DeltaTrimmer`` cuts from the
decode stream what the client already has (the first token; after a retry,
everything up to where the lost replica got). The decode replica streams deltas
(not cumulative outputs, whose prompt ids and growing token lists cost
O(tokens so far) to pickle per token), at ``replicas.stream_interval``. Faults:

* prefill replica dies or the transfer stalls: the decode side's lease expires
  (or the pair reports the error) and it recomputes the prompt or fails the
  request with a clear error (``on_transfer_failure``); the flow keeps reading
  the decode stream either way.
* decode replica dies: the flow restarts the request (new reservation, prefill
  again, mostly prefix-cache hits) on another decode replica, up to
  ``max_decode_retries`` times, skipping tokens the client already has. The
  ingress fixes the request's seed first, so the retry samples the same tokens.
  A retry is a new engine request, ``<request id>-retry<n>``, so frames the lost
  replica left on the stream channel can never mix into its stream.

Both pools keep the engine in the replica's process (``in_process_engine_factory``), whatever
``KVMESH_ENGINE_PROCESS`` says: the KV transfer needs the engine's tensors there.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
from dataclasses import dataclass
from typing import Any, AsyncIterator, Optional

from engine.gc_freeze import freeze_startup_heap
from router.config import DeploymentConfig, DisaggregationConfig
from router.deltas import DeltaTracker, DeltaTrimmer, OutputDelta
from router.messages import GenerateRequest
from router.replica import EngineFactory, LLMServer, in_process_engine_factory
from router.stream_channel import ChannelStream, StreamReceiver

logger = logging.getLogger(__name__)

PREFILL_POOL = "prefill"
DECODE_POOL = "decode"
# Errors meaning "that replica is gone" (by class name: they come from Ray and Serve).
_REPLICA_GONE = {"RayActorError", "ActorDiedError", "ActorUnavailableError", "EngineDeadError",
                 "DeploymentUnavailableError", "ReplicaUnavailableError"}


@dataclass
class PrefillReply:
    replica_id: str
    output: Any  # engine.outputs.RequestOutput: the first token (final if it ended the request)
    timings: Any  # engine.kv_transfer.plan.PrefillTimings
    plan_mailbox: Any = None  # deferred plan: where to post it (router.kv_mailbox.ChannelMailbox)


def _backend(cfg: DeploymentConfig):
    from engine.executor import resolve_device
    from engine.kv_transfer.base import create_backend
    try:
        import ray
        host = ray.util.get_node_ip_address()
    except Exception:
        host = "127.0.0.1"
    return create_backend(cfg.disaggregation.transport, resolve_device(cfg.engine), host=host)


class PrefillServer(LLMServer):
    """A prefill-pool replica: computes prompts and sends their KV to decode replicas."""

    pool = PREFILL_POOL

    async def __init__(self, cfg: DeploymentConfig, board: Any = None,
                       engine_factory: Optional[EngineFactory] = None) -> None:
        from engine.kv_transfer.connector import PrefillConnector
        from router.kv_mailbox import ChannelMailbox
        cfg = dataclasses.replace(cfg, engine=cfg.pool_engine_config(cfg.disaggregation.prefill))
        await super().__init__(cfg, board, engine_factory or in_process_engine_factory)
        self.connector = PrefillConnector(self.engine, _backend(cfg), f"prefill-{self.replica_id}",
                                          timeout_s=cfg.disaggregation.transfer_timeout_s)
        # Deferred plans (disaggregation.overlap_prefill) come here, one TCP frame each.
        self.plan_mailbox = await ChannelMailbox.create()
        self._plan_reader = asyncio.get_running_loop().create_task(self._read_plans())
        freeze_startup_heap()  # the transport's imports (CuPy, NCCL) too

    async def prefill(self, req: GenerateRequest, plan: Any) -> PrefillReply:
        """Computes the prompt and the first token; the KV goes to ``plan``'s endpoint in the
        background. ``plan`` None: the decode side is reserving meanwhile; the KV is parked
        until its plan is posted to the reply's ``plan_mailbox``."""
        from engine.kv_transfer.plan import DeferredPlan
        output, timings = await self.connector.prefill(
            req.prompt_token_ids, req.sampling_params, req.request_id,
            plan or DeferredPlan(req.request_id), priority=req.priority)
        return PrefillReply(self.replica_id, output, timings, None if plan else self.plan_mailbox)

    async def _read_plans(self) -> None:
        while True:
            try:
                plan = await self.plan_mailbox.next(1.0)
                if plan is not None:
                    self.connector.deliver_plan(plan)
                self.connector.drop_expired()
            except asyncio.CancelledError:
                raise
            except Exception:  # a bad message must not end the reader
                logger.exception("prefill replica %s: reading a plan failed", self.replica_id)

    def inject_transfer_stall(self, seconds: float) -> None:
        """Fault injection (tests): pause every send between its header and its bytes."""
        self.connector.sender.stall_s = seconds

    def get_stats(self) -> dict:
        stats = super().get_stats()
        sender = self.connector.sender.stats
        stats.update(kv_sends=sender.num_transfers, kv_send_failures=sender.num_failures,
                     kv_bytes_sent=sender.num_bytes, kv_send_s=round(sender.seconds, 6),
                     kv_parked=self.connector.num_parked)
        return stats


class DecodeServer(LLMServer):
    """A decode-pool replica: reserves blocks, receives the prompt's KV, decodes."""

    pool = DECODE_POOL
    # The decode pool's router picks by load and free blocks (DecodeRequestRouter), never by
    # prefix: a list of every cached block would only cost each ingress the parsing.
    reports_block_hashes = False

    async def __init__(self, cfg: DeploymentConfig, board: Any = None,
                       engine_factory: Optional[EngineFactory] = None) -> None:
        from engine.kv_transfer.connector import DecodeConnector
        from router.kv_mailbox import ChannelMailbox
        cfg = dataclasses.replace(cfg, engine=cfg.pool_engine_config(cfg.disaggregation.decode))
        await super().__init__(cfg, board, engine_factory or in_process_engine_factory)
        # Headers come over a direct TCP channel, not a mailbox actor's two Ray hops.
        self.connector = DecodeConnector(self.engine, _backend(cfg), await ChannelMailbox.create(),
                                         f"decode-{self.replica_id}",
                                         timeout_s=cfg.disaggregation.transfer_timeout_s)
        self.connector.start()
        freeze_startup_heap()  # the transport's imports (CuPy, NCCL) too

    async def generate_remote(self, req: GenerateRequest) -> AsyncIterator[Any]:
        """First the ``KVTransferPlan`` for a prefill replica (None: computed here), then
        ``OutputDelta``s from the request's first token on (the first carries the KV transfer's
        bytes and seconds when the prompt's KV came from a prefill replica). With
        ``req.stream_to`` set the deltas go over the stream channel and the last item is a
        ``ChannelEnd`` (``LLMServer._deliver``); the plan always comes through Serve."""
        disagg, replicas = self.cfg.disaggregation, self.cfg.replicas
        stream = self.connector.generate(req.prompt_token_ids, req.sampling_params, req.request_id,
                                         disagg.lease_timeout_s, disagg.min_remote_tokens,
                                         disagg.on_transfer_failure, priority=req.priority,
                                         stream_interval=replicas.stream_interval,
                                         max_outputs_per_step=replicas.max_stream_updates_per_step)
        outputs = self._guarded(req.request_id, stream)
        async for plan in outputs:  # the first item
            yield plan
            break
        async for item in self._deliver(req, self._decode_deltas(outputs)):
            yield item

    async def _decode_deltas(self, outputs: AsyncIterator[Any]) -> AsyncIterator[OutputDelta]:
        tracker = DeltaTracker(self.replica_id)
        transfer_reported = False
        async for item in outputs:
            delta = tracker.update(item)
            if delta is None:
                continue
            metrics = getattr(item, "metrics", None)
            if not transfer_reported and metrics is not None and metrics.kv_transfer_bytes:
                delta.kv_transfer, transfer_reported = (metrics.kv_transfer_bytes, metrics.kv_transfer_s or 0.0), True
            yield delta

    def get_stats(self) -> dict:
        stats = super().get_stats()
        receiver = self.connector.receiver.stats
        engine = getattr(self.engine, "engine", None)
        stats.update(num_waiting_for_kv=self.engine.get_stats().num_waiting_for_kv,
                     kv_recvs=receiver.num_transfers, kv_recv_failures=receiver.num_failures,
                     kv_bytes_received=receiver.num_bytes, kv_recv_s=round(receiver.seconds, 6),
                     kv_recomputes=getattr(engine, "num_kv_recomputes", 0))
        return stats


# ---- the ingress side ---------------------------------------------------------------------------
class DisaggregatedFlow:
    """Runs requests through the two pools (one ``start`` per request); see the module docstring."""

    def __init__(self, cfg: DisaggregationConfig, prefill_handle: Any, decode_handle: Any,
                 metrics: Any = None) -> None:
        self.cfg = cfg
        self.prefill = prefill_handle
        self.decode = decode_handle
        self.metrics = metrics  # router.metrics.ServingMetrics or None
        self._rng = random.Random()

    def start(self, req: GenerateRequest, receiver: Optional[StreamReceiver] = None) -> "DisaggregatedStream":
        """``receiver`` (started): the decode deltas come over the ingress's stream channel."""
        if req.sampling_params.seed is None:  # a retry must sample what the client already has
            params = dataclasses.replace(req.sampling_params, seed=self._rng.randrange(1 << 31))
            req = dataclasses.replace(req, sampling_params=params)
        return DisaggregatedStream(self, req, receiver)


class DisaggregatedStream:
    """One request's merged stream: ``OutputDelta``s in order; ``cancel()`` stops both pools' calls."""

    def __init__(self, flow: DisaggregatedFlow, req: GenerateRequest,
                 receiver: Optional[StreamReceiver] = None) -> None:
        self.flow = flow
        self.req = req
        self.receiver = receiver  # None: the decode deltas are Serve stream items
        self.decode_replica_id: Optional[str] = None  # tests: whom to kill
        self.plan: Any = None
        self.num_retries = 0  # decode replicas lost and replaced by another
        self.kv_transfer: Optional[tuple[int, float]] = None  # (bytes, s) when the KV came over a pair
        self._calls: list[Any] = []
        self._trimmer = DeltaTrimmer()  # what the client has, per choice

    def __aiter__(self) -> AsyncIterator[OutputDelta]:
        return self._run()

    def cancel(self) -> None:
        for call in self._calls:
            call.cancel()

    async def _run(self) -> AsyncIterator[OutputDelta]:
        flow = self.flow
        attempt = 0
        while True:
            try:
                async for item in self._attempt(attempt):
                    yield item
                return
            except Exception as exc:  # noqa: BLE001 - classified below
                gone = {cls.__name__ for cls in type(exc).__mro__} & _REPLICA_GONE
                if not gone or attempt >= flow.cfg.max_decode_retries:
                    raise
                attempt += 1
                self.num_retries = attempt
                logger.warning("request %s: decode replica %s is gone (%s); retrying on another",
                               self.req.request_id, self.decode_replica_id, type(exc).__name__)
                self._count("decode_retry")

    async def _attempt(self, attempt: int) -> AsyncIterator[OutputDelta]:
        flow, req, receiver = self.flow, self.req, self.receiver
        if attempt:  # a new engine request on another replica; its own channel subscription
            req = dataclasses.replace(req, request_id=f"{req.request_id}-retry{attempt}")
        if receiver is not None:
            req = dataclasses.replace(req, stream_to=receiver.address)
            queue = receiver.subscribe(req.request_id)  # before the call: deltas may precede the plan
        try:
            decode = flow.decode.options(stream=True).generate_remote.remote(req)
            self._calls.append(decode)
            # overlap_prefill: the prefill runs while the decode side reserves; its first token
            # does not wait for the plan, which then goes to the prefill replica's mailbox.
            overlap = flow.cfg.overlap_prefill and req.sampling_params.n == 1
            plan = reply = None
            if not overlap:
                plan = await self._take_plan(decode)
            if overlap or plan is not None:
                reply = await self._prefill(req, plan)  # plan None: the KV is parked for it
                if reply is not None:
                    item = self._first_delta(reply)
                    if item is not None:
                        yield item
                    if reply.output.finished:  # the first token ended it: free the reservation
                        decode.cancel()
                        return
            if overlap:
                plan = await self._take_plan(decode)  # None: computed there; the parked KV expires
                if plan is not None and reply is not None:
                    await self._post_plan(reply, plan)
            deltas: Any = decode
            if receiver is not None:  # the rest of the Serve stream is the ChannelEnd
                deltas = ChannelStream(receiver, req.request_id, queue, decode)
                self._calls[self._calls.index(decode)] = deltas  # its cancel() spares a finished call
            source = self._trimmer.new_source()
            async for delta in deltas:
                if self.decode_replica_id is None:
                    self.decode_replica_id = delta.replica_id
                if delta.kv_transfer is not None and self.kv_transfer is None:
                    self.kv_transfer = delta.kv_transfer
                    self._observe_transfer(*delta.kv_transfer)
                forwarded = source.trim(delta)
                if forwarded is not None:
                    yield forwarded
        finally:
            if receiver is not None:
                receiver.unsubscribe(req.request_id)

    async def _take_plan(self, decode: Any) -> Any:
        """The decode call's first item: its ``KVTransferPlan``, or None (computed there)."""
        plan = self.plan = await decode.__anext__()
        if plan is not None:
            self.decode_replica_id = plan.endpoint.endpoint_id.removeprefix("decode-")
        self._count("local" if plan is None else "remote")
        return plan

    def _first_delta(self, reply: PrefillReply) -> Optional[OutputDelta]:
        self._observe_prefill(reply)
        first = DeltaTracker(reply.replica_id).update(reply.output)
        return self._trimmer.new_source().trim(first) if first is not None else None

    async def _post_plan(self, reply: PrefillReply, plan: Any) -> None:
        try:
            await reply.plan_mailbox.post(plan)
        except Exception as exc:  # noqa: BLE001 - the prefill replica is gone: the lease covers it
            logger.warning("request %s: the plan did not reach prefill replica %s (%r); the decode "
                           "side takes over", self.req.request_id, reply.replica_id, exc)
            self._count("prefill_failed")

    async def _prefill(self, req: GenerateRequest, plan: Any) -> Optional[PrefillReply]:
        call = self.flow.prefill.prefill.remote(req, plan)
        self._calls.append(call)
        try:
            return await call
        except Exception as exc:  # noqa: BLE001
            if isinstance(exc, ValueError) or not {c.__name__ for c in type(exc).__mro__} & _REPLICA_GONE:
                raise
            # The decode side's lease covers it: it recomputes the prompt or fails the request.
            logger.warning("request %s: prefill replica failed (%s); the decode side takes over",
                           req.request_id, type(exc).__name__)
            self._count("prefill_failed")
            return None

    # ---- metrics ------------------------------------------------------------------------------
    def _count(self, path: str) -> None:
        if self.flow.metrics is not None:
            self.flow.metrics.disagg_requests.labels(path).inc()

    def _observe_prefill(self, reply: PrefillReply) -> None:
        metrics = self.flow.metrics
        if metrics is not None:
            metrics.ttft_phase.labels("queue").observe(reply.timings.queue_s)
            metrics.ttft_phase.labels("prefill").observe(reply.timings.prefill_s)

    def _observe_transfer(self, num_bytes: int, seconds: float) -> None:
        metrics = self.flow.metrics
        if metrics is not None:
            metrics.ttft_phase.labels("transfer").observe(seconds)
            metrics.kv_transfer_bytes.inc(num_bytes)
            metrics.kv_transfer_seconds.observe(seconds)
