"""Serving-path overhead: TTFT through the HTTP server vs the offline ``AsyncLLM``, same prompts.

One process, one machine: starts a private local Ray, deploys the real Serve app
(``router.app.build_app``: proxy -> OpenAIIngress -> request router -> LLMServer ->
AsyncLLM) with one fixed replica, then

1. sends ``--num-requests`` streaming chat requests one at a time (concurrency 1),
   ~``--prompt-tokens``-token prompts, and measures TTFT at the client: request sent ->
   first SSE chunk (it carries the first token; with kvmesh-tiny's gibberish that
   token's text is often empty, so the first chunk *with text*, which is what
   ``load_gen.py`` times, is reported apart). Each request carries ``x-kvmesh-trace: 1``, so the
   server appends a ``: kvmesh-trace {...}`` SSE comment (ignored by OpenAI clients)
   with ``time.monotonic()`` stamps of the request's way through the ingress, the
   replica and the engine (CLOCK_MONOTONIC: one clock for all processes of the host);
   the per-phase medians are the overhead breakdown;
2. interleaved with those, runs prompts of the same length through an ``AsyncLLM`` of
   the same engine config in this process (time from ``generate()`` to its first
   output, and to its first output with text), so both see the same load from the
   rest of the machine;
3. measures output tokens/s, TPOT and ITL at ``--concurrency`` (streaming, ``bench/load_gen.py``'s
   client) through the server, then offline with the same concurrency (server idle).
   Wall times swing with whatever else runs on a shared box; the CPU time each Serve
   actor (proxy, ingress, replica; per thread too; ``bench/proc_cpu.py``) spends per output
   token, minus its idle use measured right after, barely does: it is the steadier measure of per-token
   serving overhead (the replica's share includes the engine; compare with the offline
   engine's CPU per token).

The cluster gets ``RAY_SERVE_PROXY_USE_GRPC`` as ``kvmesh serve`` sets it (``--proxy-grpc``).
``--direct-http`` sends every request to the ingress's own port (``http.direct_port``) instead
of Serve's proxy. ``--stream-interval`` / ``--max-stream-updates-per-step`` set the replica's streaming
(``replicas.*`` of the config; unset: the config defaults). ``--py-spy DIR`` records the
replica's and the ingress's stacks per thread during the load (``py-spy`` on PATH).
Writes JSON naming the machine under bench/results/; ``--merge`` gathers several runs
(e.g. before/after a change, alternated, ``label=path`` each) into one file with medians:

    python bench/http_overhead.py --name run_a          # bench/results/run_a.json
    python bench/http_overhead.py --name http_overhead_tiny_cpu \
        --merge before=bench/results/run_a.json after=bench/results/run_b.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Optional

import httpx

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from bench import load_gen  # noqa: E402
from bench.proc_cpu import cpu_delta, cpu_seconds, per_token_ms, role_pids  # noqa: E402
from bench.routing_compare import free_port, start_ray  # noqa: E402
from router.config import DeploymentConfig, parse_deployment_config  # noqa: E402

TRACE_HEADER = "x-kvmesh-trace"
TRACE_PREFIX = ": kvmesh-trace "

# Consecutive stamps of one request, in the order they happen; a missing stamp (an older
# server, or a path that does not record it) merges its phase into the next one.
STAMPS = (
    ("client_sent", "client: request sent"),
    ("ingress_arrival", "client -> proxy -> ingress handler (HTTP, proxy, Serve hop)"),
    ("ingress_body_read", "ingress: request body fetched from the proxy (Serve hop)"),
    ("ingress_tokenized", "ingress: body parse, chat template, tokenize"),
    ("ingress_dispatch", "ingress: admission, block hashes, handle call"),
    ("replica_received", "handle call -> replica generate_deltas() (request router, Serve hop)"),
    ("engine_arrival", "replica -> engine add_request (engine thread wake-up)"),
    ("engine_scheduled", "engine: queued until scheduled"),
    ("engine_first_token", "engine: prefill forward + sample"),
    ("replica_first_output", "engine step end -> replica has the output (thread hand-off)"),
    ("ingress_first_output", "replica -> ingress (Serve streaming hop)"),
    ("ingress_response", "ingress: first output -> handler returns the StreamingResponse"),
    ("ingress_stream_start", "ingress: response start -> SSE body generator runs"),
    ("ingress_first_chunk", "ingress: first SSE chunk built"),
    ("client_first_chunk", "ingress -> proxy -> client"),
)


def bench_config(args: argparse.Namespace, direct_port: Optional[int] = None) -> DeploymentConfig:
    """kvmesh-tiny on CPU, one fixed replica, no admission limit (the offline engine uses ``.engine``);
    ``direct_port``: the ingress also serves there (``http.direct_port``)."""
    return parse_deployment_config({
        "name": "http-overhead",
        "model": "kvmesh-tiny",
        "served_model_name": "kvmesh-tiny",
        "engine": {"dtype": "float32", "device": "cpu", "max_model_len": 1024, "block_size": 16,
                   "num_blocks": 1024, "max_num_seqs": max(args.concurrency, 16),
                   "max_num_batched_tokens": 2048, "enable_prefix_caching": True},
        "replicas": {"min_replicas": 1, "max_replicas": 1, "num_cpus": args.replica_cpus,
                     "max_ongoing_requests": 4 * max(args.concurrency, 16),
                     **({"stream_interval": args.stream_interval} if args.stream_interval > 1 else {}),
                     **({"max_stream_updates_per_step": args.max_stream_updates_per_step or None}
                        if args.max_stream_updates_per_step is not None else {})},
        "routing": {"kind": "prefix_aware", "stats_period_s": 0.5},
        "admission": {"max_waiting_per_replica": None},
        "ingress": {"num_cpus": 0.1, "num_replicas": 1},
        **({"http": {"direct_port": direct_port}} if direct_port else {}),
    })


def make_prompts(tokenizer, num: int, target_tokens: int, seed: int) -> list[tuple[str, list[int]]]:
    """``num`` unique user messages whose rendered chat prompt has about ``target_tokens`` tokens.

    Unique from their first words, so no prompt hits another's prefix-cache blocks.
    Returns (message text, rendered prompt token ids).
    """
    import random

    from engine.tokenizer import apply_chat_template, encode_prompt
    rng = random.Random(seed)
    prompts = []
    for i in range(num):
        words = [f"Note {i}:"] + [rng.choice(load_gen.WORDS) for _ in range(4 * target_tokens)]
        lo, hi = 1, len(words)
        while lo < hi:  # the most words whose prompt fits target_tokens
            mid = (lo + hi + 1) // 2
            ids = encode_prompt(tokenizer, apply_chat_template(
                tokenizer, [{"role": "user", "content": " ".join(words[:mid])}]))
            lo, hi = (mid, hi) if len(ids) <= target_tokens else (lo, mid - 1)
        text = " ".join(words[:lo])
        ids = encode_prompt(tokenizer, apply_chat_template(tokenizer, [{"role": "user", "content": text}]))
        prompts.append((text, ids))
    return prompts


# ---- through the server -------------------------------------------------------------------------
async def http_ttft_one(client: httpx.AsyncClient, model: str, text: str, max_tokens: int) -> dict:
    """One streamed chat request; the client's stamps plus the server's trace stamps."""
    body = {"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": max_tokens,
            "temperature": 0.0, "ignore_eos": True, "stream": True}
    stamps: dict = {}
    num_chunks = 0
    stamps["client_sent"] = time.monotonic()
    async with client.stream("POST", "/v1/chat/completions", json=body,
                             headers={TRACE_HEADER: "1"}) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if line.startswith(TRACE_PREFIX):
                server = json.loads(line[len(TRACE_PREFIX):])
                stamps.update({k: v for k, v in server.items() if k not in stamps})
                continue
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: "):])
            if not chunk.get("choices"):
                continue
            stamps.setdefault("client_first_chunk", time.monotonic())
            if any((c.get("delta") or {}).get("content") for c in chunk["choices"]):
                num_chunks += 1
                stamps.setdefault("client_first_content", time.monotonic())
    stamps["client_done"] = time.monotonic()
    stamps["num_content_chunks"] = num_chunks
    return stamps


async def ttft_c1(base_url: str, model: str, engine, prompts: list, offline_prompts: list,
                  max_tokens: int) -> tuple[list[dict], list[float]]:
    """Concurrency 1, alternating: one request through the server, one offline."""
    traces, offline = [], []
    async with httpx.AsyncClient(base_url=base_url, timeout=120) as client:
        for (text, _), offline_prompt in zip(prompts, offline_prompts):
            traces.append(await http_ttft_one(client, model, text, max_tokens))
            if engine is not None:
                offline += await offline_ttft(engine, [offline_prompt], max_tokens)
    return traces, offline


async def http_load(base_url: str, model: str, prompts: list,
                    args: argparse.Namespace) -> tuple[list, float]:
    """``load_gen``'s streaming client over our prompts, ``args.concurrency`` in flight."""
    load_args = argparse.Namespace(model=model, endpoint="chat", max_tokens=args.load_max_tokens,
                                   temperature=0.0, ignore_eos=True)
    records = [load_gen.RequestRecord(i, False) for i in range(len(prompts))]
    semaphore = asyncio.Semaphore(args.concurrency)
    limits = httpx.Limits(max_connections=2 * args.concurrency + 16)
    async with httpx.AsyncClient(base_url=base_url, limits=limits, timeout=300) as client:
        t0 = time.perf_counter()

        async def one(i: int) -> None:
            async with semaphore:
                await load_gen.run_one(client, load_args, records[i], prompts[i][0], t0)
        await asyncio.gather(*(one(i) for i in range(len(prompts))))
        return records, time.perf_counter() - t0


