"""Can a Triton GEMM beat cuBLAS on the decode GEMMs of a full batch (M = 32-256 rows)?

At max load a decode step is one GEMM per linear layer with M = the number of running requests,
still bound by reading the weight: at 128 requests on one H200, the 8B step's cuBLAS GEMMs read
16 GB in 4.4 ms (about 3.6 TB/s; bench/results/maxload_tp1_h200.json) where the one-row GEMVs
reach 4.3-4.5 TB/s. This times, per 8B weight shape (one rank at TP=1 or 2) and M, cuBLAS
(``F.linear``) against a tiled Triton GEMM over a small config list, with split-K for shapes
of few output blocks, as the GEMV tuner times them (``gemv_tune._time_in_graphs``: many calls
in one CUDA graph, each on another copy of the weight so every call reads HBM, the candidates'
graphs in turn, best of 5 rounds). Prints µs and TB/s per shape and writes a JSON naming the
GPU. (The figures in bench/results/skinny_gemm_h200.json were taken by this script's first
version, which timed each candidate alone in a loop of its own.)

    python bench/skinny_gemm.py --out bench/results/skinny_gemm_h200.json   # one GPU, a few min
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from bench.gemv_probe import shapes  # noqa: E402
from engine.kernels import gemv as g, gemv_tune  # noqa: E402

# (BLOCK_N, BLOCK_K, SPLIT_K, num_warps, num_stages)
CONFIGS = [(64, 128, 1, 4, 4), (64, 128, 1, 4, 5), (64, 256, 1, 4, 3), (64, 256, 1, 8, 3),
           (128, 64, 1, 4, 5), (128, 128, 1, 8, 3), (128, 128, 1, 4, 3), (32, 256, 1, 4, 4),
           (32, 128, 1, 4, 5), (64, 64, 1, 4, 6),
           (64, 128, 2, 4, 4), (64, 128, 4, 4, 4), (128, 128, 2, 8, 3), (32, 256, 2, 4, 4),
           (64, 256, 4, 4, 3), (128, 64, 4, 4, 5)]
CALLS = 24  # calls a graph, as bench/gemv_configs.py times


@triton.jit
def _skinny_kernel(x_ptr, w_ptr, out_ptr, part_ptr, M, N, K, stride_xm, stride_wn, stride_om,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   SPLIT_K: tl.constexpr):
    """Program (n, m, s): out[m-block, n-block] over the s-th of SPLIT_K slices of K; with
    SPLIT_K > 1 fp32 partials go to part (SPLIT_K, M, N) for gemv.py's ``_split_k_reduce_kernel``.
    gemv.py's ``_gemv_split_k_kernel`` is this loop for one M block (M <= 16 rows) that always
    writes partials; the grid's M axis and the direct store are what this comparison adds, kept
    here rather than in the engine's tuned kernel since cuBLAS won these shapes."""
    pid_n, pid_m, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    k_per_split = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
    k_start = pid_k * k_per_split
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_start, tl.minimum(k_start + k_per_split, K), BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :],
                    mask=(rm[:, None] < M) & (rk[None, :] < K), other=0.0)  # (BLOCK_M, BLOCK_K)
        w = tl.load(w_ptr + rn[:, None].to(tl.int64) * stride_wn + rk[None, :],
                    mask=(rn[:, None] < N) & (rk[None, :] < K), other=0.0)  # (BLOCK_N, BLOCK_K)
        acc = tl.dot(x, tl.trans(w), acc)
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    if SPLIT_K == 1:
        tl.store(out_ptr + rm[:, None] * stride_om + rn[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(part_ptr + (pid_k * M + rm[:, None]) * N + rn[None, :], acc, mask=mask)


def skinny(x: torch.Tensor, w: torch.Tensor, out: torch.Tensor, part: torch.Tensor, config) -> None:
    m, k = x.shape
    n = w.shape[0]
    bn, bk, split, warps, stages = config
    bm = min(128, max(16, triton.next_power_of_2(m)))
    grid = (triton.cdiv(n, bn), triton.cdiv(m, bm), split)
    _skinny_kernel[grid](x, w, out, part, m, n, k, x.stride(0), w.stride(0), out.stride(0),
                         BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=split, num_warps=warps, num_stages=stages)
    if split > 1:
        g._split_k_reduce_kernel[(triton.cdiv(n, 1024), m)](part, out, m, n, out.stride(0), SPLIT_K=split,
                                                            BLOCK=1024)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tp", default="1,2")
    ap.add_argument("--rows", default="32,64,128,256")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    rows = [int(r) for r in args.rows.split(",")]
    result = {"benchmark": "skinny_gemm", "gpu": torch.cuda.get_device_name(0), "torch": torch.__version__,
              "triton": triton.__version__, "time": time.time(), "configs": CONFIGS, "runs": []}
    for tp in (int(t) for t in args.tp.split(",")):
        for name, (n, k) in shapes(tp).items():
            nbytes = n * k * 2
            w = torch.randn(n, k, dtype=torch.bfloat16, device="cuda") * 0.02
            for m in rows:
                x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
                out = torch.empty(m, n, dtype=torch.bfloat16, device="cuda")
                part = torch.empty(4, m, n, dtype=torch.float32, device="cuda")
                ref = F.linear(x, w)
                row = {"tp": tp, "shape": name, "n": n, "k": k, "m": m, "triton": {}}
                fns = {"cublas": lambda wi: torch.matmul(x, wi.t(), out=out)}
                for config in CONFIGS:
                    if config[2] > 1 and n > 8192:
                        continue  # enough output blocks without splitting K
                    try:
                        skinny(x, w, out, part, config)
                        err = (out.float() - ref.float()).abs().max().item()
                        if err > 0.05 * ref.float().abs().max().item() + 1e-2:
                            row["triton"][str(config)] = f"wrong (max err {err:.3g})"
                            continue
                    except Exception as exc:  # e.g. out of shared memory
                        row["triton"][str(config)] = f"{type(exc).__name__}: {str(exc)[:80]}"
                        continue
                    fns[str(config)] = lambda wi, config=config: skinny(x, wi, out, part, config)
                # as the GEMV tuner times: each in its own graph over copies that overflow L2, in turn
                weights = gemv_tune._weight_copies(w, CALLS)
                times = {key: t * 1e6 for key, t in gemv_tune._time_in_graphs(fns, weights, CALLS).items()}
                del weights
                cublas = times.pop("cublas")
                row["cublas_us"], row["cublas_tbs"] = round(cublas, 2), round(nbytes / cublas / 1e6, 2)
                row["triton"].update({key: round(t, 2) for key, t in times.items()})
                timed = {c: t for c, t in row["triton"].items() if isinstance(t, float)}
                if timed:
                    best = min(timed, key=timed.get)
                    row["best"], row["best_us"] = best, timed[best]
                    row["best_tbs"] = round(nbytes / timed[best] / 1e6, 2)
                    print(f"tp{tp} {name} {n}x{k} M={m}: cuBLAS {cublas:.2f} us ({row['cublas_tbs']} TB/s), "
                          f"Triton best {timed[best]:.2f} us ({row['best_tbs']} TB/s) {best}: "
                          f"{timed[best] / cublas:.3f}x", flush=True)
                result["runs"].append(row)
            w = None  # free this shape's weight before the next
            torch.cuda.empty_cache()
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
