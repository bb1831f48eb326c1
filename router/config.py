"""Typed deployment configuration: one YAML file describes one served model.

Frozen dataclasses nested by concern, Enums for choices, validated at load time
with a ``ValueError`` that names the file and the bad field. Unknown keys are
errors (a typo must not silently fall back to a default); the type checks are
router/typed_yaml.py's. No I/O happens in ``__post_init__``: API keys named by an
environment variable are read when the ingress starts (``AuthConfig.resolve_api_keys``),
not when the file is parsed.

    name: kvmesh                      # Serve application name
    model: kvmesh-tiny                # local HF folder or the built-in model
    served_model_name: kvmesh-tiny    # name clients send as "model" (default: model)
    engine:                           # flat EngineConfig.create(...) options
      max_model_len: 1024
      block_size: 16
    replicas: {min_replicas: 1, max_replicas: 3, initial_replicas: 1,
               num_cpus: 0.25, num_gpus: 0, max_ongoing_requests: 64}
    autoscaling: {target_waiting_per_replica: 2, upscale_delay_s: 5, downscale_delay_s: 30}
    routing: {kind: prefix_aware, stats_period_s: 0.5, block_report_period_s: 5, policy: {...}}  # policy: RouterPolicyConfig
    admission: {max_waiting_per_replica: 32}
    auth: {api_keys: [sk-...], api_keys_env: KVMESH_API_KEYS}
    http: {host: 127.0.0.1, port: 8000}
    ingress: {num_cpus: 0.1, num_replicas: 1, stream_channel: true}
    redis_url: redis://127.0.0.1:6379/0   # optional shared router state
    disaggregation:                   # optional; default mode: colocated (one pool)
      mode: disaggregated             # colocated | disaggregated | auto
      transport: gloo                 # gloo (CPU) | nccl (GPU, CuPy)
      auto_min_uncached_tokens: 256   # auto: prompts with fewer uncached tokens skip the prefill pool
      lease_timeout_s: 30             # decode side holds reserved blocks this long for the KV
      on_transfer_failure: recompute  # recompute | fail
      prefill: {replicas: {...}, autoscaling: {...}, tensor_parallel_size: 1}
      decode:  {replicas: {...}, autoscaling: {...}, tensor_parallel_size: 1}
"""

from __future__ import annotations

import dataclasses
import enum
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from engine.config import EngineConfig
from engine.kv_transfer.base import KVTransportKind
from engine.kv_transfer.plan import TransferFailurePolicy
from router.typed_yaml import build_section, coerce_field, reject_unknown


class RouterKind(str, enum.Enum):
    PREFIX_AWARE = "prefix_aware"  # kvmesh PrefixAwareRequestRouter (router/request_router.py)
    POWER_OF_TWO = "power_of_two"  # Ray Serve's default power-of-two-choices router


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


