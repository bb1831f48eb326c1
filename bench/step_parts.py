"""What each small kernel costs the batch-1 decode step, by taking it out (a GPU).

The step's GEMVs stream the weights; the rest (norms, rotary + K/V store, decode attention and
its reduce, SiLU-and-mul) is a chain of small dependent kernels whose cost under programmatic
dependent launch cannot be read off a profile (kernels overlap, and each one's duration
includes its wait). So each part is replaced by a no-op that returns a tensor of the right shape
(a view: no kernel), the engine is built with it (its CUDA graphs captured without it), and the
batch-1 graph is replayed back to back (``bench.parallel_parts.device_only_step``). The tokens
are wrong; only the times mean anything. One engine per variant, in a subprocess each:

    none        the step as it is
    norm        RMSNorm (+ residual add) -> (x, x + nothing): no kernel
    attn        paged decode attention and its split reduce -> the query
    rope_store  rotary + K/V store -> nothing (attention still runs)
    silu        SiLU-and-mul -> the gate half
    all         all four

    python bench/step_parts.py --model-dir DIR [--variants none,norm,...] [--out F]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

VARIANTS = ("none", "norm", "attn", "rope_store", "silu", "all")


def knock_out(part: str) -> None:
    """Patches ``part`` out before the engine exists (so its graphs are captured without it)."""
    from engine.attention.triton_backend import TritonBackend
    from engine.models import layers, llama
    parts = ("norm", "attn", "rope_store", "silu") if part == "all" else (part,)
    if "norm" in parts:
        layers.fused.rms_norm = lambda x, weight, eps, residual=None: (x, x if residual is None else residual)
    if "attn" in parts:
        TritonBackend._attend = lambda self, query, kv_cache, meta, scale, out: query
    if "rope_store" in parts:
        TritonBackend.forward_with_rotary = (lambda self, rotary, positions, query, key, value, kv_cache, meta,
                                             scale, *, out=None: self._attend(query, kv_cache, meta, scale, out))
    if "silu" in parts:
        llama.silu_and_mul = lambda gate_up: gate_up[..., :gate_up.shape[-1] // 2]


def run_variant(model_dir: str, part: str) -> dict:
    from bench.parallel_parts import device_only_step, dummy_gpu_config
    from engine.llm_engine import LLMEngine
    from engine.sampling_params import SamplingParams
    if part != "none":
        knock_out(part)
    engine = LLMEngine(dummy_gpu_config(model_dir, max_model_len=512, max_num_seqs=1, max_num_batched_tokens=512))
    try:
        engine.add_request("r", [7] * 128, SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True))
        while engine.has_unfinished_requests():
            engine.step()
        return {"variant": part, **device_only_step(engine)}
    finally:
        engine.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # the subprocess's variant
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.one:
        print("RESULT " + json.dumps(run_variant(args.model_dir, args.one)), flush=True)
        return
    from bench.load_gen import machine_name
    rows = []
    for part in args.variants.split(","):
        if part not in VARIANTS:
            raise SystemExit(f"unknown variant {part!r}; choose from {', '.join(VARIANTS)}")
        proc = subprocess.run([sys.executable, __file__, "--model-dir", args.model_dir, "--one", part],
                              capture_output=True, text=True, timeout=300)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if not lines:
            print(f"{part}: failed\n{proc.stderr[-2000:]}", flush=True)
            continue
        row = json.loads(lines[-1][7:])
        rows.append(row)
        base = rows[0]["graph_ms"] if rows[0]["variant"] == "none" else None
        saved = f"; {(base - row['graph_ms']) * 1e3:.0f} us less than none" if base is not None else ""
        print(f"{part}: graph {row['graph_ms']:.3f} ms, graph + LM head {row['step_ms']:.3f} ms{saved}", flush=True)
    result = {"benchmark": "step_parts", "machine": machine_name(), "model_dir": args.model_dir, "rows": rows}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
