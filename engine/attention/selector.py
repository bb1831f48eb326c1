"""Chooses the attention backend named by ``DeviceConfig.attention_backend``."""

from __future__ import annotations

import torch

from engine.attention.base import AttentionBackend
from engine.config import AttentionBackendKind


def get_attention_backend(kind: AttentionBackendKind, device: torch.device) -> AttentionBackend:
    if kind == AttentionBackendKind.AUTO:
        kind = AttentionBackendKind.TRITON if device.type == "cuda" and _triton_available() \
            else AttentionBackendKind.TORCH_REF
    if kind == AttentionBackendKind.TORCH_REF:
        from engine.attention.torch_ref import TorchRefBackend
        return TorchRefBackend()
    if kind == AttentionBackendKind.TRITON:
        if device.type != "cuda":
            raise ValueError("attention_backend 'triton' needs a CUDA device; use 'torch_ref' on CPU")
        from engine.attention.triton_backend import TritonBackend
        return TritonBackend()
    raise ValueError(f"unknown attention backend {kind!r}")


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
        import engine.attention.triton_backend  # noqa: F401
    except ImportError:
        return False
    return True