@dataclass(frozen=True)
class ReplicaConfig:
    """How many engine replicas, and what each one reserves from Ray."""

    min_replicas: int = 1
    max_replicas: int = 1
    initial_replicas: Optional[int] = None  # None: min_replicas
    # The replica actor's own Ray resources; fractional is fine (0.25). A multi-worker replica
    # reserves these as bundle 0 of its placement group, its workers as bundles 1..N
    # (engine/placement.py: {"GPU": 1, "CPU": 1} each on GPUs, {"CPU": 0.2} on CPU).
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    max_ongoing_requests: int = 64  # Serve's cap on in-flight calls per replica
    # Tokens per streamed update of a request (the first token always goes at once; the last
    # update may be shorter). 1: every token. Larger values divide the per-token host work of
    # the replica (output objects, hand-off, Serve's per-item streaming) and the ingress by
    # about this much, with coarser streaming; the text is the same.
    stream_interval: int = 1
    # Under load, widen each request's interval to ceil(unfinished requests / this), so one engine
    # step streams about this many updates however large the batch: the replica's per-step
    # Python work (which shares the GIL with the engine loop) stops growing with concurrency.
    # 64: up to 64 requests stream every token (as users expect); 128 get 2 tokens per update.
    # None: never widen.
    max_stream_updates_per_step: Optional[int] = 64

    def __post_init__(self) -> None:
        _check(self.min_replicas >= 1, f"min_replicas must be >= 1, got {self.min_replicas}")
        _check(self.max_replicas >= self.min_replicas,
               f"max_replicas ({self.max_replicas}) must be >= min_replicas ({self.min_replicas})")
        if self.initial_replicas is not None:
            _check(self.min_replicas <= self.initial_replicas <= self.max_replicas,
                   f"initial_replicas must be in [min_replicas, max_replicas] = "
                   f"[{self.min_replicas}, {self.max_replicas}], got {self.initial_replicas}")
        _check(self.num_cpus > 0, f"num_cpus must be > 0, got {self.num_cpus}")
        _check(self.num_gpus >= 0, f"num_gpus must be >= 0, got {self.num_gpus}")
        _check(self.max_ongoing_requests >= 1,
               f"max_ongoing_requests must be >= 1, got {self.max_ongoing_requests}")
        _check(isinstance(self.stream_interval, int) and self.stream_interval >= 1,
               f"stream_interval must be an integer >= 1, got {self.stream_interval!r}")
        _check(self.max_stream_updates_per_step is None
               or (isinstance(self.max_stream_updates_per_step, int) and self.max_stream_updates_per_step >= 1),
               f"max_stream_updates_per_step must be an integer >= 1 or null, "
               f"got {self.max_stream_updates_per_step!r}")

    @property
    def is_autoscaling(self) -> bool:
        return self.max_replicas > self.min_replicas


@dataclass(frozen=True)
class AutoscalingConfig:
    """Scale on queue depth: waiting (not yet running) requests per replica."""

    target_waiting_per_replica: float = 2.0
    upscale_delay_s: float = 10.0  # sustained overload before adding a replica
    downscale_delay_s: float = 60.0  # sustained idleness before removing one
    downscale_running_per_replica: float = 8.0  # running requests each remaining replica absorbs
    metrics_interval_s: float = 1.0  # how often replicas report to the controller

    def __post_init__(self) -> None:
        _check(self.target_waiting_per_replica > 0,
               f"target_waiting_per_replica must be > 0, got {self.target_waiting_per_replica}")
        _check(self.upscale_delay_s >= 0, f"upscale_delay_s must be >= 0, got {self.upscale_delay_s}")
        _check(self.downscale_delay_s >= 0,
               f"downscale_delay_s must be >= 0, got {self.downscale_delay_s}")
        _check(self.downscale_running_per_replica >= 0,
               f"downscale_running_per_replica must be >= 0, got {self.downscale_running_per_replica}")
        _check(self.metrics_interval_s > 0,
               f"metrics_interval_s must be > 0, got {self.metrics_interval_s}")


@dataclass(frozen=True)
class RoutingConfig:
    kind: RouterKind = RouterKind.PREFIX_AWARE
    stats_period_s: float = 1.0  # how often Serve pulls each replica's ReplicaStats
    # How often those stats also list every block of the replica's prefix cache: a correction
    # (evictions) for the routers' prefix index, which each dispatch already updates. A GPU
    # replica caches tens of thousands of blocks, and every router of every ingress parses
    # the list, holding the GIL of the process that streams tokens to clients.
    block_report_period_s: float = 5.0
    # router.policy.RouterPolicyConfig (thresholds of the prefix-aware policy); None: its defaults.
    policy: Optional[Any] = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", RouterKind(self.kind))
        _check(self.stats_period_s > 0, f"stats_period_s must be > 0, got {self.stats_period_s}")
        _check(self.block_report_period_s > 0,
               f"block_report_period_s must be > 0, got {self.block_report_period_s}")


@dataclass(frozen=True)
class AdmissionConfig:
    """Load shedding in the ingress (HTTP 429) before a request reaches a replica."""

    max_waiting_per_replica: Optional[int] = 64  # None: never shed load

    def __post_init__(self) -> None:
        _check(self.max_waiting_per_replica is None or self.max_waiting_per_replica >= 1,
               f"max_waiting_per_replica must be >= 1 or null, got {self.max_waiting_per_replica}")


