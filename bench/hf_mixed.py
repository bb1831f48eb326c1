"""HF transformers' faster path (static cache, batch 32) on all of gpu_bench's 1,000 mixed requests.

gpu_bench's target (3) compares kvmesh and HF "on the same requests". HF at batch 32 needs
about 13 minutes of one H100 for the whole set, so the set is cut into shards of whole
batches, each shard run on its own GPU at the same time, and the shards' seconds added up:
the sum is what one GPU would take for all 1,000 (the batches are independent).

    # one process per GPU (CUDA_VISIBLE_DEVICES), shard i of n: batches b with b % n == i
    python bench/hf_mixed.py run --shard 0/3 --out /tmp/hf_shard0.json
    # then: HF throughput over all shards, and the ratio to kvmesh on the same 1,000 requests
    python bench/hf_mixed.py merge /tmp/hf_shard*.json --engine bench/results/gpu_bench_engine.json \\
        --out bench/results/hf_mixed_h100.json

Fair to HF: one ``StaticCache`` of 2,560 positions (the longest prompt, 2,048, plus the longest
output, 512) is reused by every batch, so the decode step HF compiles has one shape for the whole
run and is compiled once, in an untimed warm-up on the shard's first batch (a per-batch cache
length would recompile, and bill compile time to HF, on most batches). Each batch is left-padded to
its longest prompt and runs to its longest output, which is how ``generate`` batches; only each
request's own ``max_tokens`` count as output. The last batch (1,000 = 31 x 32 + 8) is filled up to
32 rows with copies of its first request, which add no output tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import torch  # noqa: E402

from bench.gpu_bench import hf_generate, hf_model, make_dummy_checkpoint, mixed_requests  # noqa: E402

CACHE_LEN = 2048 + 512  # longest prompt + longest output of gpu_bench.mixed_requests


def batches(reqs: list, batch_size: int) -> list[tuple[list, int]]:
    """(rows, number of real rows) per batch, the last one filled with copies of its first row."""
    out = []
    for i in range(0, len(reqs), batch_size):
        rows = list(reqs[i:i + batch_size])
        real = len(rows)
        rows += [rows[0]] * (batch_size - real)
        out.append((rows, real))
    return out


def run_batch(model, rows: list, cache) -> float:
    """One left-padded batch to its longest output through ``generate`` with ``cache``; seconds."""
    return hf_generate(model, rows, static=True, cache=cache)


def run_shard(args) -> None:
    from transformers import StaticCache

    index, count = (int(x) for x in args.shard.split("/"))
    reqs = mixed_requests(args.num_mixed, seed=1)  # gpu_bench's requests, same seed
    all_batches = batches(reqs, args.batch_size)
    mine = [(b, rows, real) for b, (rows, real) in enumerate(all_batches) if b % count == index]
    model = hf_model(make_dummy_checkpoint(args.workdir))
    cache = StaticCache(config=model.config, max_cache_len=CACHE_LEN)
    result = {"benchmark": "hf_mixed", "gpu": torch.cuda.get_device_name(0), "torch": torch.__version__,
              "shard": args.shard, "batch_size": args.batch_size, "cache_len": CACHE_LEN,
              "num_mixed": args.num_mixed, "batches": []}
    t0 = time.perf_counter()
    run_batch(model, mine[0][1], cache)  # warm-up: compiles the decode step (untimed)
    result["warmup_s"] = time.perf_counter() - t0
    print(f"[hf_mixed {args.shard}] warm-up {result['warmup_s']:.0f}s; {len(mine)} batches", flush=True)
    for done, (b, rows, real) in enumerate(mine, 1):
        seconds = run_batch(model, rows, cache)
        tokens = sum(n for _, n in rows[:real])
        result["batches"].append({"batch": b, "num_requests": real, "output_tokens": tokens, "seconds": seconds})
        print(f"[hf_mixed {args.shard}] batch {b} ({done}/{len(mine)}): {seconds:.1f}s, "
              f"{tokens / seconds:.0f} tok/s", flush=True)
        with open(args.out, "w") as f:  # after every batch: a run cut short keeps what it measured
            json.dump(result, f, indent=1)


def merge(args) -> None:
    shards = [json.load(open(p)) for p in args.shards]
    rows = [b for s in shards for b in s["batches"]]
    num_batches = -(-shards[0]["num_mixed"] // shards[0]["batch_size"])
    seconds = sum(b["seconds"] for b in rows)
    tokens = sum(b["output_tokens"] for b in rows)
    out = {"benchmark": "hf_mixed", "gpu": shards[0]["gpu"], "shards": [s["shard"] for s in shards],
           "batch_size": shards[0]["batch_size"], "cache_len": shards[0]["cache_len"],
           "num_requests": sum(b["num_requests"] for b in rows), "num_batches": len(rows),
           "complete": len({b["batch"] for b in rows}) == num_batches,
           "output_tokens": tokens, "seconds_one_gpu": seconds, "output_tok_s": tokens / seconds}
    if args.engine:
        engine = json.load(open(args.engine))
        mixed = engine.get("kvmesh_mixed")
        if mixed:
            out["kvmesh_mixed"] = {k: mixed[k] for k in ("num_requests", "seconds", "output_tokens", "output_tok_s")}
            out["kvmesh_over_hf"] = mixed["output_tok_s"] / out["output_tok_s"]
            out["kvmesh_gpu"] = engine.get("gpu")
    print(json.dumps(out, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--shard", default="0/1", help="i/n: batches b with b %% n == i")
    r.add_argument("--out", required=True)
    r.add_argument("--workdir", default="/tmp/kvmesh-llama8b-dummy")
    r.add_argument("--num-mixed", type=int, default=1000)
    r.add_argument("--batch-size", type=int, default=32)
    m = sub.add_parser("merge")
    m.add_argument("shards", nargs="+")
    m.add_argument("--engine", default=None, help="gpu_bench JSON with kvmesh_mixed")
    m.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    run_shard(args) if args.cmd == "run" else merge(args)


if __name__ == "__main__":
    main()
