"""``bench/disagg_serve.py`` without running it: the seeded workload and both modes' configs.

The GPU run (``--model-shape llama8b``) cannot run in CI; these checks keep its wiring
right: one prefill and one decode replica over NCCL vs two colocated replicas, one GPU each.
"""

from __future__ import annotations

import dataclasses

from bench.disagg_serve import PROFILES, app_configs, num_replicas
from bench.mixed_workload import Record, summarize
from router.config import DeploymentMode


def test_workload_is_seeded_and_in_range():
    workload = PROFILES["llama8b"].workload
    assert workload.short(3) == workload.short(3) and workload.long(2) == workload.long(2)
    assert workload.short(3) != dataclasses.replace(workload, seed=1).short(3)
    prompt, max_tokens = workload.long(0)
    assert 4096 <= len(prompt) <= 8192 and max_tokens == 8
    prompt, max_tokens = workload.short(0)
    assert 128 <= len(prompt) <= 256 and 128 <= max_tokens <= 256
    arrivals = workload.long_arrivals(60.0)
    assert arrivals == sorted(arrivals) and 0 < arrivals[0] and arrivals[-1] < 60.0 and 40 <= len(arrivals) <= 80


def test_llama8b_modes_one_gpu_per_replica_nccl_between_pools():
    profile = PROFILES["llama8b"]
    configs = app_configs(profile, "/tmp/llama8b-dummy", profile.transport, profile.disagg_mode)
    disagg, colocated = configs["disaggregated"], configs["colocated"]
    d = disagg.disaggregation
    assert d.mode is DeploymentMode.AUTO and d.transport.value == "nccl"
    assert (d.prefill.replicas.min_replicas, d.prefill.replicas.max_replicas) == (1, 1)
    assert (d.decode.replicas.min_replicas, d.decode.replicas.max_replicas) == (1, 1)
    assert d.prefill.replicas.num_gpus == d.decode.replicas.num_gpus == 1
    assert not colocated.disaggregation.is_disaggregated
    assert (colocated.replicas.min_replicas, colocated.replicas.max_replicas, colocated.replicas.num_gpus) == (2, 2, 1)
    assert num_replicas(disagg) == num_replicas(colocated) == 2
    for cfg in configs.values():  # the same engine in both modes
        assert cfg.engine == disagg.engine
        assert cfg.engine.model.max_model_len == 10240 and cfg.engine.model.load_format.value == "dummy"
        assert cfg.admission.max_waiting_per_replica is None


def test_smoke_profile_is_cpu_gloo():
    profile = PROFILES["tiny"]
    configs = app_configs(profile, "kvmesh-tiny", profile.transport, profile.disagg_mode)
    assert configs["disaggregated"].disaggregation.transport.value == "gloo"
    assert configs["colocated"].replicas.num_gpus == 0 and configs["colocated"].replicas.num_cpus < 1


def test_client_processes_and_ingress_per_profile():
    """The GPU run's load client is 8 processes and its ingress 4 replicas (stop 14's runs: one
    client process lags at ~4,000 tokens/s), the smoke run's one of each
    (``tests/test_mixed_workload.py`` runs the client itself)."""
    assert PROFILES["llama8b"].client_processes == 8 and PROFILES["tiny"].client_processes == 1
    configs = app_configs(PROFILES["llama8b"], "/tmp/llama8b-dummy", "nccl", "disaggregated")
    assert all(cfg.ingress.num_replicas == 4 for cfg in configs.values())


def test_direct_port_goes_to_both_modes_alike():
    profile = PROFILES["tiny"]
    plain = app_configs(profile, "kvmesh-tiny", "gloo", "disaggregated")
    direct = app_configs(profile, "kvmesh-tiny", "gloo", "disaggregated", overlap_prefill=True, direct_port=18001)
    assert all(cfg.http.direct_port is None for cfg in plain.values())
    assert all(cfg.http.direct_port == 18001 for cfg in direct.values())
    assert direct["disaggregated"].disaggregation.overlap_prefill


def test_summary_splits_kinds_and_counts_errors():
    short = Record("short", 0, 20, 4, ok=True, ttft_s=0.1, e2e_s=0.4, itl_s=[0.1, 0.1, 0.1], num_chunks=4,
                   completion_tokens=4)
    long = Record("long", 0, 300, 2, ok=True, ttft_s=0.5, e2e_s=0.6, itl_s=[0.1], num_chunks=2, completion_tokens=2)
    failed = Record("short", 1, 20, 4, error="cancelled: still running")
    s = summarize([short, long, failed], elapsed_s=2.0)
    assert s["all"]["num_ok"] == 2 and s["all"]["num_errors"] == 1 and s["errors"] == {"cancelled": 1}
    assert s["all"]["output_tok_s"] == 3.0 and s["short"]["ttft_s"]["p50"] == 0.1 and s["long"]["ttft_s"]["p50"] == 0.5
    assert s["all"]["itl_s"]["count"] == 4


def test_client_stalls_cluster_and_are_attributed():
    """Five short streams wait 50 ms at the same moment, then get two tokens at once (a burst):
    one cluster, burst share 1, overlapped by the decode replica's loop lag there only."""
    from bench.stall_attribution import attribute_client_stalls
    from bench.mixed_workload import Record

    records = []
    for i in range(5):
        r = Record("short", i, 100, 10, start_s=0.0, ok=True, ttft_s=0.1)
        r.itl_s = [0.006, 0.006, 0.05, 0.0002, 0.006]  # the wait ends at 0.1 + 0.062 s
        records.append(r)
    t0 = 1000.0
    entry = {"client": {"t0_monotonic_s": t0, "loop_lags": [(5.0, 40.0)]},
             "timeline": {"decode:x": {"enabled": True, "t0_monotonic_s": t0 + 0.1, "top_gaps": [],
                                       "top_loop_lags": [{"t_s": 0.02, "ms": 30.0}]}},
             "ingress_timeline": {"enabled": True, "t0_monotonic_s": t0, "top_loop_lags": []}}
    a = attribute_client_stalls(records, entry)
    assert a["num_clusters"] == 1 and a["clusters"][0]["streams"] == 5 and a["mean_burst"] == 1.0
    assert a["overlapped_by"] == {"decode:x step gap": 0, "decode:x loop lag": 1, "ingress loop lag": 0,
                                  "client loop lag": 0}
    assert a["unexplained"] == 0
