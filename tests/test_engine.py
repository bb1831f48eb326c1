"""Engine-level correctness on CPU (fp32, tiny random checkpoints saved and reloaded in HF format).

Greedy tokens must equal HF transformers ``generate`` token for token, and the
same outputs must come out whatever the batching: alone or batched, chunked
prefill on or off, prefix-cache hits or misses, forced preemption.
"""

from __future__ import annotations

import random

import pytest
import torch
from transformers import AutoModelForCausalLM

from engine import LLM, SamplingParams
from tests.engine_helpers import checkpoint_with_tokenizer, assert_no_leaks

ARCHS = ["llama", "qwen2", "qwen3", "mixtral", "qwen2_moe", "qwen3_moe"]
NEW_TOKENS = 10


def random_prompts(vocab_size: int, lengths: list[int], seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(5, vocab_size) for _ in range(n)] for n in lengths]


def hf_greedy(path: str, prompt: list[int], new_tokens: int) -> list[int]:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


GREEDY = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_matches_hf_transformers(arch, tmp_path):
    path, vocab = checkpoint_with_tokenizer(arch, tmp_path)
    prompts = random_prompts(vocab, [3, 17, 33, 8], seed=1)
    llm = LLM(model=path, block_size=8, max_num_batched_tokens=64)
    outs = llm.generate(prompts, GREEDY)
    for prompt, out in zip(prompts, outs):
        assert out.prompt_token_ids == prompt
        assert out.outputs[0].token_ids == hf_greedy(path, prompt, NEW_TOKENS), arch
        assert out.outputs[0].finish_reason == "length"
    assert_no_leaks(llm)


@pytest.fixture(scope="module")
def llama_path(tmp_path_factory):
    path, vocab = checkpoint_with_tokenizer("llama", tmp_path_factory.mktemp("llama"))
    return path, vocab


def _tokens(outs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outs]


def test_batching_chunking_prefix_cache_and_preemption_do_not_change_outputs(llama_path):
    path, vocab = llama_path
    shared = random_prompts(vocab, [40], seed=7)[0]
    prompts = [shared + p for p in random_prompts(vocab, [5, 21, 2, 13, 30], seed=3)] + \
        random_prompts(vocab, [9, 50], seed=4)
    alone = [_tokens(LLM(model=path, block_size=8, enable_prefix_caching=False).generate([p], GREEDY))[0]
             for p in prompts[:2]]
    reference_llm = LLM(model=path, block_size=8, enable_prefix_caching=False, enable_chunked_prefill=False,
                        max_num_batched_tokens=512)
    reference = _tokens(reference_llm.generate(prompts, GREEDY))
    assert reference[:2] == alone

    chunked = LLM(model=path, block_size=8, max_num_batched_tokens=16, enable_prefix_caching=True)
    assert _tokens(chunked.generate(prompts, GREEDY)) == reference
    # Second pass: the shared prefix (and whole prompts) are now cached.
    again = chunked.generate(prompts, GREEDY)
    assert _tokens(again) == reference
    assert any(o.num_cached_tokens >= 40 for o in again)
    assert chunked.engine.get_stats().prefix_cache_hits > 0
    assert_no_leaks(chunked)

    # A pool far too small for the batch forces preemption by recompute.
    tight = LLM(model=path, block_size=8, num_blocks=14, max_num_batched_tokens=32, enable_prefix_caching=False)
    assert _tokens(tight.generate(prompts, GREEDY)) == reference
    assert tight.engine.get_stats().num_preemptions > 0
    assert_no_leaks(tight)


def test_seeded_sampling_is_reproducible_across_batch_compositions(llama_path):
    path, vocab = llama_path
    prompts = random_prompts(vocab, [6, 11, 25], seed=5)
    seeded = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=12, seed=1234, ignore_eos=True)
    other = SamplingParams(temperature=0.8, max_tokens=7, ignore_eos=True)
    llm = LLM(model=path, block_size=8)
    alone = llm.generate([prompts[0]], seeded)[0].outputs[0].token_ids
    mixed = llm.generate([prompts[1], prompts[0], prompts[2]], [other, seeded, other])
    assert mixed[1].outputs[0].token_ids == alone
    different_seed = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=12, seed=99, ignore_eos=True)
    assert llm.generate([prompts[0]], different_seed)[0].outputs[0].token_ids != alone
    # Preemption mid-way does not change a seeded sample either.
    tight = LLM(model=path, block_size=8, num_blocks=8, max_num_batched_tokens=16)
    outs = tight.generate([prompts[1], prompts[0], prompts[2]], [other, seeded, other])
    assert outs[1].outputs[0].token_ids == alone


