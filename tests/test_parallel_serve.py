"""A TP=2 (gloo) replica in a real Ray Serve app: its workers live in the replica's placement group.

What matters, and is asserted:
- the deployment declares ``placement_group_bundles`` (bundle 0 the replica, one bundle per
  worker) and STRICT_PACK, and Serve makes one group per replica from them;
- the replica's ``RayExecutor`` puts its workers into that group's bundles 1..N and makes
  no group of its own;
- a worker that dies makes the replica fail its health check; Serve replaces it, removes
  the old group with it, and the new replica's workers are in the new replica's group.

The engine factory is the real one plus a record of where the replica and its workers run,
written to a file by the replica (the test process cannot reach the replica's engine).
"""

from __future__ import annotations

import functools
import json
import os
import signal
import time
import uuid
from pathlib import Path

import pytest

pytest.importorskip("ray.serve")

from router.config import parse_deployment_config  # noqa: E402

APP = "kvmesh-tp2-placement"
PREFIX = "/tp2-placement"
REPLICA_NUM_CPUS = 0.25


def tp2_config():
    return parse_deployment_config({
        "name": APP,
        "model": "kvmesh-tiny",
        "engine": {"dtype": "float32", "device": "cpu", "max_model_len": 128, "block_size": 16,
                   "num_blocks": 32, "max_num_seqs": 4, "max_num_batched_tokens": 128,
                   "tensor_parallel_size": 2, "distributed_backend": "gloo"},
        "replicas": {"min_replicas": 1, "max_replicas": 1, "num_cpus": REPLICA_NUM_CPUS},
        "routing": {"kind": "power_of_two", "stats_period_s": 0.5},
        "ingress": {"num_cpus": 0.05},
    })


def _worker_placement(worker) -> dict:
    """Runs inside a worker actor: the placement group it was scheduled into, and its pid."""
    from ray.util import get_current_placement_group
    group = get_current_placement_group()
    return {"group": group.id.hex() if group else None, "pid": os.getpid()}


def recording_engine_factory(record_dir: str, config):
    """Runs in the replica: the real engine, plus a JSON record of its placement for the test."""
    import ray
    from ray.util import get_current_placement_group

    from engine import AsyncLLM
    engine = AsyncLLM.from_config(config)
    executor = engine.engine.executor
    group = get_current_placement_group()
    workers = ray.get([w.__ray_call__.remote(_worker_placement) for w in executor.workers], timeout=60)
    record = {"replica_group": group.id.hex() if group else None,
              "executor_group": executor.placement_group.id.hex(),
              "owns_group": executor.owns_placement_group,
              "bundle_indices": executor.bundle_indices,
              "worker_groups": [w["group"] for w in workers],
              "worker_pids": [w["pid"] for w in workers]}
    path = Path(record_dir) / f"{uuid.uuid4().hex}.json"
    path.with_suffix(".tmp").write_text(json.dumps(record))
    path.with_suffix(".tmp").rename(path)  # the test never reads a half-written record
    return engine


def _records(record_dir: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(record_dir.glob("*.json"), key=os.path.getmtime)]


