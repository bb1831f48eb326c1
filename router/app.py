"""Builds the Serve application from a ``DeploymentConfig`` and serves it.

    HTTP :port ──▶ Serve proxy ──┐
    HTTP :direct_port ───────────┴─▶ OpenAIIngress (FastAPI; tokenizes, block hashes, admission;
                                  │  direct_port: its own uvicorn, router/direct_http.py)
                                  │ handle.options(stream=True)     ▲ OutputDeltas: one TCP frame per
                                  │   .generate_deltas(request)     │ engine step and ingress (stream
                                  ▼ request router (prefix-aware,   │ channel, router/stream_channel.py),
                                  │   or Serve's default)           │ or Serve stream items
                             LLMServer × N (AsyncLLM each; autoscaled on queue depth;
                                            TP/PP: one placement group per replica, bundle 0
                                            the replica, bundles 1..N its worker actors)
                             (disaggregated: PrefillServer × P ══KV══▶ DecodeServer × D, router/disagg.py)
                                  │ stats every routing.stats_period_s
                                  ▼
                             ReplicaStatsBoard (1 replica) ◀── ingress: /metrics, /health, status

Ray is imported here and in the deployments only; nothing in this module does I/O
at import time.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import time
from typing import Any, Optional

from engine.config import EngineConfig
from router.config import AutoscalingConfig, DeploymentConfig, ReplicaConfig, RouterKind
from router.ingress import RendererFactory
from router.replica import EngineFactory, LLMServer, ReplicaStatsBoard

logger = logging.getLogger(__name__)

INGRESS_NAME = "OpenAIIngress"
REPLICA_NAME = "LLMServer"
BOARD_NAME = "ReplicaStatsBoard"
PREFILL_NAME = "PrefillServer"  # disaggregated mode: the prefill pool
DECODE_NAME = "DecodeServer"  # disaggregated mode: the decode pool (the ingress's ``llm`` handle)


def _request_router_module(cfg: DeploymentConfig) -> Optional[Any]:
    """``router.request_router`` when the config asks for our routers; None for Serve's default."""
    if cfg.routing.kind is not RouterKind.PREFIX_AWARE:
        return None
    try:
        from router import request_router
    except ImportError:
        logger.warning("router.request_router is not available; using Serve's default router")
        return None
    return request_router


def request_router_config(cfg: DeploymentConfig) -> Optional[Any]:
    """Serve ``RequestRouterConfig`` for the prefix-aware router; None for Serve's default."""
    module = _request_router_module(cfg)
    if module is None:
        return None
    return module.request_router_config(
        cfg.routing.policy, redis_url=cfg.redis_url, namespace=cfg.name,
        stats_period_s=cfg.routing.stats_period_s)


def decode_request_router_config(cfg: DeploymentConfig) -> Optional[Any]:
    """The decode pool's Serve ``RequestRouterConfig`` (free-KV-block aware); None for Serve's default."""
    module = _request_router_module(cfg)
    if module is None:
        return None
    return module.decode_request_router_config(
        cfg.routing.policy, block_size=cfg.block_size, redis_url=cfg.redis_url,
        namespace=f"{cfg.name}-decode", stats_period_s=cfg.routing.stats_period_s)


def _autoscaling_options(replicas: ReplicaConfig, scaling: AutoscalingConfig) -> dict[str, Any]:
    """Fixed replica count, or queue-depth autoscaling on this deployment's own replicas' queues."""
    if not replicas.is_autoscaling:
        return {"num_replicas": replicas.min_replicas}
    from router.autoscaling import QueueDepthScalingConfig, autoscaling_config
    policy = QueueDepthScalingConfig(target_waiting_per_replica=scaling.target_waiting_per_replica,
                                     upscale_delay_s=scaling.upscale_delay_s,
                                     downscale_delay_s=scaling.downscale_delay_s,
                                     downscale_running_per_replica=scaling.downscale_running_per_replica)
    return {"autoscaling_config": autoscaling_config(
        replicas.min_replicas, replicas.max_replicas, policy,
        initial_replicas=replicas.initial_replicas, metrics_interval_s=scaling.metrics_interval_s)}


