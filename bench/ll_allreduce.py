"""The LL all-reduce (+ fused residual add and RMSNorm, engine/distributed/ll_allreduce.py) on 2/4 GPUs.

    python bench/ll_allreduce.py --out bench/results/ll_allreduce_h100.json   # < 60 s

Ranks are spawned processes seeing one GPU each (``bench/custom_allreduce.py``'s ``run_ranks``).
Timed inside CUDA graphs of 50 calls (what the decode graphs see), bf16, hidden 4096, per row
count: NCCL's all-reduce; NCCL + the Triton ``rms_norm`` (the unfused decode path); the LL sum;
the LL fused all-reduce + add + norm; at one row, also a 4096x7168 GEMV then the fused call, with
the GEMV pushing its outputs to the peers (``linear_for_reduce``) and without. ``checks=True`` (tests/gpu/test_ll_allreduce.py) first
compares both modes with NCCL + the reference norm over dtypes, hidden sizes and row counts
(and checks every rank got bit-identical results), runs 1000 back-to-back calls of changing row
counts with NCCL-sized ones between, and replays a CUDA graph of them 100 times with new inputs.
Failures are collected, not raised, so no rank leaves the others waiting in a collective.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from bench.custom_allreduce import GRAPH_CALLS, graph_us, run_ranks  # noqa: E402

BENCH_ROWS = (1, 4, 16, 32)
HIDDEN = 4096
PUSH_K = 7168  # the 8B shape's down_proj at TP=2: the pushing GEMV's bench row
EPS = 1e-5


def rank_main(rank: int, world: int, nccl_id: tuple, isolated: bool, checks: bool,
              disable: bool, results) -> None:
    comm = None
    try:
        if disable:
            os.environ["KVMESH_DISABLE_LL_ALLREDUCE"] = "1"
        import torch

        from engine.distributed.nccl import NcclCommunicator
        device = torch.device("cuda", 0 if isolated else rank)
        torch.cuda.set_device(device)
        comm = NcclCommunicator(nccl_id, rank, world, device)
        enabled = comm.enable_ll_all_reduce()
        report = {"rank": rank, "enabled": enabled, "failures": [], "reason": comm.ll_disabled_reason}
        if checks:
            _check_modes(comm, report["failures"])
            _check_back_to_back(comm, report["failures"])
            _check_graph(comm, report["failures"])
            _check_pushed(comm, report["failures"])
            if enabled:  # KVMESH_PDL=1 on Hopper: every call above was a dependent launch
                from engine.kernels import pdl
                wanted = pdl.ll_pdl(device)
                report["dependent_launch"] = wanted and comm._ll._dependent_launch_ok
                if wanted and not comm._ll._dependent_launch_ok:
                    report["failures"].append("the LL call fell back from cuLaunchKernelEx to a plain launch")
        report["latency_us"] = _bench(comm)
        torch.cuda.synchronize(device)
        results.put(("ok", rank, report))
    except BaseException:  # noqa: BLE001 - report it; the parent fails the run
        results.put(("error", rank, traceback.format_exc()))
    finally:
        if comm is not None:
            try:
                comm.destroy()
            except Exception:  # noqa: BLE001
                pass


def _reference(comm, x, residual, weight):
    """NCCL all-reduce, then the separate add + norm: (normed, new residual)."""
    from engine import kernels as fused
    summed = comm.nccl_all_reduce(x.clone())
    if weight is None:
        return summed, None
    return fused.rms_norm(summed, weight, EPS, residual)


def _inputs(torch, rows, hidden, dtype, seed, device, rank=0):
    """x differs by rank (partial sums); residual and weight are the same on every rank, as in
    the model (the residual stream and the norm weight are replicated)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    residual = torch.randn(rows, hidden, generator=gen, device=device).to(dtype)
    weight = (torch.rand(hidden, generator=gen, device=device) + 0.5).to(dtype)
    gen.manual_seed(seed + 7919 * (rank + 1))
    x = torch.randn(rows, hidden, generator=gen, device=device).to(dtype)
    return x, residual, weight


def _close(torch, got, want, dtype) -> bool:
    rtol, atol = {torch.bfloat16: (2e-2, 1e-1), torch.float16: (2e-3, 1e-2),
                  torch.float32: (1e-5, 1e-4)}[dtype]
    return torch.allclose(got.float(), want.float(), rtol=rtol, atol=atol)


def _same_on_all_ranks(comm, torch, t) -> bool:
    parts = comm.all_gather(t.contiguous(), dim=0).view(comm.world_size, *t.shape)
    return all(torch.equal(parts[q], t) for q in range(comm.world_size))


