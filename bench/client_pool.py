"""The mixed workload (``bench/mixed_workload.py``) sent from several client processes.

One asyncio process parsing every SSE chunk of 32 streams is close to saturating a core at
~4,000-4,500 streamed tokens/s: its event loop then wakes > 3 ms late hundreds of times a minute,
and each late wake-up is inter-token latency that no server caused. ``run_load(processes=N)``
gives each of N worker processes ("spawn": a fresh interpreter with its own event loop and httpx
client) a share of the workload:

    short streams  stream s runs in process s % N; its k-th request is short index
                   s + k * concurrency, so indices are unique across streams and processes, and a
                   seed gives each stream the same requests whatever N is
    long prompts   arrival j (the same seeded times as in one process) is sent by process j % N

    parent                                    worker p of N
      start N workers      -------------->      import, send "ready"
      all ready: t0 = perf_counter() + start_delay_s
      send t0              -------------->      wait for t0, send the share, drain, cancel the rest
      merge by start time  <--------------      WorkerResult(pid, records, loop lags after t0)

All workers time against the parent's ``t0``: ``perf_counter`` is CLOCK_MONOTONIC on Linux, one
clock for every process on the host (and the clock of the servers' timelines), so the records'
``start_s`` and the loop lags of all workers share one origin. ``processes=1`` is
``mixed_workload.drive`` in this process, unchanged: no subprocess, and short indices come from
one counter shared by all streams (0, 1, 2, ... in the order they are sent).
"""

from __future__ import annotations

import asyncio
import itertools
import multiprocessing
import os
import time
import traceback
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any, Optional

from bench.mixed_workload import (Record, Workload, drive, last_finish_s, loop_lag_rows, open_client,
                                  send_share)
from engine.step_timeline import StepTimeline


@dataclass(frozen=True)
class Share:
    """What one worker sends: its closed-loop streams and its long prompts."""

    stream_ids: tuple[int, ...]
    long_arrivals: tuple[tuple[int, float], ...]  # (long index, seconds after t0)


@dataclass
class WorkerResult:
    pid: int
    records: list[Record]
    loop_lags: list[tuple[float, float]]  # (seconds after t0, lag ms)
    cpu_s: float = 0.0  # the worker's user + system seconds from t0 to its end (not its start-up)


@dataclass
class WorkerError:
    traceback: str


def shares(workload: Workload, duration_s: float, processes: int) -> list[Share]:
    """The workload split over ``processes`` workers: stream s and arrival j go to s % N and j % N."""
    arrivals = list(enumerate(workload.long_arrivals(duration_s)))
    return [Share(tuple(range(p, workload.concurrency, processes)), tuple(arrivals[p::processes]))
            for p in range(processes)]


