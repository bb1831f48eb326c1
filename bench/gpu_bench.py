"""GPU benchmark: kvmesh vs HF transformers ``generate`` at the Llama-3.1-8B shape (dummy bf16 weights).

Runs in one invocation on one GPU and writes its JSON after every part, so a
run cut short still leaves what it measured:

    copy       device-to-device copy bandwidth; the decode floor = weight bytes / bandwidth
    engine     (1) single-stream decode (prompt 256, 128 new), (2) 512 requests 128 -> 128,
               (3) 1,000 mixed requests (prompts 64-2048, outputs 16-512, seeded)
    hf         the same with HF generate (sdpa): dynamic cache and cache_implementation="static";
               (2) and (3) on subsets (HF is slow), stated in the JSON

    python bench/gpu_bench.py --out bench/results/gpu_bench_h100.json
The HTTP part (TTFT / ITL through the server) is bench/gpu_http_bench.sh.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import torch  # noqa: E402

LLAMA_8B = dict(architectures=["LlamaForCausalLM"], vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
                rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                 "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                 "original_max_position_embeddings": 8192})


def word_tokenizer(vocab_size: int):
    """A word-level tokenizer with exactly ``vocab_size`` entries, every id a word.

    Random dummy weights sample ids across the whole 128k vocabulary; with a real-size
    vocabulary every sampled id decodes to text, so streamed chunks are never empty and
    TTFT / ITL measured through the HTTP API count every token. Built in ~2 s, offline.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from engine.tiny_model import ensure_tiny_model
    from engine.tokenizer import load_tokenizer

    tiny = load_tokenizer(ensure_tiny_model())  # for its special tokens and chat template
    specials = list(dict.fromkeys(list(tiny.all_special_tokens)
                                  + [t for t in tiny.get_vocab() if t.startswith("<|")]))
    vocab: dict[str, int] = {}
    for word in ["<unk>", *specials]:
        vocab.setdefault(word, len(vocab))
    i = 0
    while len(vocab) < vocab_size:
        vocab.setdefault(f"w{i}", len(vocab))
        i += 1
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=tiny.bos_token, eos_token=tiny.eos_token, unk_token="<unk>",
        additional_special_tokens=[t for t in specials if t not in (tiny.bos_token, tiny.eos_token)])
    fast.chat_template = tiny.chat_template
    return fast


def make_dummy_checkpoint(path: str) -> str:
    """config.json of the 8B shape plus a 128,256-word tokenizer (see ``word_tokenizer``)."""
    from transformers import LlamaConfig

    os.makedirs(path, exist_ok=True)
    LlamaConfig(**LLAMA_8B, torch_dtype="bfloat16").save_pretrained(path)
    word_tokenizer(LLAMA_8B["vocab_size"]).save_pretrained(path)
    return path


