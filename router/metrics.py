"""Prometheus metrics served on the ingress's ``GET /metrics`` (all ``kvmesh_`` prefixed).

They live in prometheus_client's default registry, in the ingress process, next to
the request router's own series (``router/router_metrics.py``: the router runs in
the process that holds the replica handle, i.e. the ingress). Per-replica gauges
are read from the ``ReplicaStatsBoard`` at scrape time, so a replica that is gone
disappears from the output instead of freezing at its last value.

| metric | type | labels | meaning |
|---|---|---|---|
| `kvmesh_num_requests_running` | gauge | `replica` | requests the replica's engine is running |
| `kvmesh_num_requests_waiting` | gauge | `replica` | requests queued in the replica's engine (queue depth) |
| `kvmesh_kv_cache_usage_ratio` | gauge | `replica` | share of the replica's KV blocks in use (0-1) |
| `kvmesh_kv_cache_free_blocks` | gauge | `replica` | free KV blocks of the replica |
| `kvmesh_prefix_cache_hit_rate` | gauge | `replica` | prompt tokens found in the replica's prefix cache / looked up |
| `kvmesh_num_replicas` | gauge | | replicas reporting stats (live) |
| `kvmesh_time_to_first_token_seconds` | histogram | `endpoint` | request arrival at the ingress to first generated token |
| `kvmesh_inter_token_latency_seconds` | histogram | `endpoint` | time between generated tokens of a request, per token |
| `kvmesh_e2e_request_latency_seconds` | histogram | `endpoint` | request arrival to last token |
| `kvmesh_prompt_tokens_total` | counter | `endpoint` | prompt tokens of admitted requests |
| `kvmesh_generation_tokens_total` | counter | `endpoint` | generated tokens (all choices) |
| `kvmesh_requests_finished_total` | counter | `endpoint`, `finish_reason` | finished choices by reason (stop, length, abort, error) |
| `kvmesh_http_requests_total` | counter | `method`, `path`, `status` | HTTP requests answered, by status code |
| `kvmesh_pool_num_requests_waiting` | gauge | `pool` | queue depth of a pool (colocated, prefill, decode): its autoscaling signal |
| `kvmesh_pool_num_replicas` | gauge | `pool` | replicas of a pool reporting stats |
| `kvmesh_kv_transfer_bytes_total` | counter | | prompt KV bytes moved from prefill to decode replicas |
| `kvmesh_kv_transfer_seconds` | histogram | | one request's KV transfer, header taken to bytes received (decode side) |
| `kvmesh_ttft_phase_seconds` | histogram | `phase` | disaggregated TTFT split: `queue` (prefill replica queue), `prefill` (compute), `transfer` (KV to the decode replica; after the first token) |
| `kvmesh_disagg_requests_total` | counter | `path` | disaggregated requests by path: `remote` (prefill pool), `local` (computed on the decode pool), `prefill_failed`, `decode_retry` |
| `kvmesh_router_*` | | | request-router series, see `router/router_metrics.py` |
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Optional

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5,
                   5.0, 10.0, 20.0, 40.0, 80.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5,
               0.75, 1.0, 2.5)

CONTENT_TYPE = CONTENT_TYPE_LATEST


class ReplicaGaugeCollector(Collector):
    """Per-replica gauges from the latest board snapshot (set by ``update``)."""

    def __init__(self) -> None:
        self._snapshot: Mapping[str, dict] = {}

    def update(self, snapshot: Mapping[str, dict]) -> None:
        self._snapshot = dict(snapshot)

    def collect(self) -> Iterable[GaugeMetricFamily]:
        snapshot = self._snapshot
        specs = (
            ("kvmesh_num_requests_running", "Requests running in the replica's engine.", "num_running"),
            ("kvmesh_num_requests_waiting", "Requests waiting in the replica's engine.", "num_waiting"),
            ("kvmesh_kv_cache_usage_ratio", "Share of the replica's KV blocks in use.", "kv_usage"),
            ("kvmesh_kv_cache_free_blocks", "Free KV blocks of the replica.", "num_free_blocks"),
            ("kvmesh_prefix_cache_hit_rate", "Prefix-cache hit rate of the replica (tokens).",
             "prefix_cache_hit_rate"),
        )
        for name, doc, key in specs:
            family = GaugeMetricFamily(name, doc, labels=["replica"])
            for replica_id, stats in sorted(snapshot.items()):
                family.add_metric([replica_id], float(stats.get(key, 0.0)))
            yield family
        yield GaugeMetricFamily("kvmesh_num_replicas", "Replicas reporting stats.", value=len(snapshot))
        waiting = GaugeMetricFamily("kvmesh_pool_num_requests_waiting", "Requests waiting in a pool.",
                                    labels=["pool"])
        replicas = GaugeMetricFamily("kvmesh_pool_num_replicas", "Replicas of a pool reporting stats.",
                                     labels=["pool"])
        pools: dict[str, list[dict]] = {}
        for stats in snapshot.values():
            pools.setdefault(str(stats.get("pool", "colocated")), []).append(stats)
        for pool, members in sorted(pools.items()):
            waiting.add_metric([pool], float(sum(m.get("num_waiting", 0) for m in members)))
            replicas.add_metric([pool], float(len(members)))
        yield waiting
        yield replicas


class ServingMetrics:
    """The ingress's metrics; one instance per process (``get_metrics``)."""

    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        self.registry = registry
        self.replicas = ReplicaGaugeCollector()
        registry.register(self.replicas)
        self.ttft = Histogram("kvmesh_time_to_first_token_seconds", "Arrival to first token.",
                              ["endpoint"], buckets=LATENCY_BUCKETS, registry=registry)
        self.itl = Histogram("kvmesh_inter_token_latency_seconds", "Time between tokens.",
                             ["endpoint"], buckets=ITL_BUCKETS, registry=registry)
        self.e2e = Histogram("kvmesh_e2e_request_latency_seconds", "Arrival to last token.",
                             ["endpoint"], buckets=LATENCY_BUCKETS, registry=registry)
        self.prompt_tokens = Counter("kvmesh_prompt_tokens", "Prompt tokens of admitted requests.",
                                     ["endpoint"], registry=registry)
        self.generation_tokens = Counter("kvmesh_generation_tokens", "Generated tokens.",
                                         ["endpoint"], registry=registry)
        self.finished = Counter("kvmesh_requests_finished", "Finished choices by finish reason.",
                                ["endpoint", "finish_reason"], registry=registry)
        self.kv_transfer_bytes = Counter("kvmesh_kv_transfer_bytes", "Prompt KV bytes moved to decode.",
                                         registry=registry)
        self.kv_transfer_seconds = Histogram("kvmesh_kv_transfer_seconds", "One request's KV transfer.",
                                             buckets=LATENCY_BUCKETS, registry=registry)
        self.ttft_phase = Histogram("kvmesh_ttft_phase_seconds", "Disaggregated TTFT by phase.", ["phase"],
                                    buckets=LATENCY_BUCKETS, registry=registry)
        self.disagg_requests = Counter("kvmesh_disagg_requests", "Disaggregated requests by path.", ["path"],
                                       registry=registry)
        self.http_requests = Counter("kvmesh_http_requests", "HTTP requests by status code.",
                                     ["method", "path", "status"], registry=registry)

    def render(self) -> bytes:
        """The Prometheus text exposition of the whole registry (router series included)."""
        try:
            import router.router_metrics  # noqa: F401  registers the router's series if present
        except ImportError:
            pass
        return generate_latest(self.registry)


