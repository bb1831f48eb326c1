"""helm/kvmesh renders, lints and validates offline, and serves a config kvmesh accepts.

Helm's own engine (helm-python-sdk: Helm v4's Go SDK through a C ABI) renders and lints
`--strict`; core kinds are checked with kubernetes-validate `--strict` (its bundled
Kubernetes schemas); the RayService against KubeRay's CRD schema from
../shared/k8s/kuberay-crds with unknown fields as errors (what the API server's strict
field validation does); the embedded Serve config with Ray Serve's schema and kvmesh's
loader. Bad values must fail at render time with a message naming the value to change.
"""

from __future__ import annotations

import copy
import dataclasses
import enum
import json
import types
import typing
from functools import lru_cache
from pathlib import Path
from typing import Any, Union

import pytest
import yaml

helm = pytest.importorskip("helm_python", reason="pip install helm-python-sdk (the dev extra)")
kubernetes_validate = pytest.importorskip("kubernetes_validate")
jsonschema = pytest.importorskip("jsonschema")

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "helm" / "kvmesh"
CRDS = REPO.parent / "shared" / "k8s" / "kuberay-crds"
KUBE_VERSION = "1.33.0"
EXAMPLES = ["gpu", "disaggregated", "multinode"]
# Kinds kubernetes-validate knows; RayService and ServiceMonitor are CRDs (checked apart).
CORE_KINDS = {"Service", "Deployment", "Secret", "Ingress"}


# ---- helpers ----------------------------------------------------------------------------------
def example_values(name: str) -> dict:
    return yaml.safe_load((CHART / "examples" / f"{name}.yaml").read_text())


def all_features(values: dict) -> dict:
    """Values with every optional object on, so every template renders."""
    values = copy.deepcopy(values)
    values.setdefault("apiKeys", {})["keys"] = ["sk-test-1", "sk-test-2"]
    values.setdefault("ingress", {}).update(enabled=True, host="llm.example.com")
    values.setdefault("serviceMonitor", {})["enabled"] = True
    return values


def render(values: dict | None = None) -> list[dict]:
    with helm.Chart.load(CHART) as chart:
        manifests = chart.render(values=values, name="llm", namespace="serving")
    docs = []
    for path, text in sorted(manifests.items()):
        if path.endswith("NOTES.txt"):
            continue
        docs.extend(d for d in yaml.safe_load_all(text) if d)
    return docs


def render_error(values: dict) -> str:
    with helm.Chart.load(CHART) as chart:
        with pytest.raises(helm.HelmError) as info:
            chart.render(values=values, name="llm", namespace="serving")
    return str(info.value)


def one(docs: list[dict], kind: str) -> dict:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def _strict(schema: Any) -> Any:
    """Unknown fields are errors: additionalProperties false wherever properties are listed."""
    if isinstance(schema, dict):
        schema = {k: _strict(v) for k, v in schema.items()}
        if "properties" in schema and "additionalProperties" not in schema \
                and not schema.get("x-kubernetes-preserve-unknown-fields"):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


@lru_cache(maxsize=None)
def crd_validator(kind_file: str, version: str = "v1") -> Any:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRD is 1 MB of YAML
    crd = yaml.load((CRDS / kind_file).read_text(), Loader=loader)
    schema = next(v for v in crd["spec"]["versions"] if v["name"] == version)["schema"]["openAPIV3Schema"]
    return jsonschema.Draft7Validator(_strict(schema))


def crd_errors(doc: dict) -> list[str]:
    validator = crd_validator("ray.io_rayservices.yaml", doc["apiVersion"].split("/")[1])
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
            for e in sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.path)))]


def serve_config(docs: list[dict]) -> dict:
    return yaml.safe_load(one(docs, "RayService")["spec"]["serveConfigV2"])


# ---- render + lint ----------------------------------------------------------------------------
VALUE_SETS = {"default": {}, **{name: None for name in EXAMPLES}}


def _values(name: str) -> dict:
    return {} if name == "default" else example_values(name)


@pytest.mark.parametrize("name", list(VALUE_SETS))
def test_lint_strict(name):
    report = helm.lint(CHART, all_features(_values(name)), strict=True, namespace="serving",
                       kube_version=f"v{KUBE_VERSION}")
    problems = [m for m in report["messages"] if m["severity"] >= 1] + report["errors"]
    assert not problems, problems


@pytest.mark.parametrize("name", list(VALUE_SETS))
def test_core_kinds_pass_kubernetes_validate_strict(name):
    docs = render(all_features(_values(name)))
    kinds = {d["kind"] for d in docs}
    assert {"RayService", "Service", "ServiceMonitor", "Secret", "Ingress"} <= kinds, kinds
    for doc in docs:
        if doc["kind"] in CORE_KINDS:
            kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
    # The pods KubeRay will create: the head's and each worker group's template.
    spec = one(docs, "RayService")["spec"]["rayClusterConfig"]
    for template in [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]:
        kubernetes_validate.validate({"apiVersion": "v1", "kind": "PodTemplate",
                                      "metadata": {"name": "check"}, "template": template},
                                     KUBE_VERSION, strict=True)


