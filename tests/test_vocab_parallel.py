"""The vocabulary-parallel embedding's partial lookup and the LM head's greedy ids, on the CPU.

A TP group's ranks run in threads here (tests/thread_ranks.py), with in-process collectives
that meet at a barrier: what is checked is the layers' arithmetic (every rank gets the
whole embedding once the partial lookups are summed; ``greedy_ids`` picks the same id as the
argmax over the gathered logits, ties and vocabulary padding included), not a transport. The
Triton kernels of that greedy path (engine/kernels/greedy.py: ``shard_greedy_table``, ``pick_greedy``)
run in Triton's CPU interpreter, in a subprocess (``test_in_triton_interpreter``).
"""

from __future__ import annotations

import os
import subprocess
import sys

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


INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


@pytest.mark.skipif(not INTERPRETED, reason="runs in test_in_triton_interpreter's subprocess")
@pytest.mark.parametrize("world", [2, 3, 4])
def test_greedy_table_kernels_give_the_argmax_of_the_whole_row(world):
    """The shards' tables from the Triton kernels (interpreted), summed as the all-reduce would,
    and picked by the Triton kernel: the argmax over the whole row, ties across and within
    shards going to the lowest id; each table equals the torch path's."""
    from engine.kernels import greedy
    from tests.gpu.test_triton_attention import patch_interpreter_scalars
    patch_interpreter_scalars()
    gen = torch.Generator().manual_seed(world)
    shard = 9000  # >= the 8192 a row needs for the Triton argmax
    logits = torch.randn(3, world * shard, generator=gen).to(torch.bfloat16)
    logits[0, 5] = logits[0, (world - 1) * shard + 7] = 50.0  # a tie across shards: id 5 wins
    logits[1, shard + 3] = logits[1, shard + 4000] = 60.0  # a tie inside one shard
    tables = []
    for rank in range(world):
        local = logits[:, rank * shard:(rank + 1) * shard]
        got = greedy._shard_table_triton(local, rank, world, rank * shard)
        torch.testing.assert_close(got, greedy.shard_greedy_table(local, rank, world, rank * shard),
                                   rtol=0, atol=0)  # local is on the CPU: the torch path
        tables.append(got)
    summed = sum(tables)
    out = torch.empty(3, dtype=torch.int64)
    greedy._table_pick_kernel[(3,)](summed, out, world, TP_PAD=triton_pow2(world))
    assert torch.equal(out, logits.argmax(dim=-1)) and out[0] == 5 and out[1] == shard + 3
    assert torch.equal(greedy.pick_greedy(summed, world), out)  # the torch path's pick


def triton_pow2(n: int) -> int:
    import triton
    return triton.next_power_of_2(n)


def test_in_triton_interpreter():
    if INTERPRETED:
        pytest.skip("already the interpreter's run")
    pytest.importorskip("triton")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                          "-k", "greedy_table_kernels", os.path.abspath(__file__)], cwd=root,
                         env=dict(os.environ, TRITON_INTERPRET="1"), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-6000:] + res.stderr[-3000:]
    assert "3 passed" in res.stdout, res.stdout[-2000:]
