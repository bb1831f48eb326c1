"""Triton kernels that write the paged KV cache: a step's new keys and values into their slots,
and the same with RoPE applied on the way (the attention kernels that read the cache are in
engine/attention/triton_kernels.py; the layout is engine/attention/base.py's)::

    kv_cache: (2, num_blocks, block_size, Hkv, D)      [0] = K, [1] = V
    slot = block_id * block_size + offset_in_block      row of the flat (num_slots, Hkv, D) view

    store_kv        grid (T,)    key/value (T, Hkv, D) -> their slots
    rotary_store_kv grid (T,)    RoPE on query (in place) and key, then as store_kv: one launch
                                 instead of two
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.kernels import pdl
from engine.kernels.triton_ops import cos_sin_at, pdl_enter, rotate_heads


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


def _dim_pad(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _check_cache(kv_cache: torch.Tensor) -> None:
    if kv_cache.dim() != 5 or kv_cache.shape[0] != 2 or not kv_cache.is_contiguous():
        raise ValueError("kv_cache must be a contiguous (2, num_blocks, block_size, Hkv, D) tensor, "
                         f"got shape {tuple(kv_cache.shape)}")