@pytest.mark.skipif(not CRDS.is_dir(), reason=f"KubeRay CRDs not found at {CRDS}")
@pytest.mark.parametrize("name", list(VALUE_SETS))
def test_rayservice_matches_kuberay_crd_strictly(name):
    docs = render(all_features(_values(name)))
    assert crd_errors(one(docs, "RayService")) == []


@pytest.mark.skipif(not CRDS.is_dir(), reason=f"KubeRay CRDs not found at {CRDS}")
def test_crd_check_rejects_unknown_fields():
    doc = one(render(), "RayService")
    doc["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParam"] = {}
    doc["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["gpus"] = 1
    errors = crd_errors(doc)
    assert any("rayStartParam" in e for e in errors) and any("'gpus'" in e for e in errors), errors


# ---- the embedded Serve application ---------------------------------------------------------
@pytest.mark.parametrize("name", list(VALUE_SETS))
def test_embedded_serve_config_is_accepted_by_serve_and_kvmesh(name):
    from ray.serve.schema import ServeDeploySchema

    from cluster.serve_app import parse_serve_args

    values = _values(name)
    docs = render(values)
    config = serve_config(docs)
    ServeDeploySchema.model_validate(config)  # Ray Serve's own schema for serveConfigV2
    (app,) = config["applications"]
    assert app["import_path"] == "cluster.serve_app:app_builder" and app["route_prefix"] == "/"
    cfg = parse_serve_args(app["args"])
    expected = {**yaml.safe_load((CHART / "values.yaml").read_text())["kvmesh"], **values.get("kvmesh", {})} \
        if name == "default" else values["kvmesh"]
    assert cfg.engine.model.model == expected["model"]
    assert cfg.served_model_name == expected["served_model_name"]
    assert cfg.auth.api_keys_env == "KVMESH_API_KEYS"
    redis = values.get("redis", {})
    if redis.get("externalUrl"):
        assert cfg.redis_url == redis["externalUrl"]
    else:
        assert cfg.redis_url == "redis://llm-kvmesh-redis:6379/0"
        assert one(docs, "Deployment")["metadata"]["name"] == "llm-kvmesh-redis"


def test_app_builder_builds_the_serve_application():
    from ray.serve import Application

    from cluster.serve_app import app_builder
    (app,) = serve_config(render())["applications"]
    assert isinstance(app_builder(app["args"]), Application)


def test_app_builder_rejects_a_bad_config_with_the_loaders_message():
    from cluster.serve_app import parse_serve_args
    with pytest.raises(ValueError, match=r"serveConfigV2 args.config: unknown key\(s\) replica\b"):
        parse_serve_args({"config": {"model": "kvmesh-tiny", "replica": {}}})
    with pytest.raises(ValueError, match="exactly the key 'config'"):
        parse_serve_args({"cfg": {}})


def test_gpu_example_requests_gpus_and_tolerates_gpu_taints():
    spec = one(render(example_values("multinode")), "RayService")["spec"]["rayClusterConfig"]
    (group,) = spec["workerGroupSpecs"]
    container = group["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 4
    assert group["rayStartParams"]["num-gpus"] == "4"
    assert group["template"]["spec"]["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert group["template"]["spec"]["nodeSelector"]
    assert spec["headGroupSpec"]["rayStartParams"]["num-gpus"] == "0"


def test_api_keys_secret_reaches_every_ray_container():
    docs = render({"apiKeys": {"keys": ["sk-a", "sk-b"]}})
    secret = one(docs, "Secret")
    assert secret["stringData"] == {"KVMESH_API_KEYS": "sk-a,sk-b"}
    spec = one(docs, "RayService")["spec"]["rayClusterConfig"]
    containers = [spec["headGroupSpec"]["template"]["spec"]["containers"][0]] + \
        [g["template"]["spec"]["containers"][0] for g in spec["workerGroupSpecs"]]
    for container in containers:
        refs = [e["valueFrom"]["secretKeyRef"] for e in container["env"] if "valueFrom" in e]
        assert refs == [{"name": secret["metadata"]["name"], "key": "KVMESH_API_KEYS"}]


# ---- bad values fail at render time -----------------------------------------------------------
@pytest.mark.parametrize("values, message", [
    ({"kvmesh": {"model": ""}}, "at '/kvmesh/model': minLength"),
    ({"kvmesh": {"replicas": {"min_replicas": "two"}}}, "at '/kvmesh/replicas/min_replicas': got string, want integer"),
    ({"kvmesh": {"engine": {"tensor_parallel_sise": 2}}}, "additional properties 'tensor_parallel_sise' not allowed"),
    ({"kvmesh": {"redis_url": "redis://x:6379"}}, "additional properties 'redis_url' not allowed"),
    ({"kvmesh": {"routing": {"kind": "round_robin"}}}, "/kvmesh/routing/kind"),
    ({"workerGroups": [{"name": "gpu", "pool": "general", "replicas": 1, "minReplicas": 1,
                        "maxReplicas": "4", "gpus": 1}]}, "/workerGroups/0/maxReplicas"),
    ({"service": {"port": 80000}}, "/service/port"),
])
def test_schema_rejects_bad_values(values, message):
    assert message in render_error(values)


def test_missing_model_fails_with_a_clear_message():
    # `--set kvmesh.model=null` (or a values file without it) removes the default.
    assert "at '/kvmesh': missing property 'model'" in render_error({"kvmesh": {"model": None}})


def test_gpus_per_pod_must_fit_the_tensor_parallel_group():
    values = example_values("multinode")
    values["workerGroups"][0]["gpus"] = 6
    error = render_error(values)
    assert "workerGroups[0] (gpu4) has gpus: 6 per pod" in error
    assert "tensor_parallel_size=4" in error and "multiple of 4" in error


def test_gpu_capacity_must_hold_the_minimum_replicas():
    values = example_values("disaggregated")
    values["workerGroups"] = values["workerGroups"][:1]  # prefill group only: 4 GPUs max
    values["kvmesh"]["disaggregation"]["prefill"]["replicas"]["min_replicas"] = 4  # + 1 decode
    values["kvmesh"]["disaggregation"]["prefill"]["replicas"]["max_replicas"] = 4
    error = render_error(values)
    assert "hold at most 4 GPUs" in error and "minimum replicas need 5" in error


def test_cuda_engine_without_gpu_workers_fails():
    values = example_values("gpu")
    values["workerGroups"][0]["gpus"] = 0
    assert 'kvmesh.engine.device is "cuda" but no workerGroups entry has gpus > 0' in render_error(values)


def test_redis_enabled_and_external_url_conflict():
    error = render_error({"redis": {"enabled": True, "externalUrl": "redis://r:6379/0"}})
    assert "either redis.enabled" in error


# ---- values.schema.json follows kvmesh's config classes --------------------------------------
def _type_schema(hint: Any) -> dict:
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return {"anyOf": [_type_schema(args[0]), {"type": "null"}]}
    if origin in (tuple, list):
        return {"type": "array", "items": _type_schema(typing.get_args(hint)[0])}
    if dataclasses.is_dataclass(hint):
        return _dataclass_schema(hint)
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return {"enum": [m.value for m in hint]}
    return {bool: {"type": "boolean"}, int: {"type": "integer"}, float: {"type": "number"},
            str: {"type": "string"}}[hint]


def _dataclass_schema(cls: type, skip: tuple[str, ...] = ()) -> dict:
    hints = typing.get_type_hints(cls)
    return {"type": "object", "additionalProperties": False,
            "properties": {f.name: _type_schema(hints[f.name]) for f in dataclasses.fields(cls)
                           if f.name not in skip}}


def kvmesh_values_schema() -> dict:
    """The schema of .Values.kvmesh, derived from router/config.py and engine/config.py.

    Chart-owned keys (redis_url, auth, http) are left out, so setting them is an error.
    """
    import engine.config as ec
    import router.config as rc
    from router.policy import RouterPolicyConfig

    engine_props = {}
    for group in (ec.ModelConfig, ec.CacheConfig, ec.SchedulerConfig, ec.ParallelConfig, ec.DeviceConfig):
        hints = typing.get_type_hints(group)
        engine_props.update({f.name: _type_schema(hints[f.name]) for f in dataclasses.fields(group)
                             if f.name != "model"})
    engine_props["dtype"] = {"type": "string"}  # aliases (bf16, fp32, ...) are accepted too
    routing = _dataclass_schema(rc.RoutingConfig, skip=("policy",))
    routing["properties"]["policy"] = {"anyOf": [_dataclass_schema(RouterPolicyConfig), {"type": "null"}]}
    return {"type": "object", "additionalProperties": False, "required": ["model"], "properties": {
        "name": {"type": "string", "minLength": 1},
        "model": {"type": "string", "minLength": 1},
        "served_model_name": {"type": "string", "minLength": 1},
        "engine": {"type": "object", "additionalProperties": False, "properties": engine_props},
        "replicas": _dataclass_schema(rc.ReplicaConfig),
        "autoscaling": _dataclass_schema(rc.AutoscalingConfig),
        "routing": routing,
        "admission": _dataclass_schema(rc.AdmissionConfig),
        "ingress": _dataclass_schema(rc.IngressConfig),
        "disaggregation": _dataclass_schema(rc.DisaggregationConfig),
    }}


def test_values_schema_follows_the_kvmesh_config_classes():
    schema = json.loads((CHART / "values.schema.json").read_text())
    assert schema["properties"]["kvmesh"] == kvmesh_values_schema(), \
        "router/config.py or engine/config.py changed: update values.schema.json's kvmesh section " \
        "(python -m tests.test_helm_chart --write-schema)"


if __name__ == "__main__":
    import sys
    if sys.argv[1:] == ["--write-schema"]:
        path = CHART / "values.schema.json"
        schema = json.loads(path.read_text())
        schema["properties"]["kvmesh"] = kvmesh_values_schema()
        path.write_text(json.dumps(schema, indent=2) + "\n")
