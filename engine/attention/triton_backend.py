"""Triton attention backend: paged-KV store, flash-decoding and chunked-prefill kernels.

One ``forward`` is at most three launches, none of which reads the device to
size its grid (the host copies in ``AttentionMetadata`` suffice)::

    store_kv                         new K/V -> slot_mapping
    all requests decoding (max_query_len == 1):
        paged_decode (+ reduce)      grid (R, Hkv, splits), splits = f(R) only -> graph-capturable
    otherwise (prefill, chunked prefill, prefix hits, decodes mixed in):
        paged_prefill                grid (T // BLOCK_Q + R, Hkv)

The kernels read every key, the step's new ones included, from the cache
through the block table, so they need nothing but the cache and the metadata.
Kernels live in ``engine/attention/triton_kernels.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from engine.attention.base import AttentionBackend, AttentionMetadata
from engine.attention import triton_kernels as tk


@dataclass(frozen=True)
class TritonAttentionConfig:
    """Tile sizes and split policy; the defaults were chosen on an H100 (docs/gpu_notes.md)."""

    decode_block_n: int = 64  # keys a decode program takes per step
    decode_min_split_len: int = 64  # a decode split gets at least this many keys
    decode_max_splits: int = 32
    decode_programs_per_sm: int = 4  # splits are chosen to give about this many programs per SM
    decode_num_warps: int = 4
    decode_num_stages: int = 2
    # Prefill: query rows (tokens x heads of a group) a program takes, and its warps. The
    # large tile is used when some request brings >= prefill_large_min_query_len tokens
    # (None: never; on the H100 the 64-row tile won at every size measured, see notes).
    prefill_block_m: int = 64
    prefill_num_warps: int = 4
    prefill_large_block_m: int = 128
    prefill_large_num_warps: int = 8
    prefill_large_min_query_len: Optional[int] = None
    prefill_block_n: int = 64
    prefill_num_stages: int = 2
    decode_num_splits: Optional[int] = None  # fixed split count (tests); None: from batch size


class TritonBackend(AttentionBackend):
    name = "triton"

    def __init__(self, config: TritonAttentionConfig = TritonAttentionConfig()) -> None:
        self.config = config
        self._num_sms: dict[torch.device, int] = {}

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                kv_cache: torch.Tensor, meta: AttentionMetadata, scale: float,
                *, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """query (T, Hq, D); key, value (T, Hkv, D); kv_cache (2, blocks, block_size, Hkv, D).

        ``out`` (T, Hq, D), optional: written in place (static buffers of a CUDA graph, tests).
        """
        tk.store_kv(key, value, kv_cache, meta.slot_mapping)
        if out is None:
            out = torch.empty_like(query)  # (T, Hq, D)
        num_reqs = meta.num_reqs
        if num_reqs == 0 or query.shape[0] == 0:
            return out
        c = self.config
        if meta.is_all_decode:
            tk.paged_decode(query, kv_cache, meta.block_tables, meta.seq_lens, meta.query_start_loc,
                            num_reqs, scale, out, self.num_decode_splits(num_reqs, kv_cache),
                            block_n=c.decode_block_n, min_split_len=c.decode_min_split_len,
                            num_warps=c.decode_num_warps, num_stages=c.decode_num_stages)
        else:
            large = (c.prefill_large_min_query_len is not None
                     and meta.max_query_len >= c.prefill_large_min_query_len)
            tk.paged_prefill(query, kv_cache, meta.block_tables, meta.seq_lens,
                             meta.query_start_loc, num_reqs, scale, out,
                             block_m=c.prefill_large_block_m if large else c.prefill_block_m,
                             block_n=c.prefill_block_n,
                             num_warps=c.prefill_large_num_warps if large else c.prefill_num_warps,
                             num_stages=c.prefill_num_stages)
        return out

    def num_decode_splits(self, num_reqs: int, kv_cache: torch.Tensor) -> int:
        """Split count of an all-decode step: a function of the batch size alone."""
        c = self.config
        if c.decode_num_splits is not None:
            return c.decode_num_splits
        num_kv_heads = kv_cache.shape[3]
        return tk.default_num_splits(num_reqs, num_kv_heads, self._sm_count(kv_cache.device),
                                     c.decode_max_splits, c.decode_programs_per_sm)

    def _sm_count(self, device: torch.device) -> int:
        if device not in self._num_sms:
            self._num_sms[device] = (torch.cuda.get_device_properties(device).multi_processor_count
                                     if device.type == "cuda" else 8)  # CPU: Triton's interpreter
        return self._num_sms[device]
