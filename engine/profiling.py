"""Device-kernel profiles of engine steps, per process (a worker rank, or the driver's runner).

    profiler = KernelProfiler(); profiler.start(); ...N steps...; profiler.stop(N) -> KernelProfile

A tensor-parallel step's time is set by its slowest rank, and each rank runs in its own
process: the driver cannot see their kernels. ``Worker.profile`` runs this inside each
worker, so ``bench/parallel.py --profile`` gets one table per rank (which kernels, how many
microseconds of each per step) to put next to the step's wall time.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field
from typing import Optional

import torch


@dataclass
class KernelRow:
    name: str
    us_per_step: float
    calls_per_step: float


@dataclass
class KernelProfile:
    num_steps: int
    kernel_us_per_step: float  # sum of device-kernel time (kernels, memcpy, memset) a step
    rows: list[KernelRow] = field(default_factory=list)  # largest first
    # Device idle time a step (no kernel of this process running), by gap length: the short
    # ones are launch gaps inside a CUDA graph, the long ones the host between steps.
    idle_us_per_step: dict[str, float] = field(default_factory=dict)
    # Which kernels the idle time comes before (their launch waited): largest first.
    idle_before: list[KernelRow] = field(default_factory=list)
    # Host time in CUDA runtime / driver calls a step, every thread of the process (CUPTI):
    # launches, and the calls that block on the device (event / stream synchronize), largest first.
    host_api: list[KernelRow] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


class KernelProfiler:
    """torch.profiler over CUDA activity only (CUPTI sees every thread of the process). Without
    CUDA (CPU smoke runs) it times CPU ops instead, each op's self time, of the thread that
    started it only (a worker's step loop runs in another thread: its table comes back empty)."""

    def __init__(self) -> None:
        self._prof: Optional[torch.profiler.profile] = None
        self.cuda = torch.cuda.is_available()

    def start(self) -> None:
        if self._prof is not None:
            raise RuntimeError("profiler already running")
        _sync()
        activity = torch.profiler.ProfilerActivity.CUDA if self.cuda else torch.profiler.ProfilerActivity.CPU
        self._prof = torch.profiler.profile(activities=[activity])
        self._prof.start()

    def stop(self, num_steps: int, top: int = 25) -> KernelProfile:
        if self._prof is None:
            raise RuntimeError("profiler not running")
        _sync()
        prof, self._prof = self._prof, None
        prof.stop()
        from torch.autograd import DeviceType
        totals: dict[str, list[float]] = {}
        spans: list[tuple[float, float, str]] = []  # (start_us, end_us, name) on the device
        device = DeviceType.CUDA if self.cuda else DeviceType.CPU
        host_api: dict[str, list[float]] = {}
        for event in prof.events():
            if self.cuda and event.device_type != device and event.name.startswith("cu"):
                row = host_api.setdefault(event.name, [0.0, 0])
                row[0] += event.cpu_time_total
                row[1] += 1
            if event.device_type != device:
                continue
            row = totals.setdefault(event.name, [0.0, 0])
            row[0] += event.device_time_total if self.cuda else event.self_cpu_time_total
            row[1] += 1
            if self.cuda and getattr(event, "time_range", None) is not None:
                spans.append((event.time_range.start, event.time_range.end, event.name))
        steps = max(num_steps, 1)
        rows = _per_step(totals, steps)
        profile = KernelProfile(num_steps, sum(r.us_per_step for r in rows), rows[:top])
        if self.cuda:
            profile.idle_us_per_step, profile.idle_before = idle_gaps(spans, steps)
            profile.host_api = _per_step(host_api, steps)[:10]
        return profile


def _per_step(totals: dict[str, list[float]], steps: int) -> list[KernelRow]:
    """{name: [microseconds, calls]} over ``steps`` steps -> rows per step, largest first."""
    return sorted((KernelRow(name[:90], us / steps, calls / steps) for name, (us, calls) in totals.items()),
                  key=lambda r: -r.us_per_step)


GAP_CLASSES = ((2.0, "under_2us"), (10.0, "2_to_10us"), (100.0, "10_to_100us"), (float("inf"), "over_100us"))


def idle_gaps(spans: list[tuple[float, float, str]], steps: int, top: int = 10
              ) -> tuple[dict[str, float], list[KernelRow]]:
    """(start_us, end_us, name) of device activities -> idle microseconds a step by gap class,
    and the kernels the idle time preceded. Overlapping activities (several streams) count as busy."""
    idle = {label: 0.0 for _, label in GAP_CLASSES}
    before: dict[str, list[float]] = {}
    busy_until = None
    for start, end, name in sorted(spans):
        if busy_until is not None and start > busy_until:
            gap = start - busy_until
            idle[next(label for limit, label in GAP_CLASSES if gap < limit)] += gap / steps
            row = before.setdefault(name, [0.0, 0])
            row[0] += gap
            row[1] += 1
        busy_until = end if busy_until is None else max(busy_until, end)
    idle = {k: round(v, 2) for k, v in idle.items()}
    rows = sorted((KernelRow(n[:90], us / steps, c / steps) for n, (us, c) in before.items()),
                  key=lambda r: -r.us_per_step)
    return idle, rows[:top]


def rank_skew(stamps_per_rank: list[list[tuple[int, float, float, float, float]]]) -> dict:
    """Workers' step-loop stamps (``Worker.step_stamps``: seq, read, launched, ran, replied;
    one host's clock) -> per rank, in µs over the calls every rank has: how much later than the
    first rank it read each call (``late_read``), how long it took to queue the step's device
    work (``launch``), how long it then waited for the step before it (``wait``: device-bound
    when large), the whole run (``run`` = launch + wait) and how long the reply took to write
    (``reply``), as median and p90; and, over consecutive calls, ``turnaround_us``: from the
    last rank's reply to a call to the first rank's read of the next (the driver's host work
    between steps). Names the rank that lags each step."""
    if not stamps_per_rank or any(not stamps for stamps in stamps_per_rank):
        return {"num_calls": 0, "ranks": []}
    # per rank, seq -> (read, launched, ran, replied)
    by_seq = [{seq: rest for seq, *rest in stamps} for stamps in stamps_per_rank]
    common = sorted(set.intersection(*(set(s) for s in by_seq)))
    if not common:
        return {"num_calls": 0, "ranks": []}
    reads = {seq: [calls[seq][0] for calls in by_seq] for seq in common}
    first_read = {seq: min(r) for seq, r in reads.items()}
    last_read = {seq: max(r) for seq, r in reads.items()}

    ranks = []
    for rank, calls in enumerate(by_seq):
        ranks.append({"rank": rank,
                      "late_read_us": _spread([(calls[q][0] - first_read[q]) * 1e6 for q in common]),
                      "launch_us": _spread([(calls[q][1] - calls[q][0]) * 1e6 for q in common]),
                      "wait_us": _spread([(calls[q][2] - calls[q][1]) * 1e6 for q in common]),
                      "run_us": _spread([(calls[q][2] - calls[q][0]) * 1e6 for q in common]),
                      "reply_us": _spread([(calls[q][3] - calls[q][2]) * 1e6 for q in common]),
                      "last_to_read": sum(calls[q][0] == last_read[q] for q in common)})
    turnaround = [(first_read[q + 1] - max(calls[q][3] for calls in by_seq)) * 1e6
                  for q in common if q + 1 in first_read]
    return {"num_calls": len(common), "ranks": ranks,
            "turnaround_us": _spread(turnaround) if turnaround else None}


def ll_stamp_summary(stamps: list[tuple[int, int, int, int]]) -> dict:
    """The LL all-reduce's per-call stamps (``LLAllReduce.read_stamps``: start, waited, peers
    in, end; one GPU's globaltimer, ns) -> µs, median and p90 over the calls: ``before``, from
    the kernel's start to the end of its wait for the kernel before it (a dependent launch starts
    early); ``peers``, from there until every peer's line was in (my loads included);
    ``finish``, the sum, norm and stores after that; ``after_wait`` = peers + finish, the part of
    the call on the step's critical path; and the gap from one call's end to the next one's
    start (``between``: the GEMVs and other kernels between two calls)."""
    if not stamps:
        return {"num_calls": 0}

    calls = sorted(stamps)
    out = {"num_calls": len(calls),
           "before_us": _spread([(w - s) / 1e3 for s, w, _, _ in calls], digits=2),
           "peers_us": _spread([(i - w) / 1e3 for _, w, i, _ in calls], digits=2),
           "finish_us": _spread([(e - i) / 1e3 for _, _, i, e in calls], digits=2),
           "after_wait_us": _spread([(e - w) / 1e3 for _, w, _, e in calls], digits=2)}
    between = [(nxt[0] - cur[3]) / 1e3 for cur, nxt in zip(calls, calls[1:])]
    if between:
        out["between_us"] = _spread(between, digits=2)
    return out


def replay_decode_graph(runner, replays: int = 100, rounds: int = 5) -> Optional[dict]:
    """The batch-1 step's device work alone, with no host in the loop: the runner's batch-1 decode
    graph (embedding, the layers, the final norm) and the LM head's greedy id, replayed back to
    back and timed with CUDA events (median of ``rounds`` rounds of ``replays``), in ms:
    ``graph_ms`` the graph alone, ``step_ms`` with the LM head; and ``gemv_tuning``, the
    runner's batch-1 linear kernels and tile configs (``gemv_tune.tune``), which the graph's
    time depends on. None without that graph.

    For benchmarks, once a request has ended: the graph's static inputs still hold its last
    step, so each replay rewrites that step's K/V with the same values and reads the same
    context. In a TP group every rank must call it at once (the graphs' all-reduces)."""
    graphs = getattr(getattr(runner, "graph_runner", None), "decode", None)
    if graphs is None or 1 not in graphs.graphs:
        return None
    graph, hidden = graphs.graphs[1], graphs.outputs[1][:1]

    def timed(run_lm_head: bool) -> float:
        times = []
        for _ in range(rounds):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(replays):
                graph.replay()
                if run_lm_head:
                    runner.model.greedy_ids(hidden)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / replays)
        return statistics.median(times)

    with torch.inference_mode():
        timed(True)  # warm
        return {"graph_ms": timed(False), "step_ms": timed(True), "replays": replays, "rounds": rounds,
                "gemv_tuning": getattr(runner, "gemv_report", None)}


def _spread(values: list[float], digits: int = 1) -> dict[str, float]:
    """Median (for an even count, the upper of the two middle values) and p90 (the value 90% of
    the way along the sorted values), rounded to ``digits``."""
    ordered = sorted(values)
    return {"median": round(ordered[len(ordered) // 2], digits),
            "p90": round(ordered[int(0.9 * (len(ordered) - 1))], digits)}


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
