"""Ray Serve request router: load-aware prefix affinity over the replica deployment.

Serve builds one ``PrefixAwareRequestRouter`` inside every process holding a
handle to the replica deployment (the ingress replicas) and calls
``initialize_state(**request_router_kwargs)`` once. Per request:

1. ``choose_replicas`` finds the ``GenerateRequest`` among the call's args, asks
   the ``RouterState`` for each candidate's load and matched prefix blocks (one
   Redis round trip when shared), and returns every candidate as its own rank,
   best first (``router.policy.choose``); Serve takes the first with room.
2. When Serve resolves the request's future with a replica, the router counts
   the request in flight there and inserts its block hashes for that replica
   (optimistic: the replica is about to cache them). This happens before the
   next decision of this process, so a burst cannot pile onto one replica.
3. ``on_request_completed`` (unary and streaming calls alike: Serve fires it
   when the replica's generator finishes, fails or is cancelled) takes the
   request out of the in-flight count.
4. Replica reports (``record_routing_stats`` -> ``ReplicaStats.to_dict()``)
   arrive with ``update_replicas`` and correct queue depth and cached blocks;
   dead or removed replicas leave the index.

Each decision goes to the call it was made for (``_fulfill_next_pending_request``),
found by the call's own ``RequestMetadata`` object. Not by ``internal_request_id``
as Serve's base class does: every handle call made while one request is served
shares that id (the ingress sends one call per prompt of a batch), and the base
class indexes only the first of them, so the others would never get a replica.
Not ``FIFOMixin`` either: it hands a replica chosen for one request's prefix to
whichever request is oldest, which breaks affinity under load.

``DecodeRequestRouter`` routes a disaggregated deployment's decode pool with the
same bookkeeping but ``router.policy.choose_decode``: least loaded among the
replicas with free KV blocks for the prompt (reported ``num_free_blocks`` minus
blocks routed there since, ``FreeBlockLedger``), least loaded of all when none has.
"""

from __future__ import annotations

import logging
import random
import time
from collections import defaultdict
from typing import Any, List, Optional

from ray.serve._private.common import RequestMetadata
from ray.serve.config import RequestRouterConfig
from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from router import router_metrics
from router.messages import GenerateRequest, ReplicaStats
from router.policy import (DecodeReplicaView, FreeBlockLedger, RouterPolicyConfig, RoutingDecision,
                           choose, choose_decode, num_blocks_needed)
from router.redis_state import RedisRouterState
from router.shared_state import LocalRouterState, RouterState

logger = logging.getLogger(__name__)

ROUTER_CLASS_PATH = "router.request_router:PrefixAwareRequestRouter"


def request_router_config(policy_cfg: Optional[RouterPolicyConfig] = None,
                          redis_url: Optional[str] = None, namespace: str = "default",
                          stats_period_s: float = 1.0) -> RequestRouterConfig:
    """The replica deployment's ``request_router_config``.

    ``redis_url`` None keeps the state in each router process; with Redis, all
    ingress replicas share the index and loads under ``namespace`` (use the
    Serve app name). ``stats_period_s`` is how often Serve pulls each
    replica's ``record_routing_stats()``.
    """
    return RequestRouterConfig(
        request_router_class=PrefixAwareRequestRouter,
        request_router_kwargs={"policy": (policy_cfg or RouterPolicyConfig()).to_dict(),
                               "redis_url": redis_url, "namespace": namespace},
        request_routing_stats_period_s=stats_period_s)


def decode_request_router_config(policy_cfg: Optional[RouterPolicyConfig] = None, *, block_size: int,
                                 redis_url: Optional[str] = None, namespace: str = "default",
                                 stats_period_s: float = 1.0) -> RequestRouterConfig:
    """The decode pool's ``request_router_config`` (``DecodeRequestRouter``).

    ``block_size`` is the engine's, to turn a prompt's tokens into the blocks a
    decode replica reserves for it.
    """
    return RequestRouterConfig(
        request_router_class=DecodeRequestRouter,
        request_router_kwargs={"policy": (policy_cfg or RouterPolicyConfig()).to_dict(),
                               "redis_url": redis_url, "namespace": namespace,
                               "block_size": block_size, "stats_period_s": stats_period_s},
        request_routing_stats_period_s=stats_period_s)