def build_app(cfg: DeploymentConfig, *, engine_factory: Optional[EngineFactory] = None,
              renderer_factory: Optional[RendererFactory] = None) -> Any:
    """The Serve application: ingress → (request router) → LLMServer replicas, plus the stats board.

    ``engine_factory`` / ``renderer_factory`` replace the real engine and tokenizer
    (router unit tests only).
    """
    from ray import serve

    board = serve.deployment(
        ReplicaStatsBoard, name=BOARD_NAME, num_replicas=1, max_ongoing_requests=1000,
        ray_actor_options={"num_cpus": 0},
    ).bind(ttl_s=max(3.0, 6 * cfg.routing.stats_period_s))

    prefill = None
    if cfg.disaggregation.is_disaggregated:
        # Two pools, each sized and autoscaled on its own queue depth. Prefill replicas are
        # picked by prefix affinity and load; decode replicas by load among those with free
        # KV blocks for the prompt (DecodeRequestRouter).
        from router.disagg import DecodeServer, PrefillServer
        disagg = cfg.disaggregation
        prefill_options = _replica_options(PREFILL_NAME, disagg.prefill.replicas, disagg.prefill.autoscaling,
                                           cfg.pool_engine_config(disagg.prefill))
        router_config = request_router_config(dataclasses.replace(cfg, name=f"{cfg.name}-prefill"))
        if router_config is not None:
            prefill_options["request_router_config"] = router_config
        prefill = serve.deployment(PrefillServer, **prefill_options).bind(cfg, board, engine_factory)
        decode_options = _replica_options(DECODE_NAME, disagg.decode.replicas, disagg.decode.autoscaling,
                                          cfg.pool_engine_config(disagg.decode))
        decode_router_config = decode_request_router_config(cfg)
        if decode_router_config is not None:
            decode_options["request_router_config"] = decode_router_config
        llm = serve.deployment(DecodeServer, **decode_options).bind(cfg, board, engine_factory)
    else:
        replica_options = _replica_options(REPLICA_NAME, cfg.replicas, cfg.autoscaling, cfg.engine)
        _pass_engine_process_env(replica_options["ray_actor_options"])
        router_config = request_router_config(cfg)
        if router_config is not None:
            replica_options["request_router_config"] = router_config
        llm = serve.deployment(LLMServer, **replica_options).bind(cfg, board, engine_factory)

    from router.ingress import OpenAIIngressDeployment
    from router.stream_channel import stream_channel_from_env
    if not stream_channel_from_env():  # KVMESH_STREAM_CHANNEL=0 where the app is built (A/B runs)
        cfg = dataclasses.replace(cfg, ingress=dataclasses.replace(cfg.ingress, stream_channel=False))
    return serve.deployment(
        OpenAIIngressDeployment, name=INGRESS_NAME, num_replicas=cfg.ingress.num_replicas,
        max_ongoing_requests=10_000, ray_actor_options={"num_cpus": cfg.ingress.num_cpus},
        graceful_shutdown_timeout_s=5.0,
    ).bind(cfg, llm, board, renderer_factory, prefill)


def _pass_engine_process_env(ray_actor_options: dict[str, Any]) -> None:
    """``KVMESH_ENGINE_PROCESS`` set where the app is built reaches the replicas (their engine in a
    child process, router/replica.py), also on a cluster started without it."""
    from router.replica import ENGINE_PROCESS_ENV
    value = os.environ.get(ENGINE_PROCESS_ENV)
    if value is not None:
        ray_actor_options["runtime_env"] = {"env_vars": {ENGINE_PROCESS_ENV: value}}


