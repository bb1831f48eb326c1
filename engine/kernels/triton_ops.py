"""Triton versions of the fused kernels (signatures in engine/kernels/__init__.py).

Each is one pass over its tensors: one program per row (token), fp32 inside,
one rounding on the way out. Memory-bound, so the point is reading each input
once: RMSNorm reads x and the residual once and writes both outputs; rotary
rewrites q and k in place; silu_and_mul reads gate and up once. On Hopper each runs as a
programmatic dependent launch (``pdl_enter``; engine/kernels/pdl.py), so its launch overlaps
the kernel before it.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from engine.kernels import pdl


@triton.jit
def pdl_enter(PDL: tl.constexpr):
    """First thing a kernel launched as a programmatic dependent does: wait until the kernel
    before it has finished (its writes visible), then let the kernel after it launch. Reads
    nothing early, so the results are the same bits either way; only the launch gap goes."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def _rms_norm_kernel(x_ptr, residual_ptr, weight_ptr, out_ptr, residual_out_ptr,
                     stride_x, stride_r, stride_o, stride_ro, hidden, eps,
                     HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr = False):
    pdl_enter(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        x = (x.to(tl.float32) + tl.load(residual_ptr + row * stride_r + cols, mask=mask,
                                        other=0.0).to(tl.float32)).to(x.dtype)
        tl.store(residual_out_ptr + row * stride_ro + cols, x, mask=mask)
    x32 = x.to(tl.float32)
    inv_rms = tl.rsqrt(tl.sum(x32 * x32, 0) / hidden + eps)
    normed = (x32 * inv_rms).to(x.dtype).to(tl.float32)  # rounded before the weight, as HF does
    w = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, (w * normed).to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x, residual (T, H) -> (norm(x + residual) * weight, x + residual)."""
    hidden = x.shape[-1]
    x2 = _rows(x)
    out = torch.empty_like(x2)
    if residual is not None:
        r2 = _rows(residual)
        residual_out = torch.empty_like(x2)
    else:
        r2 = residual_out = x2  # unused
    block = triton.next_power_of_2(hidden)
    if x2.shape[0]:
        on = pdl.small_pdl(x.device)
        _rms_norm_kernel[(x2.shape[0],)](
            x2, r2, weight, out, residual_out, x2.stride(0), r2.stride(0), out.stride(0),
            residual_out.stride(0), hidden, eps, HAS_RESIDUAL=residual is not None, BLOCK=block,
            num_warps=_row_warps(block), PDL=on, launch_pdl=on)
    out = out.view(x.shape)
    return out, (residual_out.view(x.shape) if residual is not None else x)


@triton.jit
def cos_sin_at(cos_sin_ptr, pos_ptr, t, stride_cs, HALF: tl.constexpr, HALF_PAD: tl.constexpr):
    """(1, HALF_PAD) fp32 cos and sin at token t's position (padding lanes 0)."""
    pos = tl.load(pos_ptr + t).to(tl.int64)
    i = tl.arange(0, HALF_PAD)
    row = cos_sin_ptr + pos * stride_cs
    cos = tl.load(row + i, mask=i < HALF, other=0.0)[None, :]
    sin = tl.load(row + HALF + i, mask=i < HALF, other=0.0)[None, :]
    return cos, sin


@triton.jit
def rotate_heads(src_ptr, dst_ptr, stride_src_h, stride_dst_h, cos, sin, num_heads,
                 HALF: tl.constexpr, HALF_PAD: tl.constexpr, HEADS_PAD: tl.constexpr):
    """Rotates heads 0 .. num_heads-1 of one token from src to dst (each pointing at head 0).

    src and dst may be the same memory (in place). fp32 inside, rounded once to the source
    dtype, then converted to the destination's (a no-op when they match): so the rotated key
    that engine/attention/cache_store.py's fused store writes into the KV cache is bit for
    bit the one this kernel leaves in k for store_kv to copy there.
    """
    h = tl.arange(0, HEADS_PAD)[:, None]
    i = tl.arange(0, HALF_PAD)[None, :]
    mask = (h < num_heads) & (i < HALF)
    src = src_ptr + h * stride_src_h + i  # (HEADS_PAD, HALF_PAD) first halves
    dst = dst_ptr + h * stride_dst_h + i
    x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
    out1 = (x1 * cos - x2 * sin).to(src_ptr.dtype.element_ty)
    out2 = (x2 * cos + x1 * sin).to(src_ptr.dtype.element_ty)
    tl.store(dst, out1.to(dst_ptr.dtype.element_ty), mask=mask)
    tl.store(dst + HALF, out2.to(dst_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rotary_kernel(pos_ptr, q_ptr, k_ptr, cos_sin_ptr, stride_qt, stride_qh, stride_kt, stride_kh,
                   stride_cs, num_q_heads, num_kv_heads,
                   HALF: tl.constexpr, HALF_PAD: tl.constexpr, Q_HEADS_PAD: tl.constexpr,
                   KV_HEADS_PAD: tl.constexpr, PDL: tl.constexpr = False):
    pdl_enter(PDL)
    t = tl.program_id(0).to(tl.int64)
    cos, sin = cos_sin_at(cos_sin_ptr, pos_ptr, t, stride_cs, HALF, HALF_PAD)
    q_row, k_row = q_ptr + t * stride_qt, k_ptr + t * stride_kt
    rotate_heads(q_row, q_row, stride_qh, stride_qh, cos, sin, num_q_heads, HALF, HALF_PAD,
                 Q_HEADS_PAD)
    rotate_heads(k_row, k_row, stride_kh, stride_kh, cos, sin, num_kv_heads, HALF, HALF_PAD,
                 KV_HEADS_PAD)


def rotary_embedding(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                     cos_sin_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """In place on q (T, Hq, D), k (T, Hkv, D) (any token/head strides, last dim contiguous)."""
    if q.stride(-1) != 1 or k.stride(-1) != 1 or cos_sin_cache.stride(-1) != 1:
        raise ValueError("rotary_embedding needs the last dim of q, k and cos_sin_cache contiguous")
    num_tokens, num_q_heads, _ = q.shape
    half = cos_sin_cache.shape[-1] // 2
    if num_tokens:
        on = pdl.small_pdl(q.device)
        _rotary_kernel[(num_tokens,)](
            positions, q, k, cos_sin_cache, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
            cos_sin_cache.stride(0), num_q_heads, k.shape[1], HALF=half,
            HALF_PAD=triton.next_power_of_2(half), Q_HEADS_PAD=triton.next_power_of_2(num_q_heads),
            KV_HEADS_PAD=triton.next_power_of_2(k.shape[1]), num_warps=4, PDL=on, launch_pdl=on)
    return q, k


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, stride_x, stride_o, inter, BLOCK: tl.constexpr,
                         PDL: tl.constexpr = False):
    pdl_enter(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + inter + cols, mask=mask, other=0.0).to(tl.float32)
    y = gate / (1.0 + tl.exp(-gate)) * up
    tl.store(out_ptr + row * stride_o + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """(..., 2I) [gate | up] -> (..., I)."""
    inter = x.shape[-1] // 2
    x2 = _rows(x)
    out = torch.empty(x2.shape[0], inter, dtype=x.dtype, device=x.device)
    block = min(1024, triton.next_power_of_2(inter))
    if x2.shape[0]:
        on = pdl.small_pdl(x.device)
        _silu_and_mul_kernel[(x2.shape[0], triton.cdiv(inter, block))](
            x2, out, x2.stride(0), out.stride(0), inter, BLOCK=block, num_warps=4, PDL=on, launch_pdl=on)
    return out.view(*x.shape[:-1], inter)


@triton.jit
def _vocab_shard_embedding_kernel(ids_ptr, weight_ptr, out_ptr, stride_w, stride_o, hidden, start, end,
                                  BLOCK: tl.constexpr, PDL: tl.constexpr = False):
    """Program (token, column block): weight[id - start] if start <= id < end, else zeros."""
    pdl_enter(PDL)
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < hidden
    tok = tl.load(ids_ptr + t).to(tl.int64)
    mine = (tok >= start) & (tok < end)
    row = tl.where(mine, tok - start, 0)
    w = tl.load(weight_ptr + row * stride_w + cols, mask=mask & mine, other=0.0)
    tl.store(out_ptr + t * stride_o + cols, w, mask=mask)


def vocab_shard_embedding(ids: torch.Tensor, weight: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """ids (T,), weight (rows, H) holding ids [start, end) -> (T, H), zeros outside the range."""
    hidden = weight.shape[1]
    ids = ids.reshape(-1)
    out = torch.empty(ids.shape[0], hidden, dtype=weight.dtype, device=weight.device)
    block = min(1024, triton.next_power_of_2(hidden))
    if ids.shape[0]:
        on = pdl.small_pdl(weight.device)
        _vocab_shard_embedding_kernel[(ids.shape[0], triton.cdiv(hidden, block))](
            ids, weight, out, weight.stride(0), out.stride(0), hidden, start, end, BLOCK=block, num_warps=4,
            PDL=on, launch_pdl=on)
    return out


def _rows(x: torch.Tensor) -> torch.Tensor:
    """(..., H) -> (N, H) with a contiguous last dim (a view when possible)."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def _row_warps(block: int) -> int:
    return 4 if block <= 1024 else 8 if block <= 4096 else 16


def aot_examples(dtype: torch.dtype) -> dict:
    """Kernel + argument examples for tests/gpu/aot_compile.py (sm_90 compile without a GPU)."""
    c = lambda v: ("constexpr", v)  # noqa: E731
    return {
        "rms_norm(4096, residual)": (_rms_norm_kernel, dict(
            x_ptr=dtype, residual_ptr=dtype, weight_ptr=dtype, out_ptr=dtype, residual_out_ptr=dtype,
            stride_x=4096, stride_r=4096, stride_o=4096, stride_ro=4096, hidden=4096, eps=1e-5,
            HAS_RESIDUAL=c(True), BLOCK=c(4096), PDL=c(True))),
        "rotary(32/8 heads, d128)": (_rotary_kernel, dict(
            pos_ptr=torch.int64, q_ptr=dtype, k_ptr=dtype, cos_sin_ptr=torch.float32,
            stride_qt=6144, stride_qh=128, stride_kt=6144, stride_kh=128, stride_cs=128,
            num_q_heads=32, num_kv_heads=8, HALF=c(64), HALF_PAD=c(64), Q_HEADS_PAD=c(32),
            KV_HEADS_PAD=c(8))),
        "vocab_shard_embedding(4096)": (_vocab_shard_embedding_kernel, dict(
            ids_ptr=torch.int64, weight_ptr=dtype, out_ptr=dtype, stride_w=4096, stride_o=4096, hidden=4096,
            start=64128, end=128256, BLOCK=c(1024), PDL=c(True))),
        "silu_and_mul(14336)": (_silu_and_mul_kernel, dict(
            x_ptr=dtype, out_ptr=dtype, stride_x=28672, stride_o=14336, inter=14336, BLOCK=c(1024),
            PDL=c(True))),
    }
