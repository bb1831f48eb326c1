"""Prefix-affinity routing vs power-of-two routing on the same shared-prefix workload.

One invocation, one machine: starts a private local Ray and deploys the app
(``router.app.build_app``, ``--num-replicas`` fixed replicas) twice, side by
side under two route prefixes, once per routing setup. Then ``--rounds``
rounds run the same workload through ``bench/load_gen.py``'s machinery against
each app in turn (same prompts and concurrency; a new seed, so new prefixes,
each round; the order alternates), so load from anything else on the machine
hits both setups alike. Results pool the rounds. The setups:

- ``prefix_affinity``: kvmesh's ``PrefixAwareRequestRouter`` (the default);
- ``power_of_two``: the baseline, ``--baseline serve_default`` (Ray Serve's own
  power-of-two-choices router, what a deployment without kvmesh's router gets)
  or ``--baseline kvmesh_p2c`` (kvmesh's router with ``policy: power_of_two``:
  load only, prefixes ignored).

Reports TTFT / ITL / E2E p50/p90/p99, throughput and the fleet's prefix-cache
hit rate (prompt tokens found cached / looked up, summed over replicas, from
``/kvmesh/status`` before and after the run) for both, and the ratios; writes
JSON naming the machine and a PNG under bench/results/.

    python bench/routing_compare.py                     # routing_compare_tiny_cpu.{json,png}
    python bench/routing_compare.py --num-requests 200 --concurrency 12 --num-replicas 2
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import httpx

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from bench import load_gen  # noqa: E402
from router.config import (AdmissionConfig, DeploymentConfig, ReplicaConfig, RouterKind,  # noqa: E402
                           RoutingConfig, load_deployment_config)
from router.policy import RouterPolicyConfig, RoutingPolicyKind  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
STATS_PERIOD_S = 0.5


def routing_setups(baseline: str) -> dict[str, RoutingConfig]:
    """The two routing configurations compared, by label."""
    if baseline == "serve_default":
        base = RoutingConfig(kind=RouterKind.POWER_OF_TWO, stats_period_s=STATS_PERIOD_S)
    else:
        base = RoutingConfig(kind=RouterKind.PREFIX_AWARE, stats_period_s=STATS_PERIOD_S,
                             policy=RouterPolicyConfig(policy=RoutingPolicyKind.POWER_OF_TWO))
    return {"prefix_affinity": RoutingConfig(kind=RouterKind.PREFIX_AWARE, stats_period_s=STATS_PERIOD_S,
                                             policy=RouterPolicyConfig()),
            "power_of_two": base}


def app_config(base: DeploymentConfig, label: str, routing: RoutingConfig,
               num_replicas: int, num_cpus: float) -> DeploymentConfig:
    return dataclasses.replace(
        base, name=f"routing-compare-{label.replace('_', '-')}", routing=routing,
        replicas=ReplicaConfig(min_replicas=num_replicas, max_replicas=num_replicas,
                               num_cpus=num_cpus, max_ongoing_requests=base.replicas.max_ongoing_requests),
        admission=AdmissionConfig(max_waiting_per_replica=None))


def fleet_counters(status: Optional[dict]) -> tuple[int, int]:
    """(prompt tokens found in prefix caches, prompt tokens looked up) over all replicas."""
    replicas = (status or {}).get("replicas", [])
    return (sum(r["prefix_cache_hits"] for r in replicas), sum(r["prefix_cache_queries"] for r in replicas))


def wait_ready(url: str, model: str, num_replicas: int, timeout_s: float = 180.0) -> None:
    """Every replica reports to the board and one request went through (tokenizer loaded)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            r = httpx.post(f"{url}/v1/completions", timeout=60,
                           json={"model": model, "prompt": "warm up", "max_tokens": 1})
            status = httpx.get(f"{url}/kvmesh/status", timeout=30).json()
            if r.status_code == 200 and len(status["replicas"]) == num_replicas:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"the app at {url} did not become ready in {timeout_s:.0f}s")


