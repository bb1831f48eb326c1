"""The padded batches that CUDA graphs replay (engine/cuda_graphs.py) give the unpadded tokens.

On a GPU the mixed-step graphs (prefill, chunked prefill mixed with decodes) run
their batches padded to a captured token count, with one padding request owning
the extra tokens and empty requests up to the captured request count. Here the
same padded batches run eagerly on the CPU reference backend (``capture=False``),
so the padding itself is checked in CI: same greedy tokens as plain batches, no
write outside the scratch block, no block leaks.
"""

from __future__ import annotations

import random

import pytest
import torch

from engine import LLM, SamplingParams
from engine.cuda_graphs import MixedGraphs
from tests.engine_helpers import assert_no_leaks

GREEDY = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)


def _prompts() -> list[list[int]]:
    rng = random.Random(1)
    return [[rng.randrange(5, 400) for _ in range(n)] for n in (3, 17, 40, 9, 70, 1, 33)]


def _llm(**options) -> LLM:
    return LLM(model="kvmesh-tiny", dtype="float32", device="cpu", block_size=16, num_blocks=96,
               async_scheduling=False, **options)


@pytest.mark.parametrize("budget,max_seqs", [(32, 8), (64, 3), (2048, 8)])
def test_padded_mixed_batches_give_the_same_tokens(budget, max_seqs):
    """Small budgets: prompt chunks mixed with decodes; 2048: whole prompts in one step."""
    options = dict(max_num_batched_tokens=budget, max_num_seqs=max_seqs)
    expected = [o.outputs[0].token_ids for o in _llm(**options).generate(_prompts(), GREEDY)]

    llm = _llm(**options)
    runner = llm.engine.executor.runner
    runner.graph_runner = runner._graph_runner(scratch_block=llm.engine.num_blocks, capture=False)
    mixed = runner.graph_runner.mixed
    assert mixed is not None and mixed.sizes[0] == 16 and mixed.max_tokens == min(budget, 512)
    got = [o.outputs[0].token_ids for o in llm.generate(_prompts(), GREEDY)]
    assert got == expected
    assert mixed.num_replays > 0  # prompts really went through the padded path
    assert_no_leaks(llm)
    # The padding tokens' K/V went to the scratch block (one past the scheduler's pool).
    scratch = llm.engine.num_blocks
    assert all((kv[:, scratch].abs().sum() > 0) == (mixed.num_padding_tokens > 0) for kv in runner.kv_caches)
    if budget == 2048:
        assert mixed.num_padding_tokens > 0  # 173 prompt tokens in one step, run as 192


def test_steps_too_large_or_all_decode_are_not_mixed_graph_steps():
    llm = _llm(max_num_batched_tokens=4096, cuda_graph_max_prefill_tokens=64, cuda_graph_max_mixed_reqs=2)
    runner = llm.engine.executor.runner
    mixed = runner._graph_runner(scratch_block=llm.engine.num_blocks, capture=False).mixed
    assert isinstance(mixed, MixedGraphs) and mixed.sizes == [16, 32, 64]
    from engine.attention.base import AttentionMetadata

    def meta(query_lens: list[int]) -> AttentionMetadata:
        qsl = [0]
        for n in query_lens:
            qsl.append(qsl[-1] + n)
        t = torch.tensor
        return AttentionMetadata(t(list(range(qsl[-1]))), t(qsl, dtype=torch.int32),
                                 t(query_lens, dtype=torch.int32), t([[0]] * len(query_lens), dtype=torch.int32),
                                 max(query_lens), max(query_lens), qsl, list(query_lens))

    assert mixed.can_run(meta([40, 1]), 41)
    assert not mixed.can_run(meta([1, 1]), 2)  # all decode: the decode graphs' job
    assert not mixed.can_run(meta([65]), 65)  # more tokens than the largest graph
    assert not mixed.can_run(meta([5, 1, 1]), 7)  # more requests than the graphs hold


def test_graph_limits_are_validated():
    from engine.config import DeviceConfig
    with pytest.raises(ValueError, match="cuda_graph_max_mixed_reqs"):
        DeviceConfig(cuda_graph_max_mixed_reqs=0)
    with pytest.raises(ValueError, match="cuda_graph_max_prefill_tokens"):
        DeviceConfig(cuda_graph_max_prefill_tokens=-1)
