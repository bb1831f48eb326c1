"""Fused kernels of the decoder layer, each with a torch fallback of the same signature.

    rms_norm(x, weight, eps, residual=None) -> (out, residual)
        x, residual (T, H); out = norm(x + residual) * weight, residual = x + residual
        (with no residual: (norm(x) * weight, x)), as ``engine.models.layers.RMSNorm``.
    rotary_embedding(positions, q, k, cos_sin_cache) -> (q, k)
        in place; q (T, Hq, D), k (T, Hkv, D), positions (T,), cos_sin_cache
        (max_position, rot_dim) fp32 = [cos | sin] as ``RotaryEmbedding`` builds it;
        neox / "rotate half" pairs (i, i + rot_dim/2) over the first rot_dim dims.
        (On the Triton attention backend the model's RoPE usually runs inside the K/V
        store instead: ``rotary_store_kv`` in engine/attention/cache_store.py.)
    silu_and_mul(x) -> out
        x (..., 2I) = [gate | up] -> (..., I) = silu(gate) * up.
    vocab_shard_embedding(ids, weight, start, end) -> out
        ids (T,), weight (rows, H) holding ids [start, end) -> (T, H): weight[id - start] for
        the ids in range, zeros for the others (a vocab-parallel rank's part of the lookup);
        one launch on GPUs instead of the five or so elementwise kernels of the torch version.

CUDA tensors go to the Triton kernels (engine/kernels/triton_ops.py) when Triton
imports; anything else (CPU, no Triton) to engine/kernels/torch_ops.py. The
Triton versions compute in fp32 and round once at the end, so they agree with the
fallbacks to about one unit in the last place of bf16 / fp16.
"""

from __future__ import annotations

from typing import Optional

import torch

from engine.kernels import torch_ops

try:
    from engine.kernels import triton_ops
except ImportError:  # no Triton: CPU-only install
    triton_ops = None


def _use_triton(x: torch.Tensor) -> bool:
    return triton_ops is not None and x.is_cuda


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(T, H) -> (norm(x + residual) * weight, x + residual); see the module docstring."""
    impl = triton_ops if _use_triton(x) else torch_ops
    return impl.rms_norm(x, weight, eps, residual)


def rotary_embedding(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                     cos_sin_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotates q (T, Hq, D) and k (T, Hkv, D) in place; returns them."""
    impl = triton_ops if _use_triton(q) else torch_ops
    return impl.rotary_embedding(positions, q, k, cos_sin_cache)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """(..., 2I) [gate | up] -> (..., I)."""
    impl = triton_ops if _use_triton(x) else torch_ops
    return impl.silu_and_mul(x)


def vocab_shard_embedding(ids: torch.Tensor, weight: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """(T,) ids -> (T, H): this vocabulary shard's rows, zeros for ids outside [start, end)."""
    impl = triton_ops if _use_triton(weight) else torch_ops
    return impl.vocab_shard_embedding(ids, weight, start, end)


__all__ = ["rms_norm", "rotary_embedding", "silu_and_mul", "vocab_shard_embedding"]
