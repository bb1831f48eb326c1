"""Batch-1 linear layers of the Llama-3.1-8B shape at TP = 1, 2 and 4: cuBLAS vs the Triton kernels
of engine/kernels/gemv.py, timed as ``gemv.tune`` times them when a model loads (many calls in one
CUDA graph, every call reading its weight from HBM). Prints one line per shape: microseconds a
call and the bandwidth it reached for each kernel, and the kernel ``linear`` then uses.

    python bench/gemv_probe.py --out bench/results/gemv_probe_h200.json     # one GPU, ~1 min
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import torch  # noqa: E402

from engine.kernels import gemv as g, gemv_tune  # noqa: E402

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, FFN, VOCAB = 4096, 32, 8, 128, 14336, 128256


def shapes(tp: int) -> dict[str, tuple[int, int]]:
    """(N, K) of each linear weight one rank holds at tensor-parallel size ``tp``."""
    qkv = (HEADS // tp + 2 * max(KV_HEADS // tp, 1)) * HEAD_DIM  # KV heads split, at least 1 a rank
    return {"qkv": (qkv, HIDDEN), "o_proj": (HIDDEN, HEADS * HEAD_DIM // tp),
            "gate_up": (2 * FFN // tp, HIDDEN), "down": (HIDDEN, FFN // tp),
            "lm_head": (VOCAB // tp, HIDDEN)}


class _Linear(torch.nn.Module):
    small_batch_gemv = True  # what gemv.tune looks for

    def __init__(self, n: int, k: int):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(n, k, dtype=torch.bfloat16, device="cuda") * 0.02,
                                         requires_grad=False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tp", default="1,2,4", help="tensor-parallel sizes whose per-rank shapes to time")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    result = {"benchmark": "gemv_probe", "gpu": torch.cuda.get_device_name(0), "torch": torch.__version__,
              "time": time.time(), "shapes": {}}
    for tp in (int(t) for t in args.tp.split(",")):
        for name, (n, k) in shapes(tp).items():
            key = f"tp{tp}/{name}"
            report = gemv_tune.tune(_Linear(n, k))
            entry = report.get(f"{n}x{k}")
            if entry is None:  # the same (N, K) was tuned for an earlier entry
                entry = dict(result["shapes"][next(s for s, e in result["shapes"].items() if e["nk"] == [n, k])])
            mb = n * k * 2 / 1e6
            entry = {**entry, "nk": [n, k], "weight_mb": round(mb, 2)}
            entry["gb_s"] = {kern: round(mb / 1e3 / (us * 1e-6), 0) for kern, us in entry.items()
                             if kern in ("cublas", *g._KERNELS)}
            result["shapes"][key] = entry
            times = "  ".join(f"{kern} {entry[kern]:.1f}us {entry['gb_s'][kern]:.0f}GB/s" for kern in entry["gb_s"])
            print(f"{key:14s} {n:6d}x{k:<6d} {times}  -> {entry['use']} (2-4 rows: {entry['use_few_rows']})",
                  flush=True)
    configs = {f"{nk[0]}x{nk[1]}": str(c) for nk, c in getattr(g._gemv_row_kernel, "cache", {}).items()}
    result["row_kernel_configs"] = configs
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
