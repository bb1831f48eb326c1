"""TTFT and inter-token latency through the HTTP server on one GPU (8B shape, dummy bf16 weights).

Starts ``kvmesh serve`` on a generated config (one GPU replica), waits for
``/health``, then runs ``bench/load_gen.py`` at concurrency 1, 16 and 128 with
~256-token chat prompts (word-level tokenizer: one word, one token) and 64 output tokens, and gathers p50/p99 into one JSON.

    python bench/gpu_http_bench.py --out bench/results/gpu_http_h100.json
"""

from __future__ import annotations

import argparse
import json
import os
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/results/gpu_http.json")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--concurrency", default="1,16,128")
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
    finally:
        os.killpg(server.pid, signal.SIGINT)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
    print(json.dumps({c: r.get("summary", r.get("latency", {})) for c, r in result["runs"].items()}, indent=2)[:4000])


if __name__ == "__main__":
    main()