def deploy(cfg: DeploymentConfig, url: str, model: str) -> float:
    """Deploys ``cfg`` under ``url``'s path; returns the seconds until it answered."""
    from ray import serve

    from router.app import build_app
    start = time.monotonic()
    serve.run(build_app(cfg), name=cfg.name, route_prefix=httpx.URL(url).path)
    wait_ready(url, model, cfg.replicas.min_replicas)
    return time.monotonic() - start


def run_round(load_args: argparse.Namespace) -> dict:
    """One workload run against ``load_args.base_url``, with the fleet's cache counters around it."""
    time.sleep(3 * STATS_PERIOD_S)  # earlier requests' counters reach the stats board
    before = load_gen.server_status(load_args)
    load_before = os.getloadavg()[0]  # this box may be shared: say how busy it was
    records, duration = asyncio.run(load_gen.run(load_args))
    load_after = os.getloadavg()[0]
    time.sleep(3 * STATS_PERIOD_S)
    after = load_gen.server_status(load_args)
    hits0, queries0 = fleet_counters(before)
    hits1, queries1 = fleet_counters(after)
    return {"seed": load_args.seed, "records": records, "duration_s": duration,
            "load_average_1m": [load_before, load_after],
            "hit_tokens": hits1 - hits0, "looked_up_tokens": queries1 - queries0, "status_after": after}


def pooled(cfg: DeploymentConfig, deploy_s: float, rounds: list[dict]) -> dict:
    """One setup's result row over all its rounds."""
    records = [r for rnd in rounds for r in rnd["records"]]
    hits = sum(rnd["hit_tokens"] for rnd in rounds)
    looked_up = sum(rnd["looked_up_tokens"] for rnd in rounds)
    last = rounds[-1]["status_after"] or {}
    return {"app": cfg.name,
            "routing": {"kind": cfg.routing.kind.value,
                        "policy": cfg.routing.policy.to_dict() if cfg.routing.policy else None},
            "deploy_s": deploy_s,
            "summary": load_gen.summarize(records, sum(rnd["duration_s"] for rnd in rounds)),
            "fleet_prefix_cache_hit_rate": hits / looked_up if looked_up else None,
            "fleet_prefix_cache_hit_tokens": hits, "fleet_prompt_tokens_looked_up": looked_up,
            "rounds": [{"seed": rnd["seed"], "duration_s": rnd["duration_s"],
                        "load_average_1m": rnd["load_average_1m"],
                        "fleet_prefix_cache_hit_rate": (rnd["hit_tokens"] / rnd["looked_up_tokens"]
                                                        if rnd["looked_up_tokens"] else None),
                        "summary": load_gen.summarize(rnd["records"], rnd["duration_s"])}
                       for rnd in rounds],
            "per_replica_after": {r["replica_id"]: {k: r[k] for k in ("prefix_cache_hit_rate",
                                                                      "num_prompt_tokens",
                                                                      "num_generation_tokens")}
                                  for r in last.get("replicas", [])},
            "requests": [dataclasses.asdict(r) for r in records]}


def ratios(affinity: dict, baseline: dict) -> dict:
    """Baseline / affinity for latencies (>1: affinity faster), affinity / baseline for throughput."""
    out = {}
    for metric in ("ttft_s", "itl_s", "e2e_s"):
        for q in ("p50", "p90", "p99"):
            a, b = affinity["summary"][metric][q], baseline["summary"][metric][q]
            out[f"{metric}_{q}_baseline_over_affinity"] = b / a if a and b else None
    for metric in ("request_throughput_per_s", "output_token_throughput_per_s"):
        a, b = affinity["summary"][metric], baseline["summary"][metric]
        out[f"{metric}_affinity_over_baseline"] = a / b if b else None
    return out


