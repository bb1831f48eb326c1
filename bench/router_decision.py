"""Per-request cost of a routing decision with 10,000 cached prefixes indexed.

Plain Python, CPU only. Indexes ``--num-prefixes`` distinct prefixes of
``--prefix-blocks`` blocks over ``--num-replicas`` replicas, then times, per
request (a known prefix plus ``--suffix-blocks`` new blocks, or a cold one):

- ``match``: ``PrefixIndex.match`` on the request's chain;
- ``decide``: ``LocalRouterState.views_now`` + ``policy.choose``;
- ``route``: what the router does per request: decide, then count the
  dispatch, insert the chain for the chosen replica, and count the completion;
- ``hash``: ``block_hash_chain`` of the prompt (done once, in the ingress);
- with ``--redis``: ``RedisRouterState.views`` + ``choose`` against a local
  redis-server started for the run (one Lua-script round trip per decision),
  next to a bare ``PING`` round trip of the same asyncio client.

Prints microseconds per request and writes JSON naming the machine.

    python bench/router_decision.py            # writes bench/results/router_decision_cpu.json
    python bench/router_decision.py --redis
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from engine.block_hash import block_hash_chain  # noqa: E402
from router.policy import RouterPolicyConfig, choose  # noqa: E402
from router.redis_state import RedisRouterState  # noqa: E402
from router.shared_state import LocalRouterState  # noqa: E402


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def per_request_us(fn, requests: list) -> float:
    start = time.perf_counter()
    for request in requests:
        fn(request)
    return (time.perf_counter() - start) / len(requests) * 1e6


def build(args, rng: random.Random):
    cfg = RouterPolicyConfig()
    state = LocalRouterState(capacity_blocks=cfg.index_capacity_blocks)
    replica_ids = [f"replica-{i}" for i in range(args.num_replicas)]
    prefixes = []
    for p in range(args.num_prefixes):
        chain = [rng.getrandbits(64) for _ in range(args.prefix_blocks)]
        prefixes.append(chain)
        for replica_id in rng.sample(replica_ids, rng.choice((1, 1, 1, 2))):
            state.insert_blocks(replica_id, chain)
    for replica_id in replica_ids:
        for _ in range(rng.randrange(4)):
            state.on_dispatch(replica_id, 512)
    return cfg, state, replica_ids, prefixes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num-prefixes", type=int, default=10_000)
    parser.add_argument("--prefix-blocks", type=int, default=32)
    parser.add_argument("--suffix-blocks", type=int, default=4)
    parser.add_argument("--num-replicas", type=int, default=8)
    parser.add_argument("--num-requests", type=int, default=20_000)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--redis", action="store_true", help="also time the Redis-shared state")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                      "router_decision_cpu.json"))
    args = parser.parse_args()
    rng = random.Random(0)
    cfg, state, replica_ids, prefixes = build(args, rng)

    def warm_request():
        return rng.choice(prefixes) + [rng.getrandbits(64) for _ in range(args.suffix_blocks)]

    warm = [warm_request() for _ in range(args.num_requests)]
    cold = [[rng.getrandbits(64) for _ in range(args.prefix_blocks + args.suffix_blocks)]
            for _ in range(args.num_requests // 4)]
    num_tokens = (args.prefix_blocks + args.suffix_blocks) * args.block_size
    prompts = [[rng.randrange(32000) for _ in range(num_tokens)] for _ in range(200)]

    def decide(chain):
        return choose(chain, state.views_now(chain, replica_ids), rng, cfg)

    def route(chain):
        replica_id = decide(chain).replica_id
        state.on_dispatch(replica_id, num_tokens)
        state.insert_blocks(replica_id, chain)
        state.on_complete(replica_id, num_tokens)

    results = {
        "match_us": per_request_us(lambda c: state.index.match(c), warm),
        "decide_us": per_request_us(decide, warm),
        "decide_cold_us": per_request_us(decide, cold),
        "route_us": per_request_us(route, warm[: args.num_requests // 2]),
        "hash_chain_us": per_request_us(lambda t: block_hash_chain(t, args.block_size), prompts),
    }
    if args.redis:
        results.update(redis_decide_us(args, state, replica_ids, warm[:2000], cfg, rng))
    report = {
        "bench": "router_decision", "machine": cpu_model(), "platform": platform.platform(),
        "python": platform.python_version(), "num_cpus": os.cpu_count(),
        "load_avg_1m_at_end": round(os.getloadavg()[0], 2),  # a busy shared host inflates the times
        "indexed_prefixes": args.num_prefixes,
        "prefix_blocks": args.prefix_blocks, "suffix_blocks": args.suffix_blocks,
        "num_replicas": args.num_replicas, "indexed_blocks": len(state.index),
        "num_requests": args.num_requests, "per_request_us": {k: round(v, 2) for k, v in results.items()},
    }
    print(f"{args.num_prefixes} prefixes x {args.prefix_blocks} blocks indexed "
          f"({len(state.index)} blocks) over {args.num_replicas} replicas on {report['machine']}")
    for name, value in results.items():
        print(f"  {name:>16}: {value:8.2f} us/request")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    print(f"wrote {args.out}")


def redis_decide_us(args, local: LocalRouterState, replica_ids, requests, cfg, rng) -> dict:
    if shutil.which("redis-server") is None:
        print("redis-server not found: skipping --redis")
        return {}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    workdir = tempfile.mkdtemp(prefix="kvmesh-bench-redis-")
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                             "--save", "", "--appendonly", "no", "--dir", workdir],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.5)
        return asyncio.run(_redis_run(f"redis://127.0.0.1:{port}/0", local, replica_ids,
                                      requests, cfg, rng))
    finally:
        proc.terminate()
        proc.wait(timeout=10)


async def _redis_run(url, local, replica_ids, requests, cfg, rng) -> dict:
    state = RedisRouterState(url, "bench", op_timeout_s=1.0)
    state.mirror = local
    await state.resync()  # push the whole index, as after an outage
    assert state.redis_available, "redis-server did not come up"
    start = time.perf_counter()
    for _ in requests:
        await state._client.ping()
    ping_us = (time.perf_counter() - start) / len(requests) * 1e6
    start = time.perf_counter()
    for chain in requests:
        choose(chain, await state.views(chain, replica_ids), rng, cfg)
    elapsed = time.perf_counter() - start
    await state.close()
    return {"redis_ping_us": ping_us, "redis_decide_us": elapsed / len(requests) * 1e6}


if __name__ == "__main__":
    main()
