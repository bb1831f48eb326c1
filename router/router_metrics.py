"""Prometheus metrics of the request router (prometheus_client, namespace ``kvmesh_``).

The router runs inside the process that holds the deployment handle (the
ingress replica), so these series appear on that process's ``/metrics``
(``prometheus_client.generate_latest()``), next to the ingress's own.

- ``kvmesh_router_decisions_total{kind}``: decisions by ``policy.DecisionKind``.
- ``kvmesh_router_redis_available{namespace,router_id}``: 1 while the shared
  state reaches Redis, 0 while it serves from its local mirror.
- ``kvmesh_router_decision_latency_seconds``: one ``choose_replicas`` call,
  state lookup included.
- ``kvmesh_router_matched_blocks``: matched prefix blocks of the chosen replica.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

DECISIONS = Counter("decisions_total", "Routing decisions by kind.", ["kind"],
                    namespace="kvmesh", subsystem="router")
REDIS_AVAILABLE = Gauge("redis_available", "1 if the router's shared state reaches Redis.",
                        ["namespace", "router_id"], namespace="kvmesh", subsystem="router")
DECISION_LATENCY = Histogram(
    "decision_latency_seconds", "Time to pick replicas for one request.",
    namespace="kvmesh", subsystem="router",
    buckets=(25e-6, 50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 0.1))
MATCHED_BLOCKS = Histogram(
    "matched_blocks", "Prefix blocks the chosen replica already caches.",
    namespace="kvmesh", subsystem="router",
    buckets=(0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024))


def record_decision(kind_value: str, latency_s: float, matched_blocks: int) -> None:
    DECISIONS.labels(kind=kind_value).inc()
    DECISION_LATENCY.observe(latency_s)
    MATCHED_BLOCKS.observe(matched_blocks)


def set_redis_available(namespace: str, router_id: str, is_available: bool) -> None:
    REDIS_AVAILABLE.labels(namespace=namespace, router_id=router_id).set(1 if is_available else 0)