def copy_bandwidth() -> float:
    """Bytes read + written per second of a 2 GiB device-to-device copy (median of 20)."""
    x = torch.randint(0, 255, (2 << 30,), dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    times = []
    for _ in range(25):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        y.copy_(x)
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    del x, y
    return 2 * (2 << 30) / sorted(times[5:])[len(times[5:]) // 2]


def random_ids(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(1000, 128000) for _ in range(n)]


def mixed_requests(num: int, seed: int = 0) -> list[tuple[list[int], int]]:
    rng = random.Random(seed)
    return [(random_ids(rng, rng.randint(64, 2048)), rng.randint(16, 512)) for _ in range(num)]


# ---- kvmesh ----------------------------------------------------------------------------------

def engine_single_stream(llm, prompt: list[int], new_tokens: int) -> dict:
    from engine import SamplingParams

    engine = llm.engine
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    results = []
    for run in range(3):
        engine.add_request(f"single-{run}", prompt, params)
        start = time.perf_counter()
        token_times = []
        while engine.has_unfinished_requests():
            for out in engine.step():
                n = len(out.outputs[0].token_ids)
                while len(token_times) < n:
                    token_times.append(time.perf_counter())
        results.append({"ttft_s": token_times[0] - start, "e2e_s": token_times[-1] - start,
                        "decode_tok_s": (len(token_times) - 1) / (token_times[-1] - token_times[0])})
    best = results[-1]
    return {**best, "e2e_tok_s": new_tokens / best["e2e_s"], "runs": results}


def engine_ttft(llm, prompts: list[list[int]]) -> dict:
    """TTFT of one fresh prompt at a time (no prefix hit, nothing else running), no profiler:
    add_request to the first output token, through ``engine.step()``."""
    from engine import SamplingParams

    engine = llm.engine
    params = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True)
    ttfts = []
    for i, prompt in enumerate(prompts):
        torch.cuda.synchronize()
        start = time.perf_counter()
        engine.add_request(f"ttft-fresh-{i}-{time.monotonic_ns()}", prompt, params)
        first = None
        while engine.has_unfinished_requests():
            outs = engine.step()
            if first is None and any(o.outputs[0].token_ids for o in outs):
                first = time.perf_counter() - start
        ttfts.append(first * 1e3)
    ttfts = ttfts[1:]  # the first one warms up
    return {"prompt_tokens": len(prompts[0]), "ttft_ms": ttfts, "p50_ms": statistics.median(ttfts)}


def engine_profile(llm, prompts: list[list[int]], steps: int, path: str) -> dict:
    """torch.profiler over ``steps`` decode steps of ``len(prompts)`` streams: where a step's time goes."""
    from torch.profiler import ProfilerActivity, profile

    from engine import SamplingParams

    engine = llm.engine
    params = SamplingParams(temperature=0.0, max_tokens=steps + 40, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add_request(f"prof-{len(prompts)}-{i}", p, params)
    for _ in range(20):  # prefill and warm-up
        engine.step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            engine.step()
        torch.cuda.synchronize()
        wall = time.perf_counter() - start
    while engine.has_unfinished_requests():
        engine.step()
    table = (prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40) + "\n\n"
             + prof.key_averages().table(sort_by="self_device_time_total", row_limit=40))
    try:  # kernel events only (device side), so nothing is counted twice
        from torch.autograd import DeviceType
        gpu_busy_us = sum(e.device_time_total for e in prof.events() if e.device_type == DeviceType.CUDA)
    except Exception:  # noqa: BLE001 - profiler API differences: keep the table
        gpu_busy_us = float("nan")
    with open(path, "w") as f:
        f.write(f"{steps} steps of batch {len(prompts)}: wall {wall * 1e3 / steps:.3f} ms a step, "
                f"GPU kernels {gpu_busy_us / 1e3 / steps:.3f} ms a step\n\n{table}\n")
    return {"batch": len(prompts), "steps": steps, "wall_ms_per_step": wall * 1e3 / steps,
            "gpu_kernel_ms_per_step": gpu_busy_us / 1e3 / steps}


def engine_ttft_profile(llm, prompts: list[list[int]], path: str) -> dict:
    """TTFT of one request at a time (fresh prompts: no prefix hit), with a torch.profiler table of
    the device kernels and the host calls, to see where the first token's time goes."""
    from torch.profiler import ProfilerActivity, profile

    from engine import SamplingParams

    engine = llm.engine
    params = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True)
    ttfts, steps = [], []

    def one(request_id: str, prompt: list[int]) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        engine.add_request(request_id, prompt, params)
        first = None
        while engine.has_unfinished_requests():
            t0 = time.perf_counter()
            outs = engine.step()
            steps.append((time.perf_counter() - t0) * 1e3)
            if first is None and any(o.outputs[0].token_ids for o in outs):
                first = time.perf_counter() - start
        ttfts.append(first * 1e3)

    one("ttft-warm", prompts[0])
    ttfts.clear()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for i, p in enumerate(prompts[1:]):
            one(f"ttft-{i}", p)
    with open(path, "w") as f:
        f.write(f"TTFT ms per request: {[round(t, 2) for t in ttfts]}\nstep() ms: {[round(t, 2) for t in steps]}\n\n")
        f.write(prof.key_averages().table(sort_by="self_device_time_total", row_limit=30))
        f.write("\n\n")
        f.write(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))
    return {"ttft_ms": ttfts, "step_ms": steps}


def engine_throughput(llm, reqs: list[tuple[list[int], int]]) -> dict:
    from engine import SamplingParams

    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for _, n in reqs]
    start = time.perf_counter()
    outs = llm.generate([p for p, _ in reqs], params, use_tqdm=True)
    elapsed = time.perf_counter() - start
    num_out = sum(len(o.outputs[0].token_ids) for o in outs)
    return {"num_requests": len(reqs), "seconds": elapsed, "output_tokens": num_out,
            "output_tok_s": num_out / elapsed,
            "total_tok_s": (num_out + sum(len(p) for p, _ in reqs)) / elapsed}


# ---- HF transformers -------------------------------------------------------------------------

def hf_model(path: str):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa")
    model.generation_config.eos_token_id = None
    return model.eval()


