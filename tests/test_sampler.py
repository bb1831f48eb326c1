"""Sampler: greedy, filters (top-k / top-p / min-p), seeded determinism, penalties, logprobs."""

from __future__ import annotations

import math

import pytest
import torch

from engine.sampler import (Sampler, SamplingBatch, apply_min_p, apply_penalties, apply_top_k_top_p,
                            exponential_noise, to_token_logprobs)
from engine.sampling_params import SamplingParams

V = 64


def make_batch(rows, vocab_size=V):
    """rows: list of (SamplingParams, seed, output_index[, prompt_ids, output_ids])."""
    full = [r if len(r) == 5 else (*r, [], []) for r in rows]
    return SamplingBatch.from_requests(full, vocab_size=vocab_size)


def sample_many(logits_row, params, num_seeds=400, output_index=0):
    """Samples one row under many seeds in one batch; returns the list of sampled ids."""
    logits = logits_row[None, :].repeat(num_seeds, 1)
    batch = make_batch([(params, seed, output_index) for seed in range(num_seeds)], logits.shape[-1])
    return Sampler()(logits, batch).sampled_token_ids.tolist()


@pytest.fixture
def logits():
    gen = torch.Generator().manual_seed(0)
    return torch.randn(V, generator=gen) * 2.0


def test_greedy_is_argmax():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(8, V, generator=gen)
    batch = make_batch([(SamplingParams(temperature=0.0), i, i) for i in range(8)])
    assert batch.all_greedy
    out = Sampler()(logits, batch)
    assert out.sampled_token_ids.tolist() == logits.argmax(-1).tolist()
    assert out.logprobs is None


def test_mixed_greedy_and_random_rows(logits):
    rows = torch.stack([logits, logits])
    batch = make_batch([(SamplingParams(temperature=0.0), 0, 0), (SamplingParams(temperature=5.0), 0, 0)])
    assert not batch.all_greedy
    out = Sampler()(rows, batch).sampled_token_ids.tolist()
    assert out[0] == int(logits.argmax())


def allowed_set_top_k(logits, k):
    return set(torch.topk(logits, k).indices.tolist())


def allowed_set_top_p(logits, top_p):
    probs = logits.double().softmax(-1)
    order = probs.argsort(descending=True).tolist()
    kept, mass = set(), 0.0
    for i in order:
        kept.add(i)
        mass += probs[i].item()
        if mass >= top_p:
            break
    return kept


def allowed_set_min_p(logits, min_p):
    probs = logits.double().softmax(-1)
    return set(torch.nonzero(probs >= min_p * probs.max()).flatten().tolist())


def finite_set(masked_row):
    return set(torch.nonzero(torch.isfinite(masked_row)).flatten().tolist())


@pytest.mark.parametrize("k", [1, 3, 10])
def test_top_k_set_and_samples(logits, k):
    masked = apply_top_k_top_p(logits[None], torch.tensor([k]), torch.tensor([1.0]))[0]
    assert finite_set(masked) == allowed_set_top_k(logits, k)
    samples = set(sample_many(logits, SamplingParams(temperature=3.0, top_k=k)))
    assert samples <= allowed_set_top_k(logits, k)
    if k > 1:
        assert len(samples) > 1


@pytest.mark.parametrize("top_p", [0.05, 0.3, 0.8, 0.99])
def test_top_p_set_and_samples(logits, top_p):
    masked = apply_top_k_top_p(logits[None], torch.tensor([V]), torch.tensor([top_p]))[0]
    expected = allowed_set_top_p(logits, top_p)
    assert finite_set(masked) == expected
    assert set(sample_many(logits, SamplingParams(top_p=top_p))) <= expected


def test_top_k_then_top_p_renormalizes(logits):
    # top-p applies to the distribution left by top-k.
    masked = apply_top_k_top_p(logits[None], torch.tensor([5]), torch.tensor([0.7]))[0]
    top5 = torch.full_like(logits, float("-inf"))
    idx = torch.topk(logits, 5).indices
    top5[idx] = logits[idx]
    assert finite_set(masked) == allowed_set_top_p(top5, 0.7)


