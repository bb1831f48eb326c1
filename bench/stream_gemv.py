"""The shared-memory streaming GEMV (engine/kernels/stream_gemv.py) against the Triton one-row GEMV.

Three parts, on ONE GPU, at the per-rank 8B shapes of TP=1 and TP=2 (bf16, batch 1):

1. correctness: every shape against an fp32 reference (and the LM head's);
2. one GEMV alone: µs a call in a CUDA graph of 8 calls over 8 distinct weights (cold: each
   call reads its weight from HBM), stream vs the Triton one-row kernel (its tuned config from
   bench/gemv_preload.py's CONFIGS) vs cuBLAS, and the bandwidth each reaches;
3. one decoder layer's chain (bench/gemv_preload.py: GEMVs with stand-in kernels between them
   that spin a set time; TP=1 with norms, TP=2 with a 3 or 5 µs all-reduce stand-in released
   early or late), µs a layer, stream vs Triton: does streaming before the wait hide the gaps?

    python bench/stream_gemv.py --out bench/results/stream_gemv_h200.json   # ~1-2 min
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import torch  # noqa: E402

from bench import gemv_preload as gp  # noqa: E402
from bench.gemv_probe import shapes  # noqa: E402
from engine.kernels.stream_gemv import STREAM_GEMV, StreamGemv, StreamGemvDyn, TileGemv  # noqa: E402


def stream(x, w, y) -> None:
    STREAM_GEMV(x, w, y)


def variant(spec: str):
    """THREADS:STAGE_KB:CHUNK_KB:CTAS_PER_SM -> a StreamGemv of that build and plan;
    tile:TILE_KB:LOADER:MIN_WARPS -> a TileGemv; dyn:THREADS:STAGE_KB:CHUNK_KB -> a StreamGemvDyn."""
    if spec.startswith("dyn:"):
        threads, stage_kb, chunk_kb = (int(v) for v in spec.split(":")[1:])
        return StreamGemvDyn(threads, stage_kb * 1024, chunk_kb * 1024, 1)
    if spec.startswith("tile:"):
        tile_kb, loader, min_warps = (int(v) for v in spec.split(":")[1:])
        return TileGemv(tile_kb * 1024, loader, min_warps)
    threads, stage_kb, chunk_kb, cps = (int(v) for v in spec.split(":"))
    return StreamGemv(threads, stage_kb * 1024, chunk_kb * 1024, cps)


def check(tp: int) -> dict:
    """Max relative error against fp32 per shape."""
    errs = {}
    for name, (n, k) in shapes(tp).items():
        w = torch.randn(n, k, dtype=torch.bfloat16, device="cuda") * 0.02
        x = torch.randn(1, k, dtype=torch.bfloat16, device="cuda")
        ref = x.float() @ w.float().t()
        got = STREAM_GEMV(x, w).float()
        err = ((got - ref).abs().max() / ref.abs().max()).item()
        errs[name] = err
        if err > 1e-2:
            raise AssertionError(f"tp{tp} {name} {n}x{k}: relative error {err}")
    torch.cuda.synchronize()
    return errs


def time_alone(fn, ws: list, x, y, rounds: int = 5) -> float:
    for w in ws[:2]:
        fn(x, w, y)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for w in ws:
            fn(x, w, y)
    graph.replay()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(rounds):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(3):
            graph.replay()
        b.record()
        b.synchronize()
        best = min(best, a.elapsed_time(b) * 1e3 / (3 * len(ws)))
    return best


def alone(tp: int, variants: dict) -> dict:
    rows = {}
    for name, (n, k) in shapes(tp).items():
        copies = 8 if name != "lm_head" else 3
        ws = [torch.randn(n, k, dtype=torch.bfloat16, device="cuda") * 0.02 for _ in range(copies)]
        x = torch.randn(1, k, dtype=torch.bfloat16, device="cuda")
        y = torch.empty(1, n, dtype=torch.bfloat16, device="cuda")
        cfg = gp.CONFIGS[tp].get(name, (4, 2048, 8, 3))
        ref = x.float() @ ws[-1].float().t()
        t_var = {}
        for spec, g in variants.items():
            t_var[spec] = round(time_alone(lambda x_, w_, y_, g=g: g(x_, w_, y_), ws, x, y), 2)
            for _ in range(2):  # after the graph's calls, and again (the dynamic kernel's counters)
                g(x, ws[-1], y)
                err = ((y.float() - ref).abs().max() / ref.abs().max()).item()
                if err > 1e-2:
                    raise AssertionError(f"{spec} tp{tp} {name} {n}x{k}: relative error {err}")
        spec_best = min(t_var, key=t_var.get)
        t_stream = t_var[spec_best]
        t_triton = time_alone(lambda x_, w_, y_: gp.gemv(x_, w_, y_, cfg, 0), ws, x, y)
        t_cublas = time_alone(lambda x_, w_, y_: torch.matmul(x_, w_.t(), out=y_), ws, x, y)
        gb = n * k * 2 / 1e3
        rows[name] = {"n": n, "k": k, "stream_us": round(t_stream, 2), "triton_us": round(t_triton, 2),
                      "cublas_us": round(t_cublas, 2), "stream_tb_s": round(gb / t_stream / 1e3, 2),
                      "triton_tb_s": round(gb / t_triton / 1e3, 2), "variants_us": t_var}
        print(f"tp{tp} {name:8s} {n}x{k}: " + " ".join(f"[{v}] {t}" for v, t in t_var.items()), flush=True)
        print(f"tp{tp} {name:8s} {n}x{k}: stream {t_stream:.2f} us ({rows[name]['stream_tb_s']} TB/s, {spec_best}), "
              f"triton {t_triton:.2f} ({rows[name]['triton_tb_s']}), cublas {t_cublas:.2f}", flush=True)
        del ws
    return rows


class Mix:
    """mix/NAME=SPEC/NAME=SPEC: the stream or tile GEMV for the named linears of a layer, the Triton
    one-row GEMV (gemv_preload.CONFIGS) for the others."""

    def __init__(self, spec: str) -> None:
        self.by_name = {part.split("=")[0]: variant(part.split("=")[1]) for part in spec.split("/")[1:]}
        self.tp = 1

    def __call__(self, x, w, y) -> None:
        name = next(nm for nm, nk in shapes(self.tp).items() if nk == tuple(w.shape))
        if name in self.by_name:
            self.by_name[name](x, w, y)
        else:
            gp.gemv(x, w, y, gp.CONFIGS[self.tp][name], 0)


def chains(attn_ns: int, ll_list: list[int], variants: dict) -> list[dict]:
    out = []
    settings = [(1, 0, False)] + [(2, ll, early) for ll in ll_list for early in (True, False)]
    layers = {}
    for tp, ll_ns, early in settings:
        if tp not in layers:
            layers.clear()
            layers[tp] = gp.make_layers(tp)
        gaps = {"qkv": (attn_ns, False), "o_proj": (ll_ns, early), "gate_up": (0, False), "down": (ll_ns, early)}
        t_triton = gp.time_chain(tp, layers[tp], 0, gaps)
        for g in variants.values():
            if isinstance(g, Mix):
                g.tp = tp
        t_var = {spec: round(gp.time_chain(tp, layers[tp], 0, gaps, gemv_fn=lambda x_, w_, y_, g=g: g(x_, w_, y_)), 2)
                 for spec, g in variants.items()}
        t_stream = min(t_var.values())
        gaps_only = gp.time_chain(tp, layers[tp], 0, gaps, with_gemvs=False)
        row = {"tp": tp, "ll_ns": ll_ns, "ll_trigger": "early" if early else "late", "attn_ns": attn_ns,
               "gaps_only_us": round(gaps_only, 2), "triton_us": round(t_triton, 2), "stream_us": round(t_stream, 2),
               "variants_us": t_var}
        print(f"chain tp{tp} all-reduce stand-in {ll_ns} ns ({row['ll_trigger']}): gaps alone {gaps_only:.2f}, "
              f"triton {t_triton:.2f} us/layer, stream best {t_stream:.2f} ({t_stream / t_triton:.3f}x); " +
              " ".join(f"[{v}] {t}" for v, t in t_var.items()), flush=True)
        out.append(row)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--attn-ns", type=int, default=3000)
    ap.add_argument("--ll-ns", default="3000,5000")
    ap.add_argument("--skip-chain", action="store_true")
    ap.add_argument("--variants", default="256:192:32:1",
                    help="stream GEMV builds and plans: THREADS:STAGE_KB:CHUNK_KB:CTAS_PER_SM, comma-separated")
    ap.add_argument("--chain-variants", default=None, help="the variants the chains time (default: all)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    result = {"benchmark": "stream_gemv", "gpu": torch.cuda.get_device_name(0), "torch": torch.__version__,
              "time": time.time()}
    result["errors"] = {tp: check(tp) for tp in (1, 2)}
    print("correct:", json.dumps(result["errors"]), flush=True)
    variants = {spec: variant(spec) for spec in args.variants.split(",")}
    result["alone"] = {tp: alone(tp, variants) for tp in (1, 2)}
    if not args.skip_chain:
        chain_specs = args.chain_variants.split(",") if args.chain_variants else list(variants)
        result["chains"] = chains(args.attn_ns, [int(v) for v in args.ll_ns.split(",")],
                                  {s: variants[s] if s in variants else (Mix(s) if s.startswith("mix/") else variant(s))
                                   for s in chain_specs})
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
