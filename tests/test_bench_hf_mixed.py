"""bench/hf_mixed.py: the HF baseline's batching and its reused static cache (CPU, tiny Llama).

The full-set HF run reuses one StaticCache across batches (one compiled decode shape); the
tokens must be exactly what a fresh ``generate`` gives for the same batch, or the baseline
would be timing something else.
"""

from __future__ import annotations

import random

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from bench.hf_mixed import batches, run_batch  # noqa: E402


def test_batches_fill_the_last_one_with_rows_that_add_no_output():
    reqs = [([i] * 3, 10 + i) for i in range(5)]
    out = batches(reqs, 2)
    assert [(len(rows), real) for rows, real in out] == [(2, 2), (2, 2), (2, 1)]
    assert out[-1][0] == [reqs[4], reqs[4]]
    assert sum(n for rows, real in out for _, n in rows[:real]) == sum(n for _, n in reqs)


def test_reused_static_cache_gives_fresh_generate_tokens():
    from transformers import LlamaConfig, LlamaForCausalLM, StaticCache

    cfg = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    model.generation_config.eos_token_id = None
    rng = random.Random(0)
    reqs = [([rng.randrange(3, 300) for _ in range(rng.randint(4, 20))], rng.randint(2, 10)) for _ in range(5)]
    seen = []
    generate = model.generate

    def recording_generate(**kwargs):
        out = generate(**kwargs)
        seen.append((kwargs, out.clone()))
        return out
    model.generate = recording_generate
    cache = StaticCache(config=cfg, max_cache_len=64)
    for rows, _ in batches(reqs, 2):
        assert run_batch(model, rows, cache) > 0
    model.generate = generate
    assert len(seen) == 3
    for kwargs, out in seen:
        with torch.inference_mode():
            ref = model.generate(input_ids=kwargs["input_ids"], attention_mask=kwargs["attention_mask"],
                                 max_new_tokens=kwargs["max_new_tokens"], min_new_tokens=kwargs["max_new_tokens"],
                                 do_sample=False, pad_token_id=0)
        assert torch.equal(ref, out)
