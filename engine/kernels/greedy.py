"""Greedy ids without torch's argmax: Triton launches for a few rows of a large vocabulary.

    greedy_argmax(logits)              (R, V) -> (R,) int64: 64 programs a row take a chunk each
                                       (max, first index), one program a row picks the first
                                       chunk at the maximum; torch's argmax elsewhere
    shard_greedy_table(logits, ...)    a vocabulary-parallel rank's (R, tp * 2) fp32 table: its
                                       (max, vocab id) pair in its column, zeros elsewhere
    pick_greedy(table, tp)             the summed table -> (R,) int64, the first rank at the max

A TP decode step's greedy id is ``pick_greedy(all_reduce(shard_greedy_table(...)))``
(engine/models/layers.py: ``ParallelLMHead.greedy_ids``): the LM head GEMV, two launches for the
table, the all-reduce and one pick, without gathering the logits. NaN-free logits assumed (as
everywhere in sampling); ties resolve to the first index, like ``argmax``.
"""

from __future__ import annotations

import torch

ARGMAX_CHUNKS = 64

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only install
    triton = None

if triton is not None:
    @triton.jit
    def _argmax_chunk_kernel(logits_ptr, values_ptr, indices_ptr, vocab, stride_row, chunk,
                             BLOCK: tl.constexpr):
        """Program (row, c): max and first argmax of logits[row, c*chunk : (c+1)*chunk]."""
        row = tl.program_id(0).to(tl.int64)
        c = tl.program_id(1)
        offs = c * chunk + tl.arange(0, BLOCK)
        mask = (tl.arange(0, BLOCK) < chunk) & (offs < vocab)
        x = tl.load(logits_ptr + row * stride_row + offs, mask=mask, other=float("-inf")).to(tl.float32)
        best = tl.max(x, 0)
        first = tl.min(tl.where(x == best, offs, vocab), 0)  # the first index holding the maximum
        tl.store(values_ptr + row * tl.num_programs(1) + c, best)
        tl.store(indices_ptr + row * tl.num_programs(1) + c, first)

    @triton.jit
    def _argmax_final_kernel(values_ptr, indices_ptr, out_ptr, NUM_CHUNKS: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        c = tl.arange(0, NUM_CHUNKS)
        v = tl.load(values_ptr + row * NUM_CHUNKS + c)
        i = tl.load(indices_ptr + row * NUM_CHUNKS + c)
        best = tl.max(v, 0)
        tl.store(out_ptr + row, tl.min(tl.where(v == best, i, 2147483647), 0).to(tl.int64))


    @triton.jit
    def _argmax_table_kernel(values_ptr, indices_ptr, table_ptr, vocab_start, tp_rank, tp_size,
                             NUM_CHUNKS: tl.constexpr, TABLE_PAD: tl.constexpr):
        """Row r of the (R, tp_size, 2) fp32 table: (max, vocab_start + first argmax) of the
        chunks' answers in this rank's column, zeros in the others (``shard_greedy_table``)."""
        row = tl.program_id(0).to(tl.int64)
        c = tl.arange(0, NUM_CHUNKS)
        v = tl.load(values_ptr + row * NUM_CHUNKS + c)
        i = tl.load(indices_ptr + row * NUM_CHUNKS + c)
        best = tl.max(v, 0)
        first = tl.min(tl.where(v == best, i, 2147483647), 0) + vocab_start
        e = tl.arange(0, TABLE_PAD)  # entry (q, 0 value | 1 id) of the row
        mine = (e // 2) == tp_rank
        entry = tl.where(e % 2 == 0, best, first.to(tl.float32))
        tl.store(table_ptr + row * (2 * tp_size) + e, tl.where(mine, entry, 0.0), mask=e < 2 * tp_size)

    @triton.jit
    def _table_pick_kernel(table_ptr, out_ptr, tp_size, TP_PAD: tl.constexpr):
        """out[r] = the id of the first rank holding row r's largest value (``pick_greedy``)."""
        row = tl.program_id(0).to(tl.int64)
        q = tl.arange(0, TP_PAD)
        v = tl.load(table_ptr + row * (2 * tp_size) + 2 * q, mask=q < tp_size, other=float("-inf"))
        best = tl.max(v, 0)
        first = tl.min(tl.where(v == best, q, TP_PAD), 0)
        tl.store(out_ptr + row, tl.load(table_ptr + row * (2 * tp_size) + 2 * first + 1).to(tl.int64))


def greedy_argmax(logits: torch.Tensor) -> torch.Tensor:
    """logits (R, V) -> (R,) int64, the first index of each row's maximum, as ``argmax``.

    For a few rows of a large vocabulary torch's argmax reduces each row in one block
    (~27 us for 128k fp32 logits on an H100, every decode step). On CUDA two small Triton
    launches do it instead: 64 programs per row take a chunk each (max, first index of it),
    then one program per row picks the first chunk holding the maximum. NaN-free logits
    assumed (as everywhere in sampling); ties resolve to the first index, like ``argmax``.
    """
    if not _triton_argmax_takes(logits):
        return logits.argmax(dim=-1)  # CPU, many rows or a small vocabulary: torch's is fine
    rows, vocab = logits.shape
    chunk = triton.cdiv(vocab, ARGMAX_CHUNKS)
    values = torch.empty(rows, ARGMAX_CHUNKS, dtype=torch.float32, device=logits.device)
    indices = torch.empty(rows, ARGMAX_CHUNKS, dtype=torch.int32, device=logits.device)
    out = torch.empty(rows, dtype=torch.int64, device=logits.device)
    _argmax_chunk_kernel[(rows, ARGMAX_CHUNKS)](logits, values, indices, vocab, logits.stride(0), chunk,
                                               BLOCK=triton.next_power_of_2(chunk))
    _argmax_final_kernel[(rows,)](values, indices, out, NUM_CHUNKS=ARGMAX_CHUNKS)
    return out


def _triton_argmax_takes(logits: torch.Tensor) -> bool:
    """Whether ``greedy_argmax``'s two launches (not torch's argmax) take these logits."""
    rows, vocab = logits.shape
    return triton is not None and logits.is_cuda and rows <= 16 and vocab >= 8192 and logits.stride(-1) == 1


def shard_greedy_table(logits: torch.Tensor, tp_rank: int, tp_size: int, vocab_start: int) -> torch.Tensor:
    """The first step of a greedy id over a vocabulary split across ``tp_size`` ranks.

    logits (R, V_shard) hold this rank's shard (ids ``vocab_start`` ..; V_shard may be 0) ->
    (R, tp_size * 2) fp32: zeros, but for this rank's pair (its maximum, the vocabulary id of its
    first argmax), the value -inf where the shard is empty. Summed over the ranks (one
    all-reduce: exact, one nonzero term per entry, ids < 2**24) every rank holds every rank's
    pair; ``pick_greedy`` then gives the id ``argmax`` over the whole row would. On CUDA, the
    chunk launch of ``greedy_argmax`` and one launch that writes the table (three instead of
    about ten small torch kernels, every TP decode step)."""
    rows = logits.shape[0]
    if logits.shape[1] > 0 and _triton_argmax_takes(logits):
        return _shard_table_triton(logits, tp_rank, tp_size, vocab_start)
    table = torch.zeros(rows, tp_size, 2, dtype=torch.float32, device=logits.device)
    if logits.shape[1] > 0:
        ids = greedy_argmax(logits)  # (R,)
        table[:, tp_rank, 0] = logits.gather(1, ids[:, None])[:, 0].float()
        table[:, tp_rank, 1] = (ids + vocab_start).float()
    else:
        table[:, tp_rank, 0] = float("-inf")
    return table.view(rows, tp_size * 2)


def _shard_table_triton(logits: torch.Tensor, tp_rank: int, tp_size: int, vocab_start: int) -> torch.Tensor:
    rows, vocab = logits.shape
    chunk = triton.cdiv(vocab, ARGMAX_CHUNKS)
    values = torch.empty(rows, ARGMAX_CHUNKS, dtype=torch.float32, device=logits.device)
    indices = torch.empty(rows, ARGMAX_CHUNKS, dtype=torch.int32, device=logits.device)
    table = torch.empty(rows, tp_size * 2, dtype=torch.float32, device=logits.device)
    _argmax_chunk_kernel[(rows, ARGMAX_CHUNKS)](logits, values, indices, vocab, logits.stride(0), chunk,
                                               BLOCK=triton.next_power_of_2(chunk))
    _argmax_table_kernel[(rows,)](values, indices, table, vocab_start, tp_rank, tp_size,
                                  NUM_CHUNKS=ARGMAX_CHUNKS, TABLE_PAD=triton.next_power_of_2(2 * tp_size))
    return table


def pick_greedy(table: torch.Tensor, tp_size: int) -> torch.Tensor:
    """The summed (R, tp_size * 2) table of ``shard_greedy_table`` -> (R,) int64: the id of the
    first rank holding the largest value (ties: the lowest id, as ``argmax``)."""
    rows = table.shape[0]
    if triton is not None and table.is_cuda and table.is_contiguous():
        out = torch.empty(rows, dtype=torch.int64, device=table.device)
        _table_pick_kernel[(rows,)](table, out, tp_size, TP_PAD=triton.next_power_of_2(tp_size))
        return out
    pairs = table.view(rows, tp_size, 2)
    best = pairs[:, :, 0].argmax(dim=1, keepdim=True)  # (R, 1): the first rank at the max
    return pairs[:, :, 1].gather(1, best)[:, 0].long()
