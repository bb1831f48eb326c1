"""The parts of bench/parallel.py that run in its subprocesses (one per measurement).

    allreduce --ranks N   ``bench_allreduce``: N spawned rank processes, one GPU each, time
                          ``all_reduce`` through our Communicator and a raw CuPy NCCL allReduce
    engine --tp N ...     ``bench_engine``: one LLMEngine of the 8B shape (dummy bf16 weights;
                          kvmesh-tiny with --smoke-cpu): decode step at batch 1 (and a per-rank
                          kernel profile), then output tokens/s of a queued load

Each answers with one ``RESULT {json}`` line on stdout (``emit``), which the orchestrator in
bench/parallel.py reads. Replicas of a TP=1 x 2 run meet at a ``FileBarrier`` so their timed
loads start together.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Optional

RESULT_PREFIX = "RESULT "
SIZES = [1 << s for s in range(16, 29, 2)]  # 64 KiB .. 256 MiB
LLAMA_8B_SHAPE = dict(
    architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=4096, intermediate_size=14336,
    num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
    max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=500000.0, bos_token_id=1,
    eos_token_id=2, tie_word_embeddings=False, torch_dtype="bfloat16", hidden_act="silu")


def emit(result: dict) -> None:
    """The subprocess's answer: one line, written at once (no other thread can split it)."""
    sys.stdout.write(RESULT_PREFIX + json.dumps(result) + "\n")
    sys.stdout.flush()


# ---- all-reduce (subprocess "allreduce --ranks N": spawns N rank processes) -----------------------

