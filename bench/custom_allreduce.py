"""The one-shot IPC all-reduce (engine/distributed/custom_allreduce.py) against NCCL, on 2 and 4 GPUs.

    python bench/custom_allreduce.py --out bench/results/custom_allreduce_h100.json   # < 60 s

Each rank is a spawned process that sees only its own GPU (``CUDA_VISIBLE_DEVICES``, set before
its interpreter starts, as Ray does for the engine's workers). Per size, bf16: microseconds per
call of the custom path and of NCCL, eagerly (back-to-back calls, so the Python launch cost
counts) and inside a CUDA graph of 50 calls (the device time, as the decode graphs see it).
``run_ranks`` and ``rank_main`` also serve tests/gpu/test_custom_allreduce.py, whose checks
(``checks=True``) compare with NCCL over sizes and dtypes, 1000 back-to-back calls, graph replays.
A rank never stops between collectives: failures are collected and reported, not raised, so
one rank's failure cannot leave the others hanging; the parent kills every rank at its deadline.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import sys
import time
import traceback
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

BENCH_BYTES = (8 << 10, 64 << 10, 256 << 10, 512 << 10)
GRAPH_CALLS = 50


def rank_main(rank: int, world: int, nccl_id: tuple, isolated: bool, checks: bool,
              disable: bool, results) -> None:
    """One rank: build the communicator (and the custom path), check, time; put a report."""
    comm = None
    try:
        if disable:
            os.environ["KVMESH_DISABLE_CUSTOM_ALLREDUCE"] = "1"
        import torch

        from engine.distributed.nccl import NcclCommunicator
        index = 0 if isolated else rank
        if isolated and torch.cuda.device_count() != 1:
            raise RuntimeError(f"expected one visible GPU, see {torch.cuda.device_count()}")
        device = torch.device("cuda", index)
        torch.cuda.set_device(device)
        comm = NcclCommunicator(nccl_id, rank, world, device)
        enabled = comm.enable_custom_all_reduce()
        report = {"rank": rank, "enabled": enabled, "failures": [],
                  "reason": comm.custom_disabled_reason}
        if checks:
            _check_sizes(comm, rank, report["failures"])
            _check_back_to_back(comm, rank, report["failures"])
            _check_graph(comm, rank, report["failures"])
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


def _random(torch, numel: int, dtype, seed: int, device):
    gen = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(numel, generator=gen, device=device).to(dtype)


def _tolerance(torch, dtype, world: int) -> tuple[float, float]:
    return {torch.bfloat16: (2e-2, 5e-2 * world), torch.float16: (2e-3, 5e-3 * world),
            torch.float32: (1e-5, 1e-5 * world)}[dtype]


def _check_sizes(comm, rank: int, failures: list) -> None:
    """Every size 1 element .. max bytes, odd sizes, a misaligned view; equal to NCCL, and
    bit-identical on every rank."""
    import torch
    device, world = comm.device, comm.world_size
    max_bytes = comm._custom.max_bytes if comm._custom is not None else 512 * 1024
    case = 0
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        size = torch.tensor([], dtype=dtype).element_size()
        max_numel = max_bytes // size
        for numel in (1, 2, 3, 7, 8, 9, 63, 4096, 4097, 12289, 65536 // size, max_numel - 1, max_numel):
            for misaligned in (False, True):
                case += 1
                base = _random(torch, numel + 1, dtype, 1000 * rank + case, device)
                x = base[1:] if misaligned else base[:numel]  # [1:] starts 2 or 4 bytes in
                ref = comm.nccl_all_reduce(x.clone())
                if comm._custom is not None and not comm._custom.can_reduce(x):
                    failures.append(f"custom path refused {dtype} x {numel}")
                out = comm.all_reduce(x)
                rtol, atol = _tolerance(torch, dtype, world)
                if not torch.allclose(out.float(), ref.float(), rtol=rtol, atol=atol):
                    err = (out.float() - ref.float()).abs().max().item()
                    failures.append(f"{dtype} x {numel} misaligned={misaligned}: max err {err} vs NCCL")
                parts = comm.all_gather(out.contiguous(), dim=0).view(world, numel)
                if not all(torch.equal(parts[q], out) for q in range(world)):
                    failures.append(f"{dtype} x {numel}: ranks' results differ")
    torch.cuda.synchronize(device)


def _check_back_to_back(comm, rank: int, failures: list, num_calls: int = 1000) -> None:
    """1000 calls without a host sync, sizes (and so grids) changing, NCCL-sized ones between."""
    import torch
    device, world = comm.device, comm.world_size
    sizes = (4096, 1, 32768, 4097, 262144, 777, 1 << 20)  # bf16 elements; 2 MiB goes to NCCL
    max_err = torch.zeros((), dtype=torch.float32, device=device)
    for k in range(num_calls):
        numel = sizes[k % len(sizes)]
        value = float(rank + 1 + k % 5)  # small integers: exact in bf16
        x = torch.full((numel,), value, dtype=torch.bfloat16, device=device)
        comm.all_reduce(x)
        expected = world * (world + 1) / 2 + world * (k % 5)
        max_err = torch.maximum(max_err, (x.float() - expected).abs().max())
    torch.cuda.synchronize(device)
    if max_err.item() != 0:
        failures.append(f"back-to-back calls: max err {max_err.item()}")


def _check_graph(comm, rank: int, failures: list, num_replays: int = 100) -> None:
    """A CUDA graph of all-reduces (bf16 8 KiB, fp32 128 KiB, bf16 512 KiB) replayed with new inputs."""
    import torch
    device, world = comm.device, comm.world_size
    shapes = ((4096, torch.bfloat16), (32768, torch.float32), (262144, torch.bfloat16))
    static = [torch.zeros(n, dtype=d, device=device) for n, d in shapes]
    for _ in range(3):  # warm up outside the capture (NCCL connections, kernel loads)
        for s in static:
            comm.all_reduce(s.clone())
    torch.cuda.synchronize(device)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = []
        for s in static:
            y = s * 1  # the graph's own copy, reduced in place
            outs.append(comm.all_reduce(y))
    torch.cuda.synchronize(device)
    for replay in range(num_replays):
        refs = []
        for i, s in enumerate(static):
            s.copy_(_random(torch, s.numel(), s.dtype, 7919 * rank + 31 * replay + i, device))
            refs.append(comm.nccl_all_reduce(s.clone()))
        graph.replay()
        for (n, dtype), out, ref in zip(shapes, outs, refs):
            rtol, atol = _tolerance(torch, dtype, world)
            if not torch.allclose(out.float(), ref.float(), rtol=rtol, atol=atol):
                failures.append(f"graph replay {replay}, {dtype} x {n}: differs from NCCL")
    torch.cuda.synchronize(device)
    del graph


def _bench(comm) -> dict:
    """Microseconds per call, bf16: custom vs NCCL, eager and inside a CUDA graph."""
    import torch
    device = comm.device
    out = {}
    for nbytes in BENCH_BYTES:
        x = torch.zeros(nbytes // 2, dtype=torch.bfloat16, device=device)  # zeros stay zeros
        row = {}
        paths = {"nccl": comm.nccl_all_reduce}
        if comm._custom is not None and comm._custom.can_reduce(x):
            paths["custom"] = comm.all_reduce
        for name, fn in paths.items():
            for _ in range(10):
                fn(x)
            torch.cuda.synchronize(device)
            start = time.perf_counter()
            for _ in range(200):
                fn(x)
            torch.cuda.synchronize(device)
            eager = (time.perf_counter() - start) / 200 * 1e6
            in_graph = graph_us(lambda: fn(x), device)
            row[name] = {"eager_us": round(eager, 2), "graph_us": round(in_graph, 2)}
        out[str(nbytes)] = row
    return out


def graph_us(fn, device, calls: int = GRAPH_CALLS, replays: int = 20) -> float:
    """Microseconds per call of ``fn()`` inside a CUDA graph of ``calls`` back-to-back calls
    (what a decode step's graph sees: no launch overhead per call), after one warm replay."""
    import torch
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(replays):
        graph.replay()
    torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    del graph
    return seconds / (replays * calls) * 1e6


def check_reports(reports: dict, world: int, expect_enabled: bool, path: str = "custom all-reduce") -> None:
    """Asserts every rank reported, without failures, with the path on (or off) as expected;
    prints rank 0's latency table (pytest -s)."""
    assert sorted(reports) == list(range(world))
    for rank, report in sorted(reports.items()):
        print(f"rank {rank}: enabled={report['enabled']} reason={report['reason']}")
        assert report["failures"] == [], f"rank {rank}: {report['failures'][:20]}"
        assert report["enabled"] is expect_enabled, (
            f"rank {rank}: {path} enabled={report['enabled']}, expected {expect_enabled}; "
            f"reason: {report['reason']}")
    print(f"latency us (world {world}, rank 0): {json.dumps(reports[0]['latency_us'], indent=1)}")


def run_ranks(world: int, isolated: bool = True, checks: bool = True, disable_ranks=(),
              timeout_s: float = 240.0, target=None) -> dict:
    """Spawns ``world`` ranks (GPUs 0..world-1); returns {rank: report}. Raises when a rank
    fails or the deadline passes (every rank is killed then: a hang fails, never blocks)."""
    import torch.multiprocessing as mp
    from cupy.cuda import nccl
    nccl_id = nccl.get_unique_id()
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = []
    saved = os.environ.get("CUDA_VISIBLE_DEVICES")
    visible = saved.split(",") if saved else [str(i) for i in range(world)]
    try:
        for rank in range(world):
            if isolated:  # the child's interpreter starts with it: before any CUDA call
                os.environ["CUDA_VISIBLE_DEVICES"] = visible[rank]
            proc = ctx.Process(target=target or rank_main, daemon=True,  # same arguments
                               args=(rank, world, nccl_id, isolated, checks, rank in disable_ranks, results))
            proc.start()
            procs.append(proc)
    finally:
        if saved is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = saved
    reports, deadline = {}, time.monotonic() + timeout_s
    try:
        while len(reports) < world:
            try:
                status, rank, body = results.get(timeout=1.0)
            except queue.Empty:
                dead = [(r, p.exitcode) for r, p in enumerate(procs) if p.exitcode not in (None, 0)]
                if dead:
                    raise RuntimeError(f"ranks died: {dead}") from None
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{world} ranks: no result within {timeout_s:.0f}s "
                                       f"(got ranks {sorted(reports)}; a deadlock?)") from None
                continue
            if status != "ok":
                raise RuntimeError(f"rank {rank} failed:\n{body}")
            reports[rank] = body
    finally:
        for proc in procs:
            proc.join(timeout=20)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=10)
    return reports


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="write the JSON report here")
    parser.add_argument("--timeout-s", type=float, default=25.0, help="per world size")
    args = parser.parse_args()
    import torch
    num_gpus = torch.cuda.device_count()
    report = {"gpu": torch.cuda.get_device_name(0) if num_gpus else None, "num_gpus": num_gpus, "runs": {}}
    for world in (2, 4):
        if num_gpus < world:
            continue
        try:
            reports = run_ranks(world, isolated=True, checks=False, timeout_s=args.timeout_s)
            report["runs"][str(world)] = {"enabled": all(r["enabled"] for r in reports.values()),
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
