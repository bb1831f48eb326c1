"""The output processor alone: ms a step for N streamed requests (no engine, no model).

Each of ``--num-requests`` requests (kvmesh-tiny's tokenizer, 128-token prompts, greedy,
streamed at every step) gains one token a step for ``--max-tokens`` steps, and
``OutputProcessor.process`` turns them into ``RequestOutput``s: incremental detokenization,
stop-string checks, one cumulative output a request a step. The requests are plain stand-ins
holding what ``process`` reads. Median of ``--rounds`` rounds; bench/host_step.py measures the
same part inside a running engine (where it shares the CPU's caches with everything else).

    python bench/output_processing.py [--num-requests 128] [--max-tokens 128] [--rounds 5] [--out F]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from types import SimpleNamespace

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from bench.load_gen import machine_name  # noqa: E402
from engine.output_processor import OutputProcessor  # noqa: E402
from engine.request import FinishReason  # noqa: E402
from engine.sampling_params import SamplingParams  # noqa: E402
from engine.tiny_model import ensure_tiny_model  # noqa: E402
from engine.tokenizer import load_tokenizer  # noqa: E402


def one_round(tokenizer, num_requests: int, max_tokens: int) -> float:
    """Seconds a step in ``process``, averaged over the round's steps."""
    processor = OutputProcessor(tokenizer)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    requests = []
    for i in range(num_requests):
        processor.add(f"r{i}", None, [(i * 7 + j) % 1000 + 5 for j in range(128)], params, [f"r{i}"], 0.0)
        requests.append(SimpleNamespace(
            request_id=f"r{i}", output_token_ids=[], is_finished=False, finish_reason=None, stop_reason=None,
            error=None, first_scheduled_time=1.0, first_token_time=1.0, num_cached_tokens=0))
    total = 0.0
    for step in range(max_tokens):
        for i, req in enumerate(requests):
            req.output_token_ids.append((i * 31 + step * 17) % 2000 + 3)
            if step == max_tokens - 1:
                req.is_finished, req.finish_reason = True, FinishReason.LENGTH
        start = time.perf_counter()
        outputs, _ = processor.process(requests, {})
        total += time.perf_counter() - start
        assert len(outputs) == num_requests
    assert not processor.prompts  # every request ended
    return total / max_tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num-requests", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    tokenizer = load_tokenizer(ensure_tiny_model())
    rounds = [one_round(tokenizer, args.num_requests, args.max_tokens) * 1e3 for _ in range(args.rounds)]
    result = {"benchmark": "output_processing", "machine": machine_name(), "num_requests": args.num_requests,
              "max_tokens": args.max_tokens, "ms_per_step_rounds": [round(r, 3) for r in rounds],
              "ms_per_step_median": round(statistics.median(rounds), 3)}
    print(json.dumps(result, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