def _check_modes(comm, failures: list) -> None:
    import torch
    device, case = comm.device, 0
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for hidden in (64, 4096, 5120, 8192):
            for rows in (1, 2, 7, 32, 64):
                case += 1
                x, residual, weight = _inputs(torch, rows, hidden, dtype, case, device, comm.rank)
                taken = comm._ll is not None and comm._ll.can_reduce(x)
                for mode, (res, w) in (("sum", (None, None)), ("norm", (residual, weight)),
                                       ("norm-no-residual", (None, weight))):
                    want = _reference(comm, x, res, w)
                    if mode == "sum":
                        got = (comm.all_reduce(x.clone()), None)
                    else:
                        got = comm.fused_all_reduce_rms_norm(x, res, w, EPS)
                        if got is None:
                            if taken:
                                failures.append(f"fused path refused {dtype} {rows}x{hidden}")
                            continue
                    for name, g, e in (("out", got[0], want[0]), ("residual", got[1], want[1])):
                        if g is None:
                            continue
                        if not _close(torch, g, e, dtype):
                            err = (g.float() - e.float()).abs().max().item()
                            failures.append(f"{mode} {name} {dtype} {rows}x{hidden}: max err {err}")
                        if not _same_on_all_ranks(comm, torch, g):
                            failures.append(f"{mode} {name} {dtype} {rows}x{hidden}: ranks differ")
    torch.cuda.synchronize(device)


def _check_back_to_back(comm, failures: list, num_calls: int = 1000) -> None:
    """No host sync between calls; row counts (and so the per-row rounds) change, some calls are
    too big for the LL path and go to NCCL. Small integers: every sum is exact."""
    import torch
    device, world = comm.device, comm.world_size
    rows_cycle = (1, 3, 64, 2, 33, 100, 1, 17)  # 100 rows of 4096: NCCL
    max_err = torch.zeros((), dtype=torch.float32, device=device)
    ones = torch.ones(HIDDEN, dtype=torch.bfloat16, device=device)
    for k in range(num_calls):
        rows = rows_cycle[k % len(rows_cycle)]
        value = float(comm.rank + 1 + k % 5)
        x = torch.full((rows, HIDDEN), value, dtype=torch.bfloat16, device=device)
        expected = world * (world + 1) / 2 + world * (k % 5)
        if k % 3 == 0:
            out = comm.all_reduce(x)
            max_err = torch.maximum(max_err, (out.float() - expected).abs().max())
        else:  # a constant row normalizes to exactly 1 (residual 1 keeps it exact)
            residual = torch.ones_like(x)
            result = comm.fused_all_reduce_rms_norm(x, residual, ones, EPS)
            normed, new_residual = result if result is not None else _reference(comm, x, residual, ones)
            max_err = torch.maximum(max_err, (new_residual.float() - expected - 1).abs().max())
            max_err = torch.maximum(max_err, (normed.float() - 1).abs().max())
    torch.cuda.synchronize(device)
    if max_err.item() != 0:
        failures.append(f"back-to-back calls: max err {max_err.item()}")


def _check_graph(comm, failures: list, num_replays: int = 100) -> None:
    """A CUDA graph of fused (1 row), sum (4 rows), fused (32 rows) replayed with new inputs."""
    import torch
    if comm._ll is None:  # off (opt-out test): the other checks cover NCCL's path
        return
    device, dtype = comm.device, torch.bfloat16
    shapes = (("norm", 1), ("sum", 4), ("norm", 32))
    static = [_inputs(torch, rows, HIDDEN, dtype, 17 + i, device, comm.rank)
              for i, (_, rows) in enumerate(shapes)]

    def calls():
        outs = []
        for (mode, _), (x, residual, weight) in zip(shapes, static):
            if mode == "sum":
                outs.append((comm.all_reduce(x), None))
            else:
                outs.append(comm.fused_all_reduce_rms_norm(x, residual, weight, EPS))
        return outs

    graph, outs = _captured(torch, calls, device)
    if any(o is None for o in outs):
        failures.append("graph: the LL path refused a call")
        return
    for replay in range(num_replays):
        refs = []
        for i, ((mode, rows), (x, residual, weight)) in enumerate(zip(shapes, static)):
            fresh = _inputs(torch, rows, HIDDEN, dtype, 31 * replay + i, device, comm.rank)
            for dst, src in zip((x, residual, weight), fresh):
                dst.copy_(src)
            refs.append(_reference(comm, x, *((None, None) if mode == "sum" else (residual, weight))))
        graph.replay()
        for (mode, rows), got, want in zip(shapes, outs, refs):
            for g, e in zip(got, want):
                if g is not None and not _close(torch, g, e, dtype):
                    failures.append(f"graph replay {replay}, {mode} x {rows} rows: differs")
    torch.cuda.synchronize(device)
    del graph


