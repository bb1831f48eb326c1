"""Chooses, per weight shape, which batch-1 linear kernel of engine/kernels/gemv.py runs.

``tune(model)`` times cuBLAS and the Triton kernels at M = 1 for every distinct (N, K, dtype) of
the model's linear layers once, after loading, and keeps the fastest for one row, and the
fastest of cuBLAS, ``gemv`` and ``gemv_split_k`` for 2..MAX_ROWS rows (in ``gemv._USE_GEMV``,
which ``gemv.linear`` reads); nothing is decided inside a CUDA-graph capture. Each is timed as a
decode step runs it: many calls back to back inside one CUDA graph, each on another copy of the
weight so that every call reads from HBM (per-call event timing adds ~15-20 us of overhead, more
than the gap measured), the candidates' graphs in turn over 5 rounds. A Triton kernel must beat
cuBLAS by more than 3% to be used.

The one-row kernel's tile config is chosen the same way (``_sweep_row_configs``; on by default,
``KVMESH_GEMV_ROW_SWEEP=0`` keeps the Triton autotuner's pick): every config of its autotune
list timed in graphs, the fastest written into the autotuner's cache, where ``gemv_row`` and
``gemv_row_push`` read it. The autotuner times one call at a time between events, and its picks
for one shape differed from rank to rank and run to run (stop 26, 2 H200s: o_proj's 4096x2048
got 5.29-5.35 µs a call on one TP=2 rank and 5.95-6.03 on the other, where the sweep's tile
takes 4.40-4.51), and the slower rank sets a TP step. The 8B TP=2 batch-1 step went from 2.402
/ 2.395 ms to 2.367 / 2.362 ms (bench/results/parallel_h200x2_stop26.json).
"""

from __future__ import annotations

import logging
import os
from typing import Optional

import torch
import torch.nn.functional as F

from engine.kernels import gemv

logger = logging.getLogger(__name__)

ROW_SWEEP_ENV = "KVMESH_GEMV_ROW_SWEEP"
ROW_SWEEP = os.environ.get(ROW_SWEEP_ENV, "1") not in ("", "0")


@torch.inference_mode()
def tune(model: torch.nn.Module, calls: int = 24) -> dict[str, dict]:
    """Times cuBLAS, the GEMV and the split-K GEMV at batch 1 for each distinct linear weight
    shape of ``model`` (modules whose forward calls ``linear``: they carry ``small_batch_gemv =
    True``); a Triton kernel is used for a shape only where it beats cuBLAS by more than 3%.
    Returns {shape: {kernel: microseconds a call, ..., "use": kernel for one row,
    "use_few_rows": kernel for 2..MAX_ROWS rows, "row_config": the one-row kernel's tile config,
    "row_configs": microseconds a call per config (the sweep)}}."""
    if gemv.triton is None:
        return {}
    report = {}
    for module in model.modules():
        w = getattr(module, "weight", None)
        if not getattr(module, "small_batch_gemv", False) or w is None or not w.is_cuda:
            continue
        if w.dtype not in (torch.bfloat16, torch.float16) or w.dim() != 2:
            continue
        key = (w.shape[0], w.shape[1], w.dtype)
        if key in gemv._USE_GEMV:
            continue
        gemv._USE_GEMV[key] = (None, None)  # cuBLAS unless a kernel below is right and faster
        x = torch.randn(1, w.shape[1], dtype=w.dtype, device=w.device)
        ref = F.linear(x, w).float()
        candidates = {"cublas": lambda wi: F.linear(x, wi)}
        try:
            for name, kernel in gemv._KERNELS.items():
                got = kernel(x, w).float()  # also autotunes this shape, outside any capture
                if not torch.allclose(got, ref, rtol=2e-2, atol=2e-2 * ref.abs().max().item()):
                    logger.warning("%s disagrees with cuBLAS for %s; not used", name, key)
                    continue
                candidates[name] = lambda wi, kernel=kernel: kernel(x, wi)
            weights = _weight_copies(w, calls)  # one set for both timings below
            row_configs = _sweep_row_configs(x, weights, calls) if "row" in candidates and ROW_SWEEP else {}
            times = _time_in_graphs(candidates, weights, calls)
            del weights
        except Exception as exc:  # noqa: BLE001 - timing is an optimisation: cuBLAS is always right
            logger.warning("could not time the GEMVs for %s (%r); using cuBLAS", key, exc)
            torch.cuda.synchronize()
            times, row_configs = {}, {}
        one_row = _fastest(times)
        few_rows = _fastest({k: v for k, v in times.items() if k not in gemv._ONE_ROW_ONLY})
        gemv._USE_GEMV[key] = (one_row, few_rows)
        row_config = gemv._tuned_config(gemv._gemv_row_kernel, *key)
        report[f"{key[0]}x{key[1]}"] = {**{k: round(v * 1e6, 2) for k, v in times.items()},
                                        "use": one_row or "cublas", "use_few_rows": few_rows or "cublas",
                                        "row_config": row_config and _config_name(row_config),
                                        "row_configs": row_configs}
    if report:
        logger.info("batch-1 linear layers, microseconds a call in a CUDA graph: %s", report)
        torch.cuda.empty_cache()  # the copies' memory back to the device before graph capture
    return report