@dataclass(frozen=True)
class AuthConfig:
    """API keys accepted as ``Authorization: Bearer <key>``; none configured: no auth."""

    api_keys: tuple[str, ...] = ()
    api_keys_env: Optional[str] = None  # env var holding comma-separated keys, read at startup

    def __post_init__(self) -> None:
        object.__setattr__(self, "api_keys", tuple(self.api_keys))
        _check(all(isinstance(k, str) and k for k in self.api_keys),
               "api_keys must be a list of non-empty strings")
        _check(self.api_keys_env is None or bool(self.api_keys_env),
               "api_keys_env must be a non-empty environment variable name")

    def resolve_api_keys(self) -> frozenset[str]:
        """The configured keys plus those in ``api_keys_env`` (read now, from the environment)."""
        keys = set(self.api_keys)
        if self.api_keys_env:
            keys.update(k.strip() for k in os.environ.get(self.api_keys_env, "").split(",") if k.strip())
        return frozenset(keys)


@dataclass(frozen=True)
class HttpConfig:
    host: str = "127.0.0.1"
    port: int = 8000  # Serve's HTTP proxy
    # Also serve the OpenAI API from every ingress replica on this port (router/direct_http.py):
    # the replicas of a node share it (SO_REUSEPORT) and streamed tokens skip the proxy's hop.
    # One port per app: another app's ingress on the same node and port would share it too.
    # None: only the proxy's port.
    direct_port: Optional[int] = None

    def __post_init__(self) -> None:
        _check(bool(self.host), "host must be non-empty")
        _check(0 < self.port < 65536, f"port must be in [1, 65535], got {self.port}")
        if self.direct_port is not None:
            _check(isinstance(self.direct_port, int) and 0 < self.direct_port < 65536,
                   f"direct_port must be in [1, 65535] or null, got {self.direct_port!r}")
            _check(self.direct_port != self.port,
                   f"direct_port must differ from port (both {self.port}): the proxy listens there")


@dataclass(frozen=True)
class IngressConfig:
    num_cpus: float = 0.1  # the ingress only tokenizes and relays
    num_replicas: int = 1
    # Replicas push deltas to the ingress over a direct TCP channel, one frame per engine step
    # and ingress (router/stream_channel.py), instead of one Serve stream item per delta, whose
    # host cost in the replica shares the GIL with the engine loop. false (or the environment's
    # KVMESH_STREAM_CHANNEL=0): Serve streaming.
    stream_channel: bool = True

    def __post_init__(self) -> None:
        _check(self.num_cpus > 0, f"num_cpus must be > 0, got {self.num_cpus}")
        _check(self.num_replicas >= 1, f"num_replicas must be >= 1, got {self.num_replicas}")
        _check(isinstance(self.stream_channel, bool),
               f"stream_channel must be true or false, got {self.stream_channel!r}")


class DeploymentMode(str, enum.Enum):
    COLOCATED = "colocated"  # one pool: every replica prefills and decodes
    DISAGGREGATED = "disaggregated"  # prompts run on the prefill pool, their KV moves to the decode pool
    AUTO = "auto"  # disaggregated, but prompts with a short uncached part stay on the decode pool


@dataclass(frozen=True)
class PoolConfig:
    """One pool of a disaggregated deployment: its replicas, autoscaling and parallel sizes."""

    replicas: ReplicaConfig = field(default_factory=ReplicaConfig)
    autoscaling: AutoscalingConfig = field(default_factory=AutoscalingConfig)
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    # Engine scheduler options of this pool's replicas (None: the deployment's ``engine`` value):
    # a prefill pool wants a large step budget with a per-prompt cap, a decode pool small steps.
    max_num_batched_tokens: Optional[int] = None
    long_prefill_token_threshold: Optional[int] = None

    def __post_init__(self) -> None:
        _check(self.tensor_parallel_size >= 1 and self.pipeline_parallel_size >= 1,
               "tensor_parallel_size and pipeline_parallel_size must be >= 1")
        for name in ("max_num_batched_tokens", "long_prefill_token_threshold"):
            value = getattr(self, name)
            _check(value is None or (isinstance(value, int) and value > 0),
                   f"{name} must be a positive integer or null, got {value!r}")


