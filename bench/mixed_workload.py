"""The mixed workload of ``bench/disagg_serve.py``: seeded short and long requests, streamed.

    short   a closed loop of ``concurrency`` streams, each sending its next request when one ends
    long    open loop: one long prompt every ~``long_interval_s`` (uniform 0.5x-1.5x, seeded)

Prompts are random token ids sent to ``/v1/completions`` with ``ignore_eos``, so lengths
are exact and no prefix is shared; the same seed gives the same requests in the same order.
Per request the client records its TTFT and every gap between content chunks (ITL).
``drive`` runs it all in this process's event loop; ``bench/client_pool.py`` spreads it over
several processes (``send_share`` is the part each of them runs).
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import random
import time
from dataclasses import dataclass, field
from typing import Iterator, Optional

import httpx

from bench import load_gen
from engine.step_timeline import StepTimeline


@dataclass(frozen=True)
class Workload:
    """The mixed workload; the same ``seed`` gives the same requests in the same order."""

    concurrency: int  # closed-loop short streams
    short_prompt: tuple[int, int]  # tokens, inclusive range
    short_output: tuple[int, int]
    long_interval_s: float  # mean gap between long prompts (uniform 0.5x-1.5x)
    long_prompt: tuple[int, int]
    long_output: int
    token_id_range: tuple[int, int]  # prompt token ids drawn from [lo, hi)
    seed: int = 0

    def short(self, i: int) -> tuple[list[int], int]:
        rng = random.Random(f"{self.seed}-short-{i}")
        return self._ids(rng, rng.randint(*self.short_prompt)), rng.randint(*self.short_output)

    def long(self, i: int) -> tuple[list[int], int]:
        rng = random.Random(f"{self.seed}-long-{i}")
        return self._ids(rng, rng.randint(*self.long_prompt)), self.long_output

    def long_arrivals(self, duration_s: float) -> list[float]:
        """Seconds after the start at which long prompts are sent (the first after one gap)."""
        rng = random.Random(f"{self.seed}-arrivals")
        times, t = [], 0.0
        while True:
            t += self.long_interval_s * rng.uniform(0.5, 1.5)
            if t >= duration_s:
                return times
            times.append(t)

    def _ids(self, rng: random.Random, n: int) -> list[int]:
        return [rng.randrange(*self.token_id_range) for _ in range(n)]


@dataclass
class Record:
    kind: str  # short | long
    index: int
    prompt_tokens: int
    max_tokens: int
    start_s: float = 0.0  # since the load started
    ok: bool = False
    error: Optional[str] = None
    ttft_s: Optional[float] = None
    e2e_s: Optional[float] = None
    itl_s: list[float] = field(default_factory=list)
    num_chunks: int = 0  # content chunks (about one per token)
    completion_tokens: int = 0


async def stream_one(client: httpx.AsyncClient, model: str, record: Record, prompt: list[int], t0: float) -> None:
    body = {"model": model, "prompt": prompt, "max_tokens": record.max_tokens, "temperature": 0.0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    record.start_s = start - t0
    last: Optional[float] = None
    try:
        async with client.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code != 200:
                record.error = f"{response.status_code}: {(await response.aread()).decode(errors='replace')[:200]}"
                return
            async for chunk in load_gen.sse_chunks(response):
                if "error" in chunk:
                    record.error = json.dumps(chunk["error"])[:200]
                    return
                if chunk.get("usage"):
                    record.completion_tokens = chunk["usage"]["completion_tokens"]
                if not any(c.get("text") for c in chunk.get("choices", [])):
                    continue
                now = time.perf_counter()
                if last is None:
                    record.ttft_s = now - start
                else:
                    record.itl_s.append(now - last)
                last = now
                record.num_chunks += 1
        record.e2e_s = time.perf_counter() - start
        record.ok = record.ttft_s is not None
        if not record.ok:
            record.error = "no content"
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        record.error = repr(exc)[:200]


async def drive(url: str, model: str, workload: Workload, duration_s: float, drain_s: float,
                probe: Optional[dict] = None) -> tuple[list[Record], float]:
    """Runs the workload in this process; returns the records and the seconds from the start to the
    last finish (``bench/client_pool.py`` spreads it over several processes).

    Requests still running ``drain_s`` after the last one was sent are cancelled (counted as errors).
    Short requests take their indices from one counter, in the order they are sent.
    ``probe`` (a dict) gets ``t0_monotonic_s`` (the records' time origin: ``perf_counter`` and
    ``monotonic`` are both CLOCK_MONOTONIC on Linux, the clock of the servers' timelines) and
    ``loop_lags``: when this client's own event loop woke more than 3 ms late from a 2 ms sleep
    (``StepTimeline.watch_loop_lag``), as (t_s, lag_ms), so a stall the client itself caused is not
    blamed on the servers.
    """
    async with open_client(url, workload, duration_s, drain_s) as client:
        t0 = time.perf_counter()
        lags = StepTimeline() if probe is not None else None  # only its loop-lag watcher is used
        next_short = itertools.count()  # shared by all streams
        records = await send_share(client, model, workload, [next_short] * workload.concurrency,
                                   list(enumerate(workload.long_arrivals(duration_s))), t0, duration_s,
                                   drain_s, lags)
        elapsed = last_finish_s(records, t0)
        if lags is not None:
            probe.update(t0_monotonic_s=t0, loop_lags=loop_lag_rows(lags, t0))
    return records, elapsed


def open_client(url: str, workload: Workload, duration_s: float, drain_s: float) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=workload.concurrency + 64, max_keepalive_connections=workload.concurrency + 64)
    return httpx.AsyncClient(base_url=url, limits=limits, timeout=httpx.Timeout(duration_s + drain_s + 60))


async def send_share(client: httpx.AsyncClient, model: str, workload: Workload,
                     short_indices: list[Iterator[int]], long_arrivals: list[tuple[int, float]], t0: float,
                     duration_s: float, drain_s: float, lags: Optional[StepTimeline]) -> list[Record]:
    """Sends one process's share of the workload from ``t0`` on (waits for it); returns its records.

    ``short_indices``: one iterator per closed-loop stream, giving the short indices it sends (the
    same iterator for several streams shares their sequence). ``long_arrivals``: (long index, seconds
    after ``t0``). Requests still running ``drain_s`` after ``t0 + duration_s`` are cancelled and
    recorded as errors. ``lags``, if given, watches this loop from ``t0`` to the end of the drain.
    """
    delay = t0 - time.perf_counter()
    if delay > 0:
        await asyncio.sleep(delay)
    records: list[Record] = []
    lag_task = (asyncio.create_task(lags.watch_loop_lag(period_s=0.002, min_lag_s=0.003))
                if lags is not None else None)

    async def short_loop(indices: Iterator[int]) -> None:
        while time.perf_counter() - t0 < duration_s:
            i = next(indices)
            prompt, max_tokens = workload.short(i)
            record = Record("short", i, len(prompt), max_tokens)
            records.append(record)
            await stream_one(client, model, record, prompt, t0)

    async def long_at(i: int, at_s: float) -> None:
        await asyncio.sleep(max(0.0, at_s - (time.perf_counter() - t0)))
        prompt, max_tokens = workload.long(i)
        record = Record("long", i, len(prompt), max_tokens)
        records.append(record)
        await stream_one(client, model, record, prompt, t0)

    tasks = [asyncio.create_task(short_loop(indices)) for indices in short_indices]
    tasks += [asyncio.create_task(long_at(i, at_s)) for i, at_s in long_arrivals]
    if tasks:
        drain_end = t0 + duration_s + drain_s
        _, pending = await asyncio.wait(tasks, timeout=max(0.0, drain_end - time.perf_counter()))
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    for record in records:
        if not record.ok and record.error is None:
            record.error = "cancelled: still running at the end of the drain"
    if lag_task is not None:
        lag_task.cancel()
        await asyncio.gather(lag_task, return_exceptions=True)
    return records


def last_finish_s(records: list[Record], t0: float) -> float:
    """Seconds from ``t0`` to the last successful finish (to now if none finished)."""
    ends = [r.start_s + r.e2e_s for r in records if r.ok]
    return max(ends) if ends else time.perf_counter() - t0


def loop_lag_rows(lags: StepTimeline, t0: float) -> list[tuple[float, float]]:
    """The watched loop lags as (seconds after ``t0``, lag ms)."""
    return [(round(e.start_s - t0, 4), round((e.end_s - e.start_s) * 1e3, 2)) for e in lags.events]


def summarize(records: list[Record], elapsed_s: float) -> dict:
    def stats(rs: list[Record]) -> dict:
        ok = [r for r in rs if r.ok]
        tokens = sum(r.completion_tokens for r in ok)
        itl = [x for r in ok for x in r.itl_s]
        out = {"num_requests": len(rs), "num_ok": len(ok), "num_errors": len(rs) - len(ok),
               "output_tokens": tokens, "output_tok_s": tokens / elapsed_s if elapsed_s else 0.0,
               "prompt_tokens": sum(r.prompt_tokens for r in ok),
               "ttft_s": load_gen.percentiles([r.ttft_s for r in ok]),
               "itl_s": {**load_gen.percentiles(itl), "p99.9": _quantile(itl, 0.999)},
               "e2e_s": load_gen.percentiles([r.e2e_s for r in ok]),
               "chunks_per_token": (sum(r.num_chunks for r in ok) / tokens) if tokens else None}
        return out

    errors: dict[str, int] = {}
    for r in records:
        if not r.ok:
            key = (r.error or "?").split(":")[0][:40]
            errors[key] = errors.get(key, 0) + 1
    return {"elapsed_s": elapsed_s, "all": stats(records),
            "short": stats([r for r in records if r.kind == "short"]),
            "long": stats([r for r in records if r.kind == "long"]), "errors": errors}


def rounded(record: dict) -> dict:
    """Seconds to the microsecond (keeps the JSON of a long GPU run small)."""
    return {k: ([round(x, 6) for x in v] if k == "itl_s" else round(v, 6) if isinstance(v, float) else v)
            for k, v in record.items()}


def _quantile(values: list[float], q: float) -> Optional[float]:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


async def warm_up(url: str, model: str, workload: Workload) -> None:
    """One long and a few short requests (CUDA graphs, the first KV pair, both replicas), not measured."""
    warm = dataclasses.replace(workload, seed=workload.seed + 10_000)
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(300)) as client:
        jobs = []
        for i in range(2):
            prompt, _ = warm.long(i)
            jobs.append(stream_one(client, model, Record("long", i, len(prompt), 2), prompt, time.perf_counter()))
        for i in range(min(workload.concurrency, 8)):
            prompt, _ = warm.short(i)
            jobs.append(stream_one(client, model, Record("short", i, len(prompt), 8), prompt, time.perf_counter()))
        await asyncio.gather(*jobs)
