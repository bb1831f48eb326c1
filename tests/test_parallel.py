"""Replica worker groups on CPU: gloo collectives, Ray actors, fp32 tiny checkpoints.

What matters, and is asserted:
- TP=2, PP=2, TP=4 (KV heads replicated), TP=2 x PP=2 (Llama, Qwen3) and EP=2 (Mixtral; Qwen2-MoE with TP=2) give the
  same greedy tokens as one worker, in a run that has chunked prefill and preemption;
- one worker as a Ray actor (``distributed_executor_backend: ray``) gives them too;
- each rank holds only its part of the model (layers, vocab rows, experts);
- sizes that do not fit the model fail at start-up, naming the numbers, before any worker starts;
- a worker killed mid-generation ends the in-flight requests with an error (no hang) and
  ``check_health`` raises from then on; a worker that dies while idle is noticed as well;
- configs/tiny-tp2.yaml serves configs/tiny.yaml's tokens through two gloo workers.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from engine import LLM, SamplingParams
from engine.config import EngineConfig
from engine.distributed.topology import rank_layout, validate_parallel_sizes
from engine.runner_types import split_microbatches
from engine.models.spec import ModelSpec
from tests.engine_helpers import assert_no_leaks, checkpoint_with_tokenizer

# Chunked prefill (16-token budget, a 30-token prompt) and preemption (16 blocks of 4 tokens
# for ~32 blocks of demand) in one run; explicit num_blocks so every config schedules alike.
ENGINE_OPTIONS = dict(dtype="float32", device="cpu", block_size=4, num_blocks=16,
                      max_num_batched_tokens=16, max_num_seqs=4, max_model_len=128)
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [20, 21, 22], list(range(30, 60)), list(range(100, 112)),
           list(range(200, 220))]
GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)

CASES = {  # name: (architecture, parallel options)
    "llama-tp2": ("llama", dict(tensor_parallel_size=2)),
    # async scheduling over Ray: each call launches a step and returns the one before
    "llama-tp2-async": ("llama", dict(tensor_parallel_size=2, async_scheduling=True)),
    "llama-pp2": ("llama", dict(pipeline_parallel_size=2)),
    # 4 query / 2 KV heads over 4 ranks: each KV head replicated on two of them
    "llama-tp4": ("llama", dict(tensor_parallel_size=4)),
    "qwen3-tp2-pp2": ("qwen3", dict(tensor_parallel_size=2, pipeline_parallel_size=2)),
    "mixtral-ep2": ("mixtral", dict(expert_parallel_size=2)),
    "qwen2_moe-tp2-ep2": ("qwen2_moe", dict(tensor_parallel_size=2, expert_parallel_size=2)),
    # one worker, as a Ray actor instead of in the engine's process (vLLM's option name)
    "llama-one-ray-worker": ("llama", dict(distributed_executor_backend="ray")),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("parallel")
    return {arch: checkpoint_with_tokenizer(arch, root / arch)[0]
            for arch in {arch for arch, _ in CASES.values()}}


@pytest.fixture(scope="module")
def single_worker_tokens(checkpoints):
    """Greedy tokens of one in-process worker per architecture; the run must preempt."""
    tokens = {}
    for arch, path in checkpoints.items():
        llm = LLM(model=path, **ENGINE_OPTIONS)
        tokens[arch] = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY)]
        assert llm.engine.get_stats().num_preemptions > 0, "the scenario must exercise preemption"
        assert_no_leaks(llm)
    return tokens


@pytest.fixture(scope="module", params=list(CASES))
def parallel_llm(request, ray_cluster, checkpoints):
    arch, options = CASES[request.param]
    llm = LLM(model=checkpoints[arch], **ENGINE_OPTIONS, **options)
    yield arch, llm
    llm.engine.shutdown()


def test_parallel_matches_single_worker(parallel_llm, single_worker_tokens):
    arch, llm = parallel_llm
    outputs = llm.generate(PROMPTS, GREEDY)
    assert [o.outputs[0].token_ids for o in outputs] == single_worker_tokens[arch]
    assert llm.engine.get_stats().num_preemptions > 0
    assert_no_leaks(llm)


def _model_facts(worker) -> dict:
    """Runs inside a worker actor: what part of the model this rank holds."""
    model = worker.runner.model
    experts = [m for name, m in model.named_modules() if name.endswith(".experts")]
    return {
        "rank": worker.rank,
        "num_layers": model.num_layers,
        "has_embed": model.model.embed_tokens is not None,
        "has_lm_head": model.lm_head is not None,
        "vocab_rows": (model.model.embed_tokens or model.lm_head).weight.shape[0],
        "local_experts": experts[0].w13.shape[0] if experts else None,
    }


def test_each_rank_holds_only_its_part(parallel_llm):
    arch, llm = parallel_llm
    executor = llm.engine.executor
    facts = ray_get_all([w.__ray_call__.remote(_model_facts) for w in executor.workers])
    spec, parallel = llm.engine.spec, llm.engine.config.parallel
    for f in facts:
        rank = f["rank"]
        assert f["num_layers"] == spec.num_layers // parallel.pipeline_parallel_size
        assert f["has_embed"] == rank.is_first_stage
        assert f["has_lm_head"] == rank.is_last_stage
        assert f["vocab_rows"] == -(-spec.vocab_size // rank.tp_size)
        if spec.moe is not None:
            assert f["local_experts"] == spec.moe.num_experts // parallel.expert_parallel_size


def test_workers_stamp_the_same_step_calls(parallel_llm):
    """Every rank reads every step call off the ring: their stamps (what bench/parallel.py
    lines up to find a rank that starts steps late) name the same calls, in order."""
    _, llm = parallel_llm
    llm.generate(PROMPTS[:1], GREEDY)
    stamps = llm.engine.executor.step_stamps(4)
    assert len(stamps) == len(llm.engine.executor.workers) and all(len(s) == 4 for s in stamps)
    assert len({tuple(seq for seq, *_ in s) for s in stamps}) == 1
    assert all(read <= launched <= ran <= replied for s in stamps for _, read, launched, ran, replied in s)


def test_device_only_replay_reaches_every_rank(parallel_llm):
    """bench/parallel.py's device-only step asks every worker at once; on the CPU there is no
    decode graph to replay, and each rank says so."""
    _, llm = parallel_llm
    executor = llm.engine.executor
    assert executor.replay_decode_graph(2, 1) == [None] * len(executor.workers)


def ray_get_all(refs):
    import ray
    return ray.get(refs, timeout=60)


# ---- sizes that do not fit fail at start-up -------------------------------------------------

@pytest.mark.parametrize("arch,options,expected", [
    ("llama", dict(tensor_parallel_size=3), r"num_attention_heads \(4\) is not divisible by tensor_parallel_size \(3\)"),
    ("llama", dict(pipeline_parallel_size=3), r"num_hidden_layers \(2\) is not divisible by pipeline_parallel_size \(3\)"),
    ("mixtral", dict(expert_parallel_size=3), r"num_experts \(4\) is not divisible by expert_parallel_size \(3\)"),
    ("llama", dict(expert_parallel_size=2), r"expert_parallel_size \(2\) > 1 needs a mixture-of-experts model"),
    ("mixtral", dict(tensor_parallel_size=4, expert_parallel_size=2), r"expert_parallel_size \(2\) must be 1, equal tensor_parallel_size \(4\)"),
    ("llama", dict(tensor_parallel_size=2, distributed_executor_backend="uni"), r"'uni' runs one worker .* need 2"),
])
def test_bad_sizes_fail_at_start_naming_the_numbers(checkpoints, tmp_path, arch, options, expected):
    path = checkpoints.get(arch) or checkpoint_with_tokenizer(arch, tmp_path / arch)[0]
    with pytest.raises(ValueError, match=expected):
        LLM(model=path, **ENGINE_OPTIONS, **options)  # raises before any Ray actor exists


def test_kv_heads_that_neither_split_nor_replicate_are_refused(checkpoints):
    import json
    import os
    with open(os.path.join(checkpoints["llama"], "config.json")) as f:
        hf = json.load(f)
    hf.update(hidden_size=96, num_attention_heads=6, num_key_value_heads=3, head_dim=16)
    spec = ModelSpec.from_hf_config(hf)
    with pytest.raises(ValueError, match=r"num_key_value_heads \(3\) and tensor_parallel_size \(2\)"):
        validate_parallel_sizes(EngineConfig.create(tensor_parallel_size=2).parallel, spec)


def test_validation_reports_every_problem_at_once(checkpoints):
    spec = ModelSpec.from_hf_config(checkpoints["llama"])
    config = EngineConfig.create(tensor_parallel_size=3, pipeline_parallel_size=3)
    with pytest.raises(ValueError) as info:
        validate_parallel_sizes(config.parallel, spec)
    assert "num_attention_heads (4)" in str(info.value) and "num_hidden_layers (2)" in str(info.value)


# ---- layout and micro-batches (plain Python) -------------------------------------------------

def test_rank_layout_stage_groups_and_pipeline_peers():
    ranks = rank_layout(EngineConfig.create(tensor_parallel_size=2, pipeline_parallel_size=2).parallel)
    assert [(r.pp_rank, r.tp_rank) for r in ranks] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert [r.next_rank for r in ranks] == [2, 3, None, None]
    assert [r.prev_rank for r in ranks] == [None, None, 0, 1]
    assert [r.is_output_rank for r in ranks] == [False, False, True, False]
    ep = rank_layout(EngineConfig.create(expert_parallel_size=2).parallel)
    assert [(r.tp_size, r.ep_rank, r.stage_ranks) for r in ep] == [(1, 0, [0, 1]), (1, 1, [0, 1])]


def test_microbatches_keep_order_and_whole_requests():
    scheduled = [("a", 16), ("b", 1), ("c", 1), ("d", 1), ("e", 1)]
    batches = split_microbatches(scheduled, 2)
    assert [r for b in batches for r in b] == scheduled
    assert batches == [[("a", 16)], [("b", 1), ("c", 1), ("d", 1), ("e", 1)]]
    assert split_microbatches([("a", 5)], 4) == [[("a", 5)]]
    assert len(split_microbatches([(str(i), 1) for i in range(8)], 4)) == 4


# ---- a worker dies mid-generation -------------------------------------------------------------

def test_killed_worker_ends_requests_with_error_and_fails_health(ray_cluster, checkpoints):
    from engine.async_engine import AsyncLLM
    from engine.executor_ray import WorkerDiedError

    engine = AsyncLLM.from_config(EngineConfig.create(model=checkpoints["llama"], **ENGINE_OPTIONS,
                                                      tensor_parallel_size=2))
    executor = engine.engine.executor
    long = SamplingParams(temperature=0, max_tokens=100, ignore_eos=True)
    victim = executor.workers[1]

    async def run_one(request_id: str, prompt: list[int], kill: bool):
        last = None
        async for out in engine.generate(prompt, long, request_id):
            last = out
            if kill and len(out.outputs[0].token_ids) == 3 and not out.finished:
                ray_cluster.kill(victim)  # mid-generation, between or during steps
        return last

    async def main():
        return await asyncio.wait_for(asyncio.gather(
            run_one("a", PROMPTS[0], kill=True), run_one("b", PROMPTS[1], kill=False),
            return_exceptions=True), timeout=60)  # must not hang

    try:
        engine.engine.check_health()
        results = asyncio.run(main())
        for result in results:  # each request ends: an error output (or the engine's error)
            if isinstance(result, BaseException):
                assert isinstance(result, (WorkerDiedError, RuntimeError)), result
            else:
                assert result.finished and result.outputs[0].finish_reason == "error", result
                assert len(result.outputs[0].token_ids) < 100
        with pytest.raises(WorkerDiedError, match="worker"):
            engine.check_health()
    finally:
        engine.shutdown()


# ---- the shipped TP=2 CPU config -----------------------------------------------------------------

def test_tiny_tp2_config_serves_tiny_yaml_tokens(ray_cluster):
    """configs/tiny-tp2.yaml builds a 2-worker gloo replica giving configs/tiny.yaml's tokens."""
    from pathlib import Path

    from engine.llm_engine import LLMEngine
    from router.config import load_deployment_config

    from engine.executor_ray import WorkerDiedError

    configs = Path(__file__).resolve().parent.parent / "configs"
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    tokens = []
    for name in ("tiny.yaml", "tiny-tp2.yaml"):
        engine = LLMEngine(load_deployment_config(configs / name).engine)
        try:
            engine.add_request("r", "Hello, kvmesh", params)
            while engine.has_unfinished_requests():
                outs = engine.step()
            tokens.append(outs[-1].outputs[0].token_ids)
            if name == "tiny-tp2.yaml":  # a worker dying while the replica is idle is noticed too
                assert type(engine.executor).__name__ == "RayExecutor"
                ray_cluster.kill(engine.executor.workers[0])
                with pytest.raises(WorkerDiedError):
                    deadline = time.monotonic() + 10
                    while time.monotonic() < deadline:
                        engine.check_health()
                        time.sleep(0.1)
        finally:
            engine.shutdown()
    assert tokens[0] == tokens[1] and len(tokens[0]) == 6