@dataclass(frozen=True)
class DisaggregationConfig:
    """Prefill/decode disaggregation (router/disagg.py); the default keeps one colocated pool."""

    mode: DeploymentMode = DeploymentMode.COLOCATED
    transport: KVTransportKind = KVTransportKind.GLOO
    auto_min_uncached_tokens: int = 256  # AUTO: fewer uncached prompt tokens run on the decode pool
    lease_timeout_s: float = 30.0  # how long the decode side holds reserved blocks for the KV
    transfer_timeout_s: float = 30.0  # one pair send/recv (and pair creation)
    on_transfer_failure: TransferFailurePolicy = TransferFailurePolicy.RECOMPUTE
    max_decode_retries: int = 1  # a dead decode replica: restart the request on another this often
    # DISAGGREGATED only: start the prefill together with the decode side's reservation (the KV
    # waits on the prefill replica for the plan), so TTFT does not include the reservation.
    overlap_prefill: bool = False
    prefill: PoolConfig = field(default_factory=PoolConfig)
    decode: PoolConfig = field(default_factory=PoolConfig)

    def __post_init__(self) -> None:
        for name, cls in (("mode", DeploymentMode), ("transport", KVTransportKind),
                          ("on_transfer_failure", TransferFailurePolicy)):
            object.__setattr__(self, name, cls(getattr(self, name)))
        _check(self.auto_min_uncached_tokens >= 1,
               f"auto_min_uncached_tokens must be >= 1, got {self.auto_min_uncached_tokens}")
        _check(self.lease_timeout_s > 0, f"lease_timeout_s must be > 0, got {self.lease_timeout_s}")
        _check(self.transfer_timeout_s > 0, f"transfer_timeout_s must be > 0, got {self.transfer_timeout_s}")
        _check(self.max_decode_retries >= 0, f"max_decode_retries must be >= 0, got {self.max_decode_retries}")
        _check(not self.overlap_prefill or self.mode is DeploymentMode.DISAGGREGATED,
               f"overlap_prefill needs mode: disaggregated (in {self.mode.value} mode the decode side "
               "decides whether the prefill pool runs the prompt at all)")
        # Rank r of a prefill replica sends its KV shard to rank r of the decode replica.
        _check((self.prefill.tensor_parallel_size, self.prefill.pipeline_parallel_size)
               == (self.decode.tensor_parallel_size, self.decode.pipeline_parallel_size),
               "prefill and decode pools must use the same tensor_parallel_size and "
               "pipeline_parallel_size (KV resharding between different sizes is not supported)")

    @property
    def is_disaggregated(self) -> bool:
        return self.mode is not DeploymentMode.COLOCATED

    @property
    def min_remote_tokens(self) -> int:
        """Uncached prompt tokens from which a prompt goes through the prefill pool."""
        return self.auto_min_uncached_tokens if self.mode is DeploymentMode.AUTO else 1