def _allreduce_rank(rank: int, num_ranks: int, ids: tuple, results) -> None:
    import cupy
    import torch
    from cupy.cuda import nccl

    from engine.distributed.nccl import NcclCommunicator
    device = torch.device("cuda", rank)
    torch.cuda.set_device(device)
    ours = NcclCommunicator(ids[0], rank, num_ranks, device)  # collective: every rank, same order
    with cupy.cuda.Device(rank):
        raw = nccl.NcclCommunicator(num_ranks, ids[1], rank)
    bf16 = getattr(nccl, "NCCL_BFLOAT16", 9)
    out = {}
    for nbytes in SIZES:
        x = torch.zeros(nbytes // 2, dtype=torch.bfloat16, device=device)
        iters = 50 if nbytes <= (16 << 20) else 20

        def run_ours():
            ours.all_reduce(x)

        def run_raw():
            raw.allReduce(x.data_ptr(), x.data_ptr(), x.numel(), bf16, nccl.NCCL_SUM,
                          torch.cuda.current_stream(device).cuda_stream)

        row = {}
        for name, fn in (("ours", run_ours), ("raw_cupy", run_raw)):
            for _ in range(5):
                fn()
            torch.cuda.synchronize(device)
            start = time.perf_counter()
            for _ in range(iters):
                fn()
            torch.cuda.synchronize(device)
            seconds = (time.perf_counter() - start) / iters
            row[name] = {"us": seconds * 1e6,
                         "busbw_GBps": 2 * (num_ranks - 1) / num_ranks * nbytes / seconds / 1e9}
        out[str(nbytes)] = row
    ours.destroy()
    raw.destroy()
    if rank == 0:
        results.put(out)


def bench_allreduce(num_ranks: int, timeout_s: float) -> dict:
    import queue

    import torch.multiprocessing as mp
    from cupy.cuda import nccl
    ids = (nccl.get_unique_id(), nccl.get_unique_id())
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_allreduce_rank, args=(r, num_ranks, ids, results), daemon=True)
             for r in range(num_ranks)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout_s
    while True:  # rank 0's result, or fail as soon as any rank dies (its peers would hang)
        try:
            out = results.get(timeout=1.0)
            break
        except queue.Empty:
            failed = [(r, p.exitcode) for r, p in enumerate(procs) if p.exitcode not in (None, 0)]
            if failed:
                raise RuntimeError(f"all-reduce ranks exited with errors: {failed}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"all-reduce over {num_ranks} ranks took over {timeout_s:.0f}s")
    for p in procs:
        p.join(timeout=30)
    return {"dtype": "bfloat16", "ranks": num_ranks, "sizes": out}


# ---- engines (subprocess "engine --tp N ...") -------------------------------------------------------

def rank_shape(tp: int) -> dict:
    """The 8B shape cut to what ONE rank of a TP=``tp`` group holds, as a whole model: its heads,
    KV heads, FFN and vocabulary divided by ``tp`` (head_dim kept at 128). Served at TP=1 on one
    GPU it runs the same weight shapes, GEMVs and attention as that rank, without the
    all-reduces: the TP=``tp`` step's floor on one GPU."""
    shape = dict(LLAMA_8B_SHAPE)
    for key in ("num_attention_heads", "num_key_value_heads", "intermediate_size"):
        shape[key] //= tp
    shape["vocab_size"] = -(-shape["vocab_size"] // tp)
    shape["head_dim"] = LLAMA_8B_SHAPE["hidden_size"] // LLAMA_8B_SHAPE["num_attention_heads"]
    return shape


def write_model_dir(path: str, rank_of_tp: int = 1) -> str:
    """A folder with only the 8B-shape config.json (weights: load_format='dummy'); atomic.
    ``rank_of_tp`` > 1: one rank's shape of that TP size (``rank_shape``)."""
    os.makedirs(path, exist_ok=True)
    tmp = os.path.join(path, f".config.{os.getpid()}.json")
    with open(tmp, "w") as f:
        json.dump(rank_shape(rank_of_tp) if rank_of_tp > 1 else LLAMA_8B_SHAPE, f)
    os.replace(tmp, os.path.join(path, "config.json"))
    return path


def make_engine(args: argparse.Namespace, max_num_seqs: int):
    from engine.config import EngineConfig
    from engine.llm_engine import LLMEngine
    executor = getattr(args, "executor", "auto")
    if args.tp > 1 or executor == "ray":
        import ray
        if not ray.is_initialized():  # a private cluster on this machine's visible GPUs
            ray.init(address="local", include_dashboard=False, log_to_driver=False)
    if args.smoke_cpu:
        config = EngineConfig.create(model="kvmesh-tiny", dtype="float32", device="cpu",
                                     tensor_parallel_size=args.tp, distributed_backend="gloo",
                                     distributed_executor_backend=executor,
                                     max_model_len=512, max_num_seqs=max_num_seqs,
                                     max_num_batched_tokens=512, num_blocks=512)
    else:
        config = dummy_gpu_config(args.model_dir, tensor_parallel_size=args.tp,
                                  distributed_executor_backend=executor, max_model_len=2048,
                                  max_num_seqs=max_num_seqs, max_num_batched_tokens=8192)
    return LLMEngine(config)


def dummy_gpu_config(model_dir: str, **options):
    """An engine config for ``model_dir``'s shapes (``write_model_dir``) on the GPU: dummy bf16
    weights, kvmesh-tiny's tokenizer, 85% of the GPU's memory; ``options`` size the rest."""
    from engine.config import EngineConfig
    from engine.tiny_model import ensure_tiny_model
    return EngineConfig.create(model=model_dir, tokenizer=ensure_tiny_model(), load_format="dummy",
                               dtype="bfloat16", device="cuda", gpu_memory_utilization=0.85, **options)


def measure_decode(engine, decode_steps: int, profile_steps: int = 0) -> dict:
    """One request of a 128-token prompt; the step times once the prompt and 8 warm-up steps are done.

    ``profile_steps`` > 0: after the timed steps, that many more under a kernel profile in every
    rank (``engine/profiling.py``; the driver's own runner at TP=1), reported per rank.
    With Ray workers, ``rank_skew``: how much later than the first each rank read the timed
    steps' calls, and how long it ran and answered them (``engine.profiling.rank_skew``)."""
    from engine.sampling_params import SamplingParams
    engine.add_request("decode", [7] * 128, SamplingParams(
        temperature=0.0, max_tokens=decode_steps + 8 + (profile_steps + 4 if profile_steps else 0),
        ignore_eos=True))
    steps, profiled, profile = [], [], None
    profiler = _StepProfile(engine) if profile_steps else None
    profile_from = 8 + decode_steps + 2  # step index where the profiled stretch starts
    index = 0
    stamps = None
    while engine.has_unfinished_requests():
        if index == 8 + decode_steps and hasattr(engine.executor, "step_stamps"):
            stamps = engine.executor.step_stamps(decode_steps)  # the timed steps, on every rank
        in_profile = profile_steps and profile_from <= index < profile_from + profile_steps
        if profiler is not None and index == profile_from:
            profiler.start()
        start = time.perf_counter()
        engine.step()
        (profiled if in_profile else steps).append(time.perf_counter() - start)
        index += 1
        if profiler is not None and index == profile_from + profile_steps:
            profile = profiler.stop(profile_steps)
    decode = steps[8:min(8 + decode_steps, len(steps) - 1)] or steps  # the last step may only collect
    # an in-flight result
    result = {"batch": 1, "median_step_ms": statistics.median(decode) * 1e3,
              "mean_step_ms": sum(decode) / len(decode) * 1e3,
              "p90_step_ms": sorted(decode)[int(0.9 * (len(decode) - 1))] * 1e3, "num_steps": len(decode)}
    if stamps is None and hasattr(engine.executor, "step_stamps"):  # no profiled stretch after them
        stamps = engine.executor.step_stamps(decode_steps)
    if stamps is not None:
        from engine.profiling import rank_skew
        result["rank_skew"] = rank_skew(stamps)
    if profile is not None:
        result["profile"] = {"num_steps": profile_steps, "median_step_ms": statistics.median(profiled) * 1e3,
                             "ranks": profile}
    device = device_only_step(engine)
    if device is not None:
        result["device_only"] = device
        result["device_only"]["host_gap_ms"] = result["median_step_ms"] - device["step_ms"]
    return result


def device_only_step(engine, replays: int = 100, rounds: int = 5) -> Optional[dict]:
    """The batch-1 step's device work alone, with no host in the loop
    (``engine.profiling.replay_decode_graph``): the driver's own GPU runner, or every Ray worker
    at once (a TP group's graphs wait for each other in their all-reduces; the slowest rank's
    figures, with each rank's graph_ms). The engine's step minus this is time the device waited
    for the host. None where there is no batch-1 decode graph."""
    from engine.profiling import replay_decode_graph
    runner = getattr(engine.executor, "runner", None)
    if runner is not None:
        return replay_decode_graph(runner, replays, rounds)
    if not hasattr(engine.executor, "replay_decode_graph"):
        return None
    ranks = engine.executor.replay_decode_graph(replays, rounds)
    if not ranks or any(r is None for r in ranks):
        return None
    slowest = max(ranks, key=lambda r: r["step_ms"])
    return {**{k: v for k, v in slowest.items() if k != "gemv_tuning"},
            "rank_graph_ms": [r["graph_ms"] for r in ranks],
            "rank_gemv_tuning": [r.get("gemv_tuning") for r in ranks]}


class _StepProfile:
    """Kernel profile of every rank (Ray workers) or of the driver's own runner (one worker)."""

    def __init__(self, engine) -> None:
        from engine.profiling import KernelProfiler
        self.engine = engine
        self.executor = engine.executor if hasattr(engine.executor, "profile") else None
        self.local = KernelProfiler() if self.executor is None else None

    def start(self) -> None:
        self.executor.profile("start") if self.executor is not None else self.local.start()

    def stop(self, num_steps: int) -> list[dict]:
        if self.executor is not None:
            return self.executor.profile("stop", num_steps)
        runner = getattr(self.engine.executor, "runner", None)
        return [{"rank": 0, **self.local.stop(num_steps).to_dict(),
                 "gemv_tuning": getattr(runner, "gemv_report", None)}]


def measure_throughput(engine, num_requests: int, prompt_len: int, max_tokens: int,
                       barrier: Optional["FileBarrier"], profile_steps: int = 0) -> dict:
    """Output tokens/s of ``num_requests`` queued at once, timed on the second of two identical
    runs: the first meets every batch size and prefill shape once (Triton compiles and tunes,
    NCCL sets up buffers), which a short timed run would otherwise count. Prompts differ
    between the two (no prefix-cache hits) and equal earlier stops' timed prompts.

    ``full_batch_decode``: the timed run's steps that scheduled one token for each of the
    ``num_requests`` requests (all prompts done), their median and p90 wall time: where a
    step's time goes at max load. ``profile_steps`` > 0: that many such steps of the warm-up
    run under a kernel profile (every rank), so device time can be set against the wall time."""
    from engine.sampling_params import SamplingParams
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    profiler = _StepProfile(engine) if profile_steps else None
    profile = None

    def run(tag: str, offset: int, profile_from: int = -1) -> tuple[float, list[float]]:
        # the offset keeps the prefix cache from serving run 2
        nonlocal profile
        start = time.perf_counter()
        for i in range(num_requests):
            engine.add_request(f"{tag}{i}", [(i * 7 + j + offset) % 1000 + 5 for j in range(prompt_len)], params)
        full = []  # wall seconds of the full-batch decode steps
        profiling = profiler is not None and profile_from >= 0
        while engine.has_unfinished_requests():
            if profiling and len(full) == profile_from:
                profiler.start()
            t0 = time.perf_counter()
            engine.step()
            scheduled = engine.last_scheduled
            if (scheduled is not None and len(scheduled.num_scheduled_tokens) == num_requests
                    and all(n == 1 for n in scheduled.num_scheduled_tokens.values())):
                full.append(time.perf_counter() - t0)
                if profiling and len(full) == profile_from + profile_steps:
                    profile = profiler.stop(profile_steps)
        return time.perf_counter() - start, full

    warmup_s, _ = run("warm", 500, profile_from=max_tokens // 3 if profile_steps else -1)
    if barrier is not None:
        barrier.wait("throughput")  # the replicas of a TP=1 x 2 run start together
    seconds, full = run("r", 0)
    result = {"num_requests": num_requests, "prompt_len": prompt_len, "max_tokens": max_tokens,
              "seconds": seconds, "warmup_seconds": warmup_s, "output_tok_s": num_requests * max_tokens / seconds}
    if full:
        ordered = sorted(full)
        result["full_batch_decode"] = {"steps": len(full), "median_step_ms": statistics.median(full) * 1e3,
                                       "p90_step_ms": ordered[int(0.9 * (len(ordered) - 1))] * 1e3,
                                       "sum_s": sum(full)}
    if profile is not None:
        result["full_batch_decode_profile"] = {"num_steps": profile_steps, "ranks": profile}
    return result


class FileBarrier:
    """Processes of one part meet here: each touches ``<name>.<rank>`` and waits for all ``size``."""

    def __init__(self, directory: str, rank: int, size: int, timeout_s: float) -> None:
        self.directory, self.rank, self.size, self.timeout_s = Path(directory), rank, size, timeout_s

    def wait(self, name: str) -> None:
        (self.directory / f"{name}.{self.rank}").touch()
        deadline = time.monotonic() + self.timeout_s
        while len(list(self.directory.glob(f"{name}.*"))) < self.size:
            if time.monotonic() > deadline:
                raise TimeoutError(f"barrier {name!r}: peers did not arrive in {self.timeout_s:.0f}s")
            time.sleep(0.05)


def bench_engine(args: argparse.Namespace) -> dict:
    barrier = (FileBarrier(args.barrier_dir, args.barrier_rank, args.barrier_size, args.barrier_timeout_s)
               if args.barrier_dir else None)
    start = time.monotonic()
    engine = make_engine(args, max_num_seqs=args.max_num_seqs)
    result: dict[str, Any] = {"tp": args.tp, "init_s": time.monotonic() - start,
                              "executor": engine.config.parallel.distributed_executor_backend.value,
                              "visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
                              "scheduler": _plain(engine.config.scheduler),
                              "async_scheduling": getattr(engine, "async_scheduling", None)}
    try:
        if barrier is not None:
            barrier.wait("init")  # GPU 0's decode runs while its peer only waits
        if args.decode:
            result["decode"] = measure_decode(engine, args.decode_steps, args.profile_steps)
        if args.throughput_requests:
            result["throughput"] = measure_throughput(engine, args.throughput_requests, args.prompt_len,
                                                      args.max_tokens, barrier, args.throughput_profile_steps)
    finally:
        engine.shutdown()
    return result


def _plain(obj: Any) -> Any:
    """A config dataclass as JSON-able values (Enums by value)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: _plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    return getattr(obj, "value", obj)