@pytest.mark.parametrize("min_p", [0.05, 0.3, 0.9])
def test_min_p_set_and_samples(logits, min_p):
    masked = apply_min_p(logits[None], torch.tensor([min_p]))[0]
    expected = allowed_set_min_p(logits, min_p)
    assert finite_set(masked) == expected
    assert set(sample_many(logits, SamplingParams(min_p=min_p))) <= expected


def test_top_p_keeps_top_token_even_when_tiny_top_p():
    logits = torch.zeros(V)  # uniform: the first sorted token alone never reaches top_p=0.5
    masked = apply_top_k_top_p(logits[None], torch.tensor([V]), torch.tensor([1e-6]))[0]
    assert len(finite_set(masked)) == 1


def test_seed_and_output_index_determine_the_token(logits):
    params = SamplingParams(temperature=1.5)
    gen = torch.Generator().manual_seed(3)
    others = torch.randn(5, V, generator=gen)
    alone = Sampler()(logits[None], make_batch([(params, 1234, 7)])).sampled_token_ids.item()
    for row in range(6):  # the same request at every row position, among different batch-mates
        rows = list(others)
        rows.insert(row, logits)
        batch_rows = [(SamplingParams(temperature=0.7, top_p=0.9), 99 + i, i) for i in range(5)]
        batch_rows.insert(row, (params, 1234, 7))
        out = Sampler()(torch.stack(rows), make_batch(batch_rows)).sampled_token_ids.tolist()
        assert out[row] == alone


def test_noise_is_deterministic_and_seed_dependent():
    seeds = torch.tensor([1, 2, 1, 1, (1 << 62) + 1], dtype=torch.int64)
    idx = torch.tensor([0, 0, 0, 1, 0], dtype=torch.int64)
    e = exponential_noise(seeds, idx, 1000)
    assert torch.equal(e, exponential_noise(seeds, idx, 1000))
    assert torch.equal(e[0], e[2])
    assert not torch.equal(e[0], e[1]) and not torch.equal(e[0], e[3]) and not torch.equal(e[0], e[4])
    assert torch.isfinite(e).all() and (e > 0).all()
    big = exponential_noise(torch.arange(64, dtype=torch.int64), torch.zeros(64, dtype=torch.int64), 4096)
    assert abs(big.mean().item() - 1.0) < 0.02 and abs(big.var().item() - 1.0) < 0.05


def test_different_seeds_give_different_samples(logits):
    samples = sample_many(logits, SamplingParams(temperature=2.0), num_seeds=50)
    assert len(set(samples)) > 5


def test_output_index_changes_the_draw(logits):
    params = SamplingParams(temperature=2.0)
    draws = [Sampler()(logits[None], make_batch([(params, 5, i)])).sampled_token_ids.item() for i in range(40)]
    assert len(set(draws)) > 5


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_distribution_matches_softmax(temperature):
    vocab = 8
    logits = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0])
    num = 10000
    batch = make_batch([(SamplingParams(temperature=temperature), seed, 0) for seed in range(num)], vocab)
    sampled = Sampler()(logits[None].repeat(num, 1), batch).sampled_token_ids
    counts = torch.bincount(sampled, minlength=vocab).double()
    expected = (logits.double() / temperature).softmax(-1) * num
    chi2 = (((counts - expected) ** 2) / expected).sum().item()
    assert chi2 < 30.0, (chi2, counts.tolist(), expected.tolist())  # 7 dof: p ~ 1e-4 at 30


def test_repetition_penalty():
    logits = torch.tensor([[2.0, -2.0, 1.0, -1.0, 0.5]])
    params = SamplingParams(repetition_penalty=2.0)
    batch = SamplingBatch.from_requests([(params, 0, 1, [0, 1], [2])], vocab_size=5)
    assert batch.needs_penalties
    out = apply_penalties(logits, batch)
    assert out.tolist() == [[1.0, -4.0, 0.5, -1.0, 0.5]]