def breakdown(traces: list[dict]) -> list[dict]:
    """Median ms per phase between consecutive stamps present in every trace."""
    keys = [k for k, _ in STAMPS if all(k in t for t in traces)]
    labels = dict(STAMPS)
    rows = []
    for a, b in zip(keys, keys[1:]):
        values = [(t[b] - t[a]) * 1000 for t in traces]
        rows.append({"from": a, "to": b, "what": labels[b], "p50_ms": statistics.median(values),
                     "mean_ms": statistics.fmean(values)})
    return rows


# ---- offline ------------------------------------------------------------------------------------
async def offline_ttft(engine, prompts: list, max_tokens: int) -> list[tuple[float, Optional[float]]]:
    """(time to the first output, time to the first output with text) per prompt."""
    import uuid

    from engine import SamplingParams
    ttfts = []
    for _, ids in prompts:
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        start = time.monotonic()
        first = first_text = None
        async for out in engine.generate(ids, params, f"offline-ttft-{uuid.uuid4().hex}"):
            now = time.monotonic() - start
            first = first if first is not None else now
            if first_text is None and out.outputs[0].text:
                first_text = now
        ttfts.append((first, first_text))
    return ttfts


async def offline_load(engine, prompts: list, concurrency: int, max_tokens: int) -> dict:
    """Output tokens/s, TTFT, ITL and TPOT of ``AsyncLLM`` with ``concurrency`` streams in flight."""
    from engine import SamplingParams
    semaphore = asyncio.Semaphore(concurrency)
    ttfts: list[float] = []
    itls: list[float] = []
    tpots: list[float] = []
    num_tokens = 0

    async def one(i: int, ids: list[int]) -> None:
        nonlocal num_tokens
        async with semaphore:
            params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
            start = last = time.monotonic()
            first = None
            seen = 0
            async for out in engine.generate(ids, params, f"offline-load-{i}"):
                now = time.monotonic()
                new = len(out.outputs[0].token_ids) - seen
                if new <= 0:
                    continue
                if seen == 0:
                    first = now
                    ttfts.append(now - start)
                else:
                    itls.extend([(now - last) / new] * new)
                seen += new
                last = now
            num_tokens += seen
            if first is not None and seen > 1:
                tpots.append((last - first) / (seen - 1))

    t0 = time.monotonic()
    await asyncio.gather(*(one(i, ids) for i, (_, ids) in enumerate(prompts)))
    duration = time.monotonic() - t0
    return {"num_requests": len(prompts), "duration_s": duration, "total_completion_tokens": num_tokens,
            "output_token_throughput_per_s": num_tokens / duration,
            "ttft_s": load_gen.percentiles(ttfts), "itl_s": load_gen.percentiles(itls),
            "tpot_s": load_gen.percentiles(tpots)}


