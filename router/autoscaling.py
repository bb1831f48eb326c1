"""Queue-depth autoscaling for the replica deployment (a Ray Serve custom policy).

Plain Python: ``decide_num_replicas`` holds the whole rule and is tested alone;
``QueueDepthPolicy`` / ``queue_depth_policy`` adapt it to Serve's
``AutoscalingContext`` (only attributes are read, ray is never imported).

- **Up.** When waiting (admitted, not yet running) requests per replica stay
  above ``target_waiting_per_replica`` for ``upscale_delay_s``, go to
  ``ceil(total_waiting / target)`` replicas (at least one more).
- **Down.** When nothing waits and the running requests would fit on one
  replica fewer at ``downscale_running_per_replica`` each, for
  ``downscale_delay_s`` straight, remove one replica.
- Always within ``[min_replicas, max_replicas]`` (Serve's capacity-adjusted bounds).

Replicas publish ``kvmesh_num_waiting`` and ``kvmesh_num_running`` from
``record_autoscaling_stats()``; without them the policy falls back to Serve's
handle-side counts (queued at handles as waiting, the rest as running).
Serve applies its own delays on top of a custom policy, so build the
deployment's config with ``autoscaling_config`` (it sets Serve's delays to 0).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Any, Optional

WAITING_METRIC = "kvmesh_num_waiting"
RUNNING_METRIC = "kvmesh_num_running"
POLICY_PATH = "router.autoscaling:QueueDepthPolicy"


@dataclass(frozen=True)
class QueueDepthScalingConfig:
    target_waiting_per_replica: float = 2.0  # waiting requests per replica we tolerate
    upscale_delay_s: float = 10.0  # sustained overload before adding replicas
    downscale_delay_s: float = 60.0  # sustained idleness before removing one
    downscale_running_per_replica: float = 8.0  # running requests the others may absorb each

    def __post_init__(self) -> None:
        if self.target_waiting_per_replica <= 0:
            raise ValueError("target_waiting_per_replica must be > 0, "
                             f"got {self.target_waiting_per_replica}")
        if self.upscale_delay_s < 0 or self.downscale_delay_s < 0:
            raise ValueError("upscale_delay_s and downscale_delay_s must be >= 0")
        if self.downscale_running_per_replica < 0:
            raise ValueError("downscale_running_per_replica must be >= 0")


def decide_num_replicas(num_waiting: float, num_running: float, num_replicas: int,
                        min_replicas: int, max_replicas: int, now_s: float,
                        state: Optional[dict], cfg: QueueDepthScalingConfig
                        ) -> tuple[int, dict]:
    """Target replica count and the new ``state`` (``overloaded_since``, ``idle_since``)."""
    state = dict(state or {})
    clamp = lambda n: max(min_replicas, min(max_replicas, n))  # noqa: E731
    if num_replicas < min_replicas or num_replicas > max_replicas:
        return clamp(num_replicas), {}
    overloaded = num_waiting > cfg.target_waiting_per_replica * max(num_replicas, 1)
    idle = (num_waiting == 0 and num_replicas > min_replicas
            and num_running <= (num_replicas - 1) * cfg.downscale_running_per_replica)
    if overloaded:
        state.pop("idle_since", None)
        since = state.setdefault("overloaded_since", now_s)
        if now_s - since >= cfg.upscale_delay_s:
            desired = max(num_replicas + 1, math.ceil(num_waiting / cfg.target_waiting_per_replica))
            return clamp(desired), {}
        return num_replicas, state
    if idle:
        state.pop("overloaded_since", None)
        since = state.setdefault("idle_since", now_s)
        if now_s - since >= cfg.downscale_delay_s:
            return clamp(num_replicas - 1), {}
        return num_replicas, state
    return num_replicas, {}


class QueueDepthPolicy:
    """Serve class-callable policy: ``{"policy_function": POLICY_PATH, "policy_kwargs": {...}}``."""

    def __init__(self, **kwargs: Any):
        self.cfg = QueueDepthScalingConfig(**kwargs)

    def __call__(self, ctx: Any) -> tuple[int, dict]:
        num_waiting, num_running = _queue_metrics(ctx)
        now_s = ctx.current_time if ctx.current_time is not None else time.time()
        own_state = (ctx.policy_state or {}).get("kvmesh", {})
        # Start from the autoscaler's current target, not the running count: while a new
        # replica starts, answering with the running count would cancel the scale-up.
        target = getattr(ctx, "target_num_replicas", None)
        num_replicas, new_state = decide_num_replicas(
            num_waiting, num_running, target if target is not None else ctx.current_num_replicas,
            ctx.capacity_adjusted_min_replicas, ctx.capacity_adjusted_max_replicas,
            now_s, own_state, self.cfg)
        return num_replicas, {"kvmesh": new_state}


def queue_depth_policy(ctx: Any) -> tuple[int, dict]:
    """Function form with default thresholds (``router.autoscaling:queue_depth_policy``)."""
    return QueueDepthPolicy()(ctx)


def _queue_metrics(ctx: Any) -> tuple[float, float]:
    """(total waiting, total running) over the running replicas."""
    metrics = ctx.aggregated_metrics or {}
    waiting = metrics.get(WAITING_METRIC)
    if waiting:
        running = metrics.get(RUNNING_METRIC) or {}
        return float(sum(waiting.values())), float(sum(running.values()))
    queued = float(ctx.total_queued_requests or 0.0)
    return queued, max(0.0, float(ctx.total_num_requests or 0.0) - queued)


def autoscaling_config(min_replicas: int, max_replicas: int, cfg: QueueDepthScalingConfig,
                       initial_replicas: Optional[int] = None,
                       metrics_interval_s: float = 1.0) -> dict:
    """The deployment's ``autoscaling_config`` dict using ``QueueDepthPolicy``."""
    config = {
        "min_replicas": min_replicas, "max_replicas": max_replicas,
        "metrics_interval_s": metrics_interval_s, "look_back_period_s": 2 * metrics_interval_s,
        "upscale_delay_s": 0.0, "downscale_delay_s": 0.0,  # our policy applies the delays
        "policy": {"policy_function": POLICY_PATH, "policy_kwargs": asdict(cfg)},
    }
    if initial_replicas is not None:
        config["initial_replicas"] = initial_replicas
    return config
