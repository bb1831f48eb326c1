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
scheduler config is recorded with it (e.g. whether it scheduled asynchronously). With Ray
workers, ``rank_skew`` lines up the ranks' step-call stamps over the timed steps: how much later
than the first each rank read a call, and how long it ran and answered it.
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
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.parallel_parts import (RESULT_PREFIX, bench_allreduce, bench_engine, emit,  # noqa: E402
                                  write_model_dir)

DECODE_TARGET_TP2 = 0.6  # issue #5: TP=2's decode step <= 0.6 x TP=1's at batch 1
KILL_GRACE_S = 10.0  # after SIGTERM, before SIGKILL


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
    parser.add_argument("--num-requests", type=int, default=None,
                        help="throughput load (TP=1: half per replica); default 256, or 16 with --smoke-cpu "
                             "(256 on the 2-core CPU box ran the TP=1 part past its 240 s)")
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
    parser.add_argument("--executor", choices=["auto", "uni", "ray"], default="auto",
                        help="distributed_executor_backend (ray at TP=1: one worker actor, the TP=2 host path)")
    parser.add_argument("--decode", action="store_true")
    parser.add_argument("--throughput-requests", type=int, default=0)
    parser.add_argument("--throughput-profile-steps", type=int, default=0,
                        help="full-batch decode steps of the warm-up run to profile (kernels, every rank)")
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--timeout-s", type=float, default=120.0)
    parser.add_argument("--model-dir", default=None)
    parser.add_argument("--barrier-dir", default=None)
    parser.add_argument("--barrier-rank", type=int, default=0)
    parser.add_argument("--barrier-size", type=int, default=1)
    parser.add_argument("--barrier-timeout-s", type=float, default=240.0)
    args = parser.parse_args()
    if args.num_requests is None:
        args.num_requests = 16 if args.smoke_cpu else 256
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