_METRICS: Optional[ServingMetrics] = None


def get_metrics() -> ServingMetrics:
    """The process-wide ``ServingMetrics`` (metrics may be registered only once per registry)."""
    global _METRICS
    if _METRICS is None:
        _METRICS = ServingMetrics()
    return _METRICS


class RequestTimer:
    """Measures one request's TTFT, inter-token latency and end-to-end latency."""

    def __init__(self, metrics: ServingMetrics, endpoint: str, arrival: float) -> None:
        self.metrics = metrics
        self.endpoint = endpoint
        self.arrival = arrival
        self.last_token_time: Optional[float] = None
        # Labelled children looked up once per request, not once per streamed update.
        self._generation_tokens = metrics.generation_tokens.labels(endpoint)
        self._itl = metrics.itl.labels(endpoint)

    def on_tokens(self, num_new_tokens: int, now: float) -> None:
        if num_new_tokens <= 0:
            return
        self._generation_tokens.inc(num_new_tokens)
        if self.last_token_time is None:
            self.metrics.ttft.labels(self.endpoint).observe(now - self.arrival)
            num_gaps = num_new_tokens - 1  # tokens that came with the first are 0 s apart
            gap = 0.0
        else:
            num_gaps = num_new_tokens
            gap = (now - self.last_token_time) / num_new_tokens
        hist = self._itl
        for _ in range(num_gaps):
            hist.observe(gap)
        self.last_token_time = now

    def on_finish(self, now: float, finish_reasons: Iterable[Optional[str]]) -> None:
        self.metrics.e2e.labels(self.endpoint).observe(now - self.arrival)
        for reason in finish_reasons:
            self.metrics.finished.labels(self.endpoint, reason or "abort").inc()


class HTTPRequestCounter:
    """ASGI middleware of the ingress app: counts answers by method, route and status code
    (``kvmesh_http_requests_total``).

    Plain ASGI on purpose: Starlette's ``BaseHTTPMiddleware`` (``@app.middleware``) relays
    every chunk of a streamed body through an extra task and memory stream, which
    delayed each SSE chunk.
    """

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def counting_send(message: dict) -> None:
            if message["type"] == "http.response.start":
                path = getattr(scope.get("route"), "path", "other")  # the matched route, once routed
                get_metrics().http_requests.labels(scope["method"], path, str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counting_send)
