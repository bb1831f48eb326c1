"""Batch-1 linear layers of the 8B shape: cuBLAS vs the Triton GEMV (engine/kernels/gemv.py) per
tile config, cold weights (L2 flushed), CUDA events. Prints one line per shape and config.

    python bench/gemv_probe.py --out bench/results/gemv_probe_h100.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402

from engine.kernels import gemv as g  # noqa: E402

SHAPES = {"o_proj": (4096, 4096), "qkv": (6144, 4096), "down": (4096, 14336), "o_proj_tp2": (4096, 2048)}
CONFIGS = [(bn, bk, w, s) for bn in (16, 32) for bk in (128, 256, 512) for w in (4, 8) for s in (3, 5)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    report = {"gpu": torch.cuda.get_device_name(0), "shapes": {}}
    for name, (n, k) in SHAPES.items():
        w = torch.randn(n, k, dtype=torch.bfloat16, device="cuda") * 0.02
        x = torch.randn(1, k, dtype=torch.bfloat16, device="cuda")
        t_cublas = g._time(lambda: F.linear(x, w), 30)
        best = None
        for bn, bk, nw, ns in CONFIGS:
            out = torch.empty(1, n, dtype=x.dtype, device="cuda")

            def call():
                g._gemv_kernel.fn[(triton.cdiv(n, bn),)](x, w, out, 1, n, k, x.stride(0), w.stride(0),
                                                        out.stride(0), BLOCK_N=bn, BLOCK_K=bk, BLOCK_M=16,
                                                        num_warps=nw, num_stages=ns)
            try:
                call()
                t = g._time(call, 30)
            except Exception as exc:  # noqa: BLE001 - a config that does not compile
                continue
            if best is None or t < best[0]:
                best = (t, (bn, bk, nw, ns))
        ideal_us = n * k * 2 / 3.0e12 * 1e6
        report["shapes"][name] = {"n": n, "k": k, "cublas_us": t_cublas * 1e3, "gemv_best_us": best[0] * 1e3,
                                  "gemv_best_config": best[1], "ideal_us_at_3TBps": ideal_us}
        print(f"{name:12s} {n}x{k}: cuBLAS {t_cublas * 1e3:.1f} us, GEMV best {best[0] * 1e3:.1f} us {best[1]}, "
              f"ideal {ideal_us:.1f} us", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