def test_n_samples_share_the_prompt_and_differ(llama_path):
    path, vocab = llama_path
    prompt = random_prompts(vocab, [37], seed=9)[0]
    llm = LLM(model=path, block_size=8, enable_prefix_caching=False)
    greedy_n = llm.generate([prompt], SamplingParams(n=3, temperature=0.0, max_tokens=6, ignore_eos=True))[0]
    assert [o.index for o in greedy_n.outputs] == [0, 1, 2]
    single = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True))[0]
    assert all(o.token_ids == single.outputs[0].token_ids for o in greedy_n.outputs)
    sampled = llm.generate([prompt], SamplingParams(n=4, temperature=1.0, max_tokens=8, seed=3, ignore_eos=True))[0]
    assert len({tuple(o.token_ids) for o in sampled.outputs}) > 1
    assert_no_leaks(llm)


def test_stop_conditions_and_logprobs(llama_path):
    path, vocab = llama_path
    prompt = random_prompts(vocab, [12], seed=11)[0]
    llm = LLM(model=path, block_size=8)
    base = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))[0].outputs[0]
    # stop token id: generation ends at the first occurrence of the 4th token.
    stop_id = base.token_ids[3]
    out = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=12, stop_token_ids=[stop_id],
                                                ignore_eos=True))[0].outputs[0]
    assert out.token_ids == base.token_ids[:base.token_ids.index(stop_id) + 1]
    assert out.finish_reason == "stop" and out.stop_reason == stop_id
    # stop string taken from the text: the output text ends right before it.
    text = base.text
    if len(text.strip()) >= 4:
        stop_str = text[len(text) // 2: len(text) // 2 + 2]
        out = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=12, stop=[stop_str],
                                                    ignore_eos=True))[0].outputs[0]
        assert out.finish_reason == "stop" and out.stop_reason == stop_str
        assert out.text == text[:text.index(stop_str)]
    # logprobs: chosen token plus top alternatives; greedy picks rank 1.
    out = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=4, logprobs=3,
                                                ignore_eos=True))[0].outputs[0]
    assert len(out.logprobs) == 4
    for token_id, entry in zip(out.token_ids, out.logprobs):
        assert entry[token_id].rank == 1
        assert len(entry) == 3
        assert all(lp.logprob <= 0 for lp in entry.values())
    assert_no_leaks(llm)


def test_bad_input_gets_clear_errors_and_engine_keeps_going(llama_path, tmp_path):
    path, vocab = llama_path
    llm = LLM(model=path, block_size=8, max_model_len=64)
    with pytest.raises(ValueError, match="max_model_len"):
        llm.generate([[5] * 64], GREEDY)
    with pytest.raises(ValueError, match="empty"):
        llm.generate([""], GREEDY)
    with pytest.raises(ValueError, match="empty"):
        llm.generate([[]], GREEDY)
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams(max_tokens=0)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-0.5)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=1.5)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)
    with pytest.raises(ValueError, match="vocabulary"):
        llm.generate([[vocab + 10]], GREEDY)
    with pytest.raises(ValueError):
        LLM(model=str(tmp_path / "does-not-exist"))
    # The engine still serves after every rejection, and nothing leaked.
    assert len(llm.generate([[5, 6, 7]], GREEDY)[0].outputs[0].token_ids) == NEW_TOKENS
    assert_no_leaks(llm)


def test_chat_uses_the_template(tiny_llm):
    out = tiny_llm.chat([{"role": "user", "content": "Hello there"}],
                        SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True))[0]
    rendered = tiny_llm.tokenizer.apply_chat_template([{"role": "user", "content": "Hello there"}],
                                                      tokenize=False, add_generation_prompt=True)
    assert out.prompt_token_ids == tiny_llm.tokenizer.encode(rendered, add_special_tokens=False)
    assert len(out.outputs[0].token_ids) == 5


def test_builtin_default_model_generates_text(tiny_llm):
    out = tiny_llm.generate("The quick brown fox", SamplingParams(temperature=0.0, max_tokens=8))[0]
    assert out.outputs[0].token_ids and isinstance(out.outputs[0].text, str)