def _replica_options(name: str, replicas: ReplicaConfig, scaling: AutoscalingConfig,
                     engine: EngineConfig) -> dict[str, Any]:
    return {
        "name": name,
        "max_ongoing_requests": replicas.max_ongoing_requests,
        "ray_actor_options": {"num_cpus": replicas.num_cpus, "num_gpus": replicas.num_gpus},
        "health_check_period_s": 5.0,
        "health_check_timeout_s": 30.0,
        "graceful_shutdown_timeout_s": 5.0,
        **_placement_options(replicas, engine),
        **_autoscaling_options(replicas, scaling),
    }


def _placement_options(replicas: ReplicaConfig, engine: EngineConfig) -> dict[str, Any]:
    """A multi-worker replica reserves its workers with itself: Serve makes one placement group
    per replica, bundle 0 for the replica actor and bundles 1..N for the workers, which the
    replica's ``RayExecutor`` then uses (engine/placement.py). Nothing for one-worker replicas.

    ``device: auto`` is decided here as the executor decides it: GPUs when the connected
    cluster has any (without a Ray connection, CPU bundles: name ``device: cuda`` in GPU configs).
    """
    from engine.placement import placement_strategy, replica_bundles, uses_gpus
    bundles = replica_bundles(engine, {"CPU": replicas.num_cpus, "GPU": replicas.num_gpus},
                              is_gpu=uses_gpus(engine, _cluster_num_gpus(engine)))
    if bundles is None:
        return {}
    return {"placement_group_bundles": bundles, "placement_group_strategy": placement_strategy(engine.parallel)}


def _cluster_num_gpus(engine: EngineConfig) -> float:
    """GPUs of the connected Ray cluster; only asked for ``device: auto`` (0 when not connected)."""
    if engine.device.device != "auto":
        return 0.0
    import ray
    return float(ray.cluster_resources().get("GPU", 0)) if ray.is_initialized() else 0.0


def deploy(cfg: DeploymentConfig, **factories: Any) -> str:
    """Starts (or joins) Ray and Serve, deploys the app, returns its base URL. Host and ports
    come from ``cfg.http`` only: the ingress's direct server (``http.direct_port``) binds the
    same host as the proxy."""
    import ray
    from ray import serve

    host, port = cfg.http.host, cfg.http.port
    if not ray.is_initialized():
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        # Serve's HTTP proxy forwards to the ingress over gRPC instead of Ray actor calls:
        # about half the proxy's CPU per streamed chunk and a shorter TTFT
        # (bench/http_overhead.py). Workers inherit it only from a cluster started here;
        # for a cluster you join, set it where its nodes run `ray start`.
        os.environ.setdefault("RAY_SERVE_PROXY_USE_GRPC", "1")
        address = os.environ.get("RAY_ADDRESS")
        # "local" starts a private cluster even if another one runs on this host.
        ray.init(address=address or "local", include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app(cfg, **factories), name=cfg.name, route_prefix="/")
    return f"http://{host}:{port}"


def serve_forever(cfg: DeploymentConfig) -> None:
    """Deploys, prints the URL, serves until SIGINT/SIGTERM, then shuts Serve and Ray down."""
    import ray
    from ray import serve

    # The handler only appends to a list: no lock. (``threading.Event.set`` takes a lock, and a
    # second signal arriving inside the first handler's ``set`` - Ctrl-C twice, or a signal sent
    # to both ``timeout`` and this process - deadlocked on it.)
    stop: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, _frame: stop.append(signum))
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        url = deploy(cfg)
        print(f"kvmesh: serving '{cfg.served_model_name}' at {url}/v1 "
              f"(OpenAI API; {url}/metrics, {url}/health). Ctrl-C to stop.", flush=True)
        if cfg.http.direct_port is not None:
            print(f"kvmesh: the ingress replicas also serve it at http://{cfg.http.host}:"
                  f"{cfg.http.direct_port}/v1 (no proxy hop)", flush=True)
        while not stop:
            time.sleep(0.2)
        print("kvmesh: shutting down", flush=True)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        try:
            serve.shutdown()
        finally:
            if ray.is_initialized():
                ray.shutdown()
