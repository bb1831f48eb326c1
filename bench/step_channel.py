"""Step round trip, driver -> workers -> driver: Ray actor calls vs the shared-memory step channel.

Isolates the per-step transport of ``RayExecutor`` (no model): two worker actors on this node
(the real ``Worker`` step loop, its runner calls replaced by an echo), and a decode-step-sized
``SchedulerOutput`` (``--num-requests`` cached requests, one new token each). Each round trip
sends the step to every worker and waits until every worker has answered (the output rank with
a small ``ModelOutput``, the other with None):

(a) ``ray``: what the executor does without the channel: one ``ray.put``, one
    ``execute_model.remote(ref)`` per worker, ``ray.wait`` each, ``ray.get`` all;
(b) ``shm``: ``StepChannel.send`` + ``gather`` (engine/step_channel.py), with the executor's
    CPU spin setting unless ``--spin-us`` says otherwise.

Prints median/p90 latency of each and the ratio, and writes JSON naming the machine:

    python bench/step_channel.py                       # bench/results/step_channel_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Optional

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import ray  # noqa: E402
import torch  # noqa: E402

from bench.load_gen import machine_name  # noqa: E402
from bench.routing_compare import start_ray  # noqa: E402
from engine.executor_ray import SHM_SPIN_S  # noqa: E402
from engine.scheduler_output import CachedRequestData, ModelOutput, SchedulerOutput  # noqa: E402
from engine.step_channel import StepChannel, StepMethod  # noqa: E402
from engine.worker import Worker  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


class EchoWorker(Worker):
    """A worker without a model: execute_model answers like the output rank / another rank."""

    def __init__(self, is_output_rank: bool) -> None:  # none of Worker's set-up: no model
        self.is_output_rank = is_output_rank
        self.device = torch.device("cpu")
        self._step_thread = None

    def execute_model(self, scheduler_output: SchedulerOutput) -> Optional[ModelOutput]:
        if not self.is_output_rank:
            return None
        return ModelOutput(req_ids=list(scheduler_output.num_scheduled_tokens),
                           sampled_token_ids=[[7] for _ in scheduler_output.num_scheduled_tokens])

    def run_step_call(self, call):
        if call.method is StepMethod.EXECUTE_MODEL:
            return self.execute_model(*call.args)
        return None  # shutdown


def decode_step(num_requests: int, step_id: int) -> SchedulerOutput:
    reqs = [CachedRequestData(f"req-{i}", [1000 + i], [], [], 300 + step_id) for i in range(num_requests)]
    return SchedulerOutput(scheduled_cached_reqs=reqs,
                           num_scheduled_tokens={r.request_id: 1 for r in reqs}, step_id=step_id)


def ray_round_trip(workers, so: SchedulerOutput) -> list:
    ref = ray.put(so)
    pending = [w.execute_model.remote(ref) for w in workers]
    refs = list(pending)
    while pending:
        ready, pending = ray.wait(pending, num_returns=1, timeout=60)
        ray.get(ready[0])
    return ray.get(refs)


def measure(fn, num_iters: int, num_warmup: int) -> list[float]:
    for i in range(num_warmup):
        fn(i)
    times = []
    for i in range(num_iters):
        start = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - start)
    return times


def summary(times: list[float]) -> dict:
    times = sorted(times)
    return {"median_us": round(statistics.median(times) * 1e6, 1),
            "p90_us": round(times[int(len(times) * 0.9)] * 1e6, 1),
            "mean_us": round(statistics.fmean(times) * 1e6, 1), "num_iters": len(times)}


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--num-requests", type=int, default=32, help="requests in the decode step")
    parser.add_argument("--num-iters", type=int, default=2000)
    parser.add_argument("--num-warmup", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3, help="alternating ray/shm rounds")
    parser.add_argument("--spin-us", type=float, default=None,
                        help=f"ring wait spin (default: the executor's CPU setting, {SHM_SPIN_S[False] * 1e6:.0f})")
    parser.add_argument("--name", default="step_channel_cpu")
    args = parser.parse_args(argv)

    start_ray(num_cpus=max(4, os.cpu_count() or 4))
    actor = ray.remote(EchoWorker)
    workers = [actor.options(num_cpus=0.5).remote(i == 0) for i in range(args.num_workers)]
    spin_s = SHM_SPIN_S[False] if args.spin_us is None else args.spin_us / 1e6
    channel = StepChannel(args.num_workers, spin_s, poll=lambda: None, write_timeout_s=60)
    try:
        ray.get([w.start_step_loop.remote(channel.handles(i)) for i, w in enumerate(workers)])
        so = decode_step(args.num_requests, 0)
        message_bytes = len(__import__("pickle").dumps(so, protocol=5))

        def via_shm(_: int) -> list:
            return [r.value for r in channel.gather(channel.send(StepMethod.EXECUTE_MODEL, so), 60)]

        assert via_shm(0) == ray_round_trip(workers, so)  # same answers both ways
        ray_times: list[float] = []
        shm_times: list[float] = []
        for _ in range(args.rounds):  # alternate, so both see the same background load
            ray_times += measure(lambda i: ray_round_trip(workers, so), args.num_iters // 4, args.num_warmup // 4)
            shm_times += measure(via_shm, args.num_iters, args.num_warmup)
        channel.gather(channel.send(StepMethod.SHUTDOWN), 10)
    finally:
        channel.close()
        for w in workers:
            ray.kill(w)
        ray.shutdown()

    result = {"benchmark": "step_channel", "machine": machine_name(), "python": sys.version.split()[0],
              "ray": ray.__version__, "time": time.time(), "num_workers": args.num_workers,
              "num_requests": args.num_requests, "message_bytes": message_bytes,
              "spin_us": spin_s * 1e6, "ray_calls": summary(ray_times), "shm_channel": summary(shm_times)}
    result["ray_over_shm_median"] = round(result["ray_calls"]["median_us"] / result["shm_channel"]["median_us"], 2)
    print(f"{result['machine']}: {args.num_workers} workers, {message_bytes}-byte SchedulerOutput")
    for key in ("ray_calls", "shm_channel"):
        s = result[key]
        print(f"  {key:12s} median {s['median_us']:8.1f} us  p90 {s['p90_us']:8.1f} us  ({s['num_iters']} round trips)")
    print(f"  ray / shm (median): {result['ray_over_shm_median']}x")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"{args.name}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