def find_generate_request(pending_request: Optional[PendingRequest]) -> Optional[GenerateRequest]:
    """The first ``GenerateRequest`` among the call's positional, then keyword, args."""
    if pending_request is None:
        return None
    for arg in list(pending_request.args) + list(pending_request.kwargs.values()):
        if isinstance(arg, GenerateRequest):
            return arg
    return None


class PrefixAwareRequestRouter(RequestRouter):
    """Prefix-affinity, load-aware routing; see the module docstring."""

    def initialize_state(self, policy: Optional[dict] = None, redis_url: Optional[str] = None,
                         namespace: str = "default", seed: Optional[int] = None,
                         state: Optional[RouterState] = None, **_: Any) -> None:
        """Called by Serve with ``request_router_kwargs``; ``state`` may be injected in tests."""
        self._cfg = RouterPolicyConfig.from_dict(policy)
        if state is not None:
            self._state = state
        elif redis_url:
            self._state = RedisRouterState(redis_url, namespace,
                                           capacity_blocks=self._cfg.index_capacity_blocks)
        else:
            self._state = LocalRouterState(self._cfg.index_capacity_blocks)
        self._rng = random.Random(seed)
        # Futures of requests we decided for, until Serve resolves them to a replica.
        self._watched: dict[Any, tuple[str, int, list[int]]] = {}
        # (replica unique id, internal request id) -> prompt tokens, per dispatch.
        self._inflight: defaultdict[tuple[str, str], list[int]] = defaultdict(list)
        self._last_stats: dict[str, dict] = {}

    @property
    def state(self) -> RouterState:
        return self._state

    async def choose_replicas(self, candidate_replicas: List[RunningReplica],
                              pending_request: Optional[PendingRequest] = None
                              ) -> List[List[RunningReplica]]:
        self._account_resolved()
        if not candidate_replicas:
            return []
        start = time.perf_counter()
        request = find_generate_request(pending_request)
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        decision = await self._decide(request, list(by_id))
        if pending_request is not None:
            # Once all ranks are tried, back off instead of spinning (Serve's contract).
            pending_request.routing_context.should_backoff = True
            self._watch(pending_request, request)
        router_metrics.record_decision(decision.kind.value, time.perf_counter() - start,
                                       decision.matched_blocks)
        return [[by_id[replica_id]] for replica_id in decision.ranked_replica_ids]

    async def _decide(self, request: Optional[GenerateRequest], replica_ids: list[str]) -> RoutingDecision:
        """The policy's ranking of ``replica_ids`` for ``request``: cached prefix against load."""
        block_hashes = request.block_hashes if request is not None else []
        views = await self._state.views(block_hashes, replica_ids)
        self._account_resolved()  # others may have been routed while we awaited
        return choose(block_hashes, views, self._rng, self._cfg)

    def _fulfill_next_pending_request(self, replica: RunningReplica,
                                      request_metadata: Optional[RequestMetadata] = None) -> None:
        """Gives ``replica`` to the pending call whose routing chose it (Serve calls this).

        Matched by identity of the call's ``RequestMetadata``, which is unique per
        handle call; ``internal_request_id`` is not (see the module docstring). If that
        call was cancelled or fulfilled meanwhile, nobody gets this replica.
        """
        for pending in self._pending_requests_to_fulfill:
            if pending.metadata is request_metadata and not pending.future.done():
                break
        else:
            return
        self._cancel_routing_task_for_pending_request(pending)
        self._record_queue_wait_time(pending)
        pending.future.set_result(replica)
        self._remove_pending_request_from_indices(pending)

    def _watch(self, pending_request: PendingRequest, request: Optional[GenerateRequest]) -> None:
        future = pending_request.future
        if future in self._watched:
            return
        num_tokens = request.num_prompt_tokens if request is not None else 0
        hashes = list(request.block_hashes) if request is not None else []
        self._watched[future] = (pending_request.metadata.internal_request_id, num_tokens, hashes)
        future.add_done_callback(self._on_future_done)

    def _on_future_done(self, future) -> None:
        entry = self._watched.pop(future, None)
        if entry is None or future.cancelled() or future.exception() is not None:
            return
        replica_id = future.result().replica_id.unique_id
        internal_request_id, num_tokens, hashes = entry
        self._state.on_dispatch(replica_id, num_tokens)
        self._inflight[(replica_id, internal_request_id)].append(num_tokens)
        if hashes:
            self._state.insert_blocks(replica_id, hashes)

    def _account_resolved(self) -> None:
        """Count requests already given a replica whose done-callback has not run yet."""
        for future in [f for f in self._watched if f.done()]:
            self._on_future_done(future)

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        self._account_resolved()
        key = (replica_id.unique_id, internal_request_id)
        num_tokens_list = self._inflight.get(key)
        if not num_tokens_list:
            return
        num_tokens = num_tokens_list.pop()
        if not num_tokens_list:
            del self._inflight[key]
        self._state.on_complete(replica_id.unique_id, num_tokens)

    def update_replicas(self, replicas: List[RunningReplica]) -> None:
        old_ids = {rid.unique_id for rid in self._replica_id_set}
        super().update_replicas(replicas)
        new_ids = set()
        for replica in replicas:
            replica_id = replica.replica_id.unique_id
            new_ids.add(replica_id)
            stats = replica.routing_stats
            if stats and stats != self._last_stats.get(replica_id):
                self._last_stats[replica_id] = stats
                self._state.update_replica_stats(replica_id, ReplicaStats.from_dict(stats))
        for replica_id in old_ids - new_ids:
            self._forget(replica_id)

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self._forget(replica_id.unique_id)

    def _forget(self, replica_id: str) -> None:
        self._state.remove_replica(replica_id)
        self._last_stats.pop(replica_id, None)
        for key in [k for k in self._inflight if k[0] == replica_id]:
            del self._inflight[key]


