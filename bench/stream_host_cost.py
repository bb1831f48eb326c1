"""Host work per output token of the streaming path inside one replica process, model excluded.

Runs ``AsyncLLM`` (kvmesh-tiny) with ``--concurrency`` streams of ``--max-tokens`` tokens and
consumes them as ``LLMServer.generate_deltas`` does (``router.deltas.DeltaTracker``), for each
``--stream-intervals`` value, and reports per output token:

- ``engine_output_us``: the engine thread's output processing (``OutputProcessor.process``:
  detokenization, stop strings, ``RequestOutput``s) - host work that delays the next step;
- ``loop_cpu_us``: CPU of the event loop thread (hand-off, the request's stream, deltas) - in a
  replica it competes with the engine thread for the GIL, and each item it yields costs Serve's
  streaming (not included here) about the same again.

    python bench/stream_host_cost.py --stream-intervals 1 4 16
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from typing import Optional

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


async def _one_run(engine, prompts: list[str], max_tokens: int, interval: int) -> dict:
    from engine import SamplingParams
    from router.deltas import DeltaTracker
    processor = engine.engine.output_processor
    spent = [0.0]
    original = processor.process

    def timed(*args, **kwargs):
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            spent[0] += time.perf_counter() - start

    processor.process = timed
    num_items = 0

    async def one(i: int, prompt: str) -> int:
        nonlocal num_items
        tracker = DeltaTracker("bench")
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        num_tokens = 0
        async for out in engine.generate(prompt, params, f"si{interval}-{i}", stream_interval=interval):
            delta = tracker.update(out)
            if delta is not None:
                num_items += 1
                num_tokens += sum(len(c.token_ids) for c in delta.choices)
        return num_tokens

    try:
        cpu0, wall0 = time.thread_time(), time.perf_counter()
        num_tokens = sum(await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts))))
        cpu, wall = time.thread_time() - cpu0, time.perf_counter() - wall0
    finally:
        processor.process = original
    return {"stream_interval": interval, "num_tokens": num_tokens, "num_items": num_items,
            "items_per_token": round(num_items / num_tokens, 3),
            "engine_output_us_per_token": round(spent[0] * 1e6 / num_tokens, 1),
            "loop_cpu_us_per_token": round(cpu * 1e6 / num_tokens, 1),
            "output_tok_s": round(num_tokens / wall, 1)}


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--stream-intervals", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds over the intervals")
    parser.add_argument("--name", default="stream_host_cost_tiny_cpu")
    args = parser.parse_args(argv)

    import torch

    from bench import load_gen
    from engine import AsyncLLM
    from engine.config import EngineConfig
    torch.set_num_threads(1)
    engine = AsyncLLM.from_config(EngineConfig.create(
        model="kvmesh-tiny", dtype="float32", device="cpu", block_size=16, num_blocks=2048,
        max_num_seqs=max(args.concurrency, 16), max_num_batched_tokens=2048))
    prompts = [f"Story {i}: " + " ".join(load_gen.WORDS[(i * 7 + j) % len(load_gen.WORDS)] for j in range(40))
               for i in range(args.concurrency)]
    runs = []
    try:
        asyncio.run(_one_run(engine, prompts[:4], 8, 1))  # warm-up
        for _ in range(args.rounds):
            for interval in args.stream_intervals:
                run = asyncio.run(_one_run(engine, prompts, args.max_tokens, interval))
                print(json.dumps(run), flush=True)
                runs.append(run)
    finally:
        engine.shutdown()
    result = {"benchmark": "stream_host_cost", "machine": load_gen.machine_name(),
              "python": sys.version.split()[0], "time": time.time(), "args": vars(args), "runs": runs}
    load_gen.write_result(args.name, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
