"""The vocabulary-parallel embedding's partial lookup and the LM head's greedy ids, on the CPU.

A TP group's ranks run in threads here (tests/thread_ranks.py), with in-process collectives
that meet at a barrier: what is checked is the layers' arithmetic (every rank gets the
whole embedding once the partial lookups are summed; ``greedy_ids`` picks the same id as the
argmax over the gathered logits, ties and vocabulary padding included), not a transport.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine.models.layers import ParallelLMHead, VocabParallelEmbedding
from tests.thread_ranks import run_ranks


def sharded(cls, full: torch.Tensor, vocab: int, rank: int, world: int, comm):
    layer = cls(vocab, full.shape[1], rank, world, comm)
    layer.weight.data = torch.zeros(layer.weight.shape, dtype=full.dtype)
    rows = layer.vocab_end - layer.vocab_start
    layer.weight.data[:rows] = full[layer.vocab_start:layer.vocab_end]
    return layer


@pytest.mark.parametrize("vocab,world", [(10, 2), (10, 3), (9, 4)])  # (9, 4): the last rank owns no id
def test_partial_lookups_sum_to_the_embedding(vocab, world):
    torch.manual_seed(0)
    full = torch.randn(vocab, 8, dtype=torch.bfloat16)
    ids = torch.tensor([0, vocab - 1, 3, 3, 7 % vocab])

    def rank_fn(rank, comm):
        layer = sharded(VocabParallelEmbedding, full, vocab, rank, world, comm)
        part = layer.partial(ids)
        mine = (ids >= layer.vocab_start) & (ids < layer.vocab_end)
        assert torch.equal(part[~mine], torch.zeros_like(part[~mine]))  # zeros for ids not owned
        return comm.all_reduce(part), layer(ids)

    for summed, looked_up in run_ranks(world, rank_fn):
        assert torch.equal(summed, F.embedding(ids, full))
        assert torch.equal(looked_up, F.embedding(ids, full))


@pytest.mark.parametrize("vocab,world", [(10, 2), (10, 3), (9, 4), (12, 1)])
def test_greedy_ids_are_the_argmax_of_the_gathered_logits(vocab, world):
    torch.manual_seed(1)
    full = torch.randn(vocab, 16, dtype=torch.bfloat16)
    full[vocab - 2] = full[1]  # a tie across shards: the lower id must win
    hidden = torch.randn(6, 16, dtype=torch.bfloat16)
    hidden[0] = full[1] * 4  # row 0 peaks at the tie
    hidden[1] = -full.float().sum(0).to(torch.bfloat16)  # another row, any maximum

    def rank_fn(rank, comm):
        head = sharded(ParallelLMHead, full, vocab, rank, world, comm if world > 1 else None)
        return head.greedy_ids(hidden), head.compute_logits(hidden, upcast=False)

    for ids, logits in run_ranks(world, rank_fn):
        assert ids.dtype == torch.int64
        assert torch.equal(ids, logits.argmax(dim=-1))
        assert logits[0, 1] == logits[0, vocab - 2] and ids[0] == 1
