"""What pushing into the LL slots costs a row-parallel GEMV at batch 1, on ONE GPU.

A TP=2 decode step's o_proj and down_proj GEMVs (``gemv.gemv_row_push``) also store their
outputs into the peer's LL receive slots, tagged with the coming call's round (read from the LL
round word). Here one layer's chain of bench/gemv_preload.py (its four GEMVs at TP=2's per-rank
8B shapes, stand-in kernels between them, 8 layers of distinct weights per CUDA graph) runs with
o_proj and down as: the plain one-row GEMV; the pushing GEMV reading the round word after its
sum (before stop 21); and reading it as soon as the kernel before has ended (``EARLY_ROUND``, the
default since stop 21). The slots are rank 0's of a 2-rank loopback LL group (bench/ll_loopback.py);
no LL call runs, only the GEMVs' side is timed. µs a layer, best of 5 rounds, each setting twice.

    python bench/push_gemv.py --out bench/results/push_gemv_h200.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from bench.ll_loopback import LoopbackGroup  # noqa: E402  (sets CUDA_MODULE_LOADING first)

import torch  # noqa: E402
import triton  # noqa: E402

from bench import gemv_preload as gp  # noqa: E402
from bench.gemv_probe import shapes  # noqa: E402
from engine.kernels import gemv as g  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ll-ns", type=int, default=3000, help="spin of the all-reduce stand-in")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    group = LoopbackGroup(2)
    ll = group.lls[0]
    table, slot_words = ll._push_table, 2 * ll.max_lines
    tp = 2
    name_of = {nk: name for name, nk in shapes(tp).items()}  # the per-rank shapes are distinct

    def fn(mode: str):
        def run(x, w, y):
            name = name_of[tuple(w.shape)]
            bn, bk, warps, stages = gp.CONFIGS[tp][name]
            if mode == "plain" or name not in ("o_proj", "down"):
                gp.gemv(x, w, y, (bn, bk, warps, stages), 0)
                return
            n, k = w.shape
            g._gemv_row_push_kernel[(triton.cdiv(n, bn),)](
                x, w, y, n, k, w.stride(0), table, 0, 2, slot_words, BLOCK_N=bn, BLOCK_K=bk,
                num_warps=warps, num_stages=stages, PDL=True, launch_pdl=True, EARLY_ROUND=(mode == "early"))
        return run

    layers = gp.make_layers(tp)
    gaps = {"qkv": (3000, False), "o_proj": (args.ll_ns, True), "gate_up": (0, False), "down": (args.ll_ns, True)}
    result = {"benchmark": "push_gemv", "gpu": torch.cuda.get_device_name(0), "torch": torch.__version__,
              "time": time.time(), "tp": tp, "ll_ns": args.ll_ns, "layer_us": {}}
    for mode in ("plain", "late", "early", "plain", "late", "early"):
        t = gp.time_chain(tp, layers, 0, gaps, gemv_fn=fn(mode))
        result["layer_us"].setdefault(mode, []).append(round(t, 2))
        print(f"{mode}: {t:.2f} us a layer", flush=True)
    group.close()
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
