"""Does a one-row GEMV that loads more of its weight before it waits hide the kernel before it?

A batch-1 decode step alternates GEMVs, which stream weights at the HBM bandwidth, with small
kernels that leave HBM idle: at TP=1 a norm, SiLU-and-mul or attention; at TP=2 also the LL
all-reduce, which spends most of its ~5 µs waiting for the peer's flags. The one-row GEMV is
launched as a programmatic dependent, so its first programs may already sit on the SMs while
that kernel runs; what they load before ``gdc_wait`` streams during it. Today they load one
(BLOCK_N, BLOCK_K) tile; ``PRE_K`` (engine/kernels/gemv.py, ``KVMESH_GEMV_PRELOAD``) lets
them load more. When they get on the SMs depends on the kernel before: a Triton kernel lets
its dependents go after its own wait (the GEMV before it has ended), the LL all-reduce today
at its very start (so the next GEMV's programs arrive while the GEMV before still streams).

This runs one decoder layer's chain on ONE GPU with stand-ins for the small kernels:
``qkv -> gap(attention) -> o_proj -> gap(all-reduce or norm) -> gate_up -> gap(SiLU) -> down
-> gap(all-reduce or norm)``, at the per-rank 8B shapes of TP=1 and TP=2. A gap kernel is one
program that waits, spins for a set time (globaltimer) and writes the next GEMV's input; it
lets its dependents go first (``early``, as the LL kernel does) or after its wait (``late``).
Layers use distinct weights (HBM reads), 8 per CUDA graph, best of 5 rounds. Prints µs per
layer per setting and writes a JSON naming the GPU.

It is a stand-in for TP=2, not a TP=2 run: no NVLink traffic and no peer, only the idle time.

    python bench/gemv_preload.py --out bench/results/gemv_preload_h200.json   # one GPU, ~1 min
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from bench.gemv_probe import shapes  # noqa: E402
from engine.kernels import gemv as g  # noqa: E402

# (BLOCK_N, BLOCK_K, warps, stages) per shape: the autotune list's best in stop 18's chained
# sweep on an H200 (bench/results/gemv_configs_chain_h200.json)
CONFIGS = {1: {"qkv": (4, 2048, 8, 3), "o_proj": (4, 1024, 4, 3), "gate_up": (4, 2048, 8, 3),
               "down": (4, 1024, 4, 3)},
           2: {"qkv": (4, 1024, 4, 4), "o_proj": (4, 1024, 4, 3), "gate_up": (4, 2048, 8, 3),
               "down": (4, 1024, 4, 4)}}
LAYERS = 8


@triton.jit
def _now():
    return tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l", [], dtype=tl.int64,
                                     is_pure=False, pack=1)


@triton.jit
def _gap_kernel(y_ptr, x_ptr, N, K, spin_ns, EARLY: tl.constexpr, BLOCK: tl.constexpr):
    """One program: x[i] = y[i % N] / 2 for i < K after spinning spin_ns; EARLY: the dependents
    may launch before this waits for the GEMV before it (as the LL all-reduce lets them)."""
    if EARLY:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    else:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    t0 = _now()
    t = t0
    while t - t0 < spin_ns:
        t = _now()
    for k0 in range(0, K, BLOCK):
        i = k0 + tl.arange(0, BLOCK)
        y = tl.load(y_ptr + i % N, mask=i < K, other=0.0)
        tl.store(x_ptr + i, (y.to(tl.float32) * 0.5).to(x_ptr.dtype.element_ty), mask=i < K)


def gemv(x, w, out, config, budget: int) -> None:
    n, k = w.shape
    bn, bk, warps, stages = config
    pre_k = g._pre_k({"BLOCK_N": bn, "BLOCK_K": bk, "K": k, "w_ptr": w}, budget)  # as KVMESH_GEMV_PRELOAD=budget
    g._gemv_row_kernel.fn.fn[(triton.cdiv(n, bn),)](
        x, w, out, n, k, w.stride(0), BLOCK_N=bn, BLOCK_K=bk, EVEN_K=k % bk == 0, EVEN_N=n % bn == 0,
        PRE_K=pre_k, PDL=True, num_warps=warps, num_stages=stages, launch_pdl=True)


def gap(y, x, spin_ns: int, early: bool) -> None:
    _gap_kernel[(1,)](y, x, y.shape[-1], x.shape[-1], spin_ns, EARLY=early, BLOCK=1024, num_warps=16,
                      launch_pdl=True)


def make_layers(tp: int) -> tuple[list[dict], dict]:
    """LAYERS layers of distinct weights at TP=tp's per-rank shapes, and each GEMV's (x, y)."""
    sh = {name: nk for name, nk in shapes(tp).items() if name != "lm_head"}
    weights = [{name: torch.randn(n, k, dtype=torch.bfloat16, device="cuda") * 0.02
                for name, (n, k) in sh.items()} for _ in range(LAYERS)]
    bufs = {name: (torch.randn(1, k, dtype=torch.bfloat16, device="cuda"),
                   torch.empty(1, n, dtype=torch.bfloat16, device="cuda")) for name, (n, k) in sh.items()}
    return weights, bufs


def time_chain(tp: int, layers: tuple[list[dict], dict], budget: int, gaps: dict, with_gemvs: bool = True,
               rounds: int = 5, gemv_fn=None) -> float:
    """Microseconds per layer of the chain over ``layers`` (``make_layers(tp)``); ``gemv_fn(x, w, y)``
    stands in for the one-row Triton GEMV where given (bench/push_gemv.py)."""
    weights, bufs = layers
    order = ["qkv", "o_proj", "gate_up", "down"]
    nxt = {"qkv": "o_proj", "o_proj": "gate_up", "gate_up": "down", "down": "qkv"}

    def layer(ws):
        for name in order:
            x, y = bufs[name]
            if with_gemvs and gemv_fn is not None:
                gemv_fn(x, ws[name], y)
            elif with_gemvs:
                gemv(x, ws[name], y, CONFIGS[tp][name], budget)
            spin, early = gaps[name]
            gap(y, bufs[nxt[name]][0], spin, early)

    for ws in weights[:2]:
        layer(ws)  # compile and warm up outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for ws in weights:
            layer(ws)
    graph.replay()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(3):
            graph.replay()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) * 1e3 / (3 * LAYERS))
    del graph
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--budgets", default="0,16384,32768,65536", help="preload bytes per program")
    ap.add_argument("--attn-ns", type=int, default=3000, help="spin of the attention stand-in")
    ap.add_argument("--ll-ns", default="0,3000,5000", help="spins of the all-reduce stand-in (TP=2)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    budgets = [int(b) for b in args.budgets.split(",")]
    result = {"benchmark": "gemv_preload", "gpu": torch.cuda.get_device_name(0), "torch": torch.__version__,
              "time": time.time(), "layers_per_graph": LAYERS, "configs": CONFIGS, "runs": []}
    settings = [(1, 0, False)]  # TP=1: norms (late), no all-reduce
    settings += [(2, int(s), early) for s in args.ll_ns.split(",") for early in (True, False)]
    layers = {}
    for tp, ll_ns, early in settings:
        if tp not in layers:
            layers.clear()  # one TP's weights at a time (TP=1: 3.5 GB)
            layers[tp] = make_layers(tp)
        gaps = {"qkv": (args.attn_ns, False), "o_proj": (ll_ns, early), "gate_up": (0, False),
                "down": (ll_ns, early)}
        gaps_only = time_chain(tp, layers[tp], 0, gaps, with_gemvs=False)
        row = {"tp": tp, "ll_ns": ll_ns, "ll_trigger": "early" if early else "late",
               "attn_ns": args.attn_ns, "gaps_only_us": round(gaps_only, 2), "layer_us": {}}
        for budget in budgets:
            row["layer_us"][budget] = round(time_chain(tp, layers[tp], budget, gaps), 2)
        base = row["layer_us"][budgets[0]]
        print(f"tp{tp} all-reduce stand-in {ll_ns} ns ({row['ll_trigger']} trigger), attention {args.attn_ns} ns: "
              f"gaps alone {gaps_only:.2f} us/layer; layer " +
              ", ".join(f"preload {b}: {t:.2f} us ({t / base:.3f}x)" for b, t in row["layer_us"].items()),
              flush=True)
        result["runs"].append(row)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
