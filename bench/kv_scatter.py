"""A hand-off's KV scatter on the decode replica: one launch over the stacked cache vs one per layer.

When a prompt's KV arrives, the decode replica's engine thread writes the staging tensor
into the reserved blocks (``scatter_blocks``, engine/kv_transfer/blocks.py) between two
steps, and every stream waits for it. Caches from ``allocate_kv_cache`` are views of one
stacked tensor (one ``index_copy_`` for every layer); a plain list of per-layer tensors takes
the per-layer loop (one per layer: 32 for the 8B shape). Per prompt length, both paths on the
same blocks, best-of-``--repeats`` medians of:

    host_ms    what the calling (engine) thread spends queueing the scatter
    device_ms  the copy on the device (CUDA events; on CPU it equals the host time)

The gather on the prefill side (``gather_blocks``) is timed the same way. Prints the ratios
and writes JSON naming the machine:

    python bench/kv_scatter.py --shape llama8b     # on a GPU: bench/results/kv_scatter_<gpu>.json
    python bench/kv_scatter.py --shape tiny        # CPU smoke
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Optional

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import torch  # noqa: E402

from bench.load_gen import machine_name  # noqa: E402
from engine.attention.base import allocate_kv_cache  # noqa: E402
from engine.kv_transfer.blocks import gather_blocks, scatter_blocks  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
SHAPES = {  # layers, KV heads, head dim, block size, blocks in the cache, prompt lengths
    "llama8b": dict(layers=32, kv_heads=8, head_dim=128, block_size=16, num_blocks=4096,
                    prompts=(256, 1024, 8192)),
    "tiny": dict(layers=4, kv_heads=2, head_dim=16, block_size=16, num_blocks=256, prompts=(64, 512)),
}


def timed(fn: Callable[[], None], device: torch.device, calls: int) -> tuple[float, float]:
    """Median host ms per call and device ms per call (events around the batch of calls)."""
    host = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
    for _ in range(calls):
        t = time.perf_counter()
        fn()
        host.append((time.perf_counter() - t) * 1e3)
    if device.type == "cuda":
        end.record()
        torch.cuda.synchronize(device)
        return statistics.median(host), start.elapsed_time(end) / calls
    return statistics.median(host), statistics.median(host)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=tuple(SHAPES), default="llama8b" if torch.cuda.is_available() else "tiny")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    shape = SHAPES[args.shape]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    stacked = allocate_kv_cache(shape["layers"], shape["num_blocks"], shape["block_size"], shape["kv_heads"],
                                shape["head_dim"], dtype, device)
    per_layer = list(stacked)  # the same tensors as a plain list: the per-layer path
    results = []
    for tokens in shape["prompts"]:
        n = -(-tokens // shape["block_size"])
        block_ids = list(range(shape["num_blocks"] - 1, shape["num_blocks"] - 1 - 2 * n, -2))  # scattered ids
        kv = gather_blocks(stacked, block_ids)
        row = {"prompt_tokens": tokens, "num_blocks": n, "bytes": kv.numel() * kv.element_size()}
        for op, fn_of in (("scatter", lambda caches: lambda: scatter_blocks(caches, block_ids, kv)),
                          ("gather", lambda caches: lambda: gather_blocks(caches, block_ids))):
            for path, caches in (("per_layer", per_layer), ("stacked", stacked)):
                fn = fn_of(caches)
                fn()  # warm-up
                best = min((timed(fn, device, args.calls) for _ in range(args.repeats)), key=lambda hd: hd[0])
                row[f"{op}_{path}_host_ms"], row[f"{op}_{path}_device_ms"] = (round(x, 4) for x in best)
            row[f"{op}_host_ratio"] = round(row[f"{op}_stacked_host_ms"] / row[f"{op}_per_layer_host_ms"], 4)
            row[f"{op}_device_ratio"] = round(row[f"{op}_stacked_device_ms"] / row[f"{op}_per_layer_device_ms"], 4)
        results.append(row)
        print(f"{tokens:6d} tokens ({row['bytes'] / 1e6:7.1f} MB)  scatter host ms {row['scatter_per_layer_host_ms']:.3f}"
              f" -> {row['scatter_stacked_host_ms']:.3f} ({row['scatter_host_ratio']:.3f}x), device ms "
              f"{row['scatter_per_layer_device_ms']:.3f} -> {row['scatter_stacked_device_ms']:.3f} "
              f"({row['scatter_device_ratio']:.3f}x); gather host {row['gather_host_ratio']:.3f}x, "
              f"device {row['gather_device_ratio']:.3f}x", flush=True)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    out = {"benchmark": "kv_scatter", "machine": {"cpu": machine_name(), "gpu": gpu}, "shape": args.shape,
           "dtype": args.dtype, "calls": args.calls, "repeats": args.repeats, "results": results}
    path = Path(args.out or RESULTS / f"kv_scatter_{(gpu or 'cpu').split()[-1].lower()}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