def test_presence_and_frequency_penalties():
    logits = torch.zeros(1, 5)
    params = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)
    batch = SamplingBatch.from_requests([(params, 0, 3, [4, 4], [1, 1, 3])], vocab_size=5)
    out = apply_penalties(logits, batch)
    # token 1: twice -> 0.5 + 2 * 0.25; token 3: once -> 0.5 + 0.25; prompt-only token 4 untouched
    assert out.tolist() == [[0.0, -1.0, 0.0, -0.75, 0.0]]


def test_penalties_affect_greedy_choice():
    logits = torch.tensor([[3.0, 2.9, 0.0]])
    params = SamplingParams(temperature=0.0, repetition_penalty=1.5)
    batch = SamplingBatch.from_requests([(params, 0, 1, [], [0])], vocab_size=3)
    assert Sampler()(logits, batch).sampled_token_ids.tolist() == [1]


def test_no_penalty_work_when_not_asked():
    batch = make_batch([(SamplingParams(), 0, 0)])
    assert not batch.needs_penalties and batch.seen_mask is None


def test_logprobs_match_log_softmax_and_ranks(logits):
    rows = torch.stack([logits, logits * 0.5, logits])
    batch = make_batch([(SamplingParams(logprobs=3, temperature=2.0, repetition_penalty=1.3), 1, 0, [0], []),
                        (SamplingParams(logprobs=0, temperature=0.0), 2, 0),
                        (SamplingParams(temperature=1.0), 3, 0)])
    assert batch.max_num_logprobs == 3
    out = Sampler()(rows, batch)
    ref = rows.log_softmax(-1)  # raw logits: before penalties and temperature
    entries = to_token_logprobs(out, batch)
    assert entries[2] is None
    for row in (0, 1):
        (entry,) = entries[row]
        assert entry.token_id == out.sampled_token_ids[row].item()
        assert math.isclose(entry.logprob, ref[row, entry.token_id].item(), rel_tol=1e-5, abs_tol=1e-6)
        order = ref[row].argsort(descending=True).tolist()
        assert entry.rank == order.index(entry.token_id) + 1
    top = entries[0][0]
    assert top.top_token_ids == ref[0].topk(3).indices.tolist()
    assert torch.allclose(torch.tensor(top.top_logprobs), ref[0].topk(3).values)
    assert entries[1][0].rank == 1 and entries[1][0].top_token_ids == []


def test_missing_seed_is_rejected():
    with pytest.raises(ValueError, match="seed"):
        SamplingBatch.from_requests([(SamplingParams(), None, 0, [], [])], vocab_size=V)


@pytest.mark.gpu
def test_cuda_matches_cpu(logits):
    rows = [(SamplingParams(temperature=0.9, top_k=20, top_p=0.9, min_p=0.02, logprobs=2), s, s % 3, [], [])
            for s in range(64)]
    cpu = Sampler()(logits[None].repeat(64, 1), SamplingBatch.from_requests(rows, vocab_size=V))
    gpu_batch = SamplingBatch.from_requests(rows, vocab_size=V, device="cuda")
    for use_compile in (False, True):
        gpu = Sampler(use_compile=use_compile)(logits[None].repeat(64, 1).cuda(), gpu_batch)
        assert gpu.sampled_token_ids.cpu().tolist() == cpu.sampled_token_ids.tolist()
        assert gpu.logprobs.ranks.cpu().tolist() == cpu.logprobs.ranks.tolist()


@pytest.mark.gpu
def test_compiled_noise_matches_eager():
    seeds = torch.arange(16, dtype=torch.int64, device="cuda") * 7919
    idx = torch.arange(16, dtype=torch.int64, device="cuda")
    eager = exponential_noise(seeds, idx, 5000)
    fused = Sampler(use_compile=True)._noise(seeds, idx, 5000)
    assert torch.allclose(eager, fused, rtol=1e-6, atol=0)