def _fastest(times: dict[str, float]) -> Optional[str]:
    """The fastest Triton kernel of ``times`` (seconds a call) if it beats cuBLAS by > 3%, else None."""
    if "cublas" not in times:
        return None
    best = min(times, key=times.get)
    return best if best != "cublas" and times[best] < 0.97 * times["cublas"] else None


def _sweep_row_configs(x: torch.Tensor, weights: list[torch.Tensor], calls: int) -> dict[str, float]:
    """Times every config of ``gemv_row``'s autotune list at the weight's shape as
    ``_time_in_graphs`` times the kernels (each captured with that config in the autotuner's
    cache), and leaves the fastest there; returns {config name: microseconds a call}. The
    autotuner has run for this shape already, so every config is compiled."""
    w = weights[0]
    n, k = w.shape
    configs = {_config_name(c): c for c in gemv._gemv_row_kernel.configs}

    def with_config(config):
        def call(wi: torch.Tensor) -> torch.Tensor:
            _set_row_config(n, k, w.dtype, config)  # read at launch, so at capture
            return gemv.gemv_row(x, wi)
        return call

    times = _time_in_graphs({name: with_config(c) for name, c in configs.items()}, weights, calls)
    _set_row_config(n, k, w.dtype, configs[min(times, key=times.get)])
    return {name: round(t * 1e6, 2) for name, t in times.items()}


def _set_row_config(n: int, k: int, dtype: torch.dtype, config) -> None:
    """Makes ``config`` the autotuner's choice for ``gemv_row`` at (N, K, dtype)."""
    kernel = gemv._gemv_row_kernel
    keys = [key for key in kernel.cache if key[0] == n and key[1] == k and str(dtype) in key]
    if not keys:
        raise RuntimeError(f"gemv_row was never autotuned for {n}x{k} {dtype}")
    for key in keys:
        kernel.cache[key] = config
    gemv._ROW_CONFIG.pop((n, k, dtype), None)


def _config_name(config) -> str:
    """A tile config as "BLOCK_N x BLOCK_K, warps, stages", e.g. "4x1024 w4 s3"."""
    return f"{config.kwargs['BLOCK_N']}x{config.kwargs['BLOCK_K']} w{config.num_warps} s{config.num_stages}"


def _weight_copies(weight: torch.Tensor, calls: int) -> list[torch.Tensor]:
    """``weight`` and enough clones of it (at most ``calls`` in all) that together they
    overflow L2, so that each call of ``_time_in_graphs`` reads its weight from HBM."""
    copies = max(2, -(-(256 << 20) // (weight.numel() * weight.element_size())))
    copies = min(copies, calls)
    # the weight itself is one of the copies: an 8B LM head is 1 GB, and the KV cache is
    # already allocated when this runs (model_runner.initialize_kv_cache)
    return [weight] + [weight.clone() for _ in range(copies - 1)]


def _time_in_graphs(fns: dict, weights: list[torch.Tensor], calls: int, rounds: int = 5) -> dict[str, float]:
    """Seconds per call of each ``fns[name](w)``, as a decode step's CUDA graph runs it: ``calls``
    calls back to back in one captured graph per name (no launch or event overhead per call),
    each on the next of ``weights`` (``_weight_copies``: every call reads its weight from
    HBM). The graphs are timed in turn, ``rounds`` times, and each keeps
    its best: a slow stretch of the GPU (clocks, a peer rank's set-up) then costs every
    candidate a round, not one candidate all its timings. (Timed one candidate after the other,
    stop 17's final 4-GPU run took the tl.dot GEMV and cuBLAS over the one-row kernel for two
    TP=2 shapes where the call before, with the same code, took the one-row kernel.)"""
    copies = len(weights)
    graphs = {}
    for name, fn in fns.items():
        for wi in weights[:2]:
            fn(wi)  # warm up outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for i in range(calls):
                fn(weights[i % copies])
        graph.replay()  # the first replay uploads the graph
        graphs[name] = graph
    torch.cuda.synchronize()
    best = {name: float("inf") for name in graphs}
    for _ in range(rounds):
        for name, graph in graphs.items():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(2):
                graph.replay()
            end.record()
            end.synchronize()
            best[name] = min(best[name], start.elapsed_time(end) / 1e3 / (2 * calls))
    del graphs
    return best
