"""``RedisRouterState``: the routing state shared in Redis, with a local mirror.

It keeps a ``LocalRouterState`` (router/shared_state.py) as its mirror and also queues each
write for a background flusher (one pipeline per flush). When deciding, it reads the request's
chain and the candidates' loads from Redis in ONE round trip: a Lua script walks the chain server
side and stops at the first missing block. Key layout (``p`` = ``kvmesh:<namespace>``)::

    p:b:<hash hex>   HASH replica_id -> insert ts   who holds this block (EXPIRE block_ttl_s)
    p:rb:<replica>   SET  <hash hex>                 blocks of a replica (size, removal, correction)
    p:st:<replica>   HASH queue_depth running kv_usage ts      latest replica report
    p:if:<replica>   HASH router_id -> "reqs tokens ts"         each router's own in-flight

In-flight counts are absolute per router (idempotent writes, no drift): a
reader sums other routers' fresh fields with its own local counts. Redis
bounds the index by time (TTL); the mirror bounds it by capacity (LRU).

If Redis is unreachable (short socket timeouts), the state logs one warning,
sets the ``redis_available`` gauge to 0, decides from the mirror, probes with
backoff, and on success re-pushes the mirror (re-sync) before using Redis again.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
import uuid
from typing import Optional, Sequence

from router import router_metrics
from router.policy import ReplicaLoad, ReplicaView
from router.shared_state import LocalRouterState, RouterState

logger = logging.getLogger(__name__)


class RedisRouterState(RouterState):
    """Shared state in Redis with a local mirror; see the module docstring."""

    def __init__(self, url: str, namespace: str = "default", *, capacity_blocks: int = 1_000_000,
                 block_ttl_s: float = 600.0, inflight_ttl_s: float = 30.0,
                 heartbeat_s: float = 5.0, op_timeout_s: float = 0.1,
                 max_probe_backoff_s: float = 5.0, router_id: Optional[str] = None):
        self.url, self.namespace = url, namespace
        self.router_id = router_id or uuid.uuid4().hex[:12]
        self.mirror = LocalRouterState(capacity_blocks)
        self.block_ttl_s, self.inflight_ttl_s = block_ttl_s, inflight_ttl_s
        self.heartbeat_s, self.op_timeout_s = heartbeat_s, op_timeout_s
        self.max_probe_backoff_s = max_probe_backoff_s
        self._prefix = f"kvmesh:{namespace}"
        self._client = None  # created on the event loop that first uses the state
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._wakeup: Optional[asyncio.Event] = None
        self._tasks: list[asyncio.Task] = []
        self._available = True
        self._probing = False
        self._dirty_inflight: set[str] = set()
        self._dirty_stats: set[str] = set()
        self._pending_inserts: collections.deque = collections.deque(maxlen=10_000)
        self._pending_replace: dict[str, list[int]] = {}
        self._pending_remove: set[str] = set()
        self._last_full_push: dict[str, float] = {}  # replica -> last full block push (TTL refresh)
        router_metrics.set_redis_available(namespace, self.router_id, True)

    @property
    def redis_available(self) -> bool:
        return self._available

    # ---- writes: mirror now, Redis by the flusher ----

    def on_dispatch(self, replica_id, num_tokens):
        self.mirror.on_dispatch(replica_id, num_tokens)
        self._dirty_inflight.add(replica_id)
        self._kick()

    def on_complete(self, replica_id, num_tokens):
        self.mirror.on_complete(replica_id, num_tokens)
        self._dirty_inflight.add(replica_id)
        self._kick()

    def insert_blocks(self, replica_id, block_hashes):
        self.mirror.insert_blocks(replica_id, block_hashes)
        if block_hashes:  # queued even while Redis is down: re-sync may race with it
            self._pending_inserts.append((replica_id, list(block_hashes)))
            self._kick()

    def update_replica_stats(self, replica_id, stats):
        self.mirror.update_replica_stats(replica_id, stats)
        self._dirty_stats.add(replica_id)
        if stats.cached_block_hashes:
            self._pending_replace[replica_id] = sorted(self.mirror.index.blocks_of(replica_id))
        self._kick()

    def remove_replica(self, replica_id):
        self.mirror.remove_replica(replica_id)
        self._pending_remove.add(replica_id)
        self._kick()

    # ---- reads ----

    async def views(self, block_hashes, replica_ids):
        self._ensure_started()
        local = self.mirror.views_now(block_hashes, replica_ids)
        if not self._available:
            return local
        args = [self._prefix, len(block_hashes), *(f"{h:x}" for h in block_hashes), *replica_ids]
        try:
            reply = await asyncio.wait_for(self._read_script(args=args), self.op_timeout_s)
        except Exception as exc:  # noqa: BLE001 - any Redis failure: serve from the mirror
            self._mark_unavailable(exc)
            return local
        flat = reply[0]
        matched = {flat[i]: int(flat[i + 1]) for i in range(0, len(flat), 2)}
        now = time.time()
        views = []
        for i, view in enumerate(local):
            num_cached, st, inflight = reply[1 + 3 * i:4 + 3 * i]
            views.append(self._merge(view, matched.get(view.replica_id, 0), int(num_cached),
                                     _pairs(st), _pairs(inflight), now))
        return views

    def _merge(self, view: ReplicaView, matched: int, num_cached: int, st: dict,
               inflight: dict, now: float) -> ReplicaView:
        load = view.load
        reqs, tokens = load.inflight_requests, load.inflight_tokens  # own, always fresh
        for router_id, value in inflight.items():
            if router_id == self.router_id:
                continue
            o_reqs, o_tokens, ts = value.split()
            if now - float(ts) <= self.inflight_ttl_s:
                reqs, tokens = reqs + int(o_reqs), tokens + int(o_tokens)
        row = self.mirror.loads.get(view.replica_id)
        queue_depth, running, kv_usage = load.queue_depth, load.running, load.kv_usage
        if st and (row is None or float(st["ts"]) > row.stats_ts):
            queue_depth, running = int(st["queue_depth"]), int(st["running"])
            kv_usage = float(st["kv_usage"])
        return ReplicaView(view.replica_id, ReplicaLoad(queue_depth, running, reqs, tokens, kv_usage),
                           max(matched, view.matched_blocks), max(num_cached, view.num_cached_blocks))

    # ---- background flusher, outage handling ----

    def _ensure_started(self) -> None:
        if self._loop is not None:
            return
        import redis.asyncio as aioredis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff
        self._loop = asyncio.get_running_loop()
        self._wakeup = asyncio.Event()
        self._client = aioredis.Redis.from_url(
            self.url, decode_responses=True, socket_timeout=self.op_timeout_s,
            socket_connect_timeout=self.op_timeout_s, retry=Retry(NoBackoff(), 0))
        self._read_script = self._client.register_script(_READ_SCRIPT)
        self._tasks.append(self._loop.create_task(self._flush_loop()))

    def _kick(self) -> None:
        """Wake the flusher; safe from any thread."""
        if self._loop is None or self._wakeup is None:
            return
        try:
            same_loop = asyncio.get_running_loop() is self._loop
        except RuntimeError:
            same_loop = False
        if same_loop:
            self._wakeup.set()
        elif not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._wakeup.set)

    async def _flush_loop(self) -> None:
        last_heartbeat = 0.0
        while True:
            try:
                await asyncio.wait_for(self._wakeup.wait(), self.heartbeat_s)
            except asyncio.TimeoutError:
                pass
            self._wakeup.clear()
            if time.time() - last_heartbeat >= self.heartbeat_s:
                # Keep our in-flight fields fresh for other routers.
                self._dirty_inflight.update(r for r, row in self.mirror.loads.items()
                                            if row.inflight_requests)
                last_heartbeat = time.time()
            await self.flush()

    async def flush(self) -> None:
        """Write queued changes to Redis now (one pipeline, plus reads for corrections)."""
        self._ensure_started()
        if not self._available:
            return
        inserts, self._pending_inserts = list(self._pending_inserts), collections.deque(maxlen=10_000)
        dirty_inflight, self._dirty_inflight = self._dirty_inflight, set()
        dirty_stats, self._dirty_stats = self._dirty_stats, set()
        replace, self._pending_replace = self._pending_replace, {}
        remove, self._pending_remove = self._pending_remove, set()
        try:
            for r in remove:
                await self._drop_replica_blocks(r, keep=())
                self._last_full_push.pop(r, None)
            for r, hashes in replace.items():
                held = await self._drop_replica_blocks(r, keep=hashes)
                # Push only new blocks, except for a full TTL refresh now and then.
                if time.time() - self._last_full_push.get(r, 0.0) >= self.block_ttl_s / 3:
                    self._last_full_push[r] = time.time()
                else:
                    hashes = [h for h in hashes if f"{h:x}" not in held]
                await self._push_blocks(r, hashes)
            pipe = self._client.pipeline(transaction=False)
            for r in remove:
                pipe.delete(f"{self._prefix}:st:{r}", f"{self._prefix}:if:{r}")
            for r, hashes in inserts:
                if r not in remove:
                    self._queue_insert(pipe, r, hashes)
            for r in dirty_inflight - remove:
                self._queue_inflight(pipe, r)
            for r in dirty_stats - remove:
                self._queue_stats(pipe, r)
            await asyncio.wait_for(pipe.execute(), self.op_timeout_s * 10)
        except Exception as exc:  # noqa: BLE001 - the re-sync rewrites everything later
            self._mark_unavailable(exc)

    async def _drop_replica_blocks(self, replica_id: str, keep: Sequence[int]) -> set[str]:
        """Unlink the replica from blocks not in ``keep``; returns the hex hashes Redis had."""
        key = f"{self._prefix}:rb:{replica_id}"
        held = await asyncio.wait_for(self._client.smembers(key), self.op_timeout_s * 10)
        stale = held - {f"{h:x}" for h in keep}
        pipe = self._client.pipeline(transaction=False)
        for hex_hash in stale:
            pipe.hdel(f"{self._prefix}:b:{hex_hash}", replica_id)
        if stale:
            pipe.srem(key, *stale)
        await asyncio.wait_for(pipe.execute(), self.op_timeout_s * 10)
        return held

    def _queue_insert(self, pipe, replica_id: str, block_hashes: Sequence[int]) -> None:
        now, ttl = time.time(), int(self.block_ttl_s)
        hex_hashes = [f"{h:x}" for h in block_hashes]
        for hex_hash in hex_hashes:
            key = f"{self._prefix}:b:{hex_hash}"
            pipe.hset(key, replica_id, now)
            pipe.expire(key, ttl)
        if hex_hashes:
            pipe.sadd(f"{self._prefix}:rb:{replica_id}", *hex_hashes)
            pipe.expire(f"{self._prefix}:rb:{replica_id}", ttl)

    def _queue_inflight(self, pipe, replica_id: str) -> None:
        key = f"{self._prefix}:if:{replica_id}"
        row = self.mirror.loads.get(replica_id)
        if row is None or row.inflight_requests == 0:
            pipe.hdel(key, self.router_id)
        else:
            pipe.hset(key, self.router_id,
                      f"{row.inflight_requests} {row.inflight_tokens} {time.time()}")
            pipe.expire(key, int(self.inflight_ttl_s * 2))

    def _queue_stats(self, pipe, replica_id: str) -> None:
        row = self.mirror.loads.get(replica_id)
        if row is not None and row.stats_ts:
            key = f"{self._prefix}:st:{replica_id}"
            pipe.hset(key, mapping={"queue_depth": row.queue_depth, "running": row.running,
                                    "kv_usage": row.kv_usage, "ts": row.stats_ts})
            pipe.expire(key, int(self.inflight_ttl_s * 2))

    def _mark_unavailable(self, exc: BaseException) -> None:
        if self._available:
            logger.warning("Redis %s unreachable (%s: %s); routing from the local mirror until it "
                           "returns", self.url, type(exc).__name__, exc)
            self._available = False
            router_metrics.set_redis_available(self.namespace, self.router_id, False)
        if not self._probing and self._loop is not None:
            self._probing = True
            self._tasks.append(self._loop.create_task(self._probe_and_resync()))

    async def _probe_and_resync(self) -> None:
        backoff_s = 0.05
        try:
            while True:
                await asyncio.sleep(backoff_s)
                backoff_s = min(backoff_s * 2, self.max_probe_backoff_s)
                try:
                    await asyncio.wait_for(self._client.ping(), self.op_timeout_s)
                    await self.resync()
                except Exception:  # noqa: BLE001 - still down: keep probing
                    continue
                self._available = True
                router_metrics.set_redis_available(self.namespace, self.router_id, True)
                logger.warning("Redis %s is back; shared routing state re-synced", self.url)
                return
        finally:
            self._probing = False

    async def _push_blocks(self, replica_id: str, block_hashes: Sequence[int]) -> None:
        chunk = 2000  # blocks per pipeline: bounded request size and latency
        for i in range(0, len(block_hashes), chunk):
            pipe = self._client.pipeline(transaction=False)
            self._queue_insert(pipe, replica_id, block_hashes[i:i + chunk])
            await asyncio.wait_for(pipe.execute(), self.op_timeout_s * 10)

    async def resync(self) -> None:
        """Push the whole mirror: blocks per replica (in chunks), own in-flight, stats."""
        self._ensure_started()
        for replica_id in self.mirror.index.replica_ids:
            await self._push_blocks(replica_id, list(self.mirror.index.blocks_of(replica_id)))
        pipe = self._client.pipeline(transaction=False)
        for replica_id in self.mirror.loads:
            self._queue_inflight(pipe, replica_id)
            self._queue_stats(pipe, replica_id)
        await asyncio.wait_for(pipe.execute(), self.op_timeout_s * 10)

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        self._tasks.clear()
        if self._client is not None:
            await self._client.aclose()


def _pairs(flat: list) -> dict:
    return {flat[i]: flat[i + 1] for i in range(0, len(flat), 2)}


# One decision's read, server side: walk the chain's holders until the first
# block nobody holds (longest prefix per replica), then each candidate's block
# count, report and in-flight fields. ARGV: prefix, num blocks, hex hashes...,
# replica ids... Reads keys it is not passed, so standalone Redis only (not Cluster).
_READ_SCRIPT = """
local p, nb = ARGV[1], tonumber(ARGV[2])
local alive, matched, n = nil, {}, 0
for i = 1, nb do
  local holders = redis.call('HKEYS', p .. ':b:' .. ARGV[2 + i])
  if #holders == 0 then break end
  local held = {}
  for _, r in ipairs(holders) do held[r] = true end
  if alive == nil then
    alive = held
  else
    for r in pairs(alive) do
      if not held[r] then matched[r] = i - 1; alive[r] = nil end
    end
  end
  if next(alive) == nil then break end
  n = i
end
for r in pairs(alive or {}) do matched[r] = n end
local flat = {}
for r, m in pairs(matched) do flat[#flat + 1] = r; flat[#flat + 1] = m end
local out = {flat}
for j = 3 + nb, #ARGV do
  local r = ARGV[j]
  out[#out + 1] = redis.call('SCARD', p .. ':rb:' .. r)
  out[#out + 1] = redis.call('HGETALL', p .. ':st:' .. r)
  out[#out + 1] = redis.call('HGETALL', p .. ':if:' .. r)
end
return out
"""
