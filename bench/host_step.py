"""The engine's host work per step at a full batch, part by part (model excluded).

``LLMEngine`` (kvmesh-tiny on the CPU, one in-process worker) runs ``--num-requests`` streamed
requests of ``--prompt-len`` -> ``--max-tokens`` tokens, queued at once, twice (the first run
warms up); in the second, each host part of a step is timed around its call and reported in ms
a step: the scheduler's ``schedule`` and ``update_from_output``, the output processor (detokenize,
stop strings, ``RequestOutput``s), and the runner's input preparation, state update and sampling
batch. On a GPU these run while the device computes the step before (async scheduling), so
their sum bounds the step from below once the device's part is shorter (a TP=2 rank at 128
requests: bench/device/h200_hostpath.sh).

``--model-dir DIR`` (a GPU): that checkpoint's shapes with dummy bf16 weights on the GPU
instead (bench/parallel_parts.write_model_dir), one in-process worker, CUDA graphs. Two more
parts are timed then: ``execute_model_async`` (the whole launch of a step: the runner's state
update and input preparation above, the graph replay, the LM head and the device->host copy)
and ``StepFuture.result`` (the wait for the step before: time the host spent waiting for the
device, which is what remains when the host is not the bound).

``--executor ray``: the step runs in a Ray worker (one per TP rank, ``--tp``) on the shared-memory
step channel, as a TP replica's does. The driver's parts are timed as above, with
``execute_model_async`` now only the send and ``_RayStepFuture.result`` the wait for the
worker's reply; the workers' own step stamps over the timed run give their side
(``rank_skew``: read to launched, the wait for the step before, the reply, and the driver's
turnaround from the last reply to the next call).

    python bench/host_step.py [--num-requests 128] [--prompt-len 128] [--max-tokens 128]
                              [--model-dir DIR] [--executor ray --tp N] [--out F]
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from bench.load_gen import machine_name  # noqa: E402
from engine import sampler  # noqa: E402
from engine.config import EngineConfig  # noqa: E402
from engine.llm_engine import LLMEngine  # noqa: E402
from engine.sampling_params import SamplingParams  # noqa: E402


def _timed(totals: dict, tag: str, fn):
    @functools.wraps(fn)
    def run(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            totals[tag] += time.perf_counter() - start
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num-requests", type=int, default=128)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--model-dir", default=None, help="a checkpoint's shapes, dummy weights, on the GPU")
    parser.add_argument("--executor", choices=("auto", "ray"), default="auto")
    parser.add_argument("--tp", type=int, default=1, help="TP ranks (Ray workers) with --executor ray")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    max_model_len = args.prompt_len + args.max_tokens
    ray_workers = args.executor == "ray"
    if ray_workers:
        import ray
        ray.init(address="local", include_dashboard=False, log_to_driver=False)  # a private one
    options = dict(distributed_executor_backend=args.executor, tensor_parallel_size=args.tp)
    if args.model_dir:
        from bench.parallel_parts import dummy_gpu_config
        config = dummy_gpu_config(args.model_dir, max_model_len=max(max_model_len, 512),
                                  max_num_seqs=max(args.num_requests, 8), max_num_batched_tokens=8192, **options)
    else:
        config = EngineConfig.create(
            model="kvmesh-tiny", dtype="float32", device="cpu", max_model_len=max_model_len,
            max_num_seqs=args.num_requests, max_num_batched_tokens=8192, distributed_backend="gloo",
            num_blocks=args.num_requests * (-(-max_model_len // 16) + 1), **options)
    engine = LLMEngine(config)
    totals: dict[str, float] = collections.defaultdict(float)
    scheduler = engine.scheduler
    parts = [(scheduler, "schedule", "scheduler.schedule"),
             (scheduler, "update_from_output", "scheduler.update_from_output"),
             (engine.output_processor, "process", "output_processor.process")]
    if ray_workers:  # the runner is in the workers: the driver's send, and its wait for a reply
        from engine import executor_ray
        parts += [(engine.executor, "execute_model_async", "execute_model_async (send)"),
                  (engine.executor, "execute_model", "execute_model (send, wait for the reply)"),
                  (engine.executor, "check_health", "executor.check_health"),
                  (engine.executor, "_launch", "executor._launch (the channel's send)"),
                  (engine.executor, "_collect", "executor._collect (the replies)")]
        executor_ray._RayStepFuture.result = _timed(totals, "_RayStepFuture.result (wait for the reply)",
                                                    executor_ray._RayStepFuture.result)
    else:
        runner = engine.executor.runner
        parts += [(runner, "_prepare_inputs", "runner._prepare_inputs"),
                  (runner, "_update_states", "runner._update_states"),
                  (engine.executor, "execute_model_async", "execute_model_async (launch)")]
    for obj, name, tag in parts:
        setattr(obj, name, _timed(totals, tag, getattr(obj, name)))
    if args.model_dir and not ray_workers:
        from engine import runner_types
        runner_types.StepFuture.result = _timed(totals, "StepFuture.result (wait)", runner_types.StepFuture.result)
    build = sampler.SamplingBatch.from_requests.__func__
    sampler.SamplingBatch.from_requests = classmethod(_timed(totals, "SamplingBatch.from_requests", build))
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)

    def run(tag: str) -> tuple[int, float]:
        for i in range(args.num_requests):
            engine.add_request(f"{tag}{i}", [(i * 7 + j) % 1000 + 5 for j in range(args.prompt_len)], params)
        steps, start = 0, time.perf_counter()
        while engine.has_unfinished_requests():
            engine.step()
            steps += 1
        return steps, time.perf_counter() - start

    run("warm-")
    totals.clear()
    steps, seconds = run("timed-")
    timed = {tag: round(total / steps * 1e3, 3) for tag, total in sorted(totals.items(), key=lambda kv: -kv[1])}
    result = {"benchmark": "host_step", "machine": machine_name(), "num_requests": args.num_requests,
              "prompt_len": args.prompt_len, "max_tokens": args.max_tokens, "steps": steps,
              "model": args.model_dir or "kvmesh-tiny (CPU)", "executor": args.executor, "tp": args.tp,
              "step_ms": round(seconds / steps * 1e3, 3), "host_ms_per_step": timed}
    if ray_workers:
        from engine.profiling import rank_skew
        result["rank_skew"] = rank_skew(engine.executor.step_stamps(steps))
        engine.shutdown()
    print(json.dumps(result, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