def offline_engine(cfg: DeploymentConfig, args: argparse.Namespace):
    import torch

    from engine import AsyncLLM
    # The replica's torch uses OMP_NUM_THREADS = its Ray CPUs (at least 1); do the same here.
    torch.set_num_threads(max(int(args.replica_cpus), 1))
    return AsyncLLM.from_config(cfg.engine)


# ---- main ---------------------------------------------------------------------------------------
def wait_ready(url: str, model: str, timeout_s: float = 240.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            r = httpx.post(f"{url}/v1/completions", timeout=60,
                           json={"model": model, "prompt": "warm up", "max_tokens": 2})
            if r.status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"the app at {url} did not become ready in {timeout_s:.0f}s")


def fmt_ms(stats: dict) -> str:
    return " ".join(f"{q} {stats[q] * 1000:7.1f}" for q in ("p50", "p90", "p99")) + " ms"


def measure_c1(url: str, model: str, engine, prompts: list, offline_prompts: list,
               args: argparse.Namespace) -> dict:
    """Concurrency 1: TTFT through the server (traced) and offline, interleaved."""
    cpu0 = cpu_seconds()
    traces, offline = asyncio.run(ttft_c1(url, model, engine, prompts, offline_prompts, args.max_tokens))
    cpu = cpu_delta(cpu0, cpu_seconds())
    ttfts = [t["client_first_chunk"] - t["client_sent"] for t in traces]
    ttfts_text = [t["client_first_content"] - t["client_sent"] for t in traces if "client_first_content" in t]
    out = {"http_c1": {"ttft_s": load_gen.percentiles(ttfts),
                       "ttft_first_text_s": load_gen.percentiles(ttfts_text),
                       # the bench process also ran the offline engine: only the Serve actors count
                       "cpu_ms_per_request": {k: round(v * 1000 / len(traces), 2)
                                              for k, v in cpu.items() if k != "bench"},
                       "breakdown": breakdown(traces), "traces": traces}}
    print(f"HTTP    c=1 TTFT {fmt_ms(out['http_c1']['ttft_s'])}  "
          f"(first text: {fmt_ms(out['http_c1']['ttft_first_text_s'])})", flush=True)
    if engine is not None:
        offline_ttfts = [t for t, _ in offline]
        offline_text = [t for _, t in offline if t is not None]
        out["offline_c1"] = {"ttft_s": load_gen.percentiles(offline_ttfts),
                             "ttft_first_text_s": load_gen.percentiles(offline_text)}
        out["ttft_overhead_p50_ms"] = (statistics.median(ttfts) - statistics.median(offline_ttfts)) * 1000
        print(f"offline c=1 TTFT {fmt_ms(out['offline_c1']['ttft_s'])}  "
              f"(first text: {fmt_ms(out['offline_c1']['ttft_first_text_s'])})", flush=True)
        print(f"serving overhead on TTFT p50 (first token): {out['ttft_overhead_p50_ms']:.1f} ms", flush=True)
    return out