def _captured(torch, calls, device):
    """(graph, its outputs): ``calls()`` run 3 times eagerly (compiles, tunes), then captured."""
    for _ in range(3):
        calls()
    torch.cuda.synchronize(device)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = calls()
    torch.cuda.synchronize(device)
    return graph, outs


def _tuned_row_gemv(a, w) -> None:
    """Autotunes gemv_row for w's shape and makes it the one-row choice (what ``gemv_tune.tune``
    does for a model), so ``linear_for_reduce`` takes that shape."""
    from engine.kernels import gemv
    gemv.gemv_row(a, w)
    gemv._USE_GEMV[(w.shape[0], w.shape[1], w.dtype)] = ("row", None)


def _check_pushed(comm, failures: list) -> None:
    """``linear_for_reduce`` (the GEMV that pushes its outputs to the peers) then the LL call
    must give bit for bit what ``gemv_row`` then the LL call give: single calls in both modes,
    300 back-to-back calls with plain LL and NCCL calls between, and a CUDA graph replayed."""
    import torch

    from engine.kernels import gemv
    if comm._ll is None:
        return
    device = comm.device

    def row_and_weight(k, hidden, dtype, seed):
        gen = torch.Generator(device=device).manual_seed(seed + 1009 * comm.rank)
        a = torch.randn(1, k, generator=gen, device=device).to(dtype)
        return a, (torch.randn(hidden, k, generator=gen, device=device) / k ** 0.5).to(dtype)

    for dtype in (torch.bfloat16, torch.float16):
        for hidden, k in ((4096, 2048), (5120, 7168), (64, 96)):
            a, w = row_and_weight(k, hidden, dtype, hidden + k)
            _, residual, weight = _inputs(torch, 1, hidden, dtype, 900 + hidden, device, comm.rank)
            _tuned_row_gemv(a, w)
            plain = gemv.gemv_row(a, w)
            want = comm.fused_all_reduce_rms_norm(plain, residual, weight, EPS)
            want_sum = comm.all_reduce(plain.clone())
            pushed = comm.linear_for_reduce(a, w)
            if pushed is None:
                failures.append(f"linear_for_reduce refused {dtype} {hidden}x{k}")
                continue
            got = comm.fused_all_reduce_rms_norm(pushed, residual, weight, EPS)
            got_sum = comm.all_reduce(comm.linear_for_reduce(a, w))
            checks = [("out", got[0], want[0]), ("residual", got[1], want[1]), ("sum", got_sum, want_sum)]
            if not comm._ll.no_wait:  # no-wait: the GEMV's own output is never written (slots only)
                checks.append(("partial", pushed, plain))
            for name, g, e in checks:
                if not torch.equal(g, e):
                    err = (g.float() - e.float()).abs().max().item()
                    failures.append(f"pushed {name} {dtype} {hidden}x{k}: not bit-identical (max err {err})")
    torch.cuda.synchronize(device)

    # back to back, no host sync: rows of 64 * value, so every sum is exact
    ones_w = torch.ones(HIDDEN, 64, dtype=torch.bfloat16, device=device)
    ones = torch.ones(HIDDEN, dtype=torch.bfloat16, device=device)
    _tuned_row_gemv(ones_w[:1], ones_w)
    max_err = torch.zeros((), dtype=torch.float32, device=device)
    world = comm.world_size
    for k in range(300):
        value = float(comm.rank + 1 + k % 5)
        a = torch.full((1, 64), value, dtype=torch.bfloat16, device=device)
        total = 64.0 * (world * (world + 1) / 2 + world * (k % 5))
        if k % 4 == 0:
            out = comm.all_reduce(comm.linear_for_reduce(a, ones_w))
            max_err = torch.maximum(max_err, (out.float() - total).abs().max())
        elif k % 4 == 1:
            normed, res = comm.fused_all_reduce_rms_norm(comm.linear_for_reduce(a, ones_w),
                                                          torch.ones(1, HIDDEN, dtype=torch.bfloat16,
                                                                     device=device), ones, EPS)
            want_res = (torch.tensor(total, dtype=torch.bfloat16).float() + 1).to(torch.bfloat16).item()
            max_err = torch.maximum(max_err, (res.float() - want_res).abs().max())
            max_err = torch.maximum(max_err, (normed.float() - 1).abs().max())
        elif k % 4 == 2:  # a plain LL call of 3 rows
            out = comm.all_reduce(torch.full((3, HIDDEN), value, dtype=torch.bfloat16, device=device))
            max_err = torch.maximum(max_err, (out.float() - total / 64).abs().max())
        else:  # too big for LL: NCCL
            out = comm.all_reduce(torch.full((100, HIDDEN), value, dtype=torch.bfloat16, device=device))
            max_err = torch.maximum(max_err, (out.float() - total / 64).abs().max())
    torch.cuda.synchronize(device)
    if max_err.item() != 0:
        failures.append(f"pushed back-to-back calls: max err {max_err.item()}")

    # a CUDA graph: pushed norm, a plain 4-row sum, a pushed sum; replayed with new rows
    a, w = row_and_weight(2048, HIDDEN, torch.bfloat16, 5)
    _tuned_row_gemv(a, w)
    _, residual, weight = _inputs(torch, 1, HIDDEN, torch.bfloat16, 6, device, comm.rank)
    four = torch.randn(4, HIDDEN, device=device).to(torch.bfloat16)

    def calls():
        normed = comm.fused_all_reduce_rms_norm(comm.linear_for_reduce(a, w), residual, weight, EPS)
        return (*normed, comm.all_reduce(four), comm.all_reduce(comm.linear_for_reduce(a, w)))

    graph, outs = _captured(torch, calls, device)
    for replay in range(50):
        fresh, _ = row_and_weight(2048, 8, torch.bfloat16, 100 + replay)
        a.copy_(fresh)
        four.copy_(torch.randn(4, HIDDEN, device=device).to(torch.bfloat16))
        plain = gemv.gemv_row(a, w)
        refs = (*comm.fused_all_reduce_rms_norm(plain, residual, weight, EPS),
                comm.all_reduce(four.clone()), comm.all_reduce(plain.clone()))
        graph.replay()
        for i, (g, e) in enumerate(zip(outs, refs)):
            if not torch.equal(g, e):
                failures.append(f"pushed graph replay {replay}, output {i}: not bit-identical")
    torch.cuda.synchronize(device)
    del graph


