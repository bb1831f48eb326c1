"""cluster/*.yaml are valid Ray cluster-launcher configs that serve a kvmesh config that loads.

Validation is Ray's own: ``prepare_config`` (defaults, the local provider's node type)
then ``validate_config`` (ray-schema.json, unknown keys rejected), what `ray up` runs
before it contacts a cloud. Cloud credentials are not needed.
"""

from __future__ import annotations

import copy
import re
import tomllib
from pathlib import Path

import pytest
import yaml

pytest.importorskip("ray")
import jsonschema  # noqa: E402  (ray's validate_config needs it)
from ray.autoscaler._private.util import prepare_config, validate_config  # noqa: E402

from router.config import DeploymentConfig, load_deployment_config  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CLUSTER_CONFIGS = ["aws", "gcp", "onprem"]
CLOUD_CONFIGS = ["aws", "gcp"]
POOLS = ["general", "prefill", "decode"]


def _load(name: str) -> dict:
    return yaml.safe_load((REPO / "cluster" / f"{name}.yaml").read_text())


def served_config_path(cluster_cfg: dict) -> Path:
    """The configs/ file the head's `kvmesh serve` command runs (via the file mount)."""
    serve = [c for c in cluster_cfg["head_start_ray_commands"] if "kvmesh serve" in c]
    assert len(serve) == 1, "expected exactly one head start command running `kvmesh serve`"
    match = re.search(r"KVMESH_CONFIG=~/kvmesh-configs/([\w.-]+\.yaml)", serve[0])
    assert match, f"kvmesh serve command does not name a config under ~/kvmesh-configs: {serve[0]}"
    assert cluster_cfg["file_mounts"]["~/kvmesh-configs"] == "./configs"
    return REPO / "configs" / match.group(1)


def gpus_for_min_replicas(cfg: DeploymentConfig) -> dict[str, int]:
    """GPUs the served config needs at its minimum size, per pool."""
    def per_replica(num_gpus: float, tp: int, pp: int) -> int:
        # Multi-worker replicas reserve one GPU per worker; the replica itself asks num_gpus.
        return int(num_gpus) + (tp * pp if tp * pp > 1 else 0)

    if cfg.disaggregation.is_disaggregated:
        return {name: pool.replicas.min_replicas * per_replica(pool.replicas.num_gpus,
                                                               pool.tensor_parallel_size,
                                                               pool.pipeline_parallel_size)
                for name, pool in (("prefill", cfg.disaggregation.prefill),
                                   ("decode", cfg.disaggregation.decode))}
    parallel = cfg.engine.parallel
    return {"general": cfg.replicas.min_replicas * per_replica(
        cfg.replicas.num_gpus, parallel.tensor_parallel_size, parallel.pipeline_parallel_size)}


@pytest.mark.parametrize("name", CLUSTER_CONFIGS)
def test_cluster_config_passes_rays_validation(name):
    validate_config(prepare_config(copy.deepcopy(_load(name))))


@pytest.mark.parametrize("name", CLUSTER_CONFIGS)
def test_rays_validation_rejects_a_typo(name):
    cfg = _load(name)
    cfg["head_start_ray_comands"] = cfg["head_start_ray_commands"]
    with pytest.raises(jsonschema.ValidationError, match="head_start_ray_comands"):
        validate_config(prepare_config(cfg))


@pytest.mark.parametrize("name", CLUSTER_CONFIGS)
def test_head_serves_a_config_that_kvmesh_loads(name):
    path = served_config_path(_load(name))
    assert path.is_file(), f"cluster/{name}.yaml serves {path}, which does not exist"
    cfg = load_deployment_config(path)
    # Ingress replicas run on any node: a Redis on 127.0.0.1 would mean a different Redis per node.
    assert cfg.redis_url is None or not re.match(r"redis://(127\.|localhost)", cfg.redis_url), \
        f"{path.name}: a loopback redis_url cannot be shared across a cluster"
    assert cfg.http.port == 8000 or "--port" in str(_load(name)["head_start_ray_commands"])


@pytest.mark.parametrize("name", CLUSTER_CONFIGS)
def test_kvmesh_is_installed_at_the_pinned_version(name):
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    setup = " ".join(_load(name)["setup_commands"])
    pins = re.findall(r"kvmesh\[[\w,]+\]==([\w.]+)", setup)
    assert pins == [version], f"cluster/{name}.yaml installs kvmesh {pins}, pyproject says {version}"


@pytest.mark.parametrize("name", CLUSTER_CONFIGS)
def test_head_starts_with_autoscaler_v1_and_no_ray_stop_after_start(name):
    head = _load(name)["head_start_ray_commands"]
    start = [c for c in head if "ray start --head" in c]
    assert len(start) == 1 and "RAY_enable_autoscaler_v2=0" in start[0]
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in start[0]
    # `ray stop` may only come first (clean restart); after `ray start` it would undo it.
    assert all(c.strip() != "ray stop" for c in head[1:])


@pytest.mark.parametrize("name", CLOUD_CONFIGS)
def test_cloud_config_has_gpu_pools_that_fit_the_served_config(name):
    cluster_cfg = _load(name)
    types = cluster_cfg["available_node_types"]
    head = types[cluster_cfg["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0, "the head runs no engine replica"
    by_pool = {}
    for type_name, node_type in types.items():
        pools = [k.removeprefix("kvmesh_pool_") for k in node_type["resources"]
                 if k.startswith("kvmesh_pool_")]
        if type_name != cluster_cfg["head_node_type"]:
            assert len(pools) == 1, f"{type_name}: one kvmesh_pool_* resource expected"
            assert node_type["resources"]["GPU"] >= 1
            assert 0 <= node_type["min_workers"] <= node_type["max_workers"]
            by_pool[pools[0]] = node_type
    assert sorted(by_pool) == sorted(POOLS)
    assert sum(t.get("min_workers", 0) for t in types.values()) <= cluster_cfg["max_workers"]
    needed = gpus_for_min_replicas(load_deployment_config(served_config_path(cluster_cfg)))
    for pool, num_gpus in needed.items():
        node_type = by_pool[pool]
        assert node_type["min_workers"] * node_type["resources"]["GPU"] >= num_gpus, \
            f"{name}: the {pool} pool starts with fewer GPUs than the served config's min replicas need"


def test_onprem_config_is_the_local_provider_over_ssh():
    cfg = _load("onprem")
    assert cfg["provider"]["type"] == "local"
    assert cfg["provider"]["head_ip"] and cfg["provider"]["worker_ips"]
    assert cfg["auth"]["ssh_user"] and cfg["auth"]["ssh_private_key"]
    assert cfg["min_workers"] == cfg["max_workers"] == len(cfg["provider"]["worker_ips"])
