"""Disaggregated vs colocated serving under a mixed workload, through the HTTP API (issue #6).

One invocation starts a private local Ray and deploys the Serve app
(``router.app.build_app`` on a config from ``router.config.parse_deployment_config``)
twice, one mode after the other, each torn down (``serve.shutdown()``) before the next:

    disaggregated  1 PrefillServer + 1 DecodeServer (KV over NCCL on GPUs, gloo on CPU)
    colocated      2 LLMServer replicas (prefix-aware router)

Both get the same seeded workload for ``--duration-s`` seconds:

    short   a closed loop of ``concurrency`` streams: prompt 128-256 tokens, 128-256 output tokens
    long    open loop, one every ~``long_interval_s`` (seeded jitter): prompt 4k-8k tokens, 8 output

Prompts are random token ids (completions API, ``ignore_eos``), so lengths are exact and no
prefix is shared. Each request streams (SSE); the client records its TTFT and every gap
between content chunks (ITL), by kind. Reported per mode: ITL p50/p90/p99/p99.9, TTFT
p50/p90/p99, output tokens/s, the same per kind, and the ratios disaggregated/colocated
against the issue's target (ITL p99 at most 0.5x, TTFT p50 at most 1.2x). The JSON (named
machine, configs, per-request records) is rewritten after each mode, so a run cut short
keeps what it measured. The load client runs in ``--client-processes`` processes (the
profile's: 8 for ``llama8b``, 1 for ``--smoke``; ``bench/client_pool.py``), the same for
both modes, so its own event loop's lags stay out of the ITL it measures; the JSON says how many
(``client_processes``). ``--ingress-replicas`` overrides the profile's OpenAIIngress replicas
(4 for ``llama8b``, 1 for ``--smoke``; the JSON's ``ingress``). ``--direct-http`` sends the load to
the ingress replicas' shared port (``http.direct_port``, router/direct_http.py) instead of
Serve's HTTP proxy, in both modes (the JSON's ``direct_http``).

Where the CPU goes: ``results[<mode>]["cpu"]`` holds each role's CPU seconds over the load
(``bench/proc_cpu.py``: proxy, ingress, prefill and decode or replica, their engine processes
``engine_core``, controller, stats board, Ray's own processes, the load ``client``) and the
cores each kept busy (``utilization``: seconds / the load's wall seconds); one line per mode
prints the latter.

Where the ITL tails come from: the replicas run with ``KVMESH_STEP_TIMELINE=1``
(engine/step_timeline.py; ``KVMESH_STEP_TIMELINE=0`` in the environment turns it off), and
after each mode's load the benchmark asks every engine replica for
``LLMServer.step_timeline_summary`` over the load window (the same host's monotonic clock):
``results[<mode>]["timeline"]["<pool>:<replica id>"]`` holds the largest gaps between step
ends (what a stream sees as ITL on the replica) and the longest steps, each with the events
overlapping it (GC pauses by generation, KV receives and their staging allocation, KV
scatters, event-loop lag, stats refreshes, prefill tokens in the step), and, over all gaps
and steps above 20 ms, the fraction that overlapped each kind (``stalls``). The top 10 gaps
of each replica are printed. The ingress's loop lags (``GET /kvmesh/timeline``) and the load
client's own go in too, and ``stall_attribution`` lays each moment when several client streams
stalled at once against all of them (``bench/stall_attribution.py``).

    python bench/disagg_serve.py --model-shape llama8b --out bench/results/disagg_serve_h100.json  # 2 GPUs
    python bench/disagg_serve.py --smoke          # CPU, kvmesh-tiny, 2-3 min: bench/results/disagg_serve_tiny_cpu.json

``llama8b``: the Llama-3.1-8B shape with dummy bf16 weights (``load_format: dummy``) and
a 128k-word tokenizer (``bench.gpu_bench.make_dummy_checkpoint``; offline), one GPU per
replica, engine options from ``configs/llama8b-disagg-gpu.yaml`` (mode ``auto``: prompts
under 512 uncached tokens stay on the decode replica) with ``max_model_len`` 10240,
``gpu_memory_utilization`` 0.85 and a 2048-token step budget (``--max-num-batched-tokens``:
a long prompt is prefilled in chunks between the colocated replicas' decode steps, as a
latency-minded colocated setup would run it). The nccl transport needs CuPy; without it
the disaggregated mode records the error and the colocated mode still runs. The prefill pool
alone gets a 4096-token step budget with at most 1024 tokens of one prompt per step
(``long_prefill_token_threshold``), so short prompts share steps with a long prompt's chunks
instead of waiting for all of them; the decode pool and the colocated replicas keep the
2048-token budget. Expected time
on 2 H100s (not run there yet): 4 engine starts plus 2 x (60 s of load + drain), ~5 minutes.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import dataclasses
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import httpx
import yaml

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from bench import load_gen  # noqa: E402
from bench.client_pool import run_load  # noqa: E402
from bench.mixed_workload import Workload, rounded, summarize, warm_up  # noqa: E402
from bench.proc_cpu import cpu_delta, cpu_seconds  # noqa: E402
from bench.routing_compare import free_port, start_ray  # noqa: E402
from bench.stall_attribution import (attribute_client_stalls, fetch_timelines, print_attribution,  # noqa: E402
                                     print_timelines)
from router.config import DeploymentConfig, parse_deployment_config  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MODES = ("disaggregated", "colocated")


@dataclass(frozen=True)
class Profile:
    """Model, engine, resources and workload of one kind of run (``--smoke`` or ``--model-shape``)."""

    name: str
    base_config: str  # deployment YAML under configs/ the app configs start from
    model: Optional[str]  # None: build the dummy 8B checkpoint
    served_model_name: str
    engine: dict  # overrides of the YAML's engine options
    transport: str
    disagg_mode: str  # auto | disaggregated
    auto_min_uncached_tokens: int
    replica_resources: dict  # ReplicaConfig fields (num_cpus, num_gpus, max_ongoing_requests)
    ingress: dict
    ray_num_cpus: Optional[int]  # None: Ray detects
    workload: Workload
    duration_s: float
    drain_s: float  # how long in-flight requests may finish after the last one was sent
    deploy_timeout_s: float
    # Scheduler options of the prefill pool only (router.config.PoolConfig): a larger step budget
    # with a per-prompt chunk cap, so short prompts share steps with a long prompt's chunks.
    prefill_pool: dict = dataclasses.field(default_factory=dict)
    # Load client processes (bench/client_pool.py): one process parsing every stream's chunks lags
    # by milliseconds at the GPU runs' ~4,000 tokens/s, and those lags would count as ITL.
    client_processes: int = 1


PROFILES = {
    "llama8b": Profile(
        name="llama8b", base_config="configs/llama8b-disagg-gpu.yaml", model=None,
        served_model_name="llama8b-dummy",
        engine={"dtype": "bfloat16", "device": "cuda", "load_format": "dummy", "max_model_len": 10240,
                "gpu_memory_utilization": 0.85, "max_num_seqs": 256, "max_num_batched_tokens": 2048},
        transport="nccl", disagg_mode="auto", auto_min_uncached_tokens=512,
        replica_resources={"num_cpus": 4, "num_gpus": 1, "max_ongoing_requests": 512},
        ingress={"num_cpus": 2, "num_replicas": 4}, ray_num_cpus=None,
        workload=Workload(concurrency=32, short_prompt=(128, 256), short_output=(128, 256),
                          long_interval_s=1.0, long_prompt=(4096, 8192), long_output=8,
                          token_id_range=(1000, 120000)),
        duration_s=60.0, drain_s=20.0, deploy_timeout_s=180.0,
        prefill_pool={"max_num_batched_tokens": 4096, "long_prefill_token_threshold": 1024},
        client_processes=8),
    "tiny": Profile(
        name="tiny", base_config="configs/tiny-disagg.yaml", model="kvmesh-tiny",
        served_model_name="kvmesh-tiny",
        engine={"dtype": "float32", "device": "cpu", "max_model_len": 512, "num_blocks": 256,
                "max_num_seqs": 16, "max_num_batched_tokens": 256},
        transport="gloo", disagg_mode="auto", auto_min_uncached_tokens=64,
        replica_resources={"num_cpus": 0.25, "num_gpus": 0, "max_ongoing_requests": 64},
        ingress={"num_cpus": 0.1, "num_replicas": 1}, ray_num_cpus=4,
        workload=Workload(concurrency=4, short_prompt=(16, 24), short_output=(24, 40),
                          long_interval_s=3.0, long_prompt=(250, 350), long_output=4,
                          token_id_range=(10, 500)),
        duration_s=20.0, drain_s=15.0, deploy_timeout_s=150.0),
}


# ---- configs ------------------------------------------------------------------------------------
def make_llama8b_checkpoint(path: str) -> str:
    """``bench.gpu_bench``'s dummy 8B folder, with Llama-3.1's 131072 positions (max_model_len 10240)."""
    from bench.gpu_bench import make_dummy_checkpoint
    make_dummy_checkpoint(path)
    config_path = Path(path) / "config.json"
    config = json.loads(config_path.read_text())
    config["max_position_embeddings"] = 131072
    config_path.write_text(json.dumps(config, indent=2))
    return path


def app_configs(profile: Profile, model: str, transport: str, disagg_mode: str,
                overlap_prefill: bool = False, direct_port: Optional[int] = None) -> dict[str, DeploymentConfig]:
    """Both modes' ``DeploymentConfig``s from the profile's base YAML (same engine options)."""
    base = yaml.safe_load((ROOT / profile.base_config).read_text())
    base.update(model=model, served_model_name=profile.served_model_name)
    base["engine"] = {**base.get("engine", {}), **profile.engine}
    base.pop("auth", None)  # the benchmark talks to a private port
    base["admission"] = {"max_waiting_per_replica": None}  # measure queueing, never shed (429)
    base["ingress"] = dict(profile.ingress)
    base["routing"] = {"kind": "prefix_aware", "stats_period_s": 0.5}
    base.pop("http", None)
    if direct_port is not None:  # the bench's Serve proxy listens on a port of its own (run_mode)
        base["http"] = {"direct_port": direct_port}
    replicas = {"min_replicas": 1, "max_replicas": 1, **profile.replica_resources}

    disagg = copy.deepcopy(base)
    disagg["name"] = "disagg-serve-disaggregated"
    pools = base.get("disaggregation", {})
    disagg["disaggregation"] = {
        **pools, "mode": disagg_mode, "transport": transport, "overlap_prefill": overlap_prefill,
        "auto_min_uncached_tokens": profile.auto_min_uncached_tokens,
        "prefill": {**pools.get("prefill", {}), "replicas": replicas, **profile.prefill_pool},
        "decode": {**pools.get("decode", {}), "replicas": replicas}}
    for pool in ("prefill", "decode"):
        disagg["disaggregation"][pool].pop("autoscaling", None)

    colocated = copy.deepcopy(base)
    colocated["name"] = "disagg-serve-colocated"
    colocated.pop("disaggregation", None)
    colocated["replicas"] = {**replicas, "min_replicas": 2, "max_replicas": 2}
    return {"disaggregated": parse_deployment_config(disagg, source=f"{profile.base_config} (disaggregated)"),
            "colocated": parse_deployment_config(colocated, source=f"{profile.base_config} (colocated)")}


def num_replicas(cfg: DeploymentConfig) -> int:
    d = cfg.disaggregation
    if d.is_disaggregated:
        return d.prefill.replicas.min_replicas + d.decode.replicas.min_replicas
    return cfg.replicas.min_replicas


# ---- one mode -----------------------------------------------------------------------------------
def wait_ready(url: str, app_name: str, model: str, want_replicas: int, deadline: float) -> None:
    """All replicas report to the stats board and one request goes through; fails fast on DEPLOY_FAILED."""
    from ray import serve
    last = ""
    while time.monotonic() < deadline:
        app = serve.status().applications.get(app_name)
        if app is not None and app.status == "DEPLOY_FAILED":
            raise RuntimeError(f"app {app_name} is {app.status}: {app.message[:2000]}")
        try:
            replicas = httpx.get(f"{url}/kvmesh/status", timeout=10).json()["replicas"]
            healthy = sum(1 for r in replicas if r.get("is_healthy"))
            last = f"{healthy}/{want_replicas} replicas healthy"
            if healthy >= want_replicas:
                r = httpx.post(f"{url}/v1/completions", timeout=120,
                               json={"model": model, "prompt": [11, 12, 13], "max_tokens": 2})
                if r.status_code == 200:
                    return
                last = f"test request: {r.status_code} {r.text[:200]}"
        except (httpx.HTTPError, ValueError, KeyError) as exc:
            last = repr(exc)[:200]
        time.sleep(1.0)
    raise TimeoutError(f"app {app_name} not ready before its deadline ({last})")


def replica_snapshot(url: str) -> list[dict]:
    keys = ("replica_id", "pool", "num_prompt_tokens", "num_generation_tokens", "num_preemptions",
            "num_blocks", "num_free_blocks", "kv_sends", "kv_send_failures", "kv_bytes_sent", "kv_send_s",
            "kv_recvs", "kv_recv_failures", "kv_bytes_received", "kv_recv_s", "kv_recomputes")
    try:
        replicas = httpx.get(f"{url}/kvmesh/status", timeout=10).json()["replicas"]
    except (httpx.HTTPError, ValueError, KeyError):
        return []
    return [{k: r[k] for k in keys if k in r} for r in replicas]


def run_mode(mode: str, cfg: DeploymentConfig, port: int, profile: Profile, workload: Workload,
             duration_s: float, drain_s: float, mode_timeout_s: float, preflight_error: Optional[str]) -> dict:
    """Deploys ``cfg``, warms up, drives the workload, shuts Serve down (always); returns the mode's entry."""
    from ray import serve

    from router.app import build_app
    entry: dict[str, Any] = {"mode": mode, "app": cfg.name, "num_replicas": num_replicas(cfg)}
    if preflight_error:
        entry["error"] = preflight_error
        print(f"[{mode}] skipped: {preflight_error}", flush=True)
        return entry
    deadline = time.monotonic() + mode_timeout_s
    url = f"http://127.0.0.1:{port}"
    # The load's URL: the ingress replicas' own port (http.direct_port), or Serve's proxy.
    load_url = f"http://127.0.0.1:{cfg.http.direct_port}" if cfg.http.direct_port else url
    start = time.monotonic()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run_many([serve.RunTarget(build_app(cfg), name=cfg.name, route_prefix="/")],
                       wait_for_applications_running=False)
        wait_ready(url, cfg.name, cfg.served_model_name, num_replicas(cfg),
                   min(deadline, start + profile.deploy_timeout_s))
        if load_url != url:
            wait_ready(load_url, cfg.name, cfg.served_model_name, num_replicas(cfg),
                       min(deadline, start + profile.deploy_timeout_s))
        entry["deploy_s"] = time.monotonic() - start
        print(f"[{mode}] ready in {entry['deploy_s']:.0f}s ({entry['num_replicas']} replicas)", flush=True)
        asyncio.run(asyncio.wait_for(warm_up(load_url, cfg.served_model_name, workload),
                                     max(1.0, deadline - time.monotonic())))
        before = replica_snapshot(url)
        drain_s = max(0.0, min(drain_s, deadline - time.monotonic() - duration_s))
        load_before = os.getloadavg()[0]  # a shared box: say how busy it was
        load_window = (time.monotonic(), None)  # the replicas' timelines are summarized over it
        probe: dict = {}
        cpu_before = cpu_seconds()
        records, elapsed = run_load(load_url, cfg.served_model_name, workload, duration_s, drain_s, probe=probe,
                                    processes=profile.client_processes)
        entry["cpu"] = cpu_use(cpu_before, cpu_seconds(), probe, elapsed)
        load_window = (load_window[0], time.monotonic())
        entry["load_average_1m"] = [load_before, os.getloadavg()[0]]
        time.sleep(1.5)  # the replicas' last counters reach the stats board
        entry.update(summary=summarize(records, elapsed), replicas_before=before,
                     replicas_after=replica_snapshot(url),
                     requests=[rounded(dataclasses.asdict(r)) for r in records])
        s = entry["summary"]["all"]
        print(f"[{mode}] {s['num_ok']}/{s['num_requests']} ok in {elapsed:.1f}s, "
              f"ITL p99 {_ms(s['itl_s']['p99'])}, TTFT p50 {_ms(s['ttft_s']['p50'])}, "
              f"{s['output_tok_s']:.1f} output tok/s", flush=True)
        busy = sorted(entry["cpu"]["utilization"].items(), key=lambda kv: -kv[1])
        print(f"[{mode}] CPU busy (cores): " + ", ".join(f"{k} {v:.2f}" for k, v in busy if v >= 0.005), flush=True)
        entry["client"] = {"processes": profile.client_processes, "t0_monotonic_s": probe.get("t0_monotonic_s"),
                           "loop_lags": probe.get("loop_lags", []), "workers": probe.get("workers")}
        try:  # diagnosis only: a failure here must not lose the mode's measurements
            entry["timeline"] = fetch_timelines(cfg, load_window, top=200)
            print_timelines(mode, entry["timeline"])
            entry["ingress_timeline"] = httpx.get(
                f"{url}/kvmesh/timeline", params={"start_s": load_window[0], "end_s": load_window[1],
                                                  "top": 200}, timeout=60).json()
            entry["stall_attribution"] = attribute_client_stalls(records, entry)
            print_attribution(mode, entry["stall_attribution"])
        except Exception as exc:  # noqa: BLE001
            entry["timeline_error"] = f"{type(exc).__name__}: {exc}"[:1000]
            print(f"[{mode}] step timelines not fetched: {entry['timeline_error']}", flush=True)
    except Exception as exc:  # noqa: BLE001 - recorded; the next mode still runs
        entry["error"] = f"{type(exc).__name__}: {exc}"[:3000]
        print(f"[{mode}] failed: {entry['error']}", flush=True)
    finally:
        try:
            serve.shutdown()
        except Exception as exc:  # noqa: BLE001
            print(f"[{mode}] serve.shutdown failed: {exc!r}", flush=True)
        wait_gpus_released()
        entry["mode_s"] = time.monotonic() - start
    return entry


