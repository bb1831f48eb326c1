"""The inner steps the attention kernels share (engine/attention/triton_kernels.py): one
online-softmax step over a tile of BLOCK_N keys of one request, read from the paged KV cache
through its block table (layout: engine/attention/base.py), and its parts for a kernel that
loads a tile's addresses before it may read the tile (the decode kernel's prefetch)::

    attend_tile     addresses, K, the scores and the softmax update, V, the output update
    kv_offsets      a tile's cache offsets (block table -> slots)
    kv_rows         K and V at those offsets
    softmax_step    attend_tile's arithmetic on a tile already loaded (the same bits)
    online_softmax  the running maximum and sum update both share

Softmax in the log2 domain: scores arrive multiplied by ``scale * log2(e)``.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def attend_tile(q, acc, l_i, m_i, k_cache_ptr, v_cache_ptr, bt_row_ptr, n0, kv_end, q_pos,
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
    kv_offs = kv_offsets(bt_row_ptr, offs_n, n_mask, kv_head, stride_cache_slot, stride_cache_head,
                         BLOCK_SIZE, MASK_END, OFFSET_64)  # (BLOCK_N,)
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
    p, alpha, l_i, m_new = online_softmax(s, l_i, m_i)
    if MASK_END:
        v = tl.load(v_ptrs, mask=n_mask[:, None] & d_mask[None, :], other=0.0)
    elif HEAD_DIM == DIM_PAD:
        v = tl.load(v_ptrs)
    else:
        v = tl.load(v_ptrs, mask=d_mask[None, :], other=0.0)
    v = v.to(q.dtype)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return acc, l_i, m_new


@triton.jit
def online_softmax(s, l_i, m_i):
    """The online-softmax update for scores s (M, BLOCK_N), log2 domain: the tile's weights p
    (M, BLOCK_N), the factor alpha (M,) that rescales what was summed before, and the new
    running sum l_i and maximum m_i (M,)."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])  # (M, BLOCK_N)
    return p, alpha, l_i * alpha + tl.sum(p, 1), m_new


@triton.jit
def kv_offsets(bt_row_ptr, offs_n, n_mask, kv_head, stride_cache_slot, stride_cache_head,
               BLOCK_SIZE: tl.constexpr, MASKED: tl.constexpr, OFFSET_64: tl.constexpr):
    """(BLOCK_N,) element offsets of tokens offs_n's K (or V) rows of ``kv_head`` in the cache,
    through the request's block table; MASKED: the table read only where n_mask."""
    if MASKED:
        block_ids = tl.load(bt_row_ptr + offs_n // BLOCK_SIZE, mask=n_mask, other=0)
    else:
        block_ids = tl.load(bt_row_ptr + offs_n // BLOCK_SIZE)
    if OFFSET_64:  # caches of >= 2^31 elements a half; int32 offsets otherwise save registers
        block_ids = block_ids.to(tl.int64)
    slots = block_ids * BLOCK_SIZE + offs_n % BLOCK_SIZE
    return slots * stride_cache_slot + kv_head * stride_cache_head


@triton.jit
def kv_rows(k_cache_ptr, v_cache_ptr, kv_offs, n_mask, HEAD_DIM: tl.constexpr, DIM_PAD: tl.constexpr):
    """K (DIM_PAD, BLOCK_N) and V (BLOCK_N, DIM_PAD) at ``kv_offs``, zeros where not n_mask."""
    d = tl.arange(0, DIM_PAD)
    d_mask = d < HEAD_DIM
    k = tl.load(k_cache_ptr + kv_offs[None, :] + d[:, None], mask=n_mask[None, :] & d_mask[:, None], other=0.0)
    v = tl.load(v_cache_ptr + kv_offs[:, None] + d[None, :], mask=n_mask[:, None] & d_mask[None, :], other=0.0)
    return k, v


@triton.jit
def softmax_step(q, acc, l_i, m_i, k, v, n_mask, scale_log2, DOT_PRECISION: tl.constexpr):
    """``attend_tile``'s arithmetic (MASK_END, not causal) on a tile already loaded: k (DIM_PAD,
    BLOCK_N), v (BLOCK_N, DIM_PAD), keys masked off where not n_mask; the same bits."""
    s = tl.dot(q, k.to(q.dtype), input_precision=DOT_PRECISION) * scale_log2  # (M, BLOCK_N)
    s = tl.where(n_mask[None, :], s, float("-inf"))
    p, alpha, l_i, m_new = online_softmax(s, l_i, m_i)
    v = v.to(q.dtype)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return acc, l_i, m_new