def print_table(results: dict, ratio: dict) -> None:
    labels = list(results)
    print(f"\n{'metric':<28}" + "".join(f"{label:>18}" for label in labels) + f"{'ratio':>10}")

    def row(name: str, values: list, fmt: str, r: Optional[float] = None) -> None:
        cells = "".join(f"{fmt.format(v) if v is not None else 'n/a':>18}" for v in values)
        print(f"{name:<28}{cells}{(f'{r:.2f}x' if r else ''):>10}")

    def column(key: str, q: Optional[str] = None, scale: float = 1.0) -> list:
        values = [results[label]["summary"][key] for label in labels]
        if q is not None:
            values = [v[q] for v in values]
        return [v * scale if v is not None and scale != 1.0 else v for v in values]

    for metric, title in (("ttft_s", "TTFT"), ("itl_s", "ITL"), ("e2e_s", "E2E")):
        for q in ("p50", "p90", "p99"):
            row(f"{title} {q} (ms)", column(metric, q, 1000.0), "{:.1f}",
                ratio[f"{metric}_{q}_baseline_over_affinity"])
    row("requests/s", column("request_throughput_per_s"), "{:.2f}",
        ratio["request_throughput_per_s_affinity_over_baseline"])
    row("output tokens/s", column("output_token_throughput_per_s"), "{:.1f}",
        ratio["output_token_throughput_per_s_affinity_over_baseline"])
    row("fleet prefix-cache hit rate", [results[label]["fleet_prefix_cache_hit_rate"] for label in labels],
        "{:.1%}")
    row("errors", column("num_errors"), "{}")
    print("ratio: latency baseline/affinity, throughput affinity/baseline (>1: affinity better)")