def cpu_use(before: dict[str, float], after: dict[str, float], probe: dict, elapsed_s: float) -> dict:
    """CPU seconds per role over ``run_load`` (``bench/proc_cpu.py``) and cores busy: seconds / the
    load's wall seconds. Client workers have exited by ``after`` and report their own ("client"); with
    one client process the load runs in this process, so its CPU is the client's."""
    seconds = cpu_delta(before, after)
    workers = probe.get("workers")
    seconds["client"] = round(sum(w["cpu_s"] for w in workers), 3) if workers else seconds.pop("bench", 0.0)
    return {"seconds": seconds,
            "utilization": {k: round(v / elapsed_s, 3) for k, v in seconds.items()} if elapsed_s > 0 else {}}


def wait_gpus_released(timeout_s: float = 60.0, max_used_mib: int = 4096) -> None:
    """After a mode: wait until the GPUs' memory is free again (its replicas' processes are gone)."""
    if shutil.which("nvidia-smi") is None:
        return
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            used = [int(x) for x in subprocess.run(
                ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                capture_output=True, text=True, timeout=20).stdout.split()]
        except (OSError, ValueError, subprocess.SubprocessError):
            return
        if all(u <= max_used_mib for u in used):
            return
        time.sleep(1.0)
    print(f"GPU memory still in use {timeout_s:.0f}s after serve.shutdown()", flush=True)


