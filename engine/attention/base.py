"""Attention backend interface and the metadata that travels with each batch.

One step is one flattened forward over all scheduled tokens of all requests.
Request r owns tokens ``query_start_loc[r] : query_start_loc[r+1]`` of the flat
batch; they sit at positions ``seq_lens[r] - query_len_r ... seq_lens[r] - 1``
of that request, so the tokens before them (its context) are already in the KV
cache and the new ones attend causally to context + themselves.

KV cache layout, one tensor per layer::

    kv_cache: (2, num_blocks, block_size, num_kv_heads, head_dim)   # [0]=K, [1]=V
    slot = block_id * block_size + offset_in_block

Block table row r lists request r's block ids in logical order; entries past
``ceil(seq_lens[r] / block_size)`` are padding and never read.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # (num_tokens,) int64: cache slot each new token's K/V goes to
    query_start_loc: torch.Tensor  # (num_reqs + 1,) int32: cumulative query lengths
    seq_lens: torch.Tensor  # (num_reqs,) int32: context + new tokens per request
    block_tables: torch.Tensor  # (num_reqs, max_blocks_per_req) int32
    max_query_len: int
    max_seq_len: int
    # Host copies of the two length vectors, so backends never sync the device to read them.
    query_start_loc_cpu: list[int]
    seq_lens_cpu: list[int]
    # Backend-private tensors derived from the fields above, computed by the first layer of
    # a step and reused by the others (the metadata lives for exactly one step).
    backend_cache: dict = field(default_factory=dict)

    @property
    def num_reqs(self) -> int:
        return len(self.seq_lens_cpu)

    @property
    def is_all_decode(self) -> bool:
        return self.max_query_len == 1


@dataclass
class ForwardContext:
    """Everything a model forward needs besides token ids and positions."""

    attn_metadata: AttentionMetadata
    kv_caches: list[torch.Tensor]  # one per layer of this worker, layout above
    backend: "AttentionBackend"


class AttentionBackend(ABC):
    """Writes the step's new K/V into the paged cache, then attends over it."""

    name: str = "abstract"

    @abstractmethod
    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                kv_cache: torch.Tensor, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        """query (T, Hq, D); key, value (T, Hkv, D); returns (T, Hq, D).

        Hq is a multiple of Hkv (grouped-query attention). Causal within each
        request; no attention across requests.
        """

    def forward_with_rotary(self, rotary: Callable, positions: torch.Tensor, query: torch.Tensor,
                            key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                            meta: AttentionMetadata, scale: float) -> torch.Tensor:
        """``forward`` on query and key rotated by ``rotary(positions, query, key) -> (q, k)``.

        The default is exactly those two calls. A backend may override it to rotate while it
        stores K/V (one launch instead of two) when ``rotary`` offers ``cos_sin_cache(device)``
        (``engine.models.rotary.RotaryEmbedding`` does); the query it attends with and the
        cache it leaves must then be bit for bit the default's. Either way, query and key may
        be rotated in place, so the caller must not reuse them.
        """
        query, key = rotary(positions, query, key)
        return self.forward(query, key, value, kv_cache, meta, scale)


class LayerKVCaches(list):
    """The per-layer caches: views ``stacked[l]`` of one (L, 2, blocks, block_size, Hkv, D) tensor.

    Layers index it like a list of (2, blocks, block_size, Hkv, D) tensors; block moves that
    touch every layer (copy-on-write, a disaggregated hand-off's gather and scatter) are one
    launch on ``stacked`` instead of one per layer, which on a decode replica's engine thread
    is the difference between ~3 and ~64 launches per arriving prompt of an 8B model.
    """

    def __init__(self, stacked: torch.Tensor) -> None:
        super().__init__(stacked.unbind(0))
        self.stacked = stacked


def stacked_kv(kv_caches: list[torch.Tensor]) -> Optional[torch.Tensor]:
    """The (L, 2, blocks, ...) tensor behind the caches, or None for a plain list of tensors."""
    return getattr(kv_caches, "stacked", None)


def allocate_kv_cache(num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int,
                      head_dim: int, dtype: torch.dtype, device: torch.device) -> LayerKVCaches:
    """One (2, num_blocks, block_size, num_kv_heads, head_dim) cache per layer, in one allocation."""
    return LayerKVCaches(torch.zeros(num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim,
                                     dtype=dtype, device=device))


def copy_blocks(kv_caches: list[torch.Tensor], copies: list[tuple[int, int]]) -> None:
    """Copy-on-write: duplicate whole blocks (src -> dst) in every layer."""
    if not copies:
        return
    from engine.device_copy import to_device
    device = kv_caches[0].device
    src = to_device([s for s, _ in copies], torch.long, device)
    dst = to_device([d for _, d in copies], torch.long, device)
    stacked = stacked_kv(kv_caches)
    if stacked is not None:
        stacked[:, :, dst] = stacked[:, :, src]
        return
    for cache in kv_caches:
        cache[:, dst] = cache[:, src]
