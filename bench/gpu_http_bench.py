"""TTFT and inter-token latency through the HTTP server on one GPU (8B shape, dummy bf16 weights).

Starts ``kvmesh serve`` on a generated config (one GPU replica), waits for
``/health``, warms the server up (CUDA graphs, first requests), then runs
``bench/load_gen.py`` at concurrency 1, 16 and 128 with ~256-token chat prompts
(word-level tokenizer: one word, one token) and 64 output tokens, and gathers
p50/p99 into one JSON. Last, ``--trace-requests`` traced requests at concurrency 1
(``x-kvmesh-trace``, see ``bench/http_overhead.py``) give the TTFT breakdown by
serving phase (proxy, ingress, replica, engine).

    python bench/gpu_http_bench.py --out bench/results/gpu_http_h100.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import time
import urllib.request

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from bench.gpu_bench import make_dummy_checkpoint  # noqa: E402

CONFIG = """name: kvmesh
model: {model}
served_model_name: llama8b-dummy
engine:
  dtype: bfloat16
  device: cuda
  load_format: dummy
  max_model_len: 4096
  max_num_seqs: 256
  max_num_batched_tokens: 8192
  gpu_memory_utilization: 0.85
replicas:
  min_replicas: 1
  max_replicas: 1
  initial_replicas: 1
  num_cpus: 2
  num_gpus: 1
  max_ongoing_requests: 1024
admission:
  max_waiting_per_replica: 4096
ingress:
  num_cpus: 1
  num_replicas: 1
http:
  host: 127.0.0.1
  port: {port}
"""


def wait_healthy(url: str, timeout_s: float) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(2)
    raise TimeoutError(f"server not healthy at {url} after {timeout_s}s")


def chat_prompt(rng: random.Random, index: int, num_words: int) -> str:
    from bench.load_gen import WORDS
    return f"Note {index}: " + " ".join(rng.choice(WORDS) for _ in range(num_words)) + "?"


MODEL = "llama8b-dummy"  # served_model_name in CONFIG
PROMPT_WORDS = 242  # with the chat template, ~254 prompt tokens, as load_gen's 232 + 10 words


def warm_up(base_url: str, model: str = MODEL, num_requests: int = 4, num_words: int = PROMPT_WORDS) -> None:
    """A few requests first: the first ones pay one-time costs (CUDA graph capture, tokenizer
    load in the ingress, connections) that do not belong in the concurrency-1 figures."""
    import httpx
    rng = random.Random(1234)
    for i in range(num_requests):
        httpx.post(f"{base_url}/v1/chat/completions", timeout=600, json={
            "model": model, "max_tokens": 64, "ignore_eos": True, "temperature": 0.0,
            "messages": [{"role": "user", "content": chat_prompt(rng, 10_000 + i, num_words)}]}).raise_for_status()


def ttft_breakdown(base_url: str, num_requests: int, model: str = MODEL,
                   num_words: int = PROMPT_WORDS) -> dict:
    """Traced concurrency-1 requests: client TTFT and the median time of each serving phase."""
    import httpx

    from bench.http_overhead import breakdown, http_ttft_one
    from bench.load_gen import percentiles
    rng = random.Random(4321)

    async def run() -> list[dict]:
        async with httpx.AsyncClient(base_url=base_url, timeout=120) as client:
            return [await http_ttft_one(client, model, chat_prompt(rng, 20_000 + i, num_words), 16)
                    for i in range(num_requests)]
    traces = asyncio.run(run())
    return {"ttft_s": percentiles([t["client_first_chunk"] - t["client_sent"] for t in traces]),
            "breakdown": breakdown(traces), "traces": traces}


def print_summary(result: dict) -> None:
    """TTFT / ITL p50 and p99 (and TPOT p50, output tokens/s) per concurrency, then the breakdown."""
    columns = [("ttft_s", "p50"), ("ttft_s", "p99"), ("itl_s", "p50"), ("itl_s", "p99"), ("tpot_s", "p50")]
    print(f"{'concurrency':>11}" + "".join(f"{k[:-2].upper() + ' ' + q:>11}" for k, q in columns)
          + f"{'tok/s':>9}   (ms)")
    for conc, run in result["runs"].items():
        s = run["summary"]
        cells = []
        for key, q in columns:
            value = (s.get(key) or {}).get(q)
            cells.append(f"{value * 1000:11.1f}" if value is not None else f"{'n/a':>11}")
        print(f"{conc:>11}" + "".join(cells) + f"{s['output_token_throughput_per_s']:9.0f}")
    trace = result.get("ttft_breakdown_c1")
    if trace:
        print(f"\ntraced concurrency 1: TTFT p50 {trace['ttft_s']['p50'] * 1000:.1f} ms; "
              "median ms per phase:")
        for row in trace["breakdown"]:
            print(f"  {row['p50_ms']:7.2f}  {row['what']}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/results/gpu_http.json")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--concurrency", default="1,16,128")
    ap.add_argument("--trace-requests", type=int, default=16,
                    help="traced concurrency-1 requests for the TTFT breakdown (0: none)")
    args = ap.parse_args()
    model = make_dummy_checkpoint("/tmp/kvmesh-llama8b-dummy")
    cfg_path = "/tmp/kvmesh-gpu-http.yaml"
    with open(cfg_path, "w") as f:
        f.write(CONFIG.format(model=model, port=args.port))
    server = subprocess.Popen([sys.executable, "-m", "cluster.cli", "serve", cfg_path, "--port", str(args.port)],
                              start_new_session=True)
    result: dict = {"benchmark": "gpu_http", "runs": {}}
    try:
        wait_healthy(f"http://127.0.0.1:{args.port}/health", 400)
        import torch
        result["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
        warm_up(f"http://127.0.0.1:{args.port}")
        for conc in [int(c) for c in args.concurrency.split(",")]:
            num = max(16, conc * 3)
            name = f"gpu_http_c{conc}"
            cmd = [sys.executable, "bench/load_gen.py", "--base-url", f"http://127.0.0.1:{args.port}",
                   "--model", "llama8b-dummy", "--num-requests", str(num), "--concurrency", str(conc),
                   "--shared-prefix-ratio", "0", "--prefix-len", "232", "--suffix-len", "10",
                   "--max-tokens", "64", "--ignore-eos", "--name", name, "--no-plot"]
            subprocess.run(cmd, check=True, timeout=300)
            with open(os.path.join("bench", "results", f"{name}.json")) as f:
                result["runs"][str(conc)] = json.load(f)
            print(f"[gpu_http] concurrency {conc} done", flush=True)
            with open(args.out, "w") as f:
                json.dump(result, f, indent=2)
        if args.trace_requests:
            result["ttft_breakdown_c1"] = ttft_breakdown(f"http://127.0.0.1:{args.port}",
                                                         args.trace_requests)
            with open(args.out, "w") as f:
                json.dump(result, f, indent=2)
    finally:
        os.killpg(server.pid, signal.SIGINT)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
    print_summary(result)


if __name__ == "__main__":
    main()
