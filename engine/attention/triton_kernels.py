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

    store_kv        grid (T,)                    key/value (T, Hkv, D) -> their slots
    rotary_store_kv grid (T,)                    RoPE on query (in place) and key, then as
                                                 store_kv: one launch instead of two
    paged_decode    grid (R, Hkv, num_splits)    one query per request; each program
                                                 takes all GROUP = Hq/Hkv query heads of
                                                 one KV head (K/V read once per group) over
                                                 1/num_splits of the sequence
                    + reduce grid (R, Hq)        merges the splits by their log-sum-exp
    paged_prefill   grid (T//BLOCK_Q + R, Hkv)   any query lengths: chunked prefill,
                                                 prefix hits, decodes mixed in

Softmax runs in the log2 domain: scores are multiplied by ``scale * log2(e)`` and
exponentiated with exp2; the split log-sum-exps are log2 too.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from engine.kernels import pdl
from engine.kernels.triton_ops import cos_sin_at, pdl_enter, rotate_heads

LOG2E = 1.4426950408889634


# ---- store -----------------------------------------------------------------------------------

@triton.jit
def _store_kv_kernel(key_ptr, value_ptr, cache_ptr, slot_ptr,
                     stride_kt, stride_kh, stride_vt, stride_vh,
                     stride_cache_kv, stride_cache_slot, stride_cache_head,
                     NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
                     HEADS_PAD: tl.constexpr, DIM_PAD: tl.constexpr, PDL: tl.constexpr = False):
    pdl_enter(PDL)
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    h = tl.arange(0, HEADS_PAD)[:, None]
    d = tl.arange(0, DIM_PAD)[None, :]
    mask = (h < NUM_KV_HEADS) & (d < HEAD_DIM)
    k = tl.load(key_ptr + t * stride_kt + h * stride_kh + d, mask=mask)  # (HEADS_PAD, DIM_PAD)
    v = tl.load(value_ptr + t * stride_vt + h * stride_vh + d, mask=mask)
    dst = cache_ptr + slot * stride_cache_slot + h * stride_cache_head + d
    tl.store(dst, k.to(cache_ptr.dtype.element_ty), mask=mask)
    tl.store(dst + stride_cache_kv, v.to(cache_ptr.dtype.element_ty), mask=mask)


def store_kv(key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """key, value (T, Hkv, D) -> kv_cache[0 / 1] at ``slot_mapping`` (T,) int64."""
    num_tokens, num_kv_heads, head_dim = key.shape
    if num_tokens == 0:
        return
    _check_cache(kv_cache)
    key, value = _last_dim_contiguous(key), _last_dim_contiguous(value)
    on = pdl.small_pdl(key.device)
    _store_kv_kernel[(num_tokens,)](
        key, value, kv_cache, slot_mapping,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        kv_cache.stride(0), kv_cache.stride(2), kv_cache.stride(3),
        NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim,
        HEADS_PAD=triton.next_power_of_2(num_kv_heads), DIM_PAD=_dim_pad(head_dim),
        num_warps=4, PDL=on, launch_pdl=on)


@triton.jit
def _rotary_store_kv_kernel(pos_ptr, query_ptr, key_ptr, value_ptr, cos_sin_ptr, cache_ptr, slot_ptr,
                            stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                            stride_cs, stride_cache_kv, stride_cache_slot, stride_cache_head,
                            num_q_heads, NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
                            HALF_PAD: tl.constexpr, Q_HEADS_PAD: tl.constexpr,
                            KV_HEADS_PAD: tl.constexpr, DIM_PAD: tl.constexpr,
                            PDL: tl.constexpr = False):
    """Token t: rotate its query heads in place, its key heads into the cache, copy its value."""
    pdl_enter(PDL)
    HALF: tl.constexpr = HEAD_DIM // 2
    t = tl.program_id(0).to(tl.int64)
    cos, sin = cos_sin_at(cos_sin_ptr, pos_ptr, t, stride_cs, HALF, HALF_PAD)
    q_row = query_ptr + t * stride_qt
    rotate_heads(q_row, q_row, stride_qh, stride_qh, cos, sin, num_q_heads, HALF, HALF_PAD,
                 Q_HEADS_PAD)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    k_dst = cache_ptr + slot * stride_cache_slot  # K of this slot, head 0; V is stride_cache_kv on
    rotate_heads(key_ptr + t * stride_kt, k_dst, stride_kh, stride_cache_head, cos, sin,
                 NUM_KV_HEADS, HALF, HALF_PAD, KV_HEADS_PAD)
    h = tl.arange(0, KV_HEADS_PAD)[:, None]
    d = tl.arange(0, DIM_PAD)[None, :]
    mask = (h < NUM_KV_HEADS) & (d < HEAD_DIM)
    v = tl.load(value_ptr + t * stride_vt + h * stride_vh + d, mask=mask)
    tl.store(k_dst + stride_cache_kv + h * stride_cache_head + d,
             v.to(cache_ptr.dtype.element_ty), mask=mask)


def rotary_store_kv(positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor,
                    value: torch.Tensor, cos_sin_cache: torch.Tensor, kv_cache: torch.Tensor,
                    slot_mapping: torch.Tensor) -> None:
    """RoPE and ``store_kv`` in one launch, grid (T,).

    query (T, Hq, D) is rotated in place; key, value (T, Hkv, D) go to kv_cache[0 / 1] at
    ``slot_mapping`` (T,) int64, the key rotated. positions (T,); cos_sin_cache
    (max_position, D) fp32 = [cos | sin] over the whole head (``RotaryEmbedding``'s table).

    query and the cache end bit for bit as after ``engine.kernels.triton_ops.rotary_embedding``
    then ``store_kv`` (same helper, same roundings); key itself is left unrotated, since
    nothing reads it after the store. Any token / head strides (views of the qkv output).
    """
    num_tokens, num_q_heads, head_dim = query.shape
    num_kv_heads = key.shape[1]
    if query.stride(-1) != 1 or cos_sin_cache.stride(-1) != 1:
        raise ValueError("rotary_store_kv needs the last dim of query and cos_sin_cache contiguous")
    if cos_sin_cache.shape[-1] != head_dim or head_dim % 2:
        raise ValueError(f"rotary_store_kv rotates whole heads: cos_sin_cache has "
                         f"{cos_sin_cache.shape[-1]} dims for head_dim {head_dim}")
    if num_tokens == 0:
        return
    _check_cache(kv_cache)
    key, value = _last_dim_contiguous(key), _last_dim_contiguous(value)
    on = pdl.small_pdl(query.device)
    _rotary_store_kv_kernel[(num_tokens,)](
        positions, query, key, value, cos_sin_cache, kv_cache, slot_mapping,
        query.stride(0), query.stride(1), key.stride(0), key.stride(1),
        value.stride(0), value.stride(1), cos_sin_cache.stride(0),
        kv_cache.stride(0), kv_cache.stride(2), kv_cache.stride(3),
        num_q_heads, NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim,
        HALF_PAD=triton.next_power_of_2(head_dim // 2),
        Q_HEADS_PAD=triton.next_power_of_2(num_q_heads),
        KV_HEADS_PAD=triton.next_power_of_2(num_kv_heads), DIM_PAD=_dim_pad(head_dim),
        num_warps=4, PDL=on, launch_pdl=on)


# ---- shared inner step -----------------------------------------------------------------------

@triton.jit
def _attend_tile(q, acc, l_i, m_i, k_cache_ptr, v_cache_ptr, bt_row_ptr, n0, kv_end, q_pos,
                 kv_head, scale_log2, stride_cache_slot, stride_cache_head,
                 HEAD_DIM: tl.constexpr, DIM_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                 BLOCK_N: tl.constexpr, MASK_END: tl.constexpr, CAUSAL: tl.constexpr,
                 DOT_PRECISION: tl.constexpr, OFFSET_64: tl.constexpr):
    """One online-softmax step over keys n0 .. n0 + BLOCK_N - 1 of one request.

    q (M, DIM_PAD); acc (M, DIM_PAD) fp32; l_i, m_i (M,) fp32; q_pos (M,) absolute
    positions (used only when CAUSAL). MASK_END masks keys >= kv_end.
    """
    offs_n = n0 + tl.arange(0, BLOCK_N)  # (BLOCK_N,) token index within the request
    d = tl.arange(0, DIM_PAD)
    d_mask = d < HEAD_DIM
    n_mask = offs_n < kv_end
    if MASK_END:
        block_ids = tl.load(bt_row_ptr + offs_n // BLOCK_SIZE, mask=n_mask, other=0)
    else:
        block_ids = tl.load(bt_row_ptr + offs_n // BLOCK_SIZE)
    if OFFSET_64:  # caches of >= 2^31 elements a half; int32 offsets otherwise save registers
        block_ids = block_ids.to(tl.int64)
    slots = block_ids * BLOCK_SIZE + offs_n % BLOCK_SIZE
    kv_offs = slots * stride_cache_slot + kv_head * stride_cache_head  # (BLOCK_N,)
    k_ptrs = k_cache_ptr + kv_offs[None, :] + d[:, None]  # (DIM_PAD, BLOCK_N)
    v_ptrs = v_cache_ptr + kv_offs[:, None] + d[None, :]  # (BLOCK_N, DIM_PAD)
    if MASK_END:
        k = tl.load(k_ptrs, mask=n_mask[None, :] & d_mask[:, None], other=0.0)
    elif HEAD_DIM == DIM_PAD:
        k = tl.load(k_ptrs)
    else:
        k = tl.load(k_ptrs, mask=d_mask[:, None], other=0.0)
    s = tl.dot(q, k.to(q.dtype), input_precision=DOT_PRECISION) * scale_log2  # (M, BLOCK_N)
    if CAUSAL:
        s = tl.where((offs_n[None, :] <= q_pos[:, None]) & n_mask[None, :], s, float("-inf"))
    elif MASK_END:
        s = tl.where(n_mask[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])  # (M, BLOCK_N)
    l_i = l_i * alpha + tl.sum(p, 1)
    if MASK_END:
        v = tl.load(v_ptrs, mask=n_mask[:, None] & d_mask[None, :], other=0.0)
    elif HEAD_DIM == DIM_PAD:
        v = tl.load(v_ptrs)
    else:
        v = tl.load(v_ptrs, mask=d_mask[None, :], other=0.0)
    v = v.to(q.dtype)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return acc, l_i, m_new


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
                   DOT_PRECISION: tl.constexpr, OFFSET_64: tl.constexpr, PDL: tl.constexpr = False):
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

    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, DIM_PAD)
    heads = kv_head * GROUP + g  # (GROUP_PAD,) query heads of this KV head
    row_mask = (g < GROUP)[:, None] & (d < HEAD_DIM)[None, :]
    q = tl.load(q_ptr + q_row.to(tl.int64) * stride_qt + heads[:, None] * stride_qh + d[None, :],
                mask=row_mask, other=0.0)  # (GROUP_PAD, DIM_PAD)
    acc = tl.zeros([GROUP_PAD, DIM_PAD], dtype=tl.float32)
    l_i = tl.zeros([GROUP_PAD], dtype=tl.float32)
    m_i = tl.full([GROUP_PAD], float("-inf"), dtype=tl.float32)
    bt_row_ptr = block_tables_ptr + r.to(tl.int64) * stride_bt
    for n0 in range(start, end, BLOCK_N):
        acc, l_i, m_i = _attend_tile(q, acc, l_i, m_i, k_cache_ptr, v_cache_ptr, bt_row_ptr, n0,
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
                          SPLITS_PAD: tl.constexpr, PDL: tl.constexpr = False):
    pdl_enter(PDL)
    r = tl.program_id(0)
    head = tl.program_id(1)
    q_row = tl.load(query_start_ptr + r)
    if tl.load(query_start_ptr + r + 1) == q_row:
        return
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
        num_warps=num_warps, num_stages=num_stages, PDL=on, launch_pdl=on)
    if num_splits > 1:
        _decode_reduce_kernel[(num_reqs, num_q_heads)](
            part_out, part_lse, query_start_loc, out, num_splits, out.stride(0), out.stride(1),
            NUM_Q_HEADS=num_q_heads, HEAD_DIM=head_dim, DIM_PAD=dim_pad,
            SPLITS_PAD=triton.next_power_of_2(num_splits), num_warps=4, PDL=on, launch_pdl=on)


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
        acc, l_i, m_i = _attend_tile(q, acc, l_i, m_i, k_cache_ptr, v_cache_ptr, bt_row_ptr, n0,
                                     kv_end, q_pos, kv_head, scale_log2, stride_cache_slot,
                                     stride_cache_head, HEAD_DIM, DIM_PAD, BLOCK_SIZE, BLOCK_N,
                                     False, False, DOT_PRECISION, OFFSET_64)
    for n0 in range(full_end, kv_end, BLOCK_N):
        acc, l_i, m_i = _attend_tile(q, acc, l_i, m_i, k_cache_ptr, v_cache_ptr, bt_row_ptr, n0,
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

def _dim_pad(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs (tests) get exact fp32 products; 16-bit inputs use the tensor cores as is.
    return "ieee" if dtype == torch.float32 else "tf32"


def _needs_int64(kv_cache: torch.Tensor) -> bool:
    return kv_cache[0].numel() >= 2 ** 31


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _check_cache(kv_cache: torch.Tensor) -> None:
    if kv_cache.dim() != 5 or kv_cache.shape[0] != 2 or not kv_cache.is_contiguous():
        raise ValueError("kv_cache must be a contiguous (2, num_blocks, block_size, Hkv, D) tensor, "
                         f"got shape {tuple(kv_cache.shape)}")


def default_num_splits(num_reqs: int, num_kv_heads: int, num_sms: int, max_splits: int = 32,
                       programs_per_sm: int = 4) -> int:
    """Splits so that num_reqs * num_kv_heads * splits fills the GPU ~programs_per_sm deep.

    Depends only on the batch shape, never on sequence lengths, so a CUDA graph
    captured for a batch size stays valid for any lengths.
    """
    wanted = math.ceil(programs_per_sm * num_sms / max(1, num_reqs * num_kv_heads))
    return max(1, min(max_splits, triton.next_power_of_2(wanted) if wanted > 1 else 1))