class DecodeRequestRouter(PrefixAwareRequestRouter):
    """The decode pool: load-aware, and only onto replicas with free KV blocks for the prompt.

    Loads and in-flight counts are the base class's; free blocks come from the
    replicas' routing stats (``num_free_blocks``) through a ``FreeBlockLedger``.
    """

    def initialize_state(self, block_size: int = 16, stats_period_s: float = 1.0, **kwargs: Any) -> None:
        super().initialize_state(**kwargs)
        self._block_size = block_size
        # Reports reach us up to about two periods after the replica took them.
        self._ledger = FreeBlockLedger(grace_s=2 * stats_period_s)

    @property
    def ledger(self) -> FreeBlockLedger:
        return self._ledger

    async def _decide(self, request: Optional[GenerateRequest], replica_ids: list[str]) -> RoutingDecision:
        """By load, and only onto replicas with free KV blocks for the prompt (no prefix)."""
        num_blocks = num_blocks_needed(request.num_prompt_tokens, self._block_size) if request else 0
        loads = await self._state.views([], replica_ids)
        self._account_resolved()  # others may have been routed while we awaited
        views = [DecodeReplicaView(v.replica_id, v.load, self._ledger.num_free_blocks(v.replica_id))
                 for v in loads]
        return choose_decode(num_blocks, views, self._rng, self._cfg)

    def _on_future_done(self, future) -> None:
        entry = self._watched.get(future)
        super()._on_future_done(future)
        if entry is None or future.cancelled() or future.exception() is not None:
            return
        internal_request_id, num_tokens, _ = entry
        if num_tokens:
            self._ledger.on_dispatch(future.result().replica_id.unique_id, internal_request_id,
                                     num_blocks_needed(num_tokens, self._block_size))

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        super().on_request_completed(replica_id, internal_request_id)
        self._ledger.on_complete(replica_id.unique_id, internal_request_id)

    def update_replicas(self, replicas: List[RunningReplica]) -> None:
        fresh = {r.replica_id.unique_id: r.routing_stats for r in replicas
                 if r.routing_stats and r.routing_stats != self._last_stats.get(r.replica_id.unique_id)}
        super().update_replicas(replicas)
        for replica_id, stats in fresh.items():
            if stats.get("num_free_blocks") is not None:
                self._ledger.report(replica_id, int(stats["num_free_blocks"]))

    def _forget(self, replica_id: str) -> None:
        super()._forget(replica_id)
        self._ledger.remove(replica_id)
