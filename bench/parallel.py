"""Replica GPU groups on 2 and 4 GPUs: all-reduce bandwidth, decode step at TP=1/2/4, TP=1x2 vs TP=2x1.

    python bench/parallel.py all --out bench/results/parallel_h100.json   # within --budget-s (360 s)
    python bench/parallel.py all --smoke-cpu --out /tmp/parallel.json      # the plumbing, on CPU

Every measurement runs in a subprocess of its own (GPU memory, CUDA and Ray start clean) with
``CUDA_VISIBLE_DEVICES`` naming its GPUs, a private local Ray (``address="local"``, auth and
usage stats off), its stdout and stderr in files under ``<out>.logs/`` (its answer is the last
``RESULT {json}`` line of stdout), and a deadline after which its whole process group is
killed (SIGTERM, then SIGKILL). Parts, in this order; a part is skipped when less than its
minimum time is left of ``--budget-s``, and none runs past it (but for the kill's grace):

  allreduce2, allreduce4  all_reduce bus bandwidth through our Communicator
              (engine/distributed/nccl.py) vs a raw CuPy NCCL allReduce on the same buffers,
              bf16, 64 KiB .. 256 MiB, on GPUs 0-1 and 0-3.
              busbw = 2 (n-1)/n * bytes / time (NCCL-tests' definition, n ranks)
  tp1         two TP=1 engines at once, on GPU 0 and GPU 1. GPU 0's first measures the decode
              step at batch 1 while GPU 1's waits; then both run half of the throughput load
              at the same moment (a file barrier).
  tp2         one TP=2 engine (RayExecutor, 2 workers, NCCL) on GPUs 0-1: decode step at
              batch 1, then the whole throughput load.
  tp4         one TP=4 engine on GPUs 0-3: decode step at batch 1.

The model is an 8B-shape Llama (hidden 4096, 32 layers, 32/8 heads, FFN 14336, vocab 128256,
dummy bf16 weights), stepped through ``LLMEngine.step``; CUDA graphs on. Decode step: the
median (and mean) ``step()`` time of one request once its prompt is in. Throughput: output
tokens/s with all requests queued at once (decode-dominated), timed on the second of two
runs (stop 15's 4-GPU run timed the first: TP=2 x 1 got 0.32x of TP=1 x 2). The issue's target: TP=2's
decode step at most 0.6x TP=1's at batch 1 (``decode_step_ratio_vs_tp1``). Each engine's
scheduler config is recorded with it (e.g. whether it scheduled asynchronously).
``--smoke-cpu`` runs the same parts with kvmesh-tiny on CPU (gloo; the all-reduce parts
are skipped): it checks the subprocesses, barriers and report, not performance.
A PNG of the report is written next to ``--out`` when matplotlib is importable.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

RESULT_PREFIX = "RESULT "
SIZES = [1 << s for s in range(16, 29, 2)]  # 64 KiB .. 256 MiB
LLAMA_8B_SHAPE = dict(
    architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=4096, intermediate_size=14336,
    num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
    max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=500000.0, bos_token_id=1,
    eos_token_id=2, tie_word_embeddings=False, torch_dtype="bfloat16", hidden_act="silu")
DECODE_TARGET_TP2 = 0.6  # issue #5: TP=2's decode step <= 0.6 x TP=1's at batch 1
KILL_GRACE_S = 10.0  # after SIGTERM, before SIGKILL


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

def write_model_dir(path: str) -> str:
    """A folder with only the 8B-shape config.json (weights: load_format='dummy'); atomic."""
    os.makedirs(path, exist_ok=True)
    tmp = os.path.join(path, f".config.{os.getpid()}.json")
    with open(tmp, "w") as f:
        json.dump(LLAMA_8B_SHAPE, f)
    os.replace(tmp, os.path.join(path, "config.json"))
    return path


def make_engine(args: argparse.Namespace, max_num_seqs: int):
    from engine.config import EngineConfig
    from engine.llm_engine import LLMEngine
    if args.tp > 1:
        import ray
        if not ray.is_initialized():  # a private cluster on this machine's visible GPUs
            ray.init(address="local", include_dashboard=False, log_to_driver=False)
    if args.smoke_cpu:
        config = EngineConfig.create(model="kvmesh-tiny", dtype="float32", device="cpu",
                                     tensor_parallel_size=args.tp, distributed_backend="gloo",
                                     max_model_len=512, max_num_seqs=max_num_seqs,
                                     max_num_batched_tokens=512, num_blocks=512)
    else:
        from engine.tiny_model import ensure_tiny_model
        config = EngineConfig.create(model=args.model_dir, tokenizer=ensure_tiny_model(), load_format="dummy",
                                     dtype="bfloat16", device="cuda", tensor_parallel_size=args.tp,
                                     max_model_len=2048, max_num_seqs=max_num_seqs,
                                     max_num_batched_tokens=8192, gpu_memory_utilization=0.85)
    return LLMEngine(config)


def measure_decode(engine, decode_steps: int, profile_steps: int = 0) -> dict:
    """One request of a 128-token prompt; the step times once the prompt and 8 warm-up steps are done.

    ``profile_steps`` > 0: after the timed steps, that many more under a kernel profile in every
    rank (``engine/profiling.py``; the driver's own runner at TP=1), reported per rank."""
    from engine.sampling_params import SamplingParams
    engine.add_request("decode", [7] * 128, SamplingParams(
        temperature=0.0, max_tokens=decode_steps + 8 + (profile_steps + 4 if profile_steps else 0),
        ignore_eos=True))
    steps, profiled, profile = [], [], None
    profiler = _StepProfile(engine) if profile_steps else None
    profile_from = 8 + decode_steps + 2  # step index where the profiled stretch starts
    index = 0
    while engine.has_unfinished_requests():
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
    if profile is not None:
        result["profile"] = {"num_steps": profile_steps, "median_step_ms": statistics.median(profiled) * 1e3,
                             "ranks": profile}
    return result


class _StepProfile:
    """Kernel profile of every rank (Ray workers) or of the driver's own runner (one worker)."""

    def __init__(self, engine) -> None:
        from engine.profiling import KernelProfiler
        self.executor = engine.executor if hasattr(engine.executor, "profile") else None
        self.local = KernelProfiler() if self.executor is None else None

    def start(self) -> None:
        self.executor.profile("start") if self.executor is not None else self.local.start()

    def stop(self, num_steps: int) -> list[dict]:
        if self.executor is not None:
            return self.executor.profile("stop", num_steps)
        return [{"rank": 0, **self.local.stop(num_steps).to_dict()}]


def measure_throughput(engine, num_requests: int, prompt_len: int, max_tokens: int,
                       barrier: Optional["FileBarrier"]) -> dict:
    """Output tokens/s of ``num_requests`` queued at once, timed on the second of two identical
    runs: the first meets every batch size and prefill shape once (Triton compiles and tunes,
    NCCL sets up buffers), which a short timed run would otherwise count. Prompts differ
    between the two (no prefix-cache hits) and equal earlier stops' timed prompts."""
    from engine.sampling_params import SamplingParams
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)

    def run(tag: str, offset: int) -> float:  # the offset keeps the prefix cache from serving run 2
        start = time.perf_counter()
        for i in range(num_requests):
            engine.add_request(f"{tag}{i}", [(i * 7 + j + offset) % 1000 + 5 for j in range(prompt_len)], params)
        while engine.has_unfinished_requests():
            engine.step()
        return time.perf_counter() - start

    warmup_s = run("warm", 500)
    if barrier is not None:
        barrier.wait("throughput")  # the replicas of a TP=1 x 2 run start together
    seconds = run("r", 0)
    return {"num_requests": num_requests, "prompt_len": prompt_len, "max_tokens": max_tokens,
            "seconds": seconds, "warmup_seconds": warmup_s, "output_tok_s": num_requests * max_tokens / seconds}


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
                                                      args.max_tokens, barrier)
    finally:
        engine.shutdown()
    return result


