"""The ``kvmesh`` command.

    kvmesh serve [CONFIG] [--host H] [--port P]   deploy the OpenAI API on Ray Serve, until Ctrl-C
    kvmesh status [--address URL] [--api-key K]   replicas, queue depth, KV usage, prefix-cache hits
    kvmesh generate --prompt "..." [--model M]    offline generation with engine.LLM

Heavy imports (ray, torch) happen inside the subcommands so ``kvmesh --help`` is instant.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import urllib.error
import urllib.request
from typing import Optional, Sequence

DEFAULT_CONFIG = "configs/tiny.yaml"


def _cmd_serve(args: argparse.Namespace) -> int:
    from router.config import load_deployment_config
    try:
        cfg = load_deployment_config(args.config)
    except ValueError as exc:
        print(f"kvmesh serve: {exc}", file=sys.stderr)
        return 2
    overrides = {key: value for key, value in (("host", args.host), ("port", args.port),
                                                ("direct_port", args.direct_port)) if value is not None}
    if overrides:  # into the config, so the ingress's direct server binds the same host
        try:
            cfg = dataclasses.replace(cfg, http=dataclasses.replace(cfg.http, **overrides))
        except ValueError as exc:
            print(f"kvmesh serve: http: {exc}", file=sys.stderr)
            return 2
    from router.app import serve_forever
    serve_forever(cfg)
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    url = args.address.rstrip("/") + "/kvmesh/status"
    request = urllib.request.Request(url)
    if args.api_key:
        request.add_header("Authorization", f"Bearer {args.api_key}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            status = json.loads(response.read())
    except (urllib.error.URLError, OSError) as exc:
        print(f"kvmesh status: cannot reach {url}: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(status, indent=2))
        return 0
    replicas = status.get("replicas", [])
    print(f"app {status.get('app')}  model {status.get('model')}  router {status.get('router')}  "
          f"replicas {len(replicas)} (min {status.get('min_replicas')}, max {status.get('max_replicas')})")
    header = f"{'replica':<12} {'healthy':<8} {'waiting':>7} {'running':>7} {'kv_usage':>8} " \
             f"{'free/blocks':>12} {'prefix_hit':>10} {'gen_tokens':>10}"
    print(header)
    print("-" * len(header))
    for r in replicas:
        print(f"{r['replica_id']:<12} {str(r['is_healthy']).lower():<8} {r['num_waiting']:>7} "
              f"{r['num_running']:>7} {r['kv_usage']:>8.1%} "
              f"{str(r['num_free_blocks']) + '/' + str(r['num_blocks']):>12} "
              f"{r['prefix_cache_hit_rate']:>10.1%} {r['num_generation_tokens']:>10}")
    if replicas:
        total_waiting = sum(r["num_waiting"] for r in replicas)
        total_running = sum(r["num_running"] for r in replicas)
        print(f"total: {total_waiting} waiting, {total_running} running")
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    from engine import LLM, SamplingParams
    try:
        params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                                top_p=args.top_p, seed=args.seed, n=args.n)
        llm = LLM(model=args.model, max_model_len=args.max_model_len, dtype=args.dtype)
        outputs = llm.generate([args.prompt], params)
    except ValueError as exc:
        print(f"kvmesh generate: {exc}", file=sys.stderr)
        return 2
    for completion in outputs[0].outputs:
        if args.n > 1:
            print(f"--- sample {completion.index} ({completion.finish_reason}) ---")
        print(completion.text)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvmesh", description="kvmesh LLM serving cluster")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="serve the OpenAI API on Ray Serve (local Ray, or RAY_ADDRESS)")
    serve.add_argument("config", nargs="?", default=DEFAULT_CONFIG,
                       help=f"deployment YAML (default {DEFAULT_CONFIG})")
    serve.add_argument("--host", default=None, help="HTTP host (default: the config's, 127.0.0.1)")
    serve.add_argument("--port", type=int, default=None, help="HTTP port (default: the config's, 8000)")
    serve.add_argument("--direct-port", type=int, default=None,
                       help="also serve from the ingress replicas on this port, no proxy hop "
                            "(default: the config's http.direct_port, off)")
    serve.set_defaults(func=_cmd_serve)

    status = sub.add_parser("status", help="replicas, queue depth, KV usage, prefix-cache hit rate")
    status.add_argument("--address", default="http://127.0.0.1:8000", help="the server's base URL")
    status.add_argument("--api-key", default=None, help="API key, if the server requires one")
    status.add_argument("--json", action="store_true", help="print the raw JSON")
    status.set_defaults(func=_cmd_status)

    gen = sub.add_parser("generate", help="offline generation with engine.LLM (no server)")
    gen.add_argument("--model", default="kvmesh-tiny", help="local HF folder or kvmesh-tiny")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--max-tokens", type=int, default=32)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("-n", type=int, default=1, help="samples per prompt")
    gen.add_argument("--max-model-len", type=int, default=None)
    gen.add_argument("--dtype", default="auto")
    gen.set_defaults(func=_cmd_generate)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