@dataclass(frozen=True)
class DeploymentConfig:
    engine: EngineConfig = field(default_factory=EngineConfig)
    name: str = "kvmesh"  # Serve application name
    served_model_name: str = "kvmesh-tiny"  # the "model" clients ask for
    replicas: ReplicaConfig = field(default_factory=ReplicaConfig)
    autoscaling: AutoscalingConfig = field(default_factory=AutoscalingConfig)
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    admission: AdmissionConfig = field(default_factory=AdmissionConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    http: HttpConfig = field(default_factory=HttpConfig)
    ingress: IngressConfig = field(default_factory=IngressConfig)
    redis_url: Optional[str] = None  # shared router state across ingress replicas
    disaggregation: DisaggregationConfig = field(default_factory=DisaggregationConfig)

    def __post_init__(self) -> None:
        _check(bool(self.name), "name must be non-empty")
        _check(bool(self.served_model_name), "served_model_name must be non-empty")
        _check(self.redis_url is None or self.redis_url.startswith(("redis://", "rediss://", "unix://")),
               f"redis_url must start with redis://, rediss:// or unix://, got {self.redis_url!r}")

    @property
    def block_size(self) -> int:
        return self.engine.cache.block_size

    def pool_engine_config(self, pool: PoolConfig) -> EngineConfig:
        """The engine config of one pool's replicas: the shared options with the pool's sizes."""
        parallel = dataclasses.replace(self.engine.parallel, tensor_parallel_size=pool.tensor_parallel_size,
                                       pipeline_parallel_size=pool.pipeline_parallel_size)
        overrides = {name: getattr(pool, name) for name in ("max_num_batched_tokens", "long_prefill_token_threshold")
                     if getattr(pool, name) is not None}
        scheduler = dataclasses.replace(self.engine.scheduler, **overrides)
        return dataclasses.replace(self.engine, parallel=parallel, scheduler=scheduler)


# ---- loading ------------------------------------------------------------------------------------
_SECTIONS: dict[str, type] = {
    "replicas": ReplicaConfig,
    "autoscaling": AutoscalingConfig,
    "admission": AdmissionConfig,
    "auth": AuthConfig,
    "http": HttpConfig,
    "ingress": IngressConfig,
    "disaggregation": DisaggregationConfig,
}
_TOP_LEVEL = {"name", "model", "served_model_name", "engine", "routing", "redis_url", *_SECTIONS}


def load_deployment_config(path: str | os.PathLike) -> DeploymentConfig:
    """Reads and validates a deployment YAML; raises ``ValueError`` naming the file and field."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ValueError(f"{path}: cannot read deployment config: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: invalid YAML: {exc}") from None
    return parse_deployment_config(data if data is not None else {}, source=str(path))


def parse_deployment_config(data: Any, source: str = "<config>") -> DeploymentConfig:
    """Builds a ``DeploymentConfig`` from already-parsed YAML/JSON data."""
    if not isinstance(data, dict):
        raise ValueError(f"{source}: the top level must be a mapping, got {type(data).__name__}")
    reject_unknown(data, _TOP_LEVEL, source, "")
    model = data.get("model", "kvmesh-tiny")
    if not isinstance(model, str) or not model:
        raise ValueError(f"{source}: model must be a non-empty string, got {model!r}")
    engine_kwargs = data.get("engine") or {}
    if not isinstance(engine_kwargs, dict):
        raise ValueError(f"{source}: engine must be a mapping of engine options")
    if "model" in engine_kwargs:
        raise ValueError(f"{source}: engine.model is not allowed; set the top-level 'model'")
    try:
        engine = EngineConfig.create(model=model, **engine_kwargs)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{source}: engine: {exc}") from None

    kwargs: dict[str, Any] = {"engine": engine}
    for key in ("name", "served_model_name", "redis_url"):
        if key in data:
            kwargs[key] = coerce_field(data[key], DeploymentConfig, key, source, "")
    kwargs.setdefault("served_model_name", engine.model.served_model_name or _default_served_name(model))
    for key, cls in _SECTIONS.items():
        if key in data:
            kwargs[key] = build_section(cls, data[key], source, key)
    if "routing" in data:
        kwargs["routing"] = _build_routing(data["routing"], source)
    try:
        return DeploymentConfig(**kwargs)
    except ValueError as exc:
        raise ValueError(f"{source}: {exc}") from None


def _default_served_name(model: str) -> str:
    return model if model == "kvmesh-tiny" else Path(model.rstrip("/")).name or model


def _build_routing(data: Any, source: str) -> RoutingConfig:
    if data is None:
        return RoutingConfig()
    if not isinstance(data, dict):
        raise ValueError(f"{source}: routing must be a mapping")
    reject_unknown(data, {"kind", "stats_period_s", "block_report_period_s", "policy"}, source, "routing")
    kwargs: dict[str, Any] = {}
    for key in ("kind", "stats_period_s", "block_report_period_s"):
        if key in data:
            kwargs[key] = coerce_field(data[key], RoutingConfig, key, source, "routing")
    if data.get("policy") is not None:
        policy_cls = router_policy_config_class()
        if policy_cls is None:
            raise ValueError(f"{source}: routing.policy needs router.policy.RouterPolicyConfig, "
                             "which is not available in this build")
        kwargs["policy"] = build_section(policy_cls, data["policy"], source, "routing.policy")
    try:
        return RoutingConfig(**kwargs)
    except ValueError as exc:
        raise ValueError(f"{source}: routing: {exc}") from None


def router_policy_config_class() -> Optional[type]:
    """``router.policy.RouterPolicyConfig`` if that module is present, else None."""
    try:
        from router.policy import RouterPolicyConfig
    except ImportError:
        return None
    return RouterPolicyConfig
