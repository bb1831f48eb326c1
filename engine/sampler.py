"""Batched sampling: one row of logits per request that samples this step.

Order of operations for a batch of R rows over a vocabulary of V tokens::

    logits (R, V) fp32 ──▶ logprobs (raw log_softmax, only if a row asks)
        │
        ├─ penalties: repetition (prompt + output), presence / frequency (output counts)
        ├─ greedy rows: argmax ──────────────────────────────────────────────┐
        └─ random rows: / temperature ─ top-k ─ top-p ─ min-p ─ softmax      │
                        ─ argmax(probs / E),  E ~ Exp(1) ────────────────────┴▶ token ids (R,)

The exponential race picks token i with probability probs[i] (argmin of E_i / p_i over
independent exponentials). E is not drawn from a stateful generator: it is a pure function
of (seed, output_index, vocab index), computed with a counter-based integer hash. So

* a request's tokens depend only on its own seed and position, never on its batch-mates or
  its row, and a preempted request that recomputes draws the same tokens again;
* seeded and unseeded requests share one code path (the engine seeds every request);
* nothing here needs a host sync: the flags that skip work (``all_greedy`` ...) are built on
  the host from the parameters, and the only device->host copy is the caller's ``tolist()``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from engine.device_copy import to_device
from engine.kernels.greedy import greedy_argmax
from engine.sampling_params import SamplingParams
from engine.scheduler_output import TokenLogprobs

# One request's sampling inputs: (params, seed, output_index, prompt_token_ids, output_token_ids).
# output_index = number of tokens the request has already generated (the index of this draw).
SamplingRequest = tuple[SamplingParams, int, int, Sequence[int], Sequence[int]]

_MASK32 = 0xFFFFFFFF

logger = logging.getLogger(__name__)


def _hash32_(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mixer (xorshift-multiply, constants from Wellons' hash prospector), in place.

    ``x`` (a temporary: it is overwritten) holds 32-bit values in int64 lanes (0 <= x < 2**32). Both multipliers are < 2**31, so
    every product stays below 2**63: no signed overflow, and masking keeps the exact low 32 bits.
    The map is a bijection on 32-bit values with good avalanche.
    """
    x ^= x >> 16
    x *= 0x21F0AAAD
    x &= _MASK32
    x ^= x >> 15
    x *= 0x735A2D97
    x &= _MASK32
    x ^= x >> 15
    return x