# ---- report -------------------------------------------------------------------------------------
def ratios(results: dict) -> dict:
    """Disaggregated / colocated (< 1: disaggregated lower, i.e. better for latency), and the target."""
    d, c = (results.get(m, {}).get("summary") for m in MODES)
    if not d or not c:
        return {}
    out: dict[str, Any] = {}
    for scope in ("all", "short"):
        for metric in ("itl_s", "ttft_s"):
            for q in ("p50", "p99"):
                a, b = d[scope][metric][q], c[scope][metric][q]
                out[f"{scope}_{metric}_{q}"] = a / b if a and b else None
    out["output_tok_s"] = d["all"]["output_tok_s"] / c["all"]["output_tok_s"] if c["all"]["output_tok_s"] else None
    itl, ttft = out["all_itl_s_p99"], out["all_ttft_s_p50"]
    out["target"] = {"itl_p99_at_most_0.5x": itl is not None and itl <= 0.5,
                     "ttft_p50_at_most_1.2x": ttft is not None and ttft <= 1.2}
    return out


def _ms(v: Optional[float]) -> str:
    return f"{v * 1000:.1f} ms" if v is not None else "n/a"


def print_table(results: dict, ratio: dict) -> None:
    print(f"\n{'metric':<26}{'disaggregated':>16}{'colocated':>16}{'disagg/coloc':>14}")

    def row(name: str, scope: str, metric: str, q: Optional[str], ratio_key: Optional[str]) -> None:
        cells = []
        for mode in MODES:
            s = results.get(mode, {}).get("summary")
            v = None if s is None else (s[scope][metric][q] if q else s[scope][metric])
            cells.append("n/a" if v is None else (f"{v * 1000:.1f}" if q else f"{v:.1f}"))
        r = ratio.get(ratio_key) if ratio_key else None
        print(f"{name:<26}{cells[0]:>16}{cells[1]:>16}{(f'{r:.2f}x' if r else ''):>14}")

    for scope in ("all", "short", "long"):
        for metric, label in (("itl_s", "ITL"), ("ttft_s", "TTFT")):
            for q in ("p50", "p99"):
                key = f"{scope}_{metric}_{q}" if scope != "long" else None
                row(f"{label} {q} ms ({scope})", scope, metric, q, key)
    row("output tok/s", "all", "output_tok_s", None, "output_tok_s")
    for mode in MODES:
        s = results.get(mode, {}).get("summary")
        if s:
            print(f"{mode}: {s['all']['num_ok']}/{s['all']['num_requests']} ok "
                  f"({s['long']['num_ok']} long), errors {s['errors']}")
        elif results.get(mode, {}).get("error"):
            print(f"{mode}: failed: {results[mode]['error'][:300]}")
    if ratio.get("target"):
        print(f"target (issue #6): {ratio['target']}")


