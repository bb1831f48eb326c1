"""Routing state: the prefix index and per-replica load table, local or shared in Redis.

Every router process keeps a ``LocalRouterState`` (the mirror). Writes
(dispatch, completion, block inserts, replica reports) update it at once, so
a burst of decisions in one process always sees the in-flight requests of the
previous ones. ``RedisRouterState`` (router/redis_state.py) keeps that mirror and
shares the state through Redis, so several ingress processes decide alike.
"""

from __future__ import annotations

import collections
import logging
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable, Sequence

from router.messages import ReplicaStats
from router.policy import ReplicaLoad, ReplicaView
from router.prefix_index import PrefixIndex

logger = logging.getLogger(__name__)


class RouterState(ABC):
    """What the request router reads and writes; see the module docstring."""

    @abstractmethod
    async def views(self, block_hashes: Sequence[int], replica_ids: Sequence[str]) -> list[ReplicaView]:
        """One ``ReplicaView`` per replica id: its load and matched prefix blocks."""

    @abstractmethod
    def on_dispatch(self, replica_id: str, num_tokens: int) -> None:
        """A request of ``num_tokens`` prompt tokens was sent to the replica."""

    @abstractmethod
    def on_complete(self, replica_id: str, num_tokens: int) -> None:
        """A request dispatched with ``on_dispatch`` finished (any outcome)."""

    @abstractmethod
    def insert_blocks(self, replica_id: str, block_hashes: Sequence[int]) -> None:
        """The replica will cache these blocks (optimistic, at routing time)."""

    @abstractmethod
    def update_replica_stats(self, replica_id: str, stats: ReplicaStats) -> None:
        """A replica's own report; corrects queue depth and (if given) its cached blocks."""

    @abstractmethod
    def remove_replica(self, replica_id: str) -> None:
        """Forget a dead or scaled-down replica."""

    async def close(self) -> None:
        """Release connections and background tasks."""


@dataclass
class _LoadRow:
    inflight_requests: int = 0
    inflight_tokens: int = 0
    queue_depth: int = 0
    running: int = 0
    kv_usage: float = 0.0
    stats_ts: float = 0.0  # when the replica's last report arrived (0: never)


class LocalRouterState(RouterState):
    """In-process state: a ``PrefixIndex`` and a load table. Also the Redis mirror."""

    def __init__(self, capacity_blocks: int = 1_000_000, optimistic_grace_s: float = 30.0,
                 clock: Callable[[], float] = time.time):
        self.index = PrefixIndex(capacity_blocks)
        self.loads: dict[str, _LoadRow] = {}
        self.optimistic_grace_s = optimistic_grace_s  # inserts a replica report may not show yet
        self._clock = clock
        self._recent_inserts: collections.deque = collections.deque(maxlen=4096)

    def views_now(self, block_hashes: Sequence[int], replica_ids: Sequence[str]) -> list[ReplicaView]:
        matched = self.index.match(block_hashes) if block_hashes else {}
        return [ReplicaView(r, self.load_of(r), matched.get(r, 0), self.index.num_blocks(r))
                for r in replica_ids]

    async def views(self, block_hashes, replica_ids):
        return self.views_now(block_hashes, replica_ids)

    def load_of(self, replica_id: str) -> ReplicaLoad:
        row = self.loads.get(replica_id)
        if row is None:
            return ReplicaLoad()
        return ReplicaLoad(row.queue_depth, row.running, row.inflight_requests,
                           row.inflight_tokens, row.kv_usage)

    def on_dispatch(self, replica_id, num_tokens):
        row = self.loads.setdefault(replica_id, _LoadRow())
        row.inflight_requests += 1
        row.inflight_tokens += num_tokens

    def on_complete(self, replica_id, num_tokens):
        row = self.loads.get(replica_id)
        if row is not None:
            row.inflight_requests = max(0, row.inflight_requests - 1)
            row.inflight_tokens = max(0, row.inflight_tokens - num_tokens)

    def insert_blocks(self, replica_id, block_hashes):
        if block_hashes:
            self.index.insert(replica_id, block_hashes)
            self._recent_inserts.append((self._clock(), replica_id, tuple(block_hashes)))

    def update_replica_stats(self, replica_id, stats):
        row = self.loads.setdefault(replica_id, _LoadRow())
        row.queue_depth, row.running = stats.num_waiting, stats.num_running
        row.kv_usage, row.stats_ts = stats.kv_usage, self._clock()
        # An empty list means "not reported", not "nothing cached".
        if stats.cached_block_hashes:
            self.index.replace_replica_blocks(replica_id, stats.cached_block_hashes)
            # Requests routed after the replica took its snapshot are not in it yet.
            horizon = self._clock() - self.optimistic_grace_s
            for ts, rid, hashes in self._recent_inserts:
                if rid == replica_id and ts >= horizon:
                    self.index.insert(replica_id, hashes)

    def remove_replica(self, replica_id):
        self.index.remove_replica(replica_id)
        self.loads.pop(replica_id, None)