def _bench(comm) -> dict:
    """Microseconds per call inside a CUDA graph of GRAPH_CALLS calls, bf16, hidden 4096."""
    import torch

    from engine import kernels as fused
    from engine.kernels.gemv import gemv_row
    device = comm.device
    out = {}
    for rows in BENCH_ROWS:
        x, residual, weight = _inputs(torch, rows, HIDDEN, torch.bfloat16, 5, device)
        x.zero_()  # zeros stay zeros through any number of in-place sums
        paths = {"nccl": lambda: comm.nccl_all_reduce(x),
                 "nccl+rms_norm": lambda: fused.rms_norm(comm.nccl_all_reduce(x), weight, EPS, residual)}
        if comm._ll is not None and comm._ll.can_reduce(x):
            paths["ll"] = lambda: comm._ll.all_reduce(x)
            paths["ll+rms_norm fused"] = lambda: comm._ll.all_reduce_rms_norm(x, residual, weight, EPS)
        if rows == 1 and comm._ll is not None:  # the down_proj GEMV of the 8B shape at TP=2 first
            a = torch.randn(1, PUSH_K, device=device).to(torch.bfloat16)
            w = (torch.randn(HIDDEN, PUSH_K, device=device) / PUSH_K ** 0.5).to(torch.bfloat16)
            _tuned_row_gemv(a, w)
            paths[f"gemv {HIDDEN}x{PUSH_K} + ll fused"] = lambda: comm._ll.all_reduce_rms_norm(
                gemv_row(a, w), residual, weight, EPS)
            paths[f"gemv {HIDDEN}x{PUSH_K} pushing + ll fused"] = lambda: comm._ll.all_reduce_rms_norm(
                comm.linear_for_reduce(a, w), residual, weight, EPS)
        row = {}
        for name, fn in paths.items():
            for _ in range(5):
                fn()
            torch.cuda.synchronize(device)
            row[name] = round(graph_us(fn, device), 2)
        out[str(rows)] = row
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="write the JSON report here")
    parser.add_argument("--timeout-s", type=float, default=60.0, help="per world size")
    args = parser.parse_args()
    import torch
    num_gpus = torch.cuda.device_count()
    report = {"gpu": torch.cuda.get_device_name(0) if num_gpus else None, "num_gpus": num_gpus,
              "hidden": HIDDEN, "graph_calls": GRAPH_CALLS, "runs": {}}
    for world in (2, 4):
        if num_gpus < world:
            continue
        try:
            reports = run_ranks(world, isolated=True, checks=False, timeout_s=args.timeout_s,
                                target=rank_main)
            report["runs"][str(world)] = {"enabled": all(r["enabled"] for r in reports.values()),
                                          "reason": reports[0]["reason"],
                                          "latency_us": reports[0]["latency_us"]}
        except Exception as e:  # noqa: BLE001 - record it, go on with the next size
            report["runs"][str(world)] = {"error": repr(e)[:2000]}
        print(f"{world} ranks: {json.dumps(report['runs'][str(world)])}", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