def machine() -> dict:
    """The CPU (load_gen.machine_name) and GPU names; CUDA is queried in a child process."""
    out = {"cpu": load_gen.machine_name(), "gpu": None, "num_gpus": 0}
    code = ("import torch, json; n = torch.cuda.device_count() if torch.cuda.is_available() else 0; "
            "print(json.dumps([n, torch.cuda.get_device_name(0) if n else None, torch.__version__]))")
    try:
        n, name, torch_version = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True,
                                                           text=True, timeout=120).stdout.strip().splitlines()[-1])
        out.update(num_gpus=n, gpu=name, torch=torch_version)
    except Exception as exc:  # noqa: BLE001
        out["gpu_query_error"] = repr(exc)[:200]
    return out


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-shape", choices=("llama8b",), default=None,
                        help="GPU run at this model shape (dummy weights); one GPU per replica")
    parser.add_argument("--smoke", action="store_true", help="CPU run with kvmesh-tiny and tiny lengths")
    parser.add_argument("--duration-s", type=float, default=None, help="load per mode (default: the profile's)")
    parser.add_argument("--drain-s", type=float, default=None, help="in-flight requests may finish this long")
    parser.add_argument("--mode-timeout-s", type=float, default=None,
                        help="one mode, deploy to shutdown (default: deploy timeout + duration + drain + 30)")
    parser.add_argument("--concurrency", type=int, default=None, help="short streams (default: the profile's)")
    parser.add_argument("--long-interval-s", type=float, default=None, help="mean gap between long prompts")
    parser.add_argument("--max-num-batched-tokens", type=int, default=None, help="engine step token budget")
    parser.add_argument("--client-processes", type=int, default=None,
                        help="load client processes, the streams split over them (default: the profile's: "
                             + ", ".join(f"{p.name} {p.client_processes}" for p in PROFILES.values()) + ")")
    parser.add_argument("--ingress-replicas", type=int, default=None,
                        help="OpenAIIngress replicas (default: the profile's: "
                             + ", ".join(f"{p.name} {p.ingress['num_replicas']}" for p in PROFILES.values()) + ")")
    parser.add_argument("--transport", choices=("gloo", "nccl"), default=None)
    parser.add_argument("--disagg-mode", choices=("auto", "disaggregated"), default=None)
    parser.add_argument("--overlap-prefill", action="store_true",
                        help="disaggregated mode: prefill alongside the decode reservation")
    parser.add_argument("--direct-http", action="store_true",
                        help="send the load to the ingress replicas' own port (http.direct_port), not Serve's proxy")
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated subset, in this order")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--port", type=int, default=None)
    parser.add_argument("--out", default=None, help="JSON path (default: bench/results/disagg_serve_<profile>.json)")
    args = parser.parse_args(argv)
    if args.smoke == (args.model_shape is not None):
        parser.error("give exactly one of --smoke and --model-shape llama8b")

    profile = PROFILES["tiny" if args.smoke else args.model_shape]
    workload = dataclasses.replace(
        profile.workload, seed=args.seed,
        concurrency=args.concurrency or profile.workload.concurrency,
        long_interval_s=args.long_interval_s or profile.workload.long_interval_s)
    if args.max_num_batched_tokens:
        profile = dataclasses.replace(profile, engine={**profile.engine,
                                                       "max_num_batched_tokens": args.max_num_batched_tokens})
    if args.client_processes is not None:
        if args.client_processes < 1:
            parser.error("--client-processes must be at least 1")
        profile = dataclasses.replace(profile, client_processes=args.client_processes)
    if args.ingress_replicas is not None:
        if args.ingress_replicas < 1:
            parser.error("--ingress-replicas must be at least 1")
        profile = dataclasses.replace(profile, ingress={**profile.ingress, "num_replicas": args.ingress_replicas})
    duration_s = args.duration_s or profile.duration_s
    drain_s = profile.drain_s if args.drain_s is None else args.drain_s
    mode_timeout_s = args.mode_timeout_s or profile.deploy_timeout_s + duration_s + drain_s + 30
    transport = args.transport or profile.transport
    disagg_mode = args.disagg_mode or profile.disagg_mode
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not set(modes) <= set(MODES):
        parser.error(f"--modes must name {MODES}")
    out_path = Path(args.out or load_gen.RESULTS_DIR / f"disagg_serve_{'tiny_cpu' if args.smoke else profile.name}.json")
    out_path.parent.mkdir(parents=True, exist_ok=True)

    started = time.monotonic()
    # No internet on the GPU hosts: never let HF libraries try (the replicas inherit this).
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("KVMESH_STEP_TIMELINE", "1")  # the replicas record steps and stalls
    machine_info: dict = {}
    query = threading.Thread(target=lambda: machine_info.update(machine()), daemon=True)
    query.start()  # CUDA is initialized in a child process meanwhile
    model = profile.model or make_llama8b_checkpoint("/tmp/kvmesh-llama8b-dummy-131k")
    direct_port = free_port() if args.direct_http else None
    configs = app_configs(profile, model, transport, disagg_mode, args.overlap_prefill, direct_port)
    start_ray(num_cpus=profile.ray_num_cpus)
    try:
        query.join()
        preflight: dict[str, Optional[str]] = {m: None for m in MODES}
        if transport == "nccl" and importlib.util.find_spec("cupy") is None:
            preflight["disaggregated"] = ("the nccl KV transport needs CuPy (pip install cupy-cuda12x, "
                                          "or the project's [gpu] extra); not installed here")
        result: dict[str, Any] = {
            "benchmark": "disagg_serve", "profile": profile.name, "machine": machine_info,
            "python": sys.version.split()[0], "time": time.time(), "argv": sys.argv[1:],
            "transport": transport, "disagg_mode": disagg_mode, "overlap_prefill": args.overlap_prefill,
            "direct_http": args.direct_http,
            "duration_s": duration_s, "drain_s": drain_s,
            "workload": dataclasses.asdict(workload), "client_processes": profile.client_processes,
            "ingress": profile.ingress,
            "configs": {m: {"engine": dataclasses.asdict(c.engine), "replicas": dataclasses.asdict(c.replicas),
                            "disaggregation": dataclasses.asdict(c.disaggregation)} for m, c in configs.items()},
            "results": {}, "ratios": {}}

        def write() -> None:
            out_path.write_text(json.dumps(result, indent=1, default=str))

        write()
        print(f"disagg_serve: profile {profile.name}, {transport}, modes {modes}, {duration_s:.0f}s of load "
              f"each; machine {result['machine']}", flush=True)
        port = args.port or free_port()
        while port == direct_port:
            port = free_port()
        for mode in modes:
            result["results"][mode] = run_mode(mode, configs[mode], port, profile, workload, duration_s,
                                               drain_s, mode_timeout_s, preflight[mode])
            result["ratios"] = ratios(result["results"])
            result["total_s"] = time.monotonic() - started
            write()
    finally:
        import ray
        ray.shutdown()
    print_table(result["results"], result["ratios"])
    print(f"wrote {out_path} ({time.monotonic() - started:.0f}s in all)")
    ok = all(result["results"].get(m, {}).get("summary") for m in modes)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
