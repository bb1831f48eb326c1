"""The engine replica deployment (``LLMServer``) and the board where replicas post their stats.

    ingress ──GenerateRequest──▶ LLMServer.generate_deltas ──▶ AsyncLLM.generate
            ◀──OutputDelta (new tokens/text only; router/deltas.py)────────┘
    (over the direct stream channel when the request names one (``stream_to``): one frame per
     loop turn per ingress, router/stream_channel.py, and Serve's stream carries only the
     final ``ChannelEnd``; else each delta is a Serve stream item)
    (one delta per ``replicas.stream_interval`` tokens, the first token alone; widened
     under load so a step streams about ``replicas.max_stream_updates_per_step`` deltas)
    (``LLMServer.generate`` streams ReplicaOutput(replica_id, RequestOutput), cumulative,
     for callers holding a handle to the replicas directly)
    LLMServer.step_timeline_summary() ◀── benchmarks (KVMESH_STEP_TIMELINE=1: where ITL stalls came from)
    LLMServer ──every stats_period_s──▶ ReplicaStatsBoard ◀── ingress (/metrics, /health,
                                                               admission, kvmesh status)
    Serve's request router ◀── LLMServer.record_routing_stats() (ReplicaStats.to_dict())

Invariants:
- A replica owns exactly one ``AsyncLLM``; it never tokenizes or renders (the ingress did).
- A ``generate`` call that ends early (client gone, Serve cancels the call) aborts
  the engine request before the cancellation propagates, so its KV blocks are free;
  so does a stream-channel send that fails (the call then raises).
- The board keeps the latest report of each replica for ``ttl_s``; a replica that
  stops reporting (dead, scaled down) drops out of the ingress's view by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
from typing import Any, AsyncIterator, Callable, Optional

from engine.config import EngineConfig
from router.config import DeploymentConfig
from router.deltas import DeltaTracker, OutputDelta
from router.messages import GenerateRequest, ReplicaOutput, ReplicaStats
from router.stream_channel import ChannelEnd
from router.stream_sender import StreamSender

logger = logging.getLogger(__name__)

EngineFactory = Callable[[EngineConfig], Any]  # returns an object with the AsyncLLM API


ENGINE_PROCESS_ENV = "KVMESH_ENGINE_PROCESS"  # "1": the engine runs in a child process of the replica


def engine_process_from_env() -> bool:
    return os.environ.get(ENGINE_PROCESS_ENV, "0").strip().lower() in ("1", "true", "yes", "on")


def _default_engine_factory(config: EngineConfig) -> Any:
    """``AsyncLLM``; with ``KVMESH_ENGINE_PROCESS=1`` its engine runs in a child process
    (``engine/engine_process.py``: the step loop off the replica's GIL)."""
    from engine import AsyncLLM  # torch is imported here, in the replica only
    return AsyncLLM.from_config(config, engine_process=engine_process_from_env())


def in_process_engine_factory(config: EngineConfig) -> Any:
    """``AsyncLLM`` with the engine in this process, whatever the environment says (the
    disaggregated pools: their KV transfer needs the engine's tensors here)."""
    from engine import AsyncLLM
    return AsyncLLM.from_config(config)


def _replica_id() -> str:
    try:
        from ray import serve
        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # outside Serve (unit tests)
        return uuid.uuid4().hex[:8]


class LLMServer:
    """One engine replica. Deployed by ``router.app.build_app`` with the config's resources."""

    pool = "colocated"  # PrefillServer / DecodeServer (router/disagg.py) name theirs
    reports_block_hashes = True  # the routing stats carry the prefix cache (record_routing_stats)

    async def __init__(self, cfg: DeploymentConfig, board: Any = None,
                       engine_factory: Optional[EngineFactory] = None) -> None:
        self.cfg = cfg
        self.replica_id = _replica_id()
        self.engine = (engine_factory or _default_engine_factory)(cfg.engine)
        self.board = board
        self._sender = StreamSender()  # the stream channel to every ingress (one connection each)
        self._started_at = time.time()
        self._next_block_report = 0.0  # the first routing stats carry the prefix cache
        self._publisher: Optional[asyncio.Task] = None
        # With the engine's step timeline on (KVMESH_STEP_TIMELINE=1), watch this loop's lag too.
        self._lag_probe: Optional[asyncio.Task] = None
        timeline = getattr(self.engine, "timeline", None)
        if timeline is not None:
            self._lag_probe = asyncio.get_running_loop().create_task(timeline.watch_loop_lag())
        if board is not None:
            await self._publish_once()  # visible to the ingress as soon as Serve marks us ready
            self._publisher = asyncio.get_running_loop().create_task(self._publish_loop())

    # ---- requests -----------------------------------------------------------------------------
    async def generate(self, req: GenerateRequest) -> AsyncIterator[Any]:
        """Streams the engine's cumulative ``RequestOutput``s for one request, each in a
        ``ReplicaOutput`` naming this replica.

        Raises ``ValueError`` (before any output) for a request the engine rejects.
        """
        stream = self.engine.generate(req.prompt_token_ids, req.sampling_params, req.request_id,
                                      priority=req.priority)
        async for out in self._guarded(req.request_id, stream):
            yield ReplicaOutput(self.replica_id, out)

    async def generate_deltas(self, req: GenerateRequest, trace: bool = False) -> AsyncIterator[OutputDelta]:
        """Streams the request's outputs as ``OutputDelta``s: only what is new since the
        previous item (the ingress's path; ``generate`` is the cumulative one).

        ``trace`` (the ``x-kvmesh-trace`` debug header) adds ``time.monotonic()`` stamps of
        the request's way through this replica and its engine to the first delta.
        With ``req.stream_to`` set the deltas go over the stream channel and this yields
        one ``ChannelEnd`` (``_deliver``).
        Raises ``ValueError`` (before any output) for a request the engine rejects.
        """
        async for item in self._deliver(req, self._deltas(req, trace)):
            yield item

    async def _deltas(self, req: GenerateRequest, trace: bool) -> AsyncIterator[OutputDelta]:
        received = time.monotonic()
        tracker = DeltaTracker(self.replica_id)
        # ``replicas.stream_interval`` tokens per delta (the first token alone), widened under
        # load by ``max_stream_updates_per_step``: fewer items through the engine hand-off,
        # Serve's streaming and the ingress (a 1-token delta per step costs each of them the
        # same Python work as a 16-token one).
        replicas = self.cfg.replicas
        stream = self.engine.generate(req.prompt_token_ids, req.sampling_params, req.request_id,
                                      priority=req.priority, stream_interval=replicas.stream_interval,
                                      max_outputs_per_step=replicas.max_stream_updates_per_step)
        async for out in self._guarded(req.request_id, stream):
            delta = tracker.update(out)
            if delta is None:
                continue
            if trace:
                delta.trace, trace = _trace_stamps(received, out), False
            yield delta

    async def _deliver(self, req: GenerateRequest, deltas: AsyncIterator[OutputDelta]) -> AsyncIterator[Any]:
        """The Serve stream of ``deltas``: the deltas themselves, or, when the request names a
        stream channel, nothing until the end and then ``ChannelEnd(number of deltas sent)``,
        yielded once the last frame is written (so the ingress knows how many to wait for).

        Each delta is handed to the sender, which writes what this loop turn produced, for all
        requests to the same ingress, as one frame. A failed send raises here, which fails the
        Serve call and (closing ``deltas``) aborts the engine request.
        """
        if req.stream_to is None:
            async for delta in deltas:
                yield delta
            return
        sink = self._sender.open(req.stream_to, req.request_id)
        async with contextlib.aclosing(deltas):
            async for delta in deltas:
                sink.put(delta)
        yield ChannelEnd(await sink.flush())

    async def _guarded(self, request_id: str, stream: AsyncIterator[Any]) -> AsyncIterator[Any]:
        """Relays an engine stream; if the caller goes away first, aborts the request (frees its blocks)."""
        finished = False
        try:
            async for item in stream:
                finished = bool(getattr(item, "finished", False))
                yield item
        except asyncio.CancelledError:
            # The caller went away: free the request's KV blocks before we stop.
            if not finished:
                await asyncio.shield(self.engine.abort(request_id))
            raise
        except GeneratorExit:
            if not finished:
                asyncio.get_running_loop().create_task(self.engine.abort(request_id))
            raise

    async def abort(self, request_id: str) -> None:
        await self.engine.abort(request_id)

    def model_info(self) -> dict:
        """What the ingress needs to render, tokenize and validate prompts like the engine."""
        engine = self.engine
        model_path = getattr(getattr(engine, "engine", None), "model_path", None)
        return {
            "model": self.cfg.engine.model.model,
            "model_path": str(model_path) if model_path else None,
            "tokenizer": self.cfg.engine.model.tokenizer,
            "max_model_len": int(engine.max_model_len),
            "block_size": int(engine.config.cache.block_size),
        }

    # ---- health and stats ---------------------------------------------------------------------
    def check_health(self) -> None:
        """Called by Serve periodically; raising makes Serve replace this replica."""
        self.engine.check_health()

    def record_routing_stats(self) -> dict:
        """Serve's routing-stats hook: ``ReplicaStats`` for the request router. The prefix
        cache's block hashes go along every ``routing.block_report_period_s`` only (an empty
        list reads "not reported"), and never from a pool whose router ignores them."""
        s = self.engine.get_stats()
        hashes: list[int] = []
        now = time.monotonic()
        if self.reports_block_hashes and now >= self._next_block_report:
            self._next_block_report = now + self.cfg.routing.block_report_period_s
            hashes = list(s.cached_block_hashes)
        stats = ReplicaStats(num_waiting=s.num_waiting, num_running=s.num_running,
                             kv_usage=s.kv_usage, prefix_cache_hit_rate=s.prefix_cache_hit_rate,
                             num_preemptions=s.num_preemptions, cached_block_hashes=hashes).to_dict()
        # Free KV blocks (cached-and-evictable ones included): the decode pool's router
        # (request_router.DecodeRequestRouter) sends prompts only where their blocks fit.
        stats.update(num_free_blocks=int(s.num_free_blocks), num_blocks=int(s.num_blocks))
        return stats

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Serve's custom autoscaling metrics hook: this replica's queue depth and running count."""
        from router.autoscaling import RUNNING_METRIC, WAITING_METRIC
        s = self.engine.get_stats()
        return {WAITING_METRIC: float(s.num_waiting), RUNNING_METRIC: float(s.num_running)}

    def get_stats(self) -> dict:
        """This replica's load and cache figures (no block hashes), for status and /metrics."""
        s = self.engine.get_stats()
        try:
            self.engine.check_health()
            is_healthy = True
        except Exception:
            is_healthy = False
        return {
            "replica_id": self.replica_id,
            "node": socket.gethostname(),
            "pid": os.getpid(),
            "is_healthy": is_healthy,
            "uptime_s": round(time.time() - self._started_at, 1),
            "num_waiting": s.num_waiting,
            "num_running": s.num_running,
            "kv_usage": s.kv_usage,
            "num_blocks": s.num_blocks,
            "num_free_blocks": s.num_free_blocks,
            "prefix_cache_hit_rate": s.prefix_cache_hit_rate,
            "prefix_cache_queries": s.prefix_cache_queries,
            "prefix_cache_hits": s.prefix_cache_hits,
            "num_preemptions": s.num_preemptions,
            "num_prompt_tokens": s.num_prompt_tokens,
            "num_generation_tokens": s.num_generation_tokens,
            "num_cached_blocks": len(s.cached_block_hashes),
            "pool": self.pool,
        }

    def step_timeline_summary(self, top: int = 20, start_s: Optional[float] = None,
                              end_s: Optional[float] = None) -> dict:
        """``engine.step_timeline.summarize`` of this replica's steps and stalls (``start_s`` /
        ``end_s``: a ``time.monotonic()`` window of this host); ``enabled: False`` when the
        timeline is off (``KVMESH_STEP_TIMELINE`` unset, or the engine runs in a child process)."""
        from engine.step_timeline import summarize
        timeline = getattr(self.engine, "timeline", None)
        summary = {"enabled": False} if timeline is None else summarize(timeline, top, start_s=start_s,
                                                                        end_s=end_s)
        summary.update(replica_id=self.replica_id, pool=self.pool)
        return summary

    async def _publish_once(self) -> None:
        try:
            await self.board.report.remote(self.replica_id, self.get_stats())
        except Exception as exc:  # the board is best effort; serving goes on without it
            logger.warning("replica %s could not report stats: %r", self.replica_id, exc)

    async def _publish_loop(self) -> None:
        period = self.cfg.routing.stats_period_s
        while True:
            await asyncio.sleep(period)
            await self._publish_once()

    def __del__(self) -> None:
        for task in (self._publisher, self._lag_probe):
            if task is not None:
                task.cancel()
        self._sender.close()
        try:
            self.engine.shutdown()
        except Exception:
            pass


def _trace_stamps(received: float, out: Any) -> dict[str, float]:
    """Replica and engine stamps (``time.monotonic()``, one clock for the host) of a first output."""
    stamps = {"replica_received": received}
    metrics = getattr(out, "metrics", None)
    for key, attr in (("engine_arrival", "arrival_time"), ("engine_scheduled", "first_scheduled_time"),
                      ("engine_first_token", "first_token_time")):
        value = getattr(metrics, attr, None)
        if value is not None:
            stamps[key] = value
    stamps["replica_first_output"] = time.monotonic()
    return stamps


class ReplicaStatsBoard:
    """Latest ``LLMServer.get_stats()`` of every live replica (a 1-replica Serve deployment)."""

    def __init__(self, ttl_s: float = 3.0) -> None:
        self.ttl_s = ttl_s
        self._reports: dict[str, tuple[float, dict]] = {}

    def report(self, replica_id: str, stats: dict) -> None:
        self._reports[replica_id] = (time.monotonic(), stats)

    def snapshot(self) -> dict[str, dict]:
        """Fresh reports by replica id; stale ones (older than ``ttl_s``) are dropped."""
        now = time.monotonic()
        for replica_id in [r for r, (t, _) in self._reports.items() if now - t > self.ttl_s]:
            del self._reports[replica_id]
        return {replica_id: stats for replica_id, (_, stats) in self._reports.items()}
