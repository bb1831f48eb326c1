"""Deployment YAML: the shipped configs load, and bad files fail with clear errors."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from engine.config import Dtype
from router.config import (DeploymentConfig, RouterKind, load_deployment_config,
                           parse_deployment_config)

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "deploy.yaml"
    path.write_text(textwrap.dedent(text))
    return path


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load(path):
    cfg = load_deployment_config(path)
    assert isinstance(cfg, DeploymentConfig)


def test_tiny_yaml_values():
    cfg = load_deployment_config(CONFIGS / "tiny.yaml")
    assert cfg.engine.model.model == "kvmesh-tiny"
    assert cfg.served_model_name == "kvmesh-tiny"
    assert cfg.engine.model.dtype is Dtype.FLOAT32
    assert cfg.block_size == 16
    assert cfg.replicas.min_replicas == 1 and 2 <= cfg.replicas.max_replicas <= 3
    assert 0 < cfg.replicas.num_cpus < 1
    assert cfg.routing.kind is RouterKind.PREFIX_AWARE
    assert cfg.replicas.is_autoscaling


def test_minimal_file_gets_defaults(tmp_path):
    cfg = load_deployment_config(write(tmp_path, "model: kvmesh-tiny\n"))
    assert cfg == DeploymentConfig(engine=cfg.engine)
    assert cfg.http.port == 8000 and cfg.auth.api_keys == ()


def test_empty_file_is_all_defaults(tmp_path):
    cfg = load_deployment_config(write(tmp_path, ""))
    assert cfg.engine.model.model == "kvmesh-tiny"


def test_served_name_defaults_to_folder_name():
    cfg = parse_deployment_config({"model": "/models/Llama-3.1-8B-Instruct/"})
    assert cfg.served_model_name == "Llama-3.1-8B-Instruct"


def test_ints_accepted_for_floats_and_lists_become_tuples():
    cfg = parse_deployment_config({"replicas": {"num_cpus": 1, "num_gpus": 1},
                                   "auth": {"api_keys": ["a", "b"]}})
    assert cfg.replicas.num_cpus == 1.0 and isinstance(cfg.replicas.num_cpus, float)
    assert cfg.auth.api_keys == ("a", "b")


def test_api_keys_from_env(monkeypatch):
    cfg = parse_deployment_config({"auth": {"api_keys": ["k1"], "api_keys_env": "KVMESH_TEST_KEYS"}})
    monkeypatch.setenv("KVMESH_TEST_KEYS", "k2, k3,")
    assert cfg.auth.resolve_api_keys() == {"k1", "k2", "k3"}
    monkeypatch.delenv("KVMESH_TEST_KEYS")
    assert cfg.auth.resolve_api_keys() == {"k1"}


@pytest.mark.parametrize("text, fragments", [
    ("modle: kvmesh-tiny\n", ["unknown key", "modle"]),
    ("replicas: {min_replicas: 1, max_replica: 2}\n", ["replicas.max_replica"]),
    ("replicas: {min_replicas: 3, max_replicas: 2}\n", ["replicas", "max_replicas (2) must be >= min_replicas (3)"]),
    ("replicas: {min_replicas: 1, max_replicas: 3, initial_replicas: 5}\n", ["initial_replicas"]),
    ("replicas: {num_cpus: -0.5}\n", ["num_cpus must be > 0"]),
    ("replicas: {min_replicas: two}\n", ["replicas.min_replicas", "expected an integer"]),
    ("replicas: {min_replicas: true}\n", ["replicas.min_replicas", "expected an integer"]),
    ("replicas: [1, 2]\n", ["replicas must be a mapping"]),
    ("engine: {block_size: 12}\n", ["engine", "block_size must be a positive power of two"]),
    ("engine: {blok_size: 16}\n", ["engine", "unknown engine option 'blok_size'"]),
    ("engine: {dtype: float8}\n", ["engine", "dtype"]),
    ("engine: {model: foo}\n", ["engine.model is not allowed"]),
    ("routing: {kind: random}\n", ["routing.kind", "prefix_aware"]),
    ("routing: {stats_period_s: 0}\n", ["stats_period_s must be > 0"]),
    ("routing: {kind: prefix_aware, extra: 1}\n", ["routing.extra"]),
    ("autoscaling: {target_waiting_per_replica: 0}\n", ["target_waiting_per_replica must be > 0"]),
    ("autoscaling: {upscale_delay_s: fast}\n", ["autoscaling.upscale_delay_s", "expected a number"]),
    ("http: {port: 70000}\n", ["port must be in"]),
    ("auth: {api_keys: sk-1}\n", ["auth.api_keys", "expected a list"]),
    ("auth: {api_keys: ['']}\n", ["api_keys must be a list of non-empty strings"]),
    ("redis_url: http://localhost\n", ["redis_url must start with redis://"]),
    ("admission: {max_waiting_per_replica: 0}\n", ["max_waiting_per_replica must be >= 1"]),
    ("ingress: {stream_channel: 'yes'}\n", ["ingress.stream_channel", "expected true or false"]),
    ("- just\n- a list\n", ["top level must be a mapping"]),
    ("model: [unclosed\n", ["invalid YAML"]),
])
def test_invalid_configs_name_file_and_field(tmp_path, text, fragments):
    path = write(tmp_path, text)
    with pytest.raises(ValueError) as info:
        load_deployment_config(path)
    message = str(info.value)
    assert message.startswith(str(path)), message
    for fragment in fragments:
        assert fragment in message, (fragment, message)


def test_missing_file_is_value_error(tmp_path):
    with pytest.raises(ValueError, match="cannot read"):
        load_deployment_config(tmp_path / "nope.yaml")


def test_config_is_frozen():
    cfg = parse_deployment_config({})
    with pytest.raises(Exception):
        cfg.name = "x"  # type: ignore[misc]


def test_routing_policy_nests_router_policy_config():
    from router.policy import RouterPolicyConfig, RoutingPolicyKind
    cfg = parse_deployment_config({"routing": {"policy": {"policy": "power_of_two", "load_weight": 2}}})
    assert isinstance(cfg.routing.policy, RouterPolicyConfig)
    assert cfg.routing.policy.policy is RoutingPolicyKind.POWER_OF_TWO
    assert cfg.routing.policy.load_weight == 2.0


@pytest.mark.parametrize("policy, fragment", [
    ({"load_wieght": 2}, "routing.policy.load_wieght"),
    ({"policy": "random"}, "routing.policy.policy"),
    ({"min_match_blocks": 0}, "min_match_blocks must be >= 1"),
])
def test_bad_routing_policy(policy, fragment):
    with pytest.raises(ValueError, match=fragment.replace(".", r"\.")):
        parse_deployment_config({"routing": {"policy": policy}})


def test_pool_scheduler_overrides_reach_only_that_pools_engine():
    cfg = parse_deployment_config({
        "model": "kvmesh-tiny", "engine": {"max_num_batched_tokens": 512},
        "disaggregation": {"mode": "disaggregated",
                           "prefill": {"max_num_batched_tokens": 2048, "long_prefill_token_threshold": 256}}})
    prefill = cfg.pool_engine_config(cfg.disaggregation.prefill).scheduler
    decode = cfg.pool_engine_config(cfg.disaggregation.decode).scheduler
    assert (prefill.max_num_batched_tokens, prefill.long_prefill_token_threshold) == (2048, 256)
    assert (decode.max_num_batched_tokens, decode.long_prefill_token_threshold) == (512, None)
    with pytest.raises(ValueError, match="long_prefill_token_threshold"):
        parse_deployment_config({"model": "kvmesh-tiny", "disaggregation": {
            "mode": "disaggregated", "prefill": {"long_prefill_token_threshold": 0}}})


def test_overlap_prefill_only_in_disaggregated_mode():
    cfg = parse_deployment_config({"model": "kvmesh-tiny", "disaggregation": {
        "mode": "disaggregated", "overlap_prefill": True}})
    assert cfg.disaggregation.overlap_prefill is True
    with pytest.raises(ValueError, match="overlap_prefill needs mode: disaggregated"):
        parse_deployment_config({"model": "kvmesh-tiny", "disaggregation": {
            "mode": "auto", "overlap_prefill": True}})