def exponential_noise(seeds: torch.Tensor, output_indices: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """E ~ Exp(1), shape (R, V), a deterministic function of (seed, output index, vocab index).

    seeds: (R,) int64 in [0, 2**63); output_indices: (R,) int64 >= 0. Exact integer math, so
    the bits are the same on every device; only the final log may differ by an ulp across devices.
    """
    lo, hi = seeds & _MASK32, (seeds >> 32) & _MASK32  # (R,) each
    # Row key from the 64-bit seed and the draw index (a chain of bijections: distinct draws of
    # one request never share a key).
    key = _hash32_(_hash32_(_hash32_(lo ^ 0x5BD1E995) ^ hi) ^ (output_indices & _MASK32))  # (R,)
    vocab = torch.arange(vocab_size, dtype=torch.int64, device=seeds.device)  # (V,)
    token_hash = _hash32_(vocab ^ 0x165667B1)  # (V,) the same for every row: hashed once
    bits = _hash32_(token_hash[None, :] ^ key[:, None])  # (R, V), the one full-size hash
    # Top 24 bits -> u in (0, 1), exact in fp32, never 0 or 1, so E is finite and > 0.
    bits >>= 8
    u = bits.to(torch.float32).add_(0.5).mul_(1.0 / (1 << 24))
    return u.log_().neg_()


@dataclass
class SamplingBatch:
    """Per-row sampling parameters as device tensors, plus host flags that let the sampler skip work.

    Every tensor has R rows, in the order of the logits rows. A batch of greedy rows without
    penalties needs none of them: they are None then (only ``num_logprobs`` and the flags are set).
    """

    temperature: Optional[torch.Tensor]  # (R,) fp32; 1.0 on greedy rows (unused there, avoids dividing by 0)
    is_greedy: Optional[torch.Tensor]  # (R,) bool
    top_k: Optional[torch.Tensor]  # (R,) int64; V where disabled
    top_p: Optional[torch.Tensor]  # (R,) fp32; 1.0 where disabled
    min_p: Optional[torch.Tensor]  # (R,) fp32; 0.0 where disabled
    repetition_penalty: Optional[torch.Tensor]  # (R,) fp32
    presence_penalty: Optional[torch.Tensor]  # (R,) fp32
    frequency_penalty: Optional[torch.Tensor]  # (R,) fp32
    seeds: Optional[torch.Tensor]  # (R,) int64, the request seed reduced to [0, 2**63)
    output_indices: Optional[torch.Tensor]  # (R,) int64, index of the token being drawn
    num_logprobs: list[Optional[int]]  # host, per row: SamplingParams.logprobs
    all_greedy: bool
    needs_top_k_top_p: bool
    needs_min_p: bool
    needs_penalties: bool
    max_num_logprobs: Optional[int]  # None when no row asks for logprobs
    # Only when needs_penalties (else None):
    seen_mask: Optional[torch.Tensor] = None  # (R, V) bool, token in prompt or output
    output_counts: Optional[torch.Tensor] = None  # (R, V) fp32, occurrences in the output

    @property
    def num_rows(self) -> int:
        return len(self.num_logprobs)

    @property
    def is_argmax_only(self) -> bool:
        """Every row greedy, no penalties, no logprobs: the sample is the logits' argmax."""
        return self.all_greedy and not self.needs_penalties and self.max_num_logprobs is None

    @classmethod
    def from_requests(cls, requests: Sequence[SamplingRequest], vocab_size: int,
                      device: torch.device | str = "cpu") -> "SamplingBatch":
        """Builds the batch on the host, then copies each field to ``device`` once (no sync)."""
        if not requests:
            raise ValueError("a sampling batch needs at least one request")
        params = [r[0] for r in requests]
        for _, seed, _, _, _ in requests:
            if not isinstance(seed, int):
                raise ValueError(f"every sampled request needs an integer seed, got {seed!r}")
        greedy = [p.is_greedy for p in params]
        top_k = [p.top_k if 0 < p.top_k < vocab_size else vocab_size for p in params]
        random_rows = [p for p, g in zip(params, greedy) if not g]
        needs_penalties = any(p.repetition_penalty != 1.0 or p.presence_penalty != 0.0
                              or p.frequency_penalty != 0.0 for p in params)
        asked = [p.logprobs for p in params if p.logprobs is not None]

        device = torch.device(device)

        def f32(values: list[float]) -> torch.Tensor:
            return to_device(values, torch.float32, device)

        def i64(values: list[int]) -> torch.Tensor:
            return to_device(values, torch.int64, device)

        all_greedy = all(greedy)
        if all_greedy and not needs_penalties:  # argmax alone: no per-row tensors (no host->device copies)
            return cls(temperature=None, is_greedy=None, top_k=None, top_p=None, min_p=None,
                       repetition_penalty=None, presence_penalty=None, frequency_penalty=None, seeds=None,
                       output_indices=None, num_logprobs=[p.logprobs for p in params], all_greedy=True,
                       needs_top_k_top_p=False, needs_min_p=False, needs_penalties=False,
                       max_num_logprobs=max(asked) if asked else None)
        batch = cls(
            temperature=f32([1.0 if g else p.temperature for p, g in zip(params, greedy)]),
            is_greedy=to_device(greedy, torch.bool, device),
            top_k=i64(top_k),
            top_p=f32([p.top_p for p in params]),
            min_p=f32([p.min_p for p in params]),
            repetition_penalty=f32([p.repetition_penalty for p in params]),
            presence_penalty=f32([p.presence_penalty for p in params]),
            frequency_penalty=f32([p.frequency_penalty for p in params]),
            seeds=i64([r[1] & ((1 << 63) - 1) for r in requests]),
            output_indices=i64([r[2] for r in requests]),
            num_logprobs=[p.logprobs for p in params],
            all_greedy=all_greedy,
            needs_top_k_top_p=any(0 < p.top_k < vocab_size or p.top_p < 1.0 for p in random_rows),
            needs_min_p=any(p.min_p > 0.0 for p in random_rows),
            needs_penalties=needs_penalties,
            max_num_logprobs=max(asked) if asked else None,
        )
        if needs_penalties:
            batch.seen_mask, batch.output_counts = _token_stats(
                [r[3] for r in requests], [r[4] for r in requests], vocab_size, device)
        return batch


def _token_stats(prompts: Sequence[Sequence[int]], outputs: Sequence[Sequence[int]], vocab_size: int,
                 device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """(seen_mask (R, V) bool, output_counts (R, V) fp32) by scatter-add on the device.

    Token lists are padded with the id V, which lands in a spare column that is dropped.
    """
    def padded(lists: Sequence[Sequence[int]]) -> torch.Tensor:
        width = max(1, max(len(ids) for ids in lists))
        rows = [list(ids) + [vocab_size] * (width - len(ids)) for ids in lists]
        return to_device(rows, torch.int64, torch.device(device))  # (R, width)

    num_rows = len(prompts)
    out_ids = padded(outputs)
    counts = torch.zeros(num_rows, vocab_size + 1, dtype=torch.float32, device=device)
    counts.scatter_add_(1, out_ids, torch.ones_like(out_ids, dtype=torch.float32))
    prompt_ids = padded(prompts)
    in_prompt = torch.zeros(num_rows, vocab_size + 1, dtype=torch.bool, device=device)
    in_prompt.scatter_(1, prompt_ids, True)
    counts = counts[:, :vocab_size]
    return in_prompt[:, :vocab_size] | (counts > 0), counts


def apply_penalties(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Repetition penalty on tokens seen in prompt or output; presence / frequency on output counts.

    logits: (R, V) fp32 -> new (R, V) tensor.
    """
    assert batch.seen_mask is not None and batch.output_counts is not None
    rep = batch.repetition_penalty[:, None]  # (R, 1)
    penalized = torch.where(logits > 0, logits / rep, logits * rep)
    logits = torch.where(batch.seen_mask, penalized, logits)
    counts = batch.output_counts
    logits = logits - batch.frequency_penalty[:, None] * counts
    return logits - batch.presence_penalty[:, None] * (counts > 0).to(logits.dtype)


def apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Masks (-inf) all but the k most likely tokens, then all but the nucleus of what remains.

    Nucleus = the smallest most-likely-first set whose probability reaches top_p; the top token
    is always kept. logits: (R, V); top_k: (R,) int64 (V = disabled); top_p: (R,) fp32.
    """
    vocab_size = logits.shape[-1]
    sorted_logits, sorted_idx = logits.sort(dim=-1, descending=True)  # (R, V) each
    position = torch.arange(vocab_size, device=logits.device)[None, :]  # (1, V)
    drop = position >= top_k[:, None]  # (R, V) in sorted order
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # probability of the strictly more likely tokens
    # Rows with top_p == 1 skip this: rounding could push mass_before to 1 and drop the tail.
    drop |= (mass_before >= top_p[:, None]) & (top_p[:, None] < 1.0)
    drop[:, 0] = False
    drop_unsorted = torch.empty_like(drop).scatter_(1, sorted_idx, drop)
    return logits.masked_fill(drop_unsorted, float("-inf"))


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Masks tokens with prob < min_p * max prob. logits: (R, V); min_p: (R,)."""
    probs = logits.softmax(dim=-1)  # (R, V)
    threshold = min_p[:, None] * probs.amax(dim=-1, keepdim=True)  # (R, 1)
    return logits.masked_fill(probs < threshold, float("-inf"))


@dataclass
class SamplerLogprobs:
    """Logprobs of the raw logits (before penalties and temperature), as device tensors."""

    token_logprobs: torch.Tensor  # (R,) fp32, of the sampled token
    ranks: torch.Tensor  # (R,) int64, 1 = most likely
    top_token_ids: torch.Tensor  # (R, K) int64, K = the batch's largest ``logprobs``
    top_logprobs: torch.Tensor  # (R, K) fp32


@dataclass
class SamplerOutput:
    sampled_token_ids: torch.Tensor  # (R,) int64
    logprobs: Optional[SamplerLogprobs]  # None when no row asks


class Sampler:
    """Stateless apart from the compiled noise kernel: a row's draw depends only on its batch row.

    use_compile: fuse the noise hash with ``torch.compile`` on CUDA (None: when on CUDA). Eager,
    the hash is ~15 passes over an int64 (R, V) tensor (about 2 ms at 256 x 128k on an H200);
    fused it is one (about 0.3 ms). If compiling fails, the sampler logs it and stays eager.
    """

    def __init__(self, use_compile: Optional[bool] = None) -> None:
        self.use_compile = use_compile
        self._compiled_noise = None

    def __call__(self, logits: torch.Tensor, batch: SamplingBatch) -> SamplerOutput:
        if batch.is_argmax_only:  # any float dtype: the argmax of exact bf16 values is the same
            return SamplerOutput(sampled_token_ids=greedy_argmax(logits), logprobs=None)
        logits = logits.float()  # (R, V)
        raw_logprobs = logits.log_softmax(dim=-1) if batch.max_num_logprobs is not None else None
        if batch.needs_penalties:
            logits = apply_penalties(logits, batch)
        greedy_ids = logits.argmax(dim=-1)  # (R,)
        if batch.all_greedy:
            sampled = greedy_ids
        else:
            sampled = torch.where(batch.is_greedy, greedy_ids, self._sample_random(logits, batch))
        logprobs = None
        if raw_logprobs is not None:
            logprobs = _gather_logprobs(raw_logprobs, sampled, batch.max_num_logprobs)
        return SamplerOutput(sampled_token_ids=sampled, logprobs=logprobs)

    def _sample_random(self, logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        logits = logits / batch.temperature[:, None]
        if batch.needs_top_k_top_p:
            logits = apply_top_k_top_p(logits, batch.top_k, batch.top_p)
        if batch.needs_min_p:
            logits = apply_min_p(logits, batch.min_p)
        probs = logits.softmax(dim=-1)  # (R, V); masked tokens have prob 0 and can never win
        noise = self._noise(batch.seeds, batch.output_indices, logits.shape[-1])  # (R, V)
        return probs.div_(noise).argmax(dim=-1)

    def _noise(self, seeds: torch.Tensor, output_indices: torch.Tensor, vocab_size: int) -> torch.Tensor:
        use_compile = self.use_compile if self.use_compile is not None else seeds.is_cuda
        if not use_compile:
            return exponential_noise(seeds, output_indices, vocab_size)
        if self._compiled_noise is None:
            self._compiled_noise = torch.compile(exponential_noise, dynamic=True)
        try:
            return self._compiled_noise(seeds, output_indices, vocab_size)
        except Exception:  # noqa: BLE001 - a missing compiler must not take sampling down
            logger.warning("torch.compile of the sampling noise failed; using eager mode", exc_info=True)
            self.use_compile = False
            return exponential_noise(seeds, output_indices, vocab_size)


def _gather_logprobs(logprobs: torch.Tensor, sampled: torch.Tensor, k: int) -> SamplerLogprobs:
    """logprobs: (R, V) raw log_softmax; sampled: (R,)."""
    chosen = logprobs.gather(1, sampled[:, None])  # (R, 1)
    ranks = (logprobs > chosen).sum(dim=-1) + 1  # (R,)
    top_logprobs, top_ids = logprobs.topk(k, dim=-1)  # (R, K)
    return SamplerLogprobs(chosen[:, 0], ranks, top_ids, top_logprobs)


def to_token_logprobs(out: SamplerOutput, batch: SamplingBatch) -> list[Optional[list[TokenLogprobs]]]:
    """Per row: None if the row did not ask for logprobs, else a one-entry list for ``ModelOutput``.

    This copies the logprob tensors to the host (one transfer each, after the step's tokens).
    """
    if out.logprobs is None:
        return [None] * batch.num_rows
    lp = out.logprobs
    token_ids = out.sampled_token_ids.tolist()
    chosen, ranks = lp.token_logprobs.tolist(), lp.ranks.tolist()
    top_ids, top_lps = lp.top_token_ids.tolist(), lp.top_logprobs.tolist()
    result: list[Optional[list[TokenLogprobs]]] = []
    for row, k in enumerate(batch.num_logprobs):
        if k is None:
            result.append(None)
            continue
        result.append([TokenLogprobs(token_id=token_ids[row], logprob=chosen[row], rank=ranks[row],
                                     top_token_ids=top_ids[row][:k], top_logprobs=top_lps[row][:k])])
    return result