def start_py_spy(out_dir: str, roles: tuple[str, ...] = ("replica", "ingress")) -> list:
    """``py-spy record`` (collapsed stacks, per thread, idle frames dropped) of each role's
    process for the duration of the load; ``stop_py_spy`` ends them and writes the files."""
    import subprocess
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    procs = []
    for role in roles:
        for pid in role_pids(role):
            path = Path(out_dir) / f"{role}_{pid}.txt"
            procs.append(subprocess.Popen(
                ["py-spy", "record", "--pid", str(pid), "--format", "raw", "--threads", "--nonblocking",
                 "--rate", "200", "--output", str(path)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    time.sleep(1.0)  # attached before the load starts
    return procs


def stop_py_spy(procs: list) -> None:
    import signal
    for proc in procs:
        proc.send_signal(signal.SIGINT)
    for proc in procs:
        proc.wait(timeout=60)


def measure_load(url: str, model: str, prompts: list, args: argparse.Namespace) -> dict:
    """``args.concurrency`` streams through the server: tokens/s, latencies, CPU per token."""
    spies = start_py_spy(args.py_spy) if args.py_spy else []
    cpu0 = cpu_seconds(by_thread=True)
    records, duration = asyncio.run(http_load(url, model, prompts, args))
    cpu = cpu_delta(cpu0, cpu_seconds(by_thread=True))
    stop_py_spy(spies)
    s = load_gen.summarize(records, duration)
    s["cpu_s"] = cpu
    # What the app burns with no request at all (polling, stats, metrics) is measured right
    # after and subtracted for the load's duration.
    idle0, idle_start = cpu_seconds(by_thread=True), time.monotonic()
    time.sleep(args.idle_s)
    idle_s = time.monotonic() - idle_start
    idle = {k: v / idle_s for k, v in cpu_delta(idle0, cpu_seconds(by_thread=True)).items()}
    s["idle_cpu_s_per_s"] = {k: round(v, 4) for k, v in idle.items()}
    s["net_cpu_ms_per_token"] = per_token_ms({k: v - idle.get(k, 0.0) * duration for k, v in cpu.items()},
                                             s["total_completion_tokens"])
    print(f"HTTP    c={args.concurrency} {s['output_token_throughput_per_s']:.0f} tok/s, "
          f"TPOT {fmt_ms(s['tpot_s'])}, ITL {fmt_ms(s['itl_s'])}, TTFT {fmt_ms(s['ttft_s'])}, "
          f"{s['num_ok']}/{s['num_requests']} ok", flush=True)
    net = s["net_cpu_ms_per_token"]
    print("HTTP    CPU ms per output token, idle use subtracted: "
          + ", ".join(f"{k} {v:.2f}" for k, v in net.items() if v >= 0.005 and "/" not in k), flush=True)
    print("        by thread: " + ", ".join(f"{k} {v:.2f}" for k, v in net.items() if v >= 0.02 and "/" in k),
          flush=True)
    return s


def measure_offline_load(engine, prompts: list, args: argparse.Namespace) -> dict:
    cpu0 = cpu_seconds()["bench"]
    off = asyncio.run(offline_load(engine, prompts, args.concurrency, args.load_max_tokens))
    cpu_ms = (cpu_seconds()["bench"] - cpu0) * 1000
    off["cpu_ms_per_token"] = round(cpu_ms / off["total_completion_tokens"], 3)
    print(f"offline c={args.concurrency} {off['output_token_throughput_per_s']:.0f} tok/s, "
          f"TPOT {fmt_ms(off['tpot_s'])}, ITL {fmt_ms(off['itl_s'])}, "
          f"CPU {off['cpu_ms_per_token']:.2f} ms per output token", flush=True)
    return off


# ---- several runs in one file -------------------------------------------------------------------
def headline(run: dict) -> dict:
    """The figures a comparison needs from one run."""
    c1, load = run["http_c1"], run["http_load"]
    out = {"http_c1_ttft_p50_ms": c1["ttft_s"]["p50"] * 1000,
           "http_load_tok_s": load["output_token_throughput_per_s"],
           "http_load_tpot_p50_ms": load["tpot_s"]["p50"] * 1000,
           "http_load_itl_p50_ms": load["itl_s"]["p50"] * 1000,
           "net_cpu_ms_per_token": {k: v for k, v in load["net_cpu_ms_per_token"].items()
                                    if k in ("proxy", "ingress", "replica", "replica/kvmesh-engine")}}
    net = load["net_cpu_ms_per_token"]
    if "replica/kvmesh-engine" in net:  # the engine thread is named (engine/async_engine.py)
        # The replica's threads other than the engine loop: Serve's streaming, the event loop.
        out["net_cpu_ms_per_token"]["replica_other_threads"] = round(net["replica"] - net["replica/kvmesh-engine"], 3)
    if "offline_c1" in run:
        out.update(offline_c1_ttft_p50_ms=run["offline_c1"]["ttft_s"]["p50"] * 1000,
                   ttft_overhead_p50_ms=run["ttft_overhead_p50_ms"],
                   offline_load_tok_s=run["offline_load"]["output_token_throughput_per_s"],
                   offline_load_tpot_p50_ms=run["offline_load"]["tpot_s"]["p50"] * 1000,
                   offline_cpu_ms_per_token=run["offline_load"]["cpu_ms_per_token"])
    return out


def merge(name: str, labelled_paths: list[str], note: str) -> Path:
    """``label=path.json`` runs (e.g. before/after, alternated) into one file with per-label medians."""
    runs: dict[str, list[dict]] = {}
    for item in labelled_paths:
        label, _, path = item.partition("=")
        runs.setdefault(label, []).append(json.loads(Path(path).read_text()))
    medians = {}
    for label, results in runs.items():
        heads = [headline(r) for r in results]
        medians[label] = {k: statistics.median(h[k] for h in heads)
                          for k in heads[0] if not isinstance(heads[0][k], dict)}
        medians[label]["net_cpu_ms_per_token"] = {
            k: round(statistics.median(h["net_cpu_ms_per_token"].get(k, 0.0) for h in heads), 3)
            for k in heads[0]["net_cpu_ms_per_token"]}
        medians[label]["num_runs"] = len(results)
    first = next(iter(runs.values()))[0]
    out = {"benchmark": "http_overhead", "machine": first["machine"], "note": note,
           "median_of_runs": medians, "runs": runs}
    path = load_gen.RESULTS_DIR / f"{name}.json"
    path.write_text(json.dumps(out, indent=1))
    print(json.dumps(medians, indent=1))
    print(f"wrote {path}")
    return path


# ---- main ---------------------------------------------------------------------------------------
def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num-requests", type=int, default=40, help="concurrency-1 TTFT requests")
    parser.add_argument("--prompt-tokens", type=int, default=254, help="rendered chat prompt length")
    parser.add_argument("--max-tokens", type=int, default=16, help="output tokens at concurrency 1")
    parser.add_argument("--concurrency", type=int, default=32, help="streams in flight for tokens/s")
    parser.add_argument("--load-requests", type=int, default=96)
    parser.add_argument("--load-max-tokens", type=int, default=64)
    parser.add_argument("--replica-cpus", type=float, default=1.0, help="Ray CPUs of the replica")
    parser.add_argument("--idle-s", type=float, default=8.0, help="idle CPU measurement after the load")
    parser.add_argument("--skip-offline", action="store_true")
    parser.add_argument("--stream-interval", type=int, default=1,
                        help="replicas.stream_interval: tokens per streamed update of a request")
    parser.add_argument("--max-stream-updates-per-step", type=int, default=None,
                        help="replicas.max_stream_updates_per_step (widen intervals under load; 0: never)")
    parser.add_argument("--py-spy", metavar="DIR", default=None,
                        help="profile the replica and ingress with py-spy during the load (collapsed stacks "
                             "per thread into DIR; adds the sampler's own load, so CPU figures of such a "
                             "run are not comparable)")
    parser.add_argument("--proxy-grpc", type=int, choices=(0, 1), default=1,
                        help="RAY_SERVE_PROXY_USE_GRPC for the cluster (1: what `kvmesh serve` sets up)")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                        help="environment for the whole local Ray cluster (e.g. RAY_SERVE_* experiments)")
    parser.add_argument("--direct-http", action="store_true",
                        help="measure through the ingress's own port (http.direct_port), not Serve's proxy")
    parser.add_argument("--label", default="", help="free text saved with the result (e.g. before/after)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", default="http_overhead_tiny_cpu", help="result file stem")
    parser.add_argument("--merge", nargs="+", metavar="LABEL=PATH",
                        help="write runs saved earlier into one file (--name) with medians per label; "
                             "runs nothing")
    parser.add_argument("--note", default="", help="with --merge: what the runs compare")
    args = parser.parse_args(argv)
    if args.merge:
        merge(args.name, args.merge, args.note)
        return 0

    from ray import serve

    from engine.tiny_model import resolve_model_path
    from engine.tokenizer import load_tokenizer
    from router.app import build_app

    direct_port = free_port() if args.direct_http else None
    cfg = bench_config(args, direct_port)
    model = cfg.served_model_name
    tokenizer = load_tokenizer(cfg.engine.model.tokenizer or resolve_model_path(cfg.engine.model.model))
    prompts_c1 = make_prompts(tokenizer, args.num_requests, args.prompt_tokens, args.seed)
    prompts_load = make_prompts(tokenizer, args.load_requests, args.prompt_tokens, args.seed + 1)
    # Offline prompts differ from the server's (same lengths), so neither hits the other's cache.
    prompts_c1_offline = make_prompts(tokenizer, args.num_requests, args.prompt_tokens, args.seed + 2)
    prompts_load_offline = make_prompts(tokenizer, args.load_requests, args.prompt_tokens, args.seed + 3)
    port = free_port()
    while port == direct_port:
        port = free_port()
    serve_url = f"http://127.0.0.1:{port}"
    url = f"http://127.0.0.1:{direct_port}" if direct_port else serve_url  # what the clients use
    env = {"RAY_SERVE_PROXY_USE_GRPC": str(args.proxy_grpc), **dict(e.partition("=")[::2] for e in args.env)}
    os.environ.update(env)  # inherited by the local raylet and so by every Ray worker
    result: dict = {"machine": load_gen.machine_name(), "python": sys.version.split()[0],
                    "time": time.time(), "args": vars(args), "env": env,
                    "load_average_1m_before": os.getloadavg()[0],  # this box may be shared
                    "prompt_tokens_p50": statistics.median(len(ids) for _, ids in prompts_c1)}
    start_ray(num_cpus=4)
    engine = None
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(cfg), name=cfg.name, route_prefix="/")
        wait_ready(serve_url, model)
        wait_ready(url, model)
        engine = None if args.skip_offline else offline_engine(cfg, args)
        warm = make_prompts(tokenizer, 3, args.prompt_tokens, args.seed + 4)
        asyncio.run(ttft_c1(url, model, engine, warm, warm, args.max_tokens))
        result.update(measure_c1(url, model, engine, prompts_c1, prompts_c1_offline, args))
        result["http_load"] = measure_load(url, model, prompts_load, args)
        if engine is not None:
            result["offline_load"] = measure_offline_load(engine, prompts_load_offline, args)
    finally:
        import ray
        if engine is not None:
            engine.shutdown()
        serve.shutdown()
        ray.shutdown()
    result["load_average_1m_after"] = os.getloadavg()[0]

    print("\nTTFT breakdown at c=1 (median ms per phase):")
    for row in result["http_c1"]["breakdown"]:
        print(f"  {row['p50_ms']:7.2f}  {row['what']}")
    load_gen.write_result(args.name, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
