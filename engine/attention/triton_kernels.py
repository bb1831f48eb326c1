"""Triton kernels for attention over the paged KV cache.

Cache layout (engine/attention/base.py), one tensor per layer, contiguous::

    kv_cache: (2, num_blocks, block_size, Hkv, D)      [0] = K, [1] = V
    slot = block_id * block_size + offset_in_block      row of the flat (num_slots, Hkv, D) view

so one KV head of one token is D contiguous elements, and consecutive tokens of a
block are ``Hkv * D`` elements apart. Every kernel gathers token ``n`` of request
``r`` from slot ``block_tables[r, n // block_size] * block_size + n % block_size``,
so a tile of BLOCK_N tokens may span several blocks (or part of one): any
block_size works, and none of the tile sizes has to match it.

Kernels (all launched with grids that depend only on num_reqs / num_tokens and
fixed maxima, never on data, so the all-decode path can be captured in a CUDA graph):

    (store_kv and rotary_store_kv, which write the cache: engine/attention/cache_store.py)
    paged_decode    grid (R, Hkv, num_splits)    one query per request; each program
                                                 takes all GROUP = Hq/Hkv query heads of
                                                 one KV head (K/V read once per group) over
                                                 1/num_splits of the sequence
                    + reduce grid (R, Hq)        merges the splits by their log-sum-exp
                                                 (launched as a programmatic dependent; a
                                                 merge by the last split program to finish,
                                                 one launch fewer, measured slower: 3.751 ms
                                                 against 3.716 for the 8B TP=1 graph on an
                                                 H200, stop 25)
    paged_prefill   grid (T//BLOCK_Q + R, Hkv)   any query lengths: chunked prefill,
                                                 prefix hits, decodes mixed in

Softmax runs in the log2 domain: scores are multiplied by ``scale * log2(e)`` and
exponentiated with exp2; the split log-sum-exps are log2 too.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from engine.attention.cache_store import _check_cache, _dim_pad, _last_dim_contiguous
from engine.attention.tiles import attend_tile, kv_offsets, kv_rows, softmax_step
from engine.kernels import pdl
from engine.kernels.triton_ops import pdl_enter

LOG2E = 1.4426950408889634
# 0: the decode kernel and its reduce wait for the kernel before (PDL) before they read
# anything, as before stop 25; default 1: they read what the host wrote first (the lengths,
# the block table, the query starts: ``_decode_kernel``)
DECODE_PREFETCH_ENV = "KVMESH_DECODE_PREFETCH"
DECODE_PREFETCH = os.environ.get(DECODE_PREFETCH_ENV, "1") not in ("", "0")


# ---- decode (flash-decoding) -----------------------------------------------------------------

# The block table's row stride (its width: the batch's longest request, in blocks) changes from
# step to step; specialized (== 1, % 16) it would make a new variant, a JIT compile of about a
# second mid-serving, the first time each kind of width appears (so would an unaligned pointer:
# engine/device_copy.packed_to_device aligns the step's index arrays).
@triton.jit(do_not_specialize=["num_splits", "stride_bt"])
def _decode_kernel(q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq_lens_ptr,
                   query_start_ptr, out_ptr, part_out_ptr, part_lse_ptr,
                   scale_log2, num_splits, stride_qt, stride_qh, stride_ot, stride_oh,
                   stride_cache_slot, stride_cache_head, stride_bt,
                   NUM_Q_HEADS: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
                   HEAD_DIM: tl.constexpr, DIM_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                   BLOCK_N: tl.constexpr, IS_SPLIT: tl.constexpr, MIN_SPLIT_LEN: tl.constexpr,
                   DOT_PRECISION: tl.constexpr, OFFSET_64: tl.constexpr, PDL: tl.constexpr = False,
                   PREFETCH: tl.constexpr = True):
    # Launched as a programmatic dependent (PDL), this program may start while the kernel before
    # still runs: rotary_store_kv, which rotates q in place and stores this step's key and value.
    # The lengths and the block table were written before that kernel started, so they are read
    # first: after the wait (``pdl_enter``) q and the first tile's K and V are one load away,
    # not four dependent ones (query start -> length -> block table -> K). PREFETCH=False
    # (``KVMESH_DECODE_PREFETCH=0``): wait first, for A/B runs.
    if not PREFETCH:
        pdl_enter(PDL)
    r = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    q_row = tl.load(query_start_ptr + r)  # this request's one query token
    if tl.load(query_start_ptr + r + 1) == q_row:
        return  # request scheduled no token this step
    seq_len = tl.load(seq_lens_ptr + r)
    # Even split of this request's keys, in whole tiles, at least MIN_SPLIT_LEN each;
    # splits past the end get no keys and report lse = -inf.
    split_len = tl.maximum(tl.cdiv(seq_len, num_splits), MIN_SPLIT_LEN)
    split_len = tl.cdiv(split_len, BLOCK_N) * BLOCK_N
    start = split * split_len
    end = tl.minimum(start + split_len, seq_len)
    bt_row_ptr = block_tables_ptr + r.to(tl.int64) * stride_bt
    offs_n = start + tl.arange(0, BLOCK_N)  # the first tile
    n_mask = offs_n < end
    kv_offs = kv_offsets(bt_row_ptr, offs_n, n_mask, kv_head, stride_cache_slot, stride_cache_head,
                         BLOCK_SIZE, True, OFFSET_64)
    if PREFETCH:
        pdl_enter(PDL)

    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, DIM_PAD)
    heads = kv_head * GROUP + g  # (GROUP_PAD,) query heads of this KV head
    row_mask = (g < GROUP)[:, None] & (d < HEAD_DIM)[None, :]
    q = tl.load(q_ptr + q_row.to(tl.int64) * stride_qt + heads[:, None] * stride_qh + d[None, :],
                mask=row_mask, other=0.0)  # (GROUP_PAD, DIM_PAD)
    acc = tl.zeros([GROUP_PAD, DIM_PAD], dtype=tl.float32)
    l_i = tl.zeros([GROUP_PAD], dtype=tl.float32)
    m_i = tl.full([GROUP_PAD], float("-inf"), dtype=tl.float32)
    if start < end:  # the first tile, at the offsets read before the wait
        k0, v0 = kv_rows(k_cache_ptr, v_cache_ptr, kv_offs, n_mask, HEAD_DIM, DIM_PAD)
        acc, l_i, m_i = softmax_step(q, acc, l_i, m_i, k0, v0, n_mask, scale_log2, DOT_PRECISION)
    for n0 in range(start + BLOCK_N, end, BLOCK_N):
        acc, l_i, m_i = attend_tile(q, acc, l_i, m_i, k_cache_ptr, v_cache_ptr, bt_row_ptr, n0,
                                    end, m_i, kv_head, scale_log2, stride_cache_slot,
                                    stride_cache_head, HEAD_DIM, DIM_PAD, BLOCK_SIZE, BLOCK_N,
                                    True, False, DOT_PRECISION, OFFSET_64)
    if not IS_SPLIT:
        o = acc / l_i[:, None]
        tl.store(out_ptr + q_row.to(tl.int64) * stride_ot + heads[:, None] * stride_oh + d[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=row_mask)
    else:
        # part_out (R, Hq, num_splits, DIM_PAD) fp32 normalised; part_lse (R, Hq, num_splits) log2
        has_keys = l_i > 0
        o = acc / tl.where(has_keys, l_i, 1.0)[:, None]
        lse = tl.where(has_keys, m_i + tl.log2(tl.where(has_keys, l_i, 1.0)), float("-inf"))
        part_row = (r * NUM_Q_HEADS + heads).to(tl.int64) * num_splits + split  # (GROUP_PAD,)
        tl.store(part_out_ptr + part_row[:, None] * DIM_PAD + d[None, :], o, mask=row_mask)
        tl.store(part_lse_ptr + part_row, lse, mask=g < GROUP)


@triton.jit(do_not_specialize=["num_splits"])
def _decode_reduce_kernel(part_out_ptr, part_lse_ptr, query_start_ptr, out_ptr, num_splits,
                          stride_ot, stride_oh,
                          NUM_Q_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, DIM_PAD: tl.constexpr,
                          SPLITS_PAD: tl.constexpr, PDL: tl.constexpr = False,
                          PREFETCH: tl.constexpr = True):
    # As in _decode_kernel: the query starts (host-written) before the wait, the parts after
    if not PREFETCH:
        pdl_enter(PDL)
    r = tl.program_id(0)
    head = tl.program_id(1)
    q_row = tl.load(query_start_ptr + r)
    if tl.load(query_start_ptr + r + 1) == q_row:
        return
    if PREFETCH:
        pdl_enter(PDL)
    s = tl.arange(0, SPLITS_PAD)
    d = tl.arange(0, DIM_PAD)
    s_mask = s < num_splits
    part_row = (r * NUM_Q_HEADS + head).to(tl.int64) * num_splits + s  # (SPLITS_PAD,)
    lse = tl.load(part_lse_ptr + part_row, mask=s_mask, other=float("-inf"))
    weight = tl.exp2(lse - tl.max(lse, 0))  # split 0 always has keys, so the max is finite
    o = tl.load(part_out_ptr + part_row[:, None] * DIM_PAD + d[None, :],
                mask=s_mask[:, None], other=0.0)  # (SPLITS_PAD, DIM_PAD)
    o = tl.sum(o * weight[:, None], 0) / tl.sum(weight, 0)
    tl.store(out_ptr + q_row.to(tl.int64) * stride_ot + head * stride_oh + d,
             o.to(out_ptr.dtype.element_ty), mask=d < HEAD_DIM)


def paged_decode(query: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                 seq_lens: torch.Tensor, query_start_loc: torch.Tensor, num_reqs: int,
                 scale: float, out: torch.Tensor, num_splits: int,
                 block_n: int = 64, min_split_len: int = 256, num_warps: int = 4,
                 num_stages: int = 2) -> None:
    """Attention of one query token per request over its whole context.

    query, out (T, Hq, D); request r's query is row ``query_start_loc[r]`` (T >= R).
    ``num_splits`` must depend only on num_reqs (graph capture); each request's keys
    are split evenly, in tiles of ``block_n``, with at least ``min_split_len`` a split.
    """
    _check_cache(kv_cache)
    _, num_q_heads, head_dim = query.shape
    _, _, block_size, num_kv_heads, _ = kv_cache.shape
    group = num_q_heads // num_kv_heads
    dim_pad = _dim_pad(head_dim)
    query = _last_dim_contiguous(query)
    if num_splits > 1:
        part_out = torch.empty(num_reqs, num_q_heads, num_splits, dim_pad, dtype=torch.float32,
                               device=query.device)
        part_lse = torch.empty(num_reqs, num_q_heads, num_splits, dtype=torch.float32,
                               device=query.device)
    else:
        part_out = part_lse = out  # unused
    on = pdl.small_pdl(query.device)
    _decode_kernel[(num_reqs, num_kv_heads, num_splits)](
        query, kv_cache[0], kv_cache[1], block_tables, seq_lens, query_start_loc,
        out, part_out, part_lse,
        scale * LOG2E, num_splits, query.stride(0), query.stride(1), out.stride(0), out.stride(1),
        kv_cache.stride(2), kv_cache.stride(3), block_tables.stride(0),
        NUM_Q_HEADS=num_q_heads, GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)),
        HEAD_DIM=head_dim, DIM_PAD=dim_pad, BLOCK_SIZE=block_size, BLOCK_N=block_n,
        IS_SPLIT=num_splits > 1, MIN_SPLIT_LEN=min_split_len,
        DOT_PRECISION=_dot_precision(query.dtype), OFFSET_64=_needs_int64(kv_cache),
        num_warps=num_warps, num_stages=num_stages, PDL=on, PREFETCH=DECODE_PREFETCH, launch_pdl=on)
    if num_splits > 1:
        _decode_reduce_kernel[(num_reqs, num_q_heads)](
            part_out, part_lse, query_start_loc, out, num_splits, out.stride(0), out.stride(1),
            NUM_Q_HEADS=num_q_heads, HEAD_DIM=head_dim, DIM_PAD=dim_pad,
            SPLITS_PAD=triton.next_power_of_2(num_splits), num_warps=4, PDL=on, PREFETCH=DECODE_PREFETCH,
            launch_pdl=on)


# ---- prefill / mixed -------------------------------------------------------------------------

@triton.jit(do_not_specialize=["num_reqs", "stride_bt"])  # stride_bt: see _decode_kernel
def _prefill_kernel(q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq_lens_ptr,
                    query_start_ptr, out_ptr, scale_log2, num_reqs,
                    stride_qt, stride_qh, stride_ot, stride_oh,
                    stride_cache_slot, stride_cache_head, stride_bt,
                    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
                    DIM_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_Q: tl.constexpr,
                    BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr, OFFSET_64: tl.constexpr):
    """One program: BLOCK_Q new tokens of one request x the GROUP query heads of one KV head.

    Tiles of the flat batch: request r owns tile ids
    ``query_start[r] // BLOCK_Q + r ...`` (strictly increasing in r, and at least
    ceil(query_len_r / BLOCK_Q) of them), so the grid T // BLOCK_Q + R covers every
    request and a program finds its request by binary search; spare tiles exit.

    Rows of the tile, M = BLOCK_Q * GROUP_PAD::

        row m -> new token  tile * BLOCK_Q + m // GROUP_PAD,  query head  kv_head * GROUP + m % GROUP_PAD
    """
    BLOCK_M: tl.constexpr = BLOCK_Q * GROUP_PAD
    pid = tl.program_id(0)
    kv_head = tl.program_id(1)
    lo = tl.zeros([], dtype=tl.int32)
    hi = tl.zeros([], dtype=tl.int32) + num_reqs
    while lo < hi:  # find the last r with first_tile(r) <= pid
        mid = (lo + hi) // 2
        first_tile = tl.load(query_start_ptr + mid) // BLOCK_Q + mid
        lo = tl.where(first_tile <= pid, mid + 1, lo)
        hi = tl.where(first_tile <= pid, hi, mid)
    r = lo - 1
    q_start = tl.load(query_start_ptr + r)
    q_len = tl.load(query_start_ptr + r + 1) - q_start
    tile = pid - (q_start // BLOCK_Q + r)
    if tile * BLOCK_Q >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + r)
    ctx_len = seq_len - q_len  # tokens cached before this step

    m = tl.arange(0, BLOCK_M)
    d = tl.arange(0, DIM_PAD)
    tok = tile * BLOCK_Q + m // GROUP_PAD  # (BLOCK_M,) index among the request's new tokens
    g = m % GROUP_PAD
    heads = kv_head * GROUP + g
    row_mask = ((tok < q_len) & (g < GROUP))[:, None] & (d < HEAD_DIM)[None, :]
    q_rows = (q_start + tok).to(tl.int64)
    q = tl.load(q_ptr + q_rows[:, None] * stride_qt + heads[:, None] * stride_qh + d[None, :],
                mask=row_mask, other=0.0)  # (BLOCK_M, DIM_PAD)
    q_pos = ctx_len + tok  # absolute position of each row's token

    acc = tl.zeros([BLOCK_M, DIM_PAD], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    bt_row_ptr = block_tables_ptr + r.to(tl.int64) * stride_bt
    # Keys every row of the tile may see (<= the first row's position) need no mask;
    # the rest, up to the last row's position, are masked causally.
    first_pos = ctx_len + tile * BLOCK_Q
    full_end = (first_pos + 1) // BLOCK_N * BLOCK_N
    kv_end = tl.minimum(seq_len, first_pos + BLOCK_Q)
    for n0 in range(0, full_end, BLOCK_N):
        acc, l_i, m_i = attend_tile(q, acc, l_i, m_i, k_cache_ptr, v_cache_ptr, bt_row_ptr, n0,
                                    kv_end, q_pos, kv_head, scale_log2, stride_cache_slot,
                                    stride_cache_head, HEAD_DIM, DIM_PAD, BLOCK_SIZE, BLOCK_N,
                                    False, False, DOT_PRECISION, OFFSET_64)
    for n0 in range(full_end, kv_end, BLOCK_N):
        acc, l_i, m_i = attend_tile(q, acc, l_i, m_i, k_cache_ptr, v_cache_ptr, bt_row_ptr, n0,
                                    kv_end, q_pos, kv_head, scale_log2, stride_cache_slot,
                                    stride_cache_head, HEAD_DIM, DIM_PAD, BLOCK_SIZE, BLOCK_N,
                                    True, True, DOT_PRECISION, OFFSET_64)
    # Padding rows (g >= GROUP or tok >= q_len) may hold l_i == 0; they are not stored.
    o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(out_ptr + q_rows[:, None] * stride_ot + heads[:, None] * stride_oh + d[None, :],
             o.to(out_ptr.dtype.element_ty), mask=row_mask)


def paged_prefill(query: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                  seq_lens: torch.Tensor, query_start_loc: torch.Tensor, num_reqs: int,
                  scale: float, out: torch.Tensor, block_m: int = 64, block_n: int = 64,
                  num_warps: int = 4, num_stages: int = 2) -> None:
    """Causal attention of every request's new tokens over its context + themselves.

    query, out (T, Hq, D). The new tokens' K/V must already be in the cache.
    ``block_m`` query rows a program = block_m / GROUP_PAD tokens x GROUP_PAD heads.
    """
    _check_cache(kv_cache)
    num_tokens, num_q_heads, head_dim = query.shape
    _, _, block_size, num_kv_heads, _ = kv_cache.shape
    group = num_q_heads // num_kv_heads
    group_pad = triton.next_power_of_2(group)
    block_m = max(block_m, group_pad, 16)
    block_q = block_m // group_pad
    query = _last_dim_contiguous(query)
    grid = (num_tokens // block_q + num_reqs, num_kv_heads)
    _prefill_kernel[grid](
        query, kv_cache[0], kv_cache[1], block_tables, seq_lens, query_start_loc, out,
        scale * LOG2E, num_reqs,
        query.stride(0), query.stride(1), out.stride(0), out.stride(1),
        kv_cache.stride(2), kv_cache.stride(3), block_tables.stride(0),
        GROUP=group, GROUP_PAD=group_pad, HEAD_DIM=head_dim, DIM_PAD=_dim_pad(head_dim),
        BLOCK_SIZE=block_size, BLOCK_Q=block_q, BLOCK_N=block_n,
        DOT_PRECISION=_dot_precision(query.dtype), OFFSET_64=_needs_int64(kv_cache),
        num_warps=num_warps, num_stages=num_stages)


# ---- helpers ---------------------------------------------------------------------------------


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs (tests) get exact fp32 products; 16-bit inputs use the tensor cores as is.
    return "ieee" if dtype == torch.float32 else "tf32"


def _needs_int64(kv_cache: torch.Tensor) -> bool:
    return kv_cache[0].numel() >= 2 ** 31


def default_num_splits(num_reqs: int, num_kv_heads: int, num_sms: int, max_splits: int = 32,
                       programs_per_sm: int = 4) -> int:
    """Splits so that num_reqs * num_kv_heads * splits fills the GPU ~programs_per_sm deep.

    Depends only on the batch shape, never on sequence lengths, so a CUDA graph
    captured for a batch size stays valid for any lengths.
    """
    wanted = math.ceil(programs_per_sm * num_sms / max(1, num_reqs * num_kv_heads))
    return max(1, min(max_splits, triton.next_power_of_2(wanted) if wanted > 1 else 1))
