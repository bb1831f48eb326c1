"""No Triton JIT compile mid-serving: the attention kernels keep one variant whatever the batch.

Triton compiles a new variant of a kernel the first time an integer argument changes between
1 / a multiple of 16 / other, or a pointer argument between 16-byte aligned or not; each takes
about a second on the engine thread (a 1.3-1.5 s step gap in a 2-H200 serving run). The block
table's row stride varies with the batch's longest request, and the step's index arrays come
from one packed buffer at batch-dependent offsets: both must not create variants.
"""

from __future__ import annotations

import random

import pytest
import torch

from engine import LLM, SamplingParams
from engine.attention import triton_kernels as tk
from engine.device_copy import packed_to_device
from tests.engine_helpers import checkpoint_with_tokenizer

pytestmark = pytest.mark.gpu

DEV = torch.device("cuda")


def num_variants(kernel) -> int:
    """Compiled variants of a ``@triton.jit`` kernel on this GPU (Triton 3.x keeps them per device)."""
    return sum(len(entry[0]) for entry in kernel.device_caches.values())


def _batch(rng: random.Random, num_reqs: int, width: int, block_size: int, num_blocks: int):
    """Metadata of a prefill batch whose block table is ``width`` wide, packed like the runner's."""
    q_lens = [rng.randint(1, 9) for _ in range(num_reqs)]
    seq_lens = [min(width * block_size, q + rng.randint(0, 3 * block_size)) for q in q_lens]
    seq_lens[0] = width * block_size  # the widest request sets the table's width
    q_lens = [min(q, s) for q, s in zip(q_lens, seq_lens)]
    query_start = [0]
    for q in q_lens:
        query_start.append(query_start[-1] + q)
    tables = [[rng.randrange(num_blocks) for _ in range(width)] for _ in range(num_reqs)]
    qs, sl, flat = packed_to_device([query_start, seq_lens, tables], torch.int32, DEV)
    return query_start[-1], qs, sl, flat.view(num_reqs, width)


def test_prefill_and_decode_kernels_compile_once_for_any_batch():
    rng = random.Random(0)
    block_size, num_blocks, hq, hkv, d = 16, 64, 8, 2, 64
    cache = torch.randn(2, num_blocks, block_size, hkv, d, device=DEV, dtype=torch.bfloat16)
    counts = []
    for i, (num_reqs, width) in enumerate([(1, 3)] + [(r, w) for r in (1, 2, 3, 4, 5, 7) for w in (1, 5, 16, 17, 32)]):
        num_tokens, qs, sl, tables = _batch(rng, num_reqs, width, block_size, num_blocks)
        q = torch.randn(num_tokens, hq, d, device=DEV, dtype=torch.bfloat16)
        out = torch.empty_like(q)
        tk.paged_prefill(q, cache, tables, sl, qs, num_reqs, d ** -0.5, out)
        dq = torch.randn(num_reqs, hq, d, device=DEV, dtype=torch.bfloat16)
        dqs = torch.arange(num_reqs + 1, dtype=torch.int32, device=DEV)
        tk.paged_decode(dq, cache, tables, sl, dqs, num_reqs, d ** -0.5, torch.empty_like(dq), num_splits=4)
        if i == 0:
            first = (num_variants(tk._prefill_kernel), num_variants(tk._decode_kernel))
        counts.append((num_reqs, width, num_variants(tk._prefill_kernel), num_variants(tk._decode_kernel)))
    torch.cuda.synchronize()
    assert all((p, dc) == first for _, _, p, dc in counts), (first, counts)


def test_engine_serves_varied_batches_without_new_attention_variants(tmp_path):
    """Eager steps (every batch goes through the packed index arrays): after the first request,
    batches of other sizes and block-table widths compile nothing new."""
    path, vocab = checkpoint_with_tokenizer("llama", tmp_path)
    llm = LLM(model=path, dtype="bfloat16", device="cuda", block_size=16, attention_backend="triton",
              enforce_eager=True, num_blocks=256, max_num_batched_tokens=256)
    rng = random.Random(1)
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    llm.generate([[rng.randrange(5, vocab) for _ in range(40)]], params)  # the first variants
    before = (num_variants(tk._prefill_kernel), num_variants(tk._decode_kernel))
    for batch in (1, 2, 3, 5, 8):
        lengths = [rng.choice((1, 15, 16, 17, 100, 255, 256, 257, 300)) for _ in range(batch)]
        llm.generate([[rng.randrange(5, vocab) for _ in range(n)] for n in lengths], params)
    after = (num_variants(tk._prefill_kernel), num_variants(tk._decode_kernel))
    assert after == before