def run_load(url: str, model: str, workload: Workload, duration_s: float, drain_s: float,
             probe: Optional[dict] = None, processes: int = 1, start_delay_s: float = 0.5,
             ready_timeout_s: float = 120.0) -> tuple[list[Record], float]:
    """Runs the workload from ``processes`` client processes, as ``mixed_workload.drive`` does in
    one: returns the records (ordered by start) and the seconds from ``t0`` to the last finish.

    Requests still running ``drain_s`` after ``t0 + duration_s`` are cancelled (counted as errors).
    ``probe`` gets ``t0_monotonic_s`` and ``loop_lags`` (every worker's, merged by time; see
    ``drive``) and, with several processes, ``workers``: per worker its pid, how many streams,
    long prompts, records and loop lags it had, and its CPU seconds over the load (``cpu_s``: the
    workers have exited when this returns, so ``bench/proc_cpu.py`` cannot see them). Raises
    ``RuntimeError`` when a worker fails, exits or does not answer in time (``ready_timeout_s`` to
    start; the load's length plus 60 s to end).
    """
    if processes < 1:
        raise ValueError(f"processes must be at least 1, got {processes}")
    if processes == 1:
        return asyncio.run(drive(url, model, workload, duration_s, drain_s, probe=probe))
    ctx = multiprocessing.get_context("spawn")
    workers: list[tuple[multiprocessing.process.BaseProcess, Connection, Share]] = []
    try:
        for p, share in enumerate(shares(workload, duration_s, processes)):
            conn, child_conn = ctx.Pipe()
            proc = ctx.Process(target=_worker, name=f"load-client-{p}", daemon=True,
                               args=(child_conn, url, model, workload, share, duration_s, drain_s,
                                     probe is not None))
            proc.start()
            child_conn.close()
            workers.append((proc, conn, share))
        deadline = time.monotonic() + ready_timeout_s
        for proc, conn, _ in workers:
            _receive(proc, conn, deadline)  # "ready": imported, about to wait for t0
        t0 = time.perf_counter() + start_delay_s
        for _, conn, _ in workers:
            conn.send(t0)
        deadline = time.monotonic() + start_delay_s + duration_s + drain_s + 60
        results: list[WorkerResult] = [_receive(proc, conn, deadline) for proc, conn, _ in workers]
    finally:
        for proc, conn, _ in workers:
            conn.close()
            proc.join(timeout=10)
            if proc.is_alive():
                proc.terminate()
                proc.join()
    records = sorted((r for result in results for r in result.records), key=lambda r: r.start_s)
    elapsed = last_finish_s(records, t0)
    if probe is not None:
        probe.update(t0_monotonic_s=t0, loop_lags=sorted(lag for result in results for lag in result.loop_lags),
                     workers=[{"pid": result.pid, "num_streams": len(share.stream_ids),
                               "num_long": len(share.long_arrivals), "num_records": len(result.records),
                               "num_loop_lags": len(result.loop_lags), "cpu_s": round(result.cpu_s, 3)}
                              for (_, _, share), result in zip(workers, results)])
    return records, elapsed


def _receive(proc: multiprocessing.process.BaseProcess, conn: Connection, deadline: float) -> Any:
    """The worker's next message, by the ``time.monotonic()`` deadline; raises on errors and exits."""
    if not conn.poll(max(0.0, deadline - time.monotonic())):
        raise RuntimeError(f"{proc.name} did not answer in time")
    try:
        message = conn.recv()
    except EOFError:
        proc.join(timeout=5)
        raise RuntimeError(f"{proc.name} exited (code {proc.exitcode}) without answering") from None
    if isinstance(message, WorkerError):
        raise RuntimeError(f"{proc.name} failed:\n{message.traceback}")
    return message


def _worker(conn: Connection, url: str, model: str, workload: Workload, share: Share, duration_s: float,
            drain_s: float, watch_lags: bool) -> None:
    """One worker process: say ready, wait for t0, send the share, answer with a ``WorkerResult``."""
    try:
        conn.send("ready")
        t0 = conn.recv()
        cpu0 = time.process_time()  # waiting for t0 sleeps, so this is the load's CPU
        result = asyncio.run(_send(url, model, workload, share, t0, duration_s, drain_s, watch_lags))
        result.cpu_s = time.process_time() - cpu0
        conn.send(result)
    except Exception:  # noqa: BLE001 - the parent raises it with this traceback
        conn.send(WorkerError(traceback.format_exc()))
    finally:
        conn.close()


async def _send(url: str, model: str, workload: Workload, share: Share, t0: float, duration_s: float,
                drain_s: float, watch_lags: bool) -> WorkerResult:
    async with open_client(url, workload, duration_s, drain_s) as client:
        lags = StepTimeline() if watch_lags else None  # only its loop-lag watcher is used
        short_indices = [itertools.count(s, workload.concurrency) for s in share.stream_ids]
        records = await send_share(client, model, workload, short_indices, list(share.long_arrivals), t0,
                                   duration_s, drain_s, lags)
    return WorkerResult(os.getpid(), records, loop_lag_rows(lags, t0) if lags is not None else [])
