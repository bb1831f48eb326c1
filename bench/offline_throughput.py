"""Offline throughput: kvmesh's engine vs HF transformers ``generate`` on the same requests.

Both run in this process on the same checkpoint (default: the built-in
kvmesh-tiny). Requests have mixed prompt and output lengths (seeded). HF runs
static batches (left-padded, every batch runs until its longest request is
done; only the requested tokens are counted); kvmesh runs all requests under
continuous batching. Prints a table and the ratio, writes JSON naming the machine.

    python bench/offline_throughput.py                      # CPU, kvmesh-tiny, 64 requests
    python bench/offline_throughput.py --model /path/to/hf  # any local checkpoint
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import torch  # noqa: E402


def machine_name() -> str:
    """The GPU's name, else the CPU line that bench/load_gen.py writes."""
    from bench.load_gen import machine_name as cpu_machine_name

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else cpu_machine_name()


def make_requests(vocab_size: int, num: int, seed: int, prompt_range, output_range):
    rng = random.Random(seed)
    reqs = []
    for _ in range(num):
        plen = rng.randint(*prompt_range)
        reqs.append(([rng.randrange(10, vocab_size) for _ in range(plen)], rng.randint(*output_range)))
    return reqs


def run_kvmesh(model: str, reqs, dtype: str, max_num_seqs: int) -> dict:
    from engine import LLM, SamplingParams

    llm = LLM(model=model, dtype=dtype, max_num_seqs=max_num_seqs)
    params = [SamplingParams(temperature=0.0, max_tokens=out_len, ignore_eos=True) for _, out_len in reqs]
    llm.generate([p for p, _ in reqs[:4]], params[:4])  # warm-up
    start = time.perf_counter()
    outs = llm.generate([p for p, _ in reqs], params, use_tqdm=True)
    elapsed = time.perf_counter() - start
    num_out = sum(len(o.outputs[0].token_ids) for o in outs)
    assert num_out == sum(n for _, n in reqs), "kvmesh produced a different number of tokens"
    return {"seconds": elapsed, "output_tokens": num_out, "output_tok_s": num_out / elapsed}


def run_hf(model_path: str, reqs, dtype: torch.dtype, batch_size: int, device: str) -> dict:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).to(device).eval()
    pad_id = 0

    def run_batch(batch):
        max_len = max(len(p) for p, _ in batch)
        ids = torch.full((len(batch), max_len), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, (p, _) in enumerate(batch):
            ids[i, max_len - len(p):] = torch.tensor(p)
            mask[i, max_len - len(p):] = 1
        new = max(n for _, n in batch)
        with torch.inference_mode():
            model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=new,
                           min_new_tokens=new, do_sample=False, pad_token_id=pad_id)

    run_batch(reqs[:2])  # warm-up
    start = time.perf_counter()
    for i in range(0, len(reqs), batch_size):
        run_batch(reqs[i:i + batch_size])
        print(f"\r[hf] {min(i + batch_size, len(reqs))}/{len(reqs)} requests", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    elapsed = time.perf_counter() - start
    num_out = sum(n for _, n in reqs)
    return {"seconds": elapsed, "output_tokens": num_out, "output_tok_s": num_out / elapsed}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="kvmesh-tiny")
    ap.add_argument("--num-requests", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, nargs=2, default=(16, 256))
    ap.add_argument("--output-len", type=int, nargs=2, default=(16, 128))
    ap.add_argument("--hf-batch-size", type=int, default=16)
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/offline_<machine>.json)")
    args = ap.parse_args()

    from engine.models.spec import ModelSpec
    from engine.tiny_model import resolve_model_path

    torch.set_num_threads(os.cpu_count() or 1)
    model_path = resolve_model_path(args.model)
    spec = ModelSpec.from_hf_config(model_path)
    reqs = make_requests(spec.vocab_size, args.num_requests, args.seed, args.prompt_len, args.output_len)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype_name = "bfloat16" if device == "cuda" else "float32"

    kv = run_kvmesh(args.model, reqs, dtype_name, args.max_num_seqs)
    hf = run_hf(model_path, reqs, getattr(torch, dtype_name), args.hf_batch_size, device)
    ratio = kv["output_tok_s"] / hf["output_tok_s"]
    result = {
        "benchmark": "offline_throughput", "machine": machine_name(), "model": args.model,
        "dtype": dtype_name, "num_requests": args.num_requests, "prompt_len_range": args.prompt_len,
        "output_len_range": args.output_len, "hf_batch_size": args.hf_batch_size,
        "torch": torch.__version__, "kvmesh": kv, "hf_transformers_generate": hf, "ratio": ratio,
    }
    print(f"\nmachine: {result['machine']}")
    print(f"{'system':<28}{'seconds':>10}{'out tokens':>12}{'tok/s':>10}")
    print(f"{'kvmesh':<28}{kv['seconds']:>10.2f}{kv['output_tokens']:>12}{kv['output_tok_s']:>10.1f}")
    print(f"{'HF generate (static batch)':<28}{hf['seconds']:>10.2f}{hf['output_tokens']:>12}{hf['output_tok_s']:>10.1f}")
    print(f"ratio kvmesh / HF: {ratio:.2f}x")
    out = args.out or os.path.join(os.path.dirname(__file__), "results",
                                   f"offline_throughput_{'gpu' if device == 'cuda' else 'cpu'}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
