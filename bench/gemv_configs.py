"""Every candidate config of the one-row GEMV (engine/kernels/gemv.py's ``_gemv_row_kernel``) on the
Llama-3.1-8B shapes one rank holds at TP = 1, 2 and 4, against the configs ``gemv_tune.tune`` chooses
from today: is a better tile missing from the autotune list?

Timed as the tuner times (many calls in one CUDA graph, each on another copy of the weight so every
call reads HBM, as programmatic dependent launches like a decode step's, best of 5 rounds with the
configs' graphs taken in turn). Prints per shape the autotune list's best, the sweep's best and the
top few; writes a JSON naming the GPU.

``--chain``: each GEMV is followed by a small dependent kernel that turns its output into the next
call's input, as a decode step follows every GEMV with a norm, attention or SiLU-and-mul. Back to
back, a GEMV's last wave overlaps the next GEMV's first loads; in a decode step it does not, so a
tile whose programs take long to finish costs more there than the tuner's timing shows.

    python bench/gemv_configs.py --out bench/results/gemv_configs_h200.json   # one GPU, a few min
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import torch  # noqa: E402

from bench.gemv_probe import shapes  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from engine.kernels import gemv as g, gemv_tune  # noqa: E402
from engine.kernels.triton_ops import pdl_enter  # noqa: E402


def sweep_configs() -> list[tuple[int, int, int, int]]:
    """(BLOCK_N, BLOCK_K, num_warps, num_stages): tiles of 2K-16K elements, 4 or 8 warps."""
    out = []
    for bn, bk, w, s in itertools.product((2, 4, 8, 16), (256, 512, 1024, 2048, 4096), (4, 8), (2, 3, 4)):
        if 2048 <= bn * bk <= 16384 and bk * 2 >= 32 * w:
            out.append((bn, bk, w, s))
    return out


def listed_configs() -> list[tuple[int, int, int, int]]:
    return [(c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps, c.num_stages)
            for c in g._gemv_row_kernel.configs]


@triton.jit
def _feed_kernel(y_ptr, x_ptr, N, K, BLOCK: tl.constexpr):
    """x[i] = y[i % N] / 2 (the next call's input from this call's output), as a dependent."""
    pdl_enter(True)
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    y = tl.load(y_ptr + i % N, mask=i < K, other=0.0)
    tl.store(x_ptr + i, (y.to(tl.float32) * 0.5).to(x_ptr.dtype.element_ty), mask=i < K)


def feed(y: torch.Tensor, x: torch.Tensor) -> None:
    _feed_kernel[(triton.cdiv(x.shape[-1], 1024),)](y, x, y.shape[-1], x.shape[-1], BLOCK=1024,
                                                    num_warps=4, launch_pdl=True)


def time_configs(n: int, k: int, configs: list, calls: int = 24, rounds: int = 5,
                 chain: bool = False) -> dict:
    """{config: microseconds a call} for one (N, K) bf16 weight (``chain``: a call is the GEMV
    and the dependent kernel that feeds the next call)."""
    x = torch.randn(1, k, dtype=torch.bfloat16, device="cuda")
    w = torch.randn(n, k, dtype=torch.bfloat16, device="cuda") * 0.02
    ref = torch.nn.functional.linear(x, w).float()
    x0 = x.clone()  # the chain's feed rewrites x: restored after each config's check
    fns = {}
    for bn, bk, warps, stages in configs:
        def fn(wi, bn=bn, bk=bk, warps=warps, stages=stages):
            out = torch.empty(1, n, dtype=x.dtype, device=x.device)
            g._gemv_row_kernel.fn[(-(-n // bn),)](x, wi, out, n, k, wi.stride(0), BLOCK_N=bn, BLOCK_K=bk,
                                                  num_warps=warps, num_stages=stages, PDL=True,
                                                  launch_pdl=True)
            if chain:
                feed(out, x)
            return out
        try:
            got = fn(w).float()
        except Exception as exc:  # noqa: BLE001 - e.g. out of shared memory or registers
            print(f"  skip {bn}x{bk} w{warps} s{stages}: {type(exc).__name__}", flush=True)
            continue
        x.copy_(x0)
        if not torch.allclose(got, ref, rtol=2e-2, atol=2e-2 * ref.abs().max().item()):
            print(f"  {bn}x{bk} w{warps} s{stages} is wrong", flush=True)
            continue
        fns[(bn, bk, warps, stages)] = fn
    times = gemv_tune._time_in_graphs(fns, gemv_tune._weight_copies(w, calls), calls, rounds)
    return {key: t * 1e6 for key, t in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tp", default="1,2,4")
    ap.add_argument("--chain", action="store_true", help="each GEMV followed by a small dependent kernel")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    listed, swept = listed_configs(), sweep_configs()
    candidates = listed + [c for c in swept if c not in listed]
    result = {"benchmark": "gemv_configs", "gpu": torch.cuda.get_device_name(0), "torch": torch.__version__,
              "time": time.time(), "listed": listed, "chain": args.chain, "shapes": {}}
    print(f"{len(listed)} listed configs, {len(candidates)} in all", flush=True)
    seen = {}
    for tp in (int(t) for t in args.tp.split(",")):
        for name, (n, k) in shapes(tp).items():
            if name == "lm_head":
                continue
            start = time.monotonic()
            times = seen.get((n, k)) or time_configs(n, k, candidates, chain=args.chain)
            seen[(n, k)] = times
            mb = n * k * 2 / 1e6  # MB / us = TB/s
            best_listed = min((c for c in times if c in listed), key=times.get)
            best = min(times, key=times.get)
            top = sorted(times, key=times.get)[:5]
            row = {"nk": [n, k], "weight_mb": round(mb, 2),
                   "best_listed": [list(best_listed), round(times[best_listed], 2),
                                   round(mb / times[best_listed], 2)],
                   "best": [list(best), round(times[best], 2), round(mb / times[best], 2)],
                   "top5": [[list(c), round(times[c], 2)] for c in top]}
            result["shapes"][f"tp{tp}/{name}"] = row
            print(f"tp{tp}/{name} {n}x{k}: listed best {best_listed} {times[best_listed]:.2f} us "
                  f"({row['best_listed'][2]} TB/s); sweep best {best} {times[best]:.2f} us ({row['best'][2]} TB/s); "
                  f"top5 {row['top5']} [{time.monotonic() - start:.0f}s]", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
