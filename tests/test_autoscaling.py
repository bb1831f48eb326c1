"""Queue-depth autoscaling: the plain decision rule, and its Serve adapter."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from router.autoscaling import (POLICY_PATH, QueueDepthPolicy, QueueDepthScalingConfig,
                                autoscaling_config, decide_num_replicas, queue_depth_policy)

CFG = QueueDepthScalingConfig(target_waiting_per_replica=2, upscale_delay_s=5,
                              downscale_delay_s=30, downscale_running_per_replica=4)


def decide(waiting, running, replicas, now, state=None, lo=1, hi=4):
    return decide_num_replicas(waiting, running, replicas, lo, hi, now, state, CFG)


def test_scales_up_only_after_sustained_overload():
    n, state = decide(waiting=7, running=4, replicas=1, now=0.0)
    assert n == 1 and state["overloaded_since"] == 0.0
    n, state = decide(7, 4, 1, now=3.0, state=state)
    assert n == 1
    n, state = decide(7, 4, 1, now=5.0, state=state)
    assert n == 4 and state == {}  # ceil(7 / 2) = 4


def test_upscale_adds_at_least_one_and_respects_max():
    assert decide(5, 0, 2, now=10.0, state={"overloaded_since": 0.0})[0] == 3
    assert decide(100, 0, 2, now=10.0, state={"overloaded_since": 0.0})[0] == 4


def test_overload_interrupted_resets_the_timer():
    _, state = decide(7, 0, 1, now=0.0)
    _, state = decide(1, 0, 1, now=2.0, state=state)  # back under target
    assert state == {}
    n, state = decide(7, 0, 1, now=6.0, state=state)
    assert n == 1 and state["overloaded_since"] == 6.0


def test_target_is_per_replica():
    # 3 replicas, 6 waiting: exactly at target, no upscale.
    n, state = decide(6, 0, 3, now=100.0, state={"overloaded_since": 0.0})
    assert n == 3 and state == {}


def test_scales_down_one_after_idle_delay():
    n, state = decide(0, 2, 3, now=0.0)
    assert n == 3 and state["idle_since"] == 0.0
    n, state = decide(0, 2, 3, now=29.0, state=state)
    assert n == 3
    n, state = decide(0, 2, 3, now=30.0, state=state)
    assert n == 2 and state == {}


def test_no_downscale_while_busy_or_at_min():
    # 9 running would not fit on 2 replicas at 4 each.
    assert decide(0, 9, 3, now=100.0, state={"idle_since": 0.0}) == (3, {})
    assert decide(0, 0, 1, now=100.0, state={"idle_since": 0.0}) == (1, {})
    # Any waiting request means not idle.
    assert decide(1, 0, 3, now=100.0, state={"idle_since": 0.0})[0] == 3


def test_out_of_bounds_is_clamped():
    assert decide(0, 0, 0, now=0.0, lo=1)[0] == 1
    assert decide(0, 0, 6, now=0.0, hi=4)[0] == 4


def test_config_validation():
    with pytest.raises(ValueError):
        QueueDepthScalingConfig(target_waiting_per_replica=0)
    with pytest.raises(ValueError):
        QueueDepthScalingConfig(upscale_delay_s=-1)


def ctx(**overrides):
    base = dict(current_num_replicas=2, capacity_adjusted_min_replicas=1,
                capacity_adjusted_max_replicas=5, current_time=100.0, policy_state={},
                aggregated_metrics={"kvmesh_num_waiting": {"r1": 5.0, "r2": 4.0},
                                    "kvmesh_num_running": {"r1": 8.0, "r2": 8.0}},
                total_queued_requests=0.0, total_num_requests=16.0)
    base.update(overrides)
    return SimpleNamespace(**base)


def test_serve_adapter_reads_replica_metrics_and_keeps_state():
    policy = QueueDepthPolicy(target_waiting_per_replica=2, upscale_delay_s=5)
    n, state = policy(ctx())
    assert n == 2 and state["kvmesh"]["overloaded_since"] == 100.0
    n, state = policy(ctx(current_time=106.0, policy_state=state))
    assert n == 5  # ceil(9 / 2) = 5


def test_serve_adapter_falls_back_to_handle_counts():
    policy = QueueDepthPolicy(target_waiting_per_replica=2, upscale_delay_s=0)
    n, _ = policy(ctx(aggregated_metrics={}, total_queued_requests=10.0, total_num_requests=12.0))
    assert n == 5
    assert queue_depth_policy(ctx(aggregated_metrics=None, total_queued_requests=0.0,
                                  total_num_requests=0.0, current_num_replicas=2))[0] == 2


def test_real_serve_context_and_config_are_accepted():
    serve_config = pytest.importorskip("ray.serve.config")
    from ray.serve._private.common import DeploymentID
    config = serve_config.AutoscalingConfig(**autoscaling_config(1, 4, CFG, initial_replicas=2))
    assert config.policy.policy_function == POLICY_PATH
    real_ctx = serve_config.AutoscalingContext(
        deployment_id=DeploymentID(name="d", app_name="a"), deployment_name="d", app_name="a",
        current_num_replicas=2, target_num_replicas=2, running_replicas=[],
        total_num_requests=lambda: 20.0, total_queued_requests=lambda: 0.0,
        aggregated_metrics=lambda: {"kvmesh_num_waiting": {"r1": 6.0, "r2": 6.0}},
        raw_metrics=None, capacity_adjusted_min_replicas=1, capacity_adjusted_max_replicas=4,
        policy_state={}, last_scale_up_time=None, last_scale_down_time=None, current_time=50.0,
        config=config)
    policy = QueueDepthPolicy(**config.policy.policy_kwargs)
    n, state = policy(real_ctx)
    assert n == 2 and state["kvmesh"]["overloaded_since"] == 50.0