def plot(results: dict, title: str, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(results)
    colors = {"prefix_affinity": "tab:blue", "power_of_two": "tab:orange"}
    fig, axes = plt.subplots(1, 4, figsize=(18, 4.2))
    quantiles = ("p50", "p90", "p99")
    width = 0.38
    for ax, (metric, name, scale, unit) in zip(axes[:3], (("ttft_s", "Time to first token", 1000, "ms"),
                                                          ("itl_s", "Inter-token latency", 1000, "ms"),
                                                          ("e2e_s", "End-to-end latency", 1, "s"))):
        for j, label in enumerate(labels):
            values = [(results[label]["summary"][metric][q] or 0) * scale for q in quantiles]
            ax.bar([i + (j - 0.5) * width for i in range(len(quantiles))], values, width,
                   color=colors.get(label), label=label)
        ax.set_xticks(range(len(quantiles)), quantiles)
        ax.set_ylabel(unit)
        ax.set_title(name)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    ax = axes[3]
    hit_rates = [(results[l]["fleet_prefix_cache_hit_rate"] or 0) * 100 for l in labels]
    ax.bar(labels, hit_rates, color=[colors.get(l) for l in labels])
    for i, v in enumerate(hit_rates):
        ax.text(i, v, f"{v:.0f}%", ha="center", va="bottom")
    ax.set_ylim(0, 100)
    ax.set_ylabel("%")
    ax.set_title("Fleet prefix-cache hit rate")
    throughput = ", ".join(f"{label}: {results[label]['summary']['request_throughput_per_s']:.2f} req/s"
                           for label in labels)
    fig.suptitle(f"{title}\n{throughput}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ray(num_cpus: int) -> None:
    import ray
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # A private cluster on its own temp dir: never joins (or disturbs) another Ray on the host.
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
             _temp_dir=tempfile.mkdtemp(prefix="kvmesh-bench-ray-"),
             runtime_env={"env_vars": {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}})


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "tiny.yaml"),
                        help="deployment YAML (model, engine); replicas and routing are set here")
    parser.add_argument("--num-replicas", type=int, default=3)
    parser.add_argument("--replica-cpus", type=float, default=0.25, help="Ray CPUs per replica")
    parser.add_argument("--baseline", choices=("serve_default", "kvmesh_p2c"), default="serve_default")
    parser.add_argument("--num-requests", type=int, default=160)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--request-rate", type=float, default=None)
    parser.add_argument("--shared-prefix-ratio", type=float, default=0.9)
    # 16 prefixes of ~21 blocks: more than one replica's 256-block cache holds, fewer than three do.
    parser.add_argument("--num-prefixes", type=int, default=16)
    parser.add_argument("--prefix-len", type=int, default=120, help="words in a shared prefix")
    parser.add_argument("--suffix-len", type=int, default=12)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--endpoint", choices=("chat", "completions"), default="chat")
    parser.add_argument("--rounds", type=int, default=2, help="workload runs per setup, interleaved")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--port", type=int, default=None, help="Serve HTTP port (default: a free one)")
    parser.add_argument("--name", default="routing_compare_tiny_cpu", help="result file stem")
    args = parser.parse_args(argv)

    from ray import serve

    base = load_deployment_config(args.config)
    port = args.port or free_port()
    # The same workload for both setups: load_gen's prompts and client, one seed per round.
    load_args = argparse.Namespace(
        base_url=None, model=base.served_model_name, api_key=None, endpoint=args.endpoint,
        num_requests=args.num_requests, concurrency=args.concurrency, request_rate=args.request_rate,
        shared_prefix_ratio=args.shared_prefix_ratio, num_prefixes=args.num_prefixes,
        prefix_len=args.prefix_len, suffix_len=args.suffix_len, max_tokens=args.max_tokens,
        temperature=0.0, ignore_eos=True, timeout=300.0, seed=args.seed)

    start_ray(num_cpus=4)
    results: dict[str, dict] = {}
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        setups = {}
        for label, routing in routing_setups(args.baseline).items():
            cfg = app_config(base, label, routing, args.num_replicas, args.replica_cpus)
            url = f"http://127.0.0.1:{port}/{label.replace('_', '-')}"
            setups[label] = (cfg, url, deploy(cfg, url, load_args.model), [])
            print(f"deployed {label} ({args.num_replicas} replicas) in {setups[label][2]:.0f}s", flush=True)
        labels = list(setups)
        for round_id in range(args.rounds):
            for label in (labels if round_id % 2 == 0 else labels[::-1]):
                cfg, url, _, rounds = setups[label]
                run_args = argparse.Namespace(**{**vars(load_args), "base_url": url,
                                                 "seed": args.seed + round_id})
                rounds.append(run_round(run_args))
                s = load_gen.summarize(rounds[-1]["records"], rounds[-1]["duration_s"])
                print(f"round {round_id} {label:<16} {s['num_ok']}/{s['num_requests']} ok in "
                      f"{s['duration_s']:.1f}s, TTFT p50 {s['ttft_s']['p50'] * 1000:.0f} ms, hit rate "
                      f"{rounds[-1]['hit_tokens'] / max(rounds[-1]['looked_up_tokens'], 1):.1%}, "
                      f"load average {rounds[-1]['load_average_1m'][0]:.1f}", flush=True)
        for label, (cfg, _, deploy_s, rounds) in setups.items():
            results[label] = pooled(cfg, deploy_s, rounds)
    finally:
        import ray
        serve.shutdown()
        ray.shutdown()

    ratio = ratios(results["prefix_affinity"], results["power_of_two"])
    print_table(results, ratio)
    machine = load_gen.machine_name()
    out = {"machine": machine, "python": sys.version.split()[0], "time": time.time(),
           "args": vars(args), "workload": {k: v for k, v in vars(load_args).items() if k != "base_url"},
           "engine": {"model": base.engine.model.model, "block_size": base.block_size,
                      "num_blocks": base.engine.cache.num_blocks},
           "ratios": ratio, "results": results}
    load_gen.RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    json_path = load_gen.RESULTS_DIR / f"{args.name}.json"
    json_path.write_text(json.dumps(out, indent=1))
    png_path = load_gen.RESULTS_DIR / f"{args.name}.png"
    plot(results, f"kvmesh routing: prefix affinity vs power of two ({args.baseline}), "
                  f"{args.num_replicas} replicas, on {machine}", png_path)
    print(f"wrote {json_path}\nwrote {png_path}")
    return 0 if all(r["summary"]["num_ok"] == r["summary"]["num_requests"] for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