def _wait_for(what: str, fn, timeout_s: float = 90.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = fn()
        if value:
            return value
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")


def _generate(max_tokens: int = 4) -> list[int]:
    from ray import serve

    from engine.sampling_params import SamplingParams
    from router.app import REPLICA_NAME
    from router.messages import GenerateRequest

    handle = serve.get_deployment_handle(REPLICA_NAME, APP).options(stream=True)
    req = GenerateRequest(request_id=uuid.uuid4().hex, prompt_token_ids=[5, 6, 7, 8, 9],
                          sampling_params=SamplingParams(temperature=0.0, max_tokens=max_tokens,
                                                         ignore_eos=True),
                          block_hashes=[])
    last = None
    for item in handle.generate.remote(req):
        last = item.output
    assert last is not None and last.finished, last
    return list(last.outputs[0].token_ids)


def test_tp2_replica_workers_run_in_the_replicas_placement_group(ray_cluster, serve_http_port, tmp_path):
    from ray import serve

    from router.app import build_app
    placement_group_table = ray_cluster.util.placement_group_table

    def created_groups() -> dict[str, dict]:
        return {gid: g for gid, g in placement_group_table().items() if g["state"] == "CREATED"}

    before = set(created_groups())
    cfg = tp2_config()
    serve.run(build_app(cfg, engine_factory=functools.partial(recording_engine_factory, str(tmp_path))),
              name=APP, route_prefix=PREFIX)
    try:
        first = _wait_for("the replica's placement record", lambda: _records(tmp_path))[-1]
        group_id = first["replica_group"]
        assert group_id is not None, "Serve must schedule a multi-worker replica in a placement group"
        assert first == {**first, "executor_group": group_id, "owns_group": False,
                         "bundle_indices": [1, 2], "worker_groups": [group_id, group_id]}
        group = placement_group_table()[group_id]
        assert "#LLMServer#" in group["name"], group  # Serve names the group after the replica
        assert group["strategy"] == "STRICT_PACK"
        assert group["bundles"] == {0: {"CPU": REPLICA_NUM_CPUS}, 1: {"CPU": 0.2}, 2: {"CPU": 0.2}}
        assert set(created_groups()) - before == {group_id}, "the executor must not make a group"
        assert len(_generate()) == 4

        # A worker dies: the replica fails its health check and Serve replaces it, group and all.
        os.kill(first["worker_pids"][1], signal.SIGKILL)
        second = _wait_for("a replacement replica", lambda: (r := _records(tmp_path)) and len(r) > 1 and r[-1],
                           timeout_s=120)
        assert second["replica_group"] not in (None, group_id)
        assert second["worker_groups"] == [second["replica_group"]] * 2 and not second["owns_group"]
        _wait_for("the dead replica's group to be removed",
                  lambda: placement_group_table()[group_id]["state"] == "REMOVED")
        tokens = _wait_for("the new replica to serve", _generate_or_none, timeout_s=60)
        assert len(tokens) == 4
    finally:
        serve.delete(APP)
    assert set(created_groups()) <= before, "deleting the app frees its replicas' groups"


def _generate_or_none():
    try:
        return _generate()
    except Exception:  # the old replica may still be in the handle's view for a moment
        return None


def test_one_worker_replica_declares_no_placement_group():
    from router.app import _replica_options
    cfg = parse_deployment_config({"engine": {"device": "cpu"}, "replicas": {"num_cpus": 0.5}})
    options = _replica_options("LLMServer", cfg.replicas, cfg.autoscaling, cfg.engine)
    assert "placement_group_bundles" not in options and "placement_group_strategy" not in options


@pytest.mark.parametrize("engine,expected_bundles,strategy", [
    ({"device": "cuda", "tensor_parallel_size": 4},
     [{"CPU": 2.0}] + [{"CPU": 1.0, "GPU": 1.0}] * 4, "STRICT_PACK"),
    ({"device": "cuda", "tensor_parallel_size": 2, "pipeline_parallel_size": 2},
     [{"CPU": 2.0}] + [{"CPU": 1.0, "GPU": 1.0}] * 4, "PACK"),
    ({"device": "cpu", "pipeline_parallel_size": 2}, [{"CPU": 2.0}] + [{"CPU": 0.2}] * 2, "PACK"),
    # one worker, but as a Ray actor: it gets its bundle in the replica's group too
    ({"device": "cpu", "distributed_executor_backend": "ray"}, [{"CPU": 2.0}, {"CPU": 0.2}], "STRICT_PACK"),
])
def test_multi_worker_replica_bundles(engine, expected_bundles, strategy):
    from ray import serve

    from router.app import _replica_options
    from router.replica import LLMServer
    cfg = parse_deployment_config({"engine": engine, "replicas": {"num_cpus": 2}})
    options = _replica_options("LLMServer", cfg.replicas, cfg.autoscaling, cfg.engine)
    assert options["placement_group_bundles"] == expected_bundles
    assert options["placement_group_strategy"] == strategy
    assert len(expected_bundles) == 1 + cfg.engine.parallel.num_workers
    serve.deployment(LLMServer, **options)  # Serve's validation: the replica actor fits bundle 0
