"""Rotary position embedding (RoPE), plain or with Llama-3 frequency scaling.

Rotation pairs dimension i with i + D/2 (the "rotate half" convention of HF
Llama/Qwen checkpoints, not interleaved pairs)::

    x = [x1 | x2]            x1, x2: (..., D/2)
    out = [x1 cos - x2 sin | x2 cos + x1 sin]      cos, sin at the token's position

cos/sin for every position up to max_position_embeddings are computed once in
fp32 (lazily, on the device of the first call) and gathered by ``positions``.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from engine import kernels as fused

from engine.models.spec import RopeScaling, RopeType


def inverse_frequencies(head_dim: int, theta: float, scaling: Optional[RopeScaling]) -> torch.Tensor:
    """(D/2,) fp32 angular frequency of each rotated pair."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if scaling is None:
        return inv_freq
    if scaling.rope_type != RopeType.LLAMA3:
        raise ValueError(f"unsupported rope scaling {scaling.rope_type!r}")
    # Llama 3: keep short wavelengths, divide long ones by `factor`, blend linearly in between.
    old_len = scaling.original_max_position_embeddings
    low_freq_wavelen = old_len / scaling.low_freq_factor  # longer than this: scaled
    high_freq_wavelen = old_len / scaling.high_freq_factor  # shorter than this: kept
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (old_len / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor -
                                                              scaling.low_freq_factor)
    blended = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, blended, scaled)


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, max_position: int, theta: float,
                 scaling: Optional[RopeScaling] = None) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.max_position = max_position
        self.theta = theta
        self.scaling = scaling
        # Not a buffer: stays fp32 whatever dtype the model is cast to, and is
        # rebuilt on the right device after the loader materialises the model.
        self._cos_sin: Optional[torch.Tensor] = None  # (max_position, D) = [cos | sin], fp32

    def cos_sin_cache(self, device: torch.device) -> torch.Tensor:
        """(max_position, D) fp32 [cos | sin] on ``device``: what the fused kernels gather from
        (an attention backend may rotate with it while storing K/V, see
        ``AttentionBackend.forward_with_rotary``)."""
        if self._cos_sin is None or self._cos_sin.device != device:
            inv_freq = inverse_frequencies(self.head_dim, self.theta, self.scaling).to(device)
            t = torch.arange(self.max_position, device=device, dtype=torch.float32)
            freqs = torch.outer(t, inv_freq)  # (max_position, D/2)
            self._cos_sin = torch.cat([freqs.cos(), freqs.sin()], dim=-1)
        return self._cos_sin

    def forward(self, positions: torch.Tensor, q: torch.Tensor,
                k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (T,); q (T, Hq, D), k (T, Hkv, D) -> rotated q, k (same shapes/dtypes)."""
        if q.is_cuda:  # fused Triton kernel, in place (q, k are views into the qkv output)
            return fused.rotary_embedding(positions, q, k, self.cos_sin_cache(q.device))
        cos_sin = self.cos_sin_cache(q.device)[positions].unsqueeze(1)  # (T, 1, D)
        cos, sin = cos_sin.chunk(2, dim=-1)  # (T, 1, D/2) each
        return _rotate(q, cos, sin), _rotate(k, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)  # (T, H, D/2) each
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
