"""Replica GPU groups on 2 GPUs: collectives, decode latency at TP=1/2, throughput TP=1x2 vs TP=2x1.

    python bench/parallel.py all --out bench/results/parallel_h100.json

Parts (each in its own subprocess, so GPU memory and CUDA state start clean):

  allreduce   bus bandwidth of all_reduce through our Communicator (engine/distributed/nccl.py)
              vs a raw CuPy NCCL allReduce on the same buffers, 2 ranks, bf16, 64 KiB .. 256 MiB.
              busbw = 2 (n-1)/n * bytes / time  (NCCL-tests' definition)
  decode      median decode step of an 8B-shape Llama (hidden 4096, 32 layers, 32/8 heads,
              FFN 14336, vocab 128256, dummy bf16 weights) at batch 1, through LLMEngine.step:
              TP=1 (one process) and TP=2 (RayExecutor, 2 worker actors); CUDA graphs on.
  throughput  output tokens/s at max load (all requests queued at once, decode-dominated):
              TP=1 x 2 replicas (two engines, one per GPU, run concurrently) vs TP=2 x 1 replica.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SIZES = [1 << s for s in range(16, 29, 2)]  # 64 KiB .. 256 MiB
LLAMA_8B_SHAPE = dict(
    architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=4096, intermediate_size=14336,
    num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
    max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=500000.0, bos_token_id=1,
    eos_token_id=2, tie_word_embeddings=False, torch_dtype="bfloat16", hidden_act="silu")


# ---- all-reduce --------------------------------------------------------------------------------

def _allreduce_rank(rank: int, ids, results) -> None:
    import torch
    from cupy.cuda import nccl

    from engine.distributed.nccl import NcclCommunicator
    device = torch.device("cuda", rank)
    ours = NcclCommunicator(ids[0], rank, 2, device)
    raw = nccl.NcclCommunicator(2, ids[1], rank)
    out = {}
    for nbytes in SIZES:
        x = torch.ones(nbytes // 2, dtype=torch.bfloat16, device=device)
        stream = torch.cuda.current_stream(device).cuda_stream
        iters = 50 if nbytes <= (16 << 20) else 20

        def run_ours():
            ours.all_reduce(x)

        def run_raw():
            raw.allReduce(x.data_ptr(), x.data_ptr(), x.numel(), 9, nccl.NCCL_SUM, stream)

        row = {}
        for name, fn in (("ours", run_ours), ("raw_cupy", run_raw)):
            for _ in range(5):
                fn()
            torch.cuda.synchronize(device)
            start = time.perf_counter()
            for _ in range(iters):
                fn()
            torch.cuda.synchronize(device)
            seconds = (time.perf_counter() - start) / iters
            row[name] = {"us": seconds * 1e6, "busbw_GBps": 2 * (2 - 1) / 2 * nbytes / seconds / 1e9}
        out[nbytes] = row
    if rank == 0:
        results.put(out)


def bench_allreduce() -> dict:
    import torch.multiprocessing as mp
    from cupy.cuda import nccl
    ids = (nccl.get_unique_id(), nccl.get_unique_id())
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_allreduce_rank, args=(r, ids, results)) for r in range(2)]
    for p in procs:
        p.start()
    out = results.get(timeout=300)
    for p in procs:
        p.join(timeout=60)
    return {"dtype": "bfloat16", "ranks": 2,
            "sizes": {str(k): v for k, v in out.items()}}


# ---- decode latency and throughput through the engine -----------------------------------------

def _model_dir() -> str:
    path = os.path.join(tempfile.gettempdir(), "kvmesh-llama8b-shape")
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(LLAMA_8B_SHAPE, f)
    return path


def _engine(tp: int, max_num_seqs: int):
    from engine.config import EngineConfig
    from engine.llm_engine import LLMEngine
    from engine.tiny_model import ensure_tiny_model
    if tp > 1:
        import ray
        if not ray.is_initialized():
            ray.init(include_dashboard=False, log_to_driver=False)
    config = EngineConfig.create(model=_model_dir(), tokenizer=ensure_tiny_model(), load_format="dummy",
                                 dtype="bfloat16", device="cuda", tensor_parallel_size=tp,
                                 max_model_len=2048, max_num_seqs=max_num_seqs,
                                 max_num_batched_tokens=8192, gpu_memory_utilization=0.85)
    return LLMEngine(config)


def bench_decode(tp: int) -> dict:
    from engine.sampling_params import SamplingParams
    engine = _engine(tp, max_num_seqs=8)
    engine.add_request("r", [7] * 128, SamplingParams(temperature=0.0, max_tokens=96, ignore_eos=True))
    steps = []
    while engine.has_unfinished_requests():
        start = time.perf_counter()
        engine.step()
        steps.append(time.perf_counter() - start)
    decode = steps[6:]  # after the prefill and a few warm-up steps
    engine.shutdown()
    return {"tp": tp, "batch": 1, "median_step_ms": statistics.median(decode) * 1e3,
            "p90_step_ms": sorted(decode)[int(0.9 * len(decode))] * 1e3, "num_steps": len(decode)}


def bench_throughput(tp: int, num_requests: int, prompt_len: int, max_tokens: int) -> dict:
    from engine.sampling_params import SamplingParams
    engine = _engine(tp, max_num_seqs=256)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    engine.add_request("warm", [3] * 16, SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
    while engine.has_unfinished_requests():
        engine.step()
    for i in range(num_requests):
        engine.add_request(f"r{i}", [(i * 7 + j) % 1000 + 5 for j in range(prompt_len)], params)
    start = time.perf_counter()
    while engine.has_unfinished_requests():
        engine.step()
    seconds = time.perf_counter() - start
    engine.shutdown()
    return {"tp": tp, "num_requests": num_requests, "prompt_len": prompt_len, "max_tokens": max_tokens,
            "seconds": seconds, "output_tok_s": num_requests * max_tokens / seconds}


def _sub(args: list[str], env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, os.path.abspath(__file__), *args], stdout=subprocess.PIPE,
                            env={**os.environ, **(env or {})}, text=True)


def _result(proc: subprocess.Popen, timeout: float) -> dict:
    out, _ = proc.communicate(timeout=timeout)
    if proc.returncode != 0:
        return {"error": f"exit {proc.returncode}"}
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("part", choices=["all", "allreduce", "decode", "throughput"])
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--num-requests", type=int, default=256)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--out", default=None)
    parser.add_argument("--budget-s", type=float, default=300.0, help="skip later parts past this")
    args = parser.parse_args()
    if args.part == "allreduce":
        print(json.dumps(bench_allreduce()))
        return
    if args.part == "decode":
        print(json.dumps(bench_decode(args.tp)))
        return
    if args.part == "throughput":
        print(json.dumps(bench_throughput(args.tp, args.num_requests, args.prompt_len, args.max_tokens)))
        return

    import torch
    start = time.monotonic()
    report = {"gpu": torch.cuda.get_device_name(0), "num_gpus": torch.cuda.device_count(),
              "torch": torch.__version__}

    def save():
        if args.out:
            with open(args.out, "w") as f:
                json.dump(report, f, indent=1)
        print(json.dumps(report, indent=1), flush=True)

    report["allreduce"] = _result(_sub(["allreduce"]), 240)
    save()
    report["decode"] = [_result(_sub(["decode", "--tp", str(tp)]), 240) for tp in (1, 2)]
    d = report["decode"]
    if all("median_step_ms" in r for r in d):
        report["decode_tp2_over_tp1"] = d[1]["median_step_ms"] / d[0]["median_step_ms"]
    save()
    if time.monotonic() - start > args.budget_s:
        report["throughput"] = "skipped: out of time budget"
        save()
        return
    common = ["--prompt-len", str(args.prompt_len), "--max-tokens", str(args.max_tokens)]
    half = str(args.num_requests // 2)
    replicas = [_sub(["throughput", "--tp", "1", "--num-requests", half, *common], {"CUDA_VISIBLE_DEVICES": str(g)})
                for g in (0, 1)]
    one_gpu = [_result(p, 300) for p in replicas]
    two_gpu = _result(_sub(["throughput", "--tp", "2", "--num-requests", str(args.num_requests), *common]), 300)
    report["throughput"] = {"tp1_x2_replicas": one_gpu, "tp2_x1_replica": two_gpu}
    if all("output_tok_s" in r for r in [*one_gpu, two_gpu]):
        report["throughput"]["tp1_x2_output_tok_s"] = sum(r["output_tok_s"] for r in one_gpu)
        report["throughput"]["tp2_x1_output_tok_s"] = two_gpu["output_tok_s"]
    save()


if __name__ == "__main__":
    main()
