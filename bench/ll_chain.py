"""A TP=2 decode layer's chain of GEMVs and LL calls on ONE GPU: the LL no-wait mode's A/B.

Each rank of a 2-rank loopback group (bench/ll_loopback.py: both ranks in this process, each on
its own stream) gets a CUDA graph of ``--layers`` layers at one TP=2 rank's 8B shapes, distinct
weights per layer (nothing stays in the L2), one decode row::

    o_proj (1, 2048) x (4096, 2048), pushing  ->  LL all-reduce + residual add + RMSNorm
    gate_up (1, 4096) x (14336, 4096)  ->  SiLU-and-mul
    down (1, 7168) x (4096, 7168), pushing    ->  LL all-reduce + residual add + RMSNorm
    qkv (1, 4096) x (3072, 4096)  ->  its first 2048 values are the next o_proj's input

(no attention between qkv and o_proj). Both ranks' graphs are replayed at once, one per stream,
and timed together: µs a layer. Captured twice, with the LL calls waiting for the pushing GEMV
to end (``no_wait`` off, as before) and not (``KVMESH_LL_NO_WAIT``, engine/distributed/
ll_allreduce.py); timed in turn, ``--rounds`` times each, median. The two ranks share one GPU's
HBM, so the GEMVs take about twice a real rank's time; what differs between the settings is
the chain's waits. There is no NVLink here: a real TP=2 step's GEMV end also waits for its
NVLink stores to be acknowledged, which no-wait skips too. Both settings must give the same bits.

    python bench/ll_chain.py --out bench/results/ll_chain_h200.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from bench.ll_loopback import EPS, LoopbackGroup  # noqa: E402  (sets CUDA_MODULE_LOADING first)

import torch  # noqa: E402

from engine import kernels as fused  # noqa: E402
from engine.kernels import gemv  # noqa: E402

HIDDEN, HEADS_OUT, FFN, QKV = 4096, 2048, 7168, 3072  # one TP=2 rank's 8B shapes


def make_layers(num_layers: int, device, seed: int) -> list[dict]:
    gen = torch.Generator(device=device).manual_seed(seed)

    def w(n, k):
        return (torch.randn(n, k, generator=gen, device=device) / k ** 0.5).to(torch.bfloat16)

    def norm():
        return (torch.rand(HIDDEN, generator=gen, device=device) + 0.5).to(torch.bfloat16)

    return [{"o": w(HIDDEN, HEADS_OUT), "gate_up": w(2 * FFN, HIDDEN), "down": w(HIDDEN, FFN),
             "qkv": w(QKV, HIDDEN), "norm1": norm(), "norm2": norm()} for _ in range(num_layers)]


def chain(ll, layers: list[dict], qkv: torch.Tensor, residual: torch.Tensor):
    """The layers' kernels on the current stream; returns the last qkv and residual."""
    for layer in layers:
        attn = qkv[:, :HEADS_OUT]
        y = ll.gemv_push(attn, layer["o"])
        x, residual = ll.all_reduce_rms_norm(y, residual, layer["norm1"], EPS)
        act = fused.silu_and_mul(gemv.gemv_row(x, layer["gate_up"]))
        y = ll.gemv_push(act, layer["down"])
        x, residual = ll.all_reduce_rms_norm(y, residual, layer["norm2"], EPS)
        qkv = gemv.gemv_row(x, layer["qkv"])
    return qkv, residual


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--replays", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    group = LoopbackGroup(2)
    device = group.device
    layers = [make_layers(args.layers, device, 100 + r) for r in range(2)]
    gen = torch.Generator(device=device).manual_seed(5)
    qkv0 = [torch.randn(1, QKV, generator=gen, device=device).to(torch.bfloat16) for _ in range(2)]
    res0 = torch.randn(1, HIDDEN, generator=gen, device=device).to(torch.bfloat16)  # same on both ranks
    for n, k in ((HIDDEN, HEADS_OUT), (2 * FFN, HIDDEN), (HIDDEN, FFN), (QKV, HIDDEN)):  # tune, then pick
        gemv.gemv_row(torch.randn(1, k, device=device).to(torch.bfloat16), layers[0][0]["o"].new_empty(n, k).normal_())
        gemv._USE_GEMV[(n, k, torch.bfloat16)] = ("row", None)
    torch.cuda.synchronize(device)

    graphs, outputs = {}, {}
    for setting in ("wait", "no_wait"):
        for ll in group.lls:
            ll.no_wait = setting == "no_wait"
        # eager once (the kernels' builds load), then capture each rank's graph on its stream
        group.issue(lambda r, ll: chain(ll, layers[r], qkv0[r], res0))
        group.synchronize()
        graphs[setting], outputs[setting] = [], []
        for r, ll in enumerate(group.lls):
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.stream(group.streams[r]):
                with torch.cuda.graph(graph, stream=group.streams[r]):
                    outputs[setting].append(chain(ll, layers[r], qkv0[r], res0))
            graphs[setting].append(graph)
        torch.cuda.synchronize(device)

    def replay(setting: str, times: int) -> float:
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        for _ in range(times):
            for r in range(2):
                with torch.cuda.stream(group.streams[r]):
                    graphs[setting][r].replay()
        torch.cuda.synchronize(device)
        return (time.perf_counter() - start) / times / args.layers * 1e6

    for setting in graphs:
        replay(setting, 5)  # warm
    same = all(torch.equal(a, b) for r in range(2)
               for a, b in zip(outputs["wait"][r], outputs["no_wait"][r]))
    times = {setting: [] for setting in graphs}
    for _ in range(args.rounds):
        for setting in graphs:
            times[setting].append(replay(setting, args.replays))
    group.close()
    result = {"benchmark": "ll_chain", "gpu": torch.cuda.get_device_name(0), "torch": torch.__version__,
              "layers": args.layers, "replays": args.replays, "rounds": args.rounds,
              "same_bits": same, "us_per_layer": {s: {"median": round(statistics.median(t), 2),
                                                      "all": [round(v, 2) for v in t]}
                                                  for s, t in times.items()}}
    print(json.dumps(result))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