def hf_generate(model, batch: list[tuple[list[int], int]], static: bool, cache=None) -> float:
    """Runs one left-padded batch to its longest output; returns seconds. ``cache``: a
    ``StaticCache`` to reuse (reset here) instead of a fresh cache per call."""
    max_len = max(len(p) for p, _ in batch)
    ids = torch.zeros((len(batch), max_len), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, (p, _) in enumerate(batch):
        ids[i, max_len - len(p):] = torch.tensor(p)
        mask[i, max_len - len(p):] = 1
    new = max(n for _, n in batch)
    kwargs = {"cache_implementation": "static"} if static and cache is None else {}
    sync = torch.cuda.synchronize if model.device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    with torch.inference_mode():
        if cache is not None:
            cache.reset()  # inference tensors: zeroed inside inference mode
            kwargs["past_key_values"] = cache
        model.generate(input_ids=ids.to(model.device), attention_mask=mask.to(model.device), max_new_tokens=new,
                       min_new_tokens=new, do_sample=False, pad_token_id=0, **kwargs)
    sync()
    return time.perf_counter() - start


def hf_throughput(model, reqs, batch_size: int, static: bool) -> dict:
    # Warm-up: static caches compile per shape, so warm with the real first batch; dynamic: a token.
    hf_generate(model, reqs[:batch_size] if static else [(reqs[0][0], 2)], static)
    elapsed = sum(hf_generate(model, reqs[i:i + batch_size], static) for i in range(0, len(reqs), batch_size))
    useful = sum(n for _, n in reqs)
    return {"num_requests": len(reqs), "batch_size": batch_size, "static_cache": static,
            "seconds": elapsed, "output_tokens": useful, "output_tok_s": useful / elapsed}


# ---- main ------------------------------------------------------------------------------------

def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/results/gpu_bench.json")
    ap.add_argument("--workdir", default="/tmp/kvmesh-llama8b-dummy")
    ap.add_argument("--parts", default="copy,engine,hf")
    ap.add_argument("--num-mixed", type=int, default=1000)
    ap.add_argument("--hf-mixed-subset", type=int, default=32)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--profile-dir", default=None, help="write torch.profiler tables of decode steps here")
    ap.add_argument("--skip-hf-mixed-dynamic", action="store_true")
    ap.add_argument("--ttft-profile", action="store_true", help="profile first tokens of fresh prompts")
    ap.add_argument("--graph-prefill-tokens", type=int, default=512,
                    help="cuda_graph_max_prefill_tokens (0: prefill steps run eagerly)")
    ap.add_argument("--decode-profile", action="store_true", help="profile decode steps (batch 1, 256)")
    args = ap.parse_args()
    parts = set(args.parts.split(","))
    path = make_dummy_checkpoint(args.workdir)
    result: dict = {"benchmark": "gpu_bench", "gpu": torch.cuda.get_device_name(0),
                    "torch": torch.__version__, "model_shape": "Llama-3.1-8B (dummy bf16 weights)"}

    def save() -> None:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
        print(f"[gpu_bench] saved {args.out}", flush=True)

    rng = random.Random(0)
    prompt256 = random_ids(rng, 256)
    fixed = [(random_ids(rng, 128), 128) for _ in range(512)]
    mixed = mixed_requests(args.num_mixed, seed=1)

    if "copy" in parts:
        result["copy_bandwidth_GBps"] = copy_bandwidth() / 1e9
        print(f"[gpu_bench] copy bandwidth {result['copy_bandwidth_GBps']:.0f} GB/s", flush=True)
        save()

    if "engine" in parts:
        from engine import LLM

        t0 = time.perf_counter()
        llm = LLM(model=path, load_format="dummy", dtype="bfloat16", max_model_len=4096,
                  max_num_seqs=args.max_num_seqs, max_num_batched_tokens=8192, gpu_memory_utilization=0.90,
                  cuda_graph_max_prefill_tokens=args.graph_prefill_tokens)
        result["engine_options"] = {"max_num_seqs": args.max_num_seqs, "max_num_batched_tokens": 8192,
                                    "async_scheduling": llm.engine.async_scheduling,
                                    "cuda_graph_max_prefill_tokens": args.graph_prefill_tokens}
        result["engine_startup_s"] = time.perf_counter() - t0
        result["engine_num_kv_blocks"] = llm.engine.num_blocks
        result["gemv_tune_us"] = getattr(llm.engine.executor.runner, "gemv_report", {})
        weight_bytes = sum(p.numel() * p.element_size() for p in llm.engine.executor.runner.model.parameters())
        result["weight_bytes"] = weight_bytes
        if "copy_bandwidth_GBps" in result:
            floor_s = weight_bytes / (result["copy_bandwidth_GBps"] * 1e9)
            result["decode_floor_ms"] = floor_s * 1e3
            result["decode_floor_tok_s"] = 1 / floor_s
        result["kvmesh_single_stream"] = engine_single_stream(llm, prompt256, 128)
        print(f"[gpu_bench] kvmesh single stream {result['kvmesh_single_stream']['decode_tok_s']:.1f} tok/s", flush=True)
        save()
        if llm.engine.async_scheduling:  # ablation: the same engine stepping synchronously
            llm.engine.async_scheduling = False
            result["kvmesh_single_stream_sync"] = engine_single_stream(llm, prompt256, 128)
            llm.engine.async_scheduling = True
            print(f"[gpu_bench] kvmesh single stream, sync scheduling "
                  f"{result['kvmesh_single_stream_sync']['decode_tok_s']:.1f} tok/s", flush=True)
            save()
        trng = random.Random(11)
        fresh = [random_ids(trng, 256) for _ in range(8)]
        result["kvmesh_ttft_fresh_256"] = engine_ttft(llm, fresh)
        if llm.engine.async_scheduling:
            llm.engine.async_scheduling = False
            result["kvmesh_ttft_fresh_256_sync"] = engine_ttft(llm, [random_ids(trng, 256) for _ in range(8)])
            llm.engine.async_scheduling = True
        mixed_graphs = llm.engine.executor.runner.graph_runner and llm.engine.executor.runner.graph_runner.mixed
        result["mixed_graph_replays"] = mixed_graphs.num_replays if mixed_graphs else 0
        del mixed_graphs  # it holds the KV cache: HF needs that memory back after ``del llm``
        print(f"[gpu_bench] TTFT of a fresh 256-token prompt: p50 {result['kvmesh_ttft_fresh_256']['p50_ms']:.2f} ms "
              f"({result['kvmesh_ttft_fresh_256']['ttft_ms']}); sync "
              f"{result.get('kvmesh_ttft_fresh_256_sync', {}).get('p50_ms')}", flush=True)
        save()
        if args.ttft_profile:
            os.makedirs(args.profile_dir or ".", exist_ok=True)
            trng = random.Random(7)
            result["kvmesh_ttft_probe"] = engine_ttft_profile(
                llm, [random_ids(trng, 256) for _ in range(4)],
                os.path.join(args.profile_dir or ".", "profile_ttft.txt"))
            print(f"[gpu_bench] TTFT probe {result['kvmesh_ttft_probe']}", flush=True)
            save()
        if args.profile_dir and args.decode_profile:
            os.makedirs(args.profile_dir, exist_ok=True)
            result["profile"] = [engine_profile(llm, [prompt256], 50, os.path.join(args.profile_dir, "profile_b1.txt")),
                                 engine_profile(llm, [p for p, _ in fixed[:256]], 30,
                                                os.path.join(args.profile_dir, "profile_b256.txt"))]
            print(f"[gpu_bench] profile {result['profile']}", flush=True)
            save()
        result["kvmesh_max_load_512x128"] = engine_throughput(llm, fixed)
        print(f"[gpu_bench] kvmesh 512x128: {result['kvmesh_max_load_512x128']['output_tok_s']:.0f} tok/s", flush=True)
        save()
        if mixed:
            subset = mixed[:args.hf_mixed_subset]  # the requests HF runs below
            result["kvmesh_mixed_subset"] = engine_throughput(llm, subset)
            print(f"[gpu_bench] kvmesh mixed subset ({len(subset)}): "
                  f"{result['kvmesh_mixed_subset']['output_tok_s']:.0f} tok/s", flush=True)
            result["kvmesh_mixed"] = engine_throughput(llm, mixed)
            print(f"[gpu_bench] kvmesh mixed: {result['kvmesh_mixed']['output_tok_s']:.0f} tok/s", flush=True)
            save()
        del llm
        gc.collect()
        torch.cuda.empty_cache()

    if "hf" in parts:
        model = hf_model(path)
        single = [(prompt256, 128)]
        subset = mixed[:args.hf_mixed_subset]
        # The faster (static cache) path first: it is the one the targets compare against.
        result["hf_single_static"] = hf_throughput(model, single, 1, static=True)
        save()
        if subset:
            result["hf_mixed_subset_static_b32"] = hf_throughput(model, subset, 32, static=True)
            print(f"[gpu_bench] HF mixed subset static b32 "
                  f"{result['hf_mixed_subset_static_b32']['output_tok_s']:.0f} tok/s", flush=True)
            save()
        result["hf_max_load_static_b32"] = hf_throughput(model, fixed[:64], 32, static=True)
        save()
        result["hf_single_dynamic"] = hf_throughput(model, single, 1, static=False)
        print(f"[gpu_bench] HF single: dynamic {result['hf_single_dynamic']['output_tok_s']:.1f}, "
              f"static {result['hf_single_static']['output_tok_s']:.1f} tok/s", flush=True)
        save()
        result["hf_max_load_dynamic_b128"] = hf_throughput(model, fixed[:128], 128, static=False)
        print(f"[gpu_bench] HF 128x128: static b32 {result['hf_max_load_static_b32']['output_tok_s']:.0f}, "
              f"dynamic b128 {result['hf_max_load_dynamic_b128']['output_tok_s']:.0f} tok/s", flush=True)
        save()
        if subset and not args.skip_hf_mixed_dynamic:
            result["hf_mixed_subset_dynamic_b32"] = hf_throughput(model, subset, 32, static=False)
            save()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