def _plain(obj: Any) -> Any:
    """A config dataclass as JSON-able values (Enums by value)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: _plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    return getattr(obj, "value", obj)


# ---- the orchestrator ("all") -----------------------------------------------------------------------

@dataclasses.dataclass
class Launched:
    name: str
    proc: subprocess.Popen
    stdout_path: Path
    stderr_path: Path
    started: float


class Runner:
    """Starts parts as subprocesses under one deadline; kills a part's process group past it."""

    def __init__(self, args: argparse.Namespace, log_dir: Path, physical_gpus: list[str]) -> None:
        self.args = args
        self.log_dir = log_dir
        self.physical_gpus = physical_gpus  # what CUDA_VISIBLE_DEVICES index i means here
        self.start = time.monotonic()
        self.deadline = self.start + args.budget_s

    def time_left(self) -> float:
        return self.deadline - time.monotonic()

    def launch(self, name: str, argv: list[str], gpus: list[int]) -> Launched:
        env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", RAY_DEDUP_LOGS="0",
                   PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p),
                   CUDA_VISIBLE_DEVICES=",".join(self.physical_gpus[g] for g in gpus))
        env.pop("RAY_ADDRESS", None)  # never join another Ray cluster
        # The same engine settings in every part (only the load differs), so decode steps compare.
        common = ["--model-dir", self.args.model_dir, "--decode-steps", str(self.args.decode_steps),
                  "--profile-steps", str(self.args.profile_steps),
                  "--prompt-len", str(self.args.prompt_len), "--max-tokens", str(self.args.max_tokens),
                  "--max-num-seqs", str(max(8, self.args.num_requests))]
        if self.args.smoke_cpu:
            common.append("--smoke-cpu")
        stdout_path, stderr_path = self.log_dir / f"{name}.stdout", self.log_dir / f"{name}.stderr"
        with open(stdout_path, "w") as out, open(stderr_path, "w") as err:
            proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), *argv, *common], cwd=ROOT,
                                    env=env, stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                                    start_new_session=True)  # its own process group, killed as one
        return Launched(name, proc, stdout_path, stderr_path, time.monotonic())

    def finish_all(self, launched: list[Launched], timeout_s: float) -> list[dict]:
        """Waits for processes started together; once one fails or the timeout passes, the
        others are killed (a peer would wait at a barrier). Their results, in order."""
        deadline = time.monotonic() + max(timeout_s, 0.0)
        while time.monotonic() < deadline:
            codes = [p.proc.poll() for p in launched]
            if all(c is not None for c in codes) or any(c not in (None, 0) for c in codes):
                break
            time.sleep(0.2)
        return [self._finish(p) for p in launched]

    def _finish(self, launched: Launched) -> dict:
        """The part's RESULT, or {"error": ...} with the tail of its stderr; never raises."""
        proc = launched.proc
        code = proc.poll()
        if code is None:
            error = (f"killed after {time.monotonic() - launched.started:.0f}s "
                     f"(out of time, or a peer of this part failed)")
        else:
            error = None if code == 0 else f"exit {code}"
        _kill_group(proc)  # on success too: nothing of the part may outlive it
        lines = [ln for ln in launched.stdout_path.read_text(errors="replace").splitlines()
                 if ln.startswith(RESULT_PREFIX)]
        result: dict[str, Any]
        if error is None and lines:
            try:
                result = json.loads(lines[-1][len(RESULT_PREFIX):])
            except json.JSONDecodeError as exc:
                result = {"error": f"unreadable RESULT line: {exc}"}
        else:
            result = {"error": error or "no RESULT line"}
        if "error" in result:
            result["stderr_tail"] = launched.stderr_path.read_text(errors="replace")[-3000:]
        result["part_s"] = round(time.monotonic() - launched.started, 1)
        return result


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGTERM to the part's process group (Ray's driver shuts its cluster down), then SIGKILL."""
    for sig, grace in ((signal.SIGTERM, KILL_GRACE_S), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            return  # the group is gone
        if proc.poll() is None:
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                continue
        if sig == signal.SIGTERM:
            time.sleep(0.2)  # the leader is gone; its children get the SIGKILL below


@dataclasses.dataclass(frozen=True)
class Part:
    name: str
    num_gpus: int
    min_s: float  # don't start with less time left than this
    max_s: float  # its own timeout (also capped by the budget)


PARTS = [Part("allreduce2", 2, 30, 120), Part("allreduce4", 4, 30, 120),
         Part("tp1", 2, 90, 240), Part("tp2", 2, 90, 240), Part("tp4", 4, 75, 200)]


def run_all(args: argparse.Namespace) -> dict:
    physical = _physical_gpus(args.smoke_cpu)
    out_path = Path(args.out) if args.out else None
    log_dir = (out_path.with_suffix(".logs") if out_path else Path(tempfile.mkdtemp(prefix="kvmesh-parallel-")))
    log_dir.mkdir(parents=True, exist_ok=True)
    args.model_dir = write_model_dir(os.path.join(tempfile.gettempdir(), "kvmesh-llama8b-shape"))
    runner = Runner(args, log_dir, physical)
    report: dict[str, Any] = {
        "machine": _machine(physical, args.smoke_cpu),
        "settings": {k: getattr(args, k) for k in ("budget_s", "num_requests", "prompt_len", "max_tokens",
                                                   "decode_steps", "smoke_cpu")},
        "logs": str(log_dir), "parts": {}, "allreduce": {}, "decode": {}}

    def save() -> None:
        report["elapsed_s"] = round(time.monotonic() - runner.start, 1)
        if out_path:
            out_path.parent.mkdir(parents=True, exist_ok=True)
            out_path.write_text(json.dumps(report, indent=1))

    def may_start(part: Part) -> Optional[str]:
        """Why the part is skipped, or None to run it."""
        if len(physical) < part.num_gpus:
            return f"skipped: needs {part.num_gpus} GPUs, {len(physical)} visible"
        if part.name.startswith("allreduce") and args.smoke_cpu:
            return "skipped: needs CUDA and CuPy (--smoke-cpu)"
        if runner.time_left() < part.min_s:
            return f"skipped: {runner.time_left():.0f}s of --budget-s left, needs ~{part.min_s:.0f}s"
        return None

    wanted = set(args.parts.split(","))
    for part in PARTS:
        skip = may_start(part) if part.name in wanted else "skipped: not in --parts"
        if skip is not None:
            report["parts"][part.name] = skip
            save()
            continue
        timeout = min(part.max_s, runner.time_left())
        if part.name.startswith("allreduce"):
            argv = ["allreduce", "--ranks", str(part.num_gpus), "--timeout-s", str(max(timeout - 10, 5))]
            result = runner.finish_all([runner.launch(part.name, argv, list(range(part.num_gpus)))], timeout)[0]
            report["allreduce"][str(part.num_gpus)] = result
        elif part.name == "tp1":
            _run_tp1_pair(args, runner, report, timeout, log_dir)
        else:
            tp = int(part.name[2:])
            argv = ["engine", "--tp", str(tp), "--decode"]
            if tp == 2:
                argv += ["--throughput-requests", str(args.num_requests)]
            result = runner.finish_all([runner.launch(part.name, argv, list(range(tp)))], timeout)[0]
            report["decode"][str(tp)] = result
            if tp == 2:
                report.setdefault("throughput", {})["tp2_x1_replica"] = result
        report["parts"][part.name] = "error" if _has_error(report, part) else "ok"
        summarize(report)
        save()
    save()
    if out_path:
        plot(report, out_path.with_suffix(".png"))
    return report


def _run_tp1_pair(args, runner: Runner, report: dict, timeout: float, log_dir: Path) -> None:
    """Two TP=1 engines at once (GPU 0 and GPU 1), half of the throughput load each."""
    barrier_dir = tempfile.mkdtemp(prefix="barrier-", dir=log_dir)
    half = str(args.num_requests // 2)
    launched = []
    for rank in (0, 1):
        argv = ["engine", "--tp", "1", "--throughput-requests", half, "--barrier-dir", barrier_dir,
                "--barrier-rank", str(rank), "--barrier-size", "2", "--barrier-timeout-s", str(timeout)]
        if rank == 0:
            argv.append("--decode")
        launched.append(runner.launch(f"tp1_gpu{rank}", argv, [rank]))
    results = runner.finish_all(launched, timeout)
    report["decode"]["1"] = results[0]
    report.setdefault("throughput", {})["tp1_x2_replicas"] = results


def _has_error(report: dict, part: Part) -> bool:
    if part.name.startswith("allreduce"):
        return "error" in report["allreduce"].get(str(part.num_gpus), {})
    if part.name == "tp1":
        return any("error" in r for r in report.get("throughput", {}).get("tp1_x2_replicas", []))
    return "error" in report["decode"].get(part.name[2:], {})


def summarize(report: dict) -> None:
    """Ratios the issue asks for, from whatever parts have finished."""
    decode = {tp: r.get("decode") for tp, r in report["decode"].items() if isinstance(r, dict)}
    base = decode.get("1")
    if base:
        report["decode_step_ratio_vs_tp1"] = {
            tp: d["median_step_ms"] / base["median_step_ms"] for tp, d in decode.items() if d and tp != "1"}
        ratio2 = report["decode_step_ratio_vs_tp1"].get("2")
        if ratio2 is not None:
            report["decode_tp2_target"] = f"<= {DECODE_TARGET_TP2} x TP=1 at batch 1"
            report["decode_tp2_meets_target"] = ratio2 <= DECODE_TARGET_TP2
    throughput = report.get("throughput", {})
    one = [r.get("throughput") for r in throughput.get("tp1_x2_replicas", [])]
    two = throughput.get("tp2_x1_replica", {}).get("throughput")
    if len(one) == 2 and all(one):
        throughput["tp1_x2_output_tok_s"] = sum(r["output_tok_s"] for r in one)
    if two:
        throughput["tp2_x1_output_tok_s"] = two["output_tok_s"]
    if "tp1_x2_output_tok_s" in throughput and "tp2_x1_output_tok_s" in throughput:
        throughput["tp2_x1_over_tp1_x2"] = throughput["tp2_x1_output_tok_s"] / throughput["tp1_x2_output_tok_s"]


def plot(report: dict, path: Path) -> Optional[Path]:
    """Bus bandwidth by size, decode step by TP, throughput: one PNG; None without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return None
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    ax = axes[0]
    for ranks, result in sorted(report.get("allreduce", {}).items()):
        sizes = result.get("sizes") if isinstance(result, dict) else None
        if not sizes:
            continue
        xs = sorted(int(s) for s in sizes)
        for impl, style in (("ours", "-o"), ("raw_cupy", "--x")):
            ax.plot([x / 2**20 for x in xs], [sizes[str(x)][impl]["busbw_GBps"] for x in xs], style,
                    label=f"{impl}, {ranks} ranks")
    ax.set_xscale("log", base=2)
    if ax.lines:
        ax.set_yscale("log")
    ax.set_xlabel("message (MiB, bf16)")
    ax.set_ylabel("bus bandwidth (GB/s)")
    ax.set_title("all_reduce: Communicator vs raw CuPy NCCL")
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=8)
    ax = axes[1]
    decode = sorted((int(tp), r["decode"]["median_step_ms"]) for tp, r in report.get("decode", {}).items()
                    if isinstance(r, dict) and r.get("decode"))
    if decode:
        bars = ax.bar([f"TP={tp}" for tp, _ in decode], [ms for _, ms in decode], color="tab:blue")
        base = dict(decode).get(1)
        for bar, (tp, ms) in zip(bars, decode):
            label = f"{ms:.1f} ms" + (f"\n{ms / base:.2f}x" if base and tp != 1 else "")
            ax.annotate(label, (bar.get_x() + bar.get_width() / 2, ms), ha="center", va="bottom", fontsize=8)
        if base:
            ax.axhline(DECODE_TARGET_TP2 * base, color="tab:red", ls=":", label=f"TP=2 target ({DECODE_TARGET_TP2}x)")
            ax.legend(fontsize=8)
    ax.set_ylabel("median decode step (ms), batch 1")
    ax.set_title("8B-shape decode step")
    ax = axes[2]
    throughput = report.get("throughput", {})
    bars = [(name, throughput[key]) for name, key in (("TP=1 x 2 replicas", "tp1_x2_output_tok_s"),
                                                      ("TP=2 x 1 replica", "tp2_x1_output_tok_s"))
            if key in throughput]
    if bars:
        drawn = ax.bar([n for n, _ in bars], [v for _, v in bars], color=["tab:green", "tab:orange"][:len(bars)])
        for bar, (_, v) in zip(drawn, bars):
            ax.annotate(f"{v:.0f}", (bar.get_x() + bar.get_width() / 2, v), ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("output tokens/s")
    ax.set_title("throughput on the same 2 GPUs")
    machine = report.get("machine", {})
    fig.suptitle(f"kvmesh parallel replicas on {machine.get('num_gpus')} x {machine.get('gpu')}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _physical_gpus(smoke_cpu: bool) -> list[str]:
    """GPU names for CUDA_VISIBLE_DEVICES, in this process's index order (respects its own setting)."""
    if smoke_cpu:
        return ["0", "1", "2", "3"]  # nothing uses them: the engines run on CPU
    import torch
    count = torch.cuda.device_count()  # no CUDA context is created here
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible:
        return [v.strip() for v in visible.split(",") if v.strip()][:count]
    return [str(i) for i in range(count)]


def _machine(physical: list[str], smoke_cpu: bool) -> dict:
    info: dict[str, Any] = {"num_gpus": len(physical), "python": platform.python_version(),
                            "cpu_count": os.cpu_count(), "host": platform.node()}
    try:
        import torch
        info["torch"] = torch.__version__
    except ImportError:
        pass
    if smoke_cpu:
        info.update(gpu="none (CPU smoke run)", num_gpus=0)
        return info
    try:
        names = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                               capture_output=True, text=True, timeout=30).stdout.split("\n")
        info["gpu"] = names[0].strip() or "unknown"
    except (OSError, subprocess.TimeoutExpired):
        info["gpu"] = "unknown"
    try:
        import cupy  # noqa: F401  (the NCCL path needs it)
        info["cupy"] = cupy.__version__
    except ImportError:
        info["cupy"] = None
    return info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("part", choices=["all", "allreduce", "engine"],
                        help="all: the whole benchmark; allreduce / engine: one subprocess's part")
    parser.add_argument("--out", default=None, help="report JSON (a PNG and a .logs folder beside it)")
    parser.add_argument("--budget-s", type=float, default=360.0,
                        help="wall-clock budget: parts that would not fit are skipped, none runs past it")
    parser.add_argument("--num-requests", type=int, default=256, help="throughput load (TP=1: half per replica)")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--decode-steps", type=int, default=96, help="decode steps timed at batch 1")
    parser.add_argument("--profile-steps", type=int, default=0,
                        help="then this many decode steps under a kernel profile in every rank (GPU)")
    parser.add_argument("--smoke-cpu", action="store_true", help="kvmesh-tiny on CPU: the plumbing only")
    parser.add_argument("--parts", default=",".join(p.name for p in PARTS),
                        help="comma-separated subset of the parts run by 'all'")
    # one subprocess's part (set by "all")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--decode", action="store_true")
    parser.add_argument("--throughput-requests", type=int, default=0)
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--timeout-s", type=float, default=120.0)
    parser.add_argument("--model-dir", default=None)
    parser.add_argument("--barrier-dir", default=None)
    parser.add_argument("--barrier-rank", type=int, default=0)
    parser.add_argument("--barrier-size", type=int, default=1)
    parser.add_argument("--barrier-timeout-s", type=float, default=240.0)
    args = parser.parse_args()
    if args.part == "allreduce":
        emit(bench_allreduce(args.ranks, args.timeout_s))
    elif args.part == "engine":
        if not args.smoke_cpu and not args.model_dir:
            args.model_dir = write_model_dir(os.path.join(tempfile.gettempdir(), "kvmesh-llama8b-shape"))
        emit(bench_engine(args))
    else:
        report = run_all(args)
        print(json.dumps(report, indent=1), flush=True)


if __name__ == "__main__":
    main()
