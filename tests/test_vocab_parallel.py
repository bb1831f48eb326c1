"""The vocabulary-parallel embedding's partial lookup and the LM head's greedy ids, on the CPU.

A TP group's ranks run in threads here, with a stand-in communicator whose all-reduce and
all-gather meet at a barrier: what is checked is the layers' arithmetic (every rank gets the
whole embedding once the partial lookups are summed; ``greedy_ids`` picks the same id as the
argmax over the gathered logits, ties and vocabulary padding included), not a transport.
"""

from __future__ import annotations

import threading

import pytest
import torch
import torch.nn.functional as F

from engine.distributed.communicator import Communicator
from engine.models.layers import ParallelLMHead, VocabParallelEmbedding


class ThreadGroup:
    """State shared by the ranks of one stand-in group."""

    def __init__(self, world: int) -> None:
        self.world = world
        self.barrier = threading.Barrier(world)
        self.slots: list = [None] * world


class ThreadComm(Communicator):
    def __init__(self, group: ThreadGroup, rank: int) -> None:
        self.group, self.rank, self.world_size = group, rank, group.world

    def _exchange(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        self.group.slots[self.rank] = tensor.clone()
        self.group.barrier.wait()
        parts = list(self.group.slots)
        self.group.barrier.wait()  # every rank has read the slots before they are reused
        return parts

    def all_reduce(self, tensor):
        return torch.stack(self._exchange(tensor)).sum(0)

    def all_gather(self, tensor, dim):
        return torch.cat(self._exchange(tensor), dim=dim)

    def send(self, tensor, dst):
        raise AssertionError("not used here")

    def recv(self, shape, dtype, src):
        raise AssertionError("not used here")

    @property
    def device(self):
        return torch.device("cpu")


def run_ranks(world: int, fn) -> list:
    """fn(rank, comm) in one thread per rank; their results in rank order."""
    group, results, errors = ThreadGroup(world), [None] * world, []

    def target(rank: int) -> None:
        try:
            results[rank] = fn(rank, ThreadComm(group, rank))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
            group.barrier.abort()

    threads = [threading.Thread(target=target, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    if errors:
        raise errors[0]
    return results


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
