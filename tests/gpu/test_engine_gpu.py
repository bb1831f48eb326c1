"""The engine on a GPU: Triton attention + CUDA graphs give the reference backend's tokens."""

from __future__ import annotations

import random

import pytest
import torch

from engine import LLM, SamplingParams
from tests.engine_helpers import assert_no_leaks, checkpoint_with_tokenizer

pytestmark = pytest.mark.gpu

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


def _prompts(vocab: int) -> list[list[int]]:
    rng = random.Random(0)
    return [[rng.randrange(5, vocab) for _ in range(n)] for n in (3, 17, 40, 9, 70, 1)]


@pytest.mark.parametrize("arch", ["llama", "qwen3", "qwen2_moe"])
def test_triton_and_cuda_graphs_match_reference_backend(arch, tmp_path):
    torch.backends.cuda.matmul.allow_tf32 = False
    path, vocab = checkpoint_with_tokenizer(arch, tmp_path)
    prompts = _prompts(vocab)
    ref = LLM(model=path, dtype="float32", device="cuda", block_size=16, attention_backend="torch_ref",
              enforce_eager=True, num_blocks=64)
    expected = [o.outputs[0].token_ids for o in ref.generate(prompts, GREEDY)]
    del ref
    fast = LLM(model=path, dtype="float32", device="cuda", block_size=16, attention_backend="triton",
               num_blocks=64, max_num_batched_tokens=32)  # small budget: chunked prefill mixes with decodes
    got = [o.outputs[0].token_ids for o in fast.generate(prompts, GREEDY)]
    agree = sum(a == b for a, b in zip(got, expected))
    assert agree >= len(prompts) - 1, (got, expected)  # Triton's fp32 dots may use TF32
    runner = fast.engine.executor.runner
    if arch != "qwen2_moe":
        assert runner.graph_runner is not None and runner.graph_runner.decode.num_replays > 0
        assert runner.graph_runner.mixed.num_replays > 0  # prompt chunks (+ decodes) of <= 32 tokens
    else:
        assert runner.graph_runner is None  # MoE layers sync with the host: never captured
    assert_no_leaks(fast)


def test_bf16_dummy_weights_and_kv_sizing(tmp_path):
    path, vocab = checkpoint_with_tokenizer("llama", tmp_path)
    llm = LLM(model=path, dtype="bfloat16", device="cuda", load_format="dummy", gpu_memory_utilization=0.3)
    assert llm.engine.num_blocks > 100  # sized from free memory after a profiling forward
    outs = llm.generate(_prompts(vocab), GREEDY)
    assert all(len(o.outputs[0].token_ids) == 12 for o in outs)
    assert_no_leaks(llm)


def test_async_scheduling_on_gpu_matches_sync(tmp_path):
    """Overlapped steps (CUDA graphs, pending ids taken on the device) give the synchronous tokens."""
    from tests.test_async_scheduling import _workload

    torch.backends.cuda.matmul.allow_tf32 = False
    path, _ = checkpoint_with_tokenizer("llama", tmp_path)
    prompts, params = _workload()
    results = {}
    for mode in (False, True):
        llm = LLM(model=path, dtype="float32", device="cuda", block_size=16, num_blocks=128,
                  max_num_batched_tokens=64, async_scheduling=mode)
        outs = llm.generate(prompts, params)
        results[mode] = [[c.token_ids for c in o.outputs] for o in outs]
        assert_no_leaks(llm)
        if mode:
            assert llm.engine.executor.runner.graph_runner.num_replays > 0
        del llm
        torch.cuda.empty_cache()
    same = sum(a == b for a, b in zip(results[True], results[False]))
    assert same >= len(prompts) - 1, (results[True], results[False])  # fp32 kernels may pick other tiles
