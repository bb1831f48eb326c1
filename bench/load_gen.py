"""Load generator for the OpenAI API of a running kvmesh (or any OpenAI-compatible) server.

Streams every request (SSE) and measures, per request, the time to first token
(TTFT), the inter-token latencies (ITL: gaps between content chunks; a server that
is behind may send several tokens in one chunk), the time per output token after
the first (TPOT: (end-to-end - TTFT) / (completion tokens - 1), whatever the chunking)
and the end-to-end latency; reports p50/p90/p99 and throughput, writes JSON naming
the client machine and a PNG plot under bench/results/.

Prompts: a share ``--shared-prefix-ratio`` of the requests starts with one of
``--num-prefixes`` long shared prefixes (a system prompt, a document) followed by
a unique question; the rest are unique. This is what prefix-aware routing and the
engine's prefix cache are for; the server's ``/kvmesh/status`` before and after
is recorded so the prefix-cache hit rates show up next to the latencies.

    kvmesh serve configs/tiny.yaml &
    python bench/load_gen.py --num-requests 64 --concurrency 8 --shared-prefix-ratio 0.75
    python bench/load_gen.py --request-rate 4 --num-requests 100 --endpoint completions
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import AsyncIterator, Optional

import httpx

RESULTS_DIR = Path(__file__).resolve().parent / "results"

WORDS = ("alpha beta gamma delta cache block token router replica prefix engine model serve "
         "queue batch latency stream request answer river mountain cloud garden window paper "
         "music light ocean forest planet story market signal bridge engine silver orange").split()


@dataclass
class RequestRecord:
    index: int
    has_shared_prefix: bool
    ok: bool = False
    status: Optional[int] = None
    error: Optional[str] = None
    ttft_s: Optional[float] = None
    e2e_s: Optional[float] = None
    itl_s: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    start_s: float = 0.0  # since the run started


def machine_name() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"CPU: {cpu} ({os.cpu_count()} cores), {platform.system()} {platform.release()}"


def make_prompts(args: argparse.Namespace) -> list[tuple[str, bool]]:
    rng = random.Random(args.seed)
    words = lambda n: " ".join(rng.choice(WORDS) for _ in range(n))  # noqa: E731
    prefixes = [f"Document {i}: {words(args.prefix_len)}\n" for i in range(args.num_prefixes)]
    prompts = []
    for i in range(args.num_requests):
        if prefixes and rng.random() < args.shared_prefix_ratio:
            prompts.append((f"{rng.choice(prefixes)}Question {i}: {words(args.suffix_len)}?", True))
        else:
            prompts.append((f"Note {i}: {words(args.prefix_len + args.suffix_len)}?", False))
    return prompts


def request_body(args: argparse.Namespace, prompt: str) -> dict:
    body = {"model": args.model, "max_tokens": args.max_tokens, "temperature": args.temperature,
            "stream": True, "stream_options": {"include_usage": True}}
    if args.ignore_eos:
        body["ignore_eos"] = True
    if args.endpoint == "chat":
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    return body


async def sse_chunks(response: httpx.Response) -> AsyncIterator[dict]:
    """The JSON chunks of an OpenAI server-sent-event stream, up to ``data: [DONE]``."""
    async for line in response.aiter_lines():
        if not line.startswith("data: "):
            continue
        data = line[len("data: "):]
        if data == "[DONE]":
            return
        yield json.loads(data)


async def run_one(client: httpx.AsyncClient, args: argparse.Namespace, record: RequestRecord,
                  prompt: str, t0: float) -> None:
    path = "/v1/chat/completions" if args.endpoint == "chat" else "/v1/completions"
    start = time.perf_counter()
    record.start_s = start - t0
    last: Optional[float] = None
    try:
        async with client.stream("POST", path, json=request_body(args, prompt)) as response:
            record.status = response.status_code
            if response.status_code != 200:
                record.error = (await response.aread()).decode(errors="replace")[:300]
                return
            async for chunk in sse_chunks(response):
                if "error" in chunk:
                    record.error = json.dumps(chunk["error"])[:300]
                    return
                if chunk.get("usage"):
                    record.prompt_tokens = chunk["usage"]["prompt_tokens"]
                    record.completion_tokens = chunk["usage"]["completion_tokens"]
                has_content = any((c.get("delta") or {}).get("content") or c.get("text")
                                  for c in chunk.get("choices", []))
                if not has_content:
                    continue
                now = time.perf_counter()
                if last is None:
                    record.ttft_s = now - start
                else:
                    record.itl_s.append(now - last)
                last = now
        record.e2e_s = time.perf_counter() - start
        record.ok = True
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        record.error = repr(exc)[:300]


async def run(args: argparse.Namespace) -> tuple[list[RequestRecord], float]:
    prompts = make_prompts(args)
    records = [RequestRecord(i, shared) for i, (_, shared) in enumerate(prompts)]
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=max(args.concurrency, 1) * 2 + 16)
    semaphore = asyncio.Semaphore(args.concurrency) if args.concurrency else None
    rng = random.Random(args.seed + 1)
    async with httpx.AsyncClient(base_url=args.base_url, headers=headers, limits=limits,
                                 timeout=httpx.Timeout(args.timeout)) as client:
        t0 = time.perf_counter()

        async def one(i: int) -> None:
            if semaphore is None:
                await run_one(client, args, records[i], prompts[i][0], t0)
                return
            async with semaphore:
                await run_one(client, args, records[i], prompts[i][0], t0)

        tasks = []
        for i in range(len(prompts)):
            tasks.append(asyncio.create_task(one(i)))
            if args.request_rate:
                await asyncio.sleep(rng.expovariate(args.request_rate))  # Poisson arrivals
        await asyncio.gather(*tasks)
        duration = time.perf_counter() - t0
    return records, duration


def percentiles(values: list[float]) -> dict:
    if not values:
        return {"p50": None, "p90": None, "p99": None, "mean": None, "count": 0}
    ordered = sorted(values)

    def pick(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]
    return {"p50": pick(0.50), "p90": pick(0.90), "p99": pick(0.99),
            "mean": statistics.fmean(ordered), "count": len(ordered)}


def summarize(records: list[RequestRecord], duration: float) -> dict:
    ok = [r for r in records if r.ok]
    completion_tokens = sum(r.completion_tokens for r in ok)
    summary = {
        "num_requests": len(records), "num_ok": len(ok), "num_errors": len(records) - len(ok),
        "duration_s": duration,
        "request_throughput_per_s": len(ok) / duration if duration else 0.0,
        "output_token_throughput_per_s": completion_tokens / duration if duration else 0.0,
        "total_prompt_tokens": sum(r.prompt_tokens for r in ok),
        "total_completion_tokens": completion_tokens,
        "ttft_s": percentiles([r.ttft_s for r in ok if r.ttft_s is not None]),
        "itl_s": percentiles([x for r in ok for x in r.itl_s]),
        "tpot_s": percentiles([(r.e2e_s - r.ttft_s) / (r.completion_tokens - 1) for r in ok
                               if r.ttft_s is not None and r.e2e_s is not None
                               and r.completion_tokens > 1]),
        "e2e_s": percentiles([r.e2e_s for r in ok if r.e2e_s is not None]),
    }
    for shared in (True, False):
        key = "ttft_s_shared_prefix" if shared else "ttft_s_unique"
        summary[key] = percentiles([r.ttft_s for r in ok if r.ttft_s is not None
                                    and r.has_shared_prefix == shared])
    errors: dict[str, int] = {}
    for r in records:
        if not r.ok:
            errors[str(r.status)] = errors.get(str(r.status), 0) + 1
    summary["errors_by_status"] = errors
    return summary


def server_status(args: argparse.Namespace) -> Optional[dict]:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    try:
        r = httpx.get(f"{args.base_url}/kvmesh/status", headers=headers, timeout=10)
        return r.json() if r.status_code == 200 else None
    except httpx.HTTPError:
        return None


def plot(records: list[RequestRecord], summary: dict, title: str, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in records if r.ok and r.ttft_s is not None]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    ax = axes[0]
    for shared, color, label in ((True, "tab:blue", "shared prefix"), (False, "tab:orange", "unique")):
        xs = [r.start_s for r in ok if r.has_shared_prefix == shared]
        ys = [r.ttft_s * 1000 for r in ok if r.has_shared_prefix == shared]
        ax.scatter(xs, ys, s=10, color=color, label=label)
    ax.set_xlabel("request start (s)")
    ax.set_ylabel("TTFT (ms)")
    ax.set_title("Time to first token")
    ax.legend()
    for ax, values, name in ((axes[1], [x * 1000 for r in ok for x in r.itl_s], "Inter-token latency"),
                             (axes[2], [r.e2e_s for r in ok], "End-to-end latency")):
        if values:
            ordered = sorted(values)
            ax.plot(ordered, [(i + 1) / len(ordered) for i in range(len(ordered))])
        ax.set_title(name)
        ax.set_xlabel("ms" if "Inter" in name else "s")
        ax.set_ylabel("CDF")
        ax.grid(alpha=0.3)
    fig.suptitle(f"{title}\n{summary['num_ok']}/{summary['num_requests']} ok, "
                 f"{summary['request_throughput_per_s']:.2f} req/s, "
                 f"{summary['output_token_throughput_per_s']:.1f} output tok/s", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def format_ms(stats: dict) -> str:
    if not stats["count"]:
        return "n/a"
    return " ".join(f"{k} {stats[k] * 1000:8.1f}" for k in ("p50", "p90", "p99")) + " ms"


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base-url", default="http://127.0.0.1:8000")
    parser.add_argument("--model", default="kvmesh-tiny")
    parser.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"))
    parser.add_argument("--endpoint", choices=("chat", "completions"), default="chat")
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=8,
                        help="max requests in flight (0: unbounded, use with --request-rate)")
    parser.add_argument("--request-rate", type=float, default=None,
                        help="Poisson arrivals per second (default: send as fast as concurrency allows)")
    parser.add_argument("--shared-prefix-ratio", type=float, default=0.5,
                        help="share of requests starting with one of the shared prefixes")
    parser.add_argument("--num-prefixes", type=int, default=4)
    parser.add_argument("--prefix-len", type=int, default=120, help="words in a shared prefix")
    parser.add_argument("--suffix-len", type=int, default=12, help="words after the prefix")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--ignore-eos", action="store_true", help="always generate max_tokens")
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", default=None, help="result file stem (default: load_gen_<time>)")
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args(argv)
    if not 0.0 <= args.shared_prefix_ratio <= 1.0:
        parser.error("--shared-prefix-ratio must be in [0, 1]")
    if args.num_requests < 1:
        parser.error("--num-requests must be >= 1")

    status_before = server_status(args)
    records, duration = asyncio.run(run(args))
    status_after = server_status(args)
    summary = summarize(records, duration)

    name = args.name or time.strftime("load_gen_%Y%m%d_%H%M%S")
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    result = {"machine": machine_name(), "python": sys.version.split()[0], "time": time.time(),
              "args": vars(args), "summary": summary,
              "server_status_before": status_before, "server_status_after": status_after,
              "requests": [asdict(r) for r in records]}
    json_path = RESULTS_DIR / f"{name}.json"
    json_path.write_text(json.dumps(result, indent=1))

    print(f"{summary['num_ok']}/{summary['num_requests']} ok in {duration:.1f}s  "
          f"{summary['request_throughput_per_s']:.2f} req/s  "
          f"{summary['output_token_throughput_per_s']:.1f} output tok/s  errors {summary['errors_by_status']}")
    print(f"TTFT {format_ms(summary['ttft_s'])}")
    print(f"  shared prefix {format_ms(summary['ttft_s_shared_prefix'])}")
    print(f"  unique        {format_ms(summary['ttft_s_unique'])}")
    print(f"ITL  {format_ms(summary['itl_s'])}")
    print(f"TPOT {format_ms(summary['tpot_s'])}")
    print(f"E2E  {format_ms(summary['e2e_s'])}")
    if status_after:
        for r in status_after.get("replicas", []):
            print(f"replica {r['replica_id']}: prefix-cache hit rate {r['prefix_cache_hit_rate']:.1%}, "
                  f"{r['num_generation_tokens']} tokens generated")
    print(f"wrote {json_path}")
    if not args.no_plot:
        png_path = RESULTS_DIR / f"{name}.png"
        plot(records, summary, f"kvmesh load_gen on {machine_name()}", png_path)
        print(f"wrote {png_path}")
    return 0 if summary["num_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())


def write_result(name: str, result: dict) -> Path:
    """Writes a benchmark's JSON as bench/results/<name>.json; returns the path."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    path.write_text(json.dumps(result, indent=1))
    print(f"wrote {path}")
    return path

