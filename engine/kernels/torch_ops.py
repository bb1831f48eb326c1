"""Plain-PyTorch versions of the fused kernels: the CPU path and the tests' reference.

Same arithmetic as engine/models/layers.py and engine/models/rotary.py.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x, residual (T, H) -> (norm(x + residual) * weight, x + residual)."""
    if residual is not None:
        x = x + residual  # rounded to x's dtype, as the residual stream is
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + eps)
    return (weight * x32.to(x.dtype)).to(x.dtype), x


def rotary_embedding(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                     cos_sin_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """In place on the first rot_dim dims of q (T, Hq, D) and k (T, Hkv, D)."""
    rot_dim = cos_sin_cache.shape[-1]
    cos, sin = cos_sin_cache[positions].unsqueeze(1).chunk(2, dim=-1)  # (T, 1, rot_dim/2) each
    for x in (q, k):
        x1, x2 = x[..., :rot_dim].float().chunk(2, dim=-1)  # (T, H, rot_dim/2) each
        x[..., :rot_dim] = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)
    return q, k


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """(..., 2I) [gate | up] -> (..., I) = silu(gate) * up."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def vocab_shard_embedding(ids: torch.Tensor, weight: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """ids (T,), weight (rows, H) holding ids [start, end) -> (T, H): weight[id - start] for the
    ids in range, zeros for the others."""
    is_mine = (ids >= start) & (ids < end)
    local_ids = torch.where(is_mine, ids - start, 0)
    return F.embedding(local_ids, weight) * is_mine.unsqueeze(-1).to(weight.dtype)
