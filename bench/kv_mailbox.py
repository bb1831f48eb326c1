"""KV header latency, prefill replica -> decode replica: the Ray mailbox actor vs the TCP channel.

Every disaggregated hand-off first posts a ``KVTransferHeader`` to the decode replica's
mailbox, and the decode side's ``KVReceiver`` reads it before the KV bytes can move. Two
Ray actors stand in for the two replicas (no model): the consumer owns the mailbox and
reads it in a loop, the producer posts its send time every ``--gap-ms``. Per message:
post start -> ``next`` returned on the consumer (``time.time``, one host).

(a) ``ray``: ``RayMailbox`` (engine/kv_transfer/mailbox.py): the producer's call to the
    mailbox actor, then the consumer's pending ``next`` returning, two Ray hops;
(b) ``channel``: ``ChannelMailbox`` (router/kv_mailbox.py): one frame over a persistent
    TCP connection to the consumer's ``StreamReceiver``.

Prints p50/p90/p99 of each and the ratio, and writes JSON naming the machine:

    python bench/kv_mailbox.py                       # bench/results/kv_mailbox_cpu.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import ray  # noqa: E402

from bench.load_gen import machine_name, percentiles  # noqa: E402
from bench.routing_compare import start_ray  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
KINDS = ("ray", "channel")


@ray.remote(num_cpus=0.1)
class Consumer:
    """The decode replica's part: owns the mailbox and reads it."""

    async def open(self, kind: str) -> Any:
        if kind == "ray":
            from engine.kv_transfer.mailbox import RayMailbox
            self.mailbox = RayMailbox.create()
        else:
            from router.kv_mailbox import ChannelMailbox
            self.mailbox = await ChannelMailbox.create()
        return self.mailbox  # pickled: a handle the producer can post to

    async def read(self, n: int) -> list[float]:
        latencies = []
        for _ in range(n):
            sent = await self.mailbox.next(10.0)
            latencies.append(time.time() - sent)
        return latencies


@ray.remote(num_cpus=0.1)
class Producer:
    """The prefill replica's part: posts a header-sized message (its send time) every gap."""

    async def post(self, mailbox: Any, n: int, gap_s: float) -> None:
        for _ in range(n):
            await mailbox.post(time.time())
            await asyncio.sleep(gap_s)


def measure(kind: str, n: int, gap_s: float, warm_up: int = 20) -> dict:
    consumer, producer = Consumer.remote(), Producer.remote()
    mailbox = ray.get(consumer.open.remote(kind))
    for count in (warm_up, n):  # the first messages pay for connections and actor start-up
        reading = consumer.read.remote(count)
        ray.get(producer.post.remote(mailbox, count, gap_s))
        latencies = ray.get(reading)
    for actor in (consumer, producer):
        ray.kill(actor)
    return {key: round(value * 1e3, 4) for key, value in percentiles(latencies).items() if key != "count"} | {"count": n}


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num-messages", type=int, default=300)
    parser.add_argument("--gap-ms", type=float, default=5.0, help="between posts (a hand-off every gap)")
    parser.add_argument("--out", default=str(RESULTS / "kv_mailbox_cpu.json"))
    args = parser.parse_args(argv)
    start_ray(num_cpus=2)
    results = {}
    for kind in KINDS:
        results[kind] = measure(kind, args.num_messages, args.gap_ms / 1e3)
        r = results[kind]
        print(f"{kind:8s} post -> next ms  p50 {r['p50']:.3f}  p90 {r['p90']:.3f}  p99 {r['p99']:.3f}")
    ratio = results["channel"]["p50"] / results["ray"]["p50"]
    print(f"channel / ray (p50): {ratio:.3f}x")
    out = {"benchmark": "kv_mailbox", "machine": machine_name(), "num_messages": args.num_messages,
           "gap_ms": args.gap_ms, "latency_ms": results, "ratio_p50_channel_over_ray": round(ratio, 4)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
