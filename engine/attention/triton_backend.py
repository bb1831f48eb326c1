"""Triton attention backend: paged-KV store, flash-decoding and chunked-prefill kernels.

One ``forward`` is at most three launches, none of which reads the device to
size its grid (the host copies in ``AttentionMetadata`` suffice)::

    store_kv                         new K/V -> slot_mapping
      (forward_with_rotary: rotary_store_kv, RoPE on q in place and on k on its way to
       the cache, replaces the model's rotary launch and this one)
    all requests decoding (max_query_len == 1):
        paged_decode (+ reduce)      grid (R, Hkv, splits), splits = f(R) only -> graph-capturable
    otherwise (prefill, chunked prefill, prefix hits, decodes mixed in):
        paged_prefill                grid (T // BLOCK_Q + R, Hkv)

The kernels read every key, the step's new ones included, from the cache
through the block table, so they need nothing but the cache and the metadata.
Kernels live in ``engine/attention/triton_kernels.py``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from engine.attention.base import AttentionBackend, AttentionMetadata
from engine.attention import cache_store as cs
from engine.attention import triton_kernels as tk

# Set to 1 to turn the fused RoPE + K/V store off whatever the config says (A/B runs).
DISABLE_FUSED_ROPE_STORE_ENV = "KVMESH_DISABLE_FUSED_ROPE_STORE"


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
    # RoPE rides along the K/V store (forward_with_rotary): one launch a layer fewer, same bits.
    fuse_rope_store: bool = True


class TritonBackend(AttentionBackend):
    name = "triton"

    def __init__(self, config: TritonAttentionConfig = TritonAttentionConfig()) -> None:
        self.config = config
        self.fuse_rope_store = config.fuse_rope_store and os.environ.get(
            DISABLE_FUSED_ROPE_STORE_ENV, "0") in ("", "0")
        self._num_sms: dict[torch.device, int] = {}

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                kv_cache: torch.Tensor, meta: AttentionMetadata, scale: float,
                *, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """query (T, Hq, D); key, value (T, Hkv, D); kv_cache (2, blocks, block_size, Hkv, D).

        ``out`` (T, Hq, D), optional: written in place (static buffers of a CUDA graph, tests).
        """
        cs.store_kv(key, value, kv_cache, meta.slot_mapping)
        return self._attend(query, kv_cache, meta, scale, out)

    def forward_with_rotary(self, rotary: Callable, positions: torch.Tensor, query: torch.Tensor,
                            key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                            meta: AttentionMetadata, scale: float, *,
                            out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``rotary`` then ``forward`` (base contract), fused when the rotary offers its table.

        Fused: one ``rotary_store_kv`` launch rotates query in place and writes the rotated
        key and value into the cache, instead of the rotary kernel then ``store_kv``; query
        and the cache are bit for bit the same (key is left unrotated). Its grid is (T,),
        so it is captured in CUDA graphs like ``store_kv``.
        """
        cos_sin = self._rope_table(rotary, query)
        if cos_sin is None:
            query, key = rotary(positions, query, key)
            return self.forward(query, key, value, kv_cache, meta, scale, out=out)
        cs.rotary_store_kv(positions, query, key, value, cos_sin, kv_cache, meta.slot_mapping)
        return self._attend(query, kv_cache, meta, scale, out)

    def _rope_table(self, rotary: Callable, query: torch.Tensor) -> Optional[torch.Tensor]:
        """The (max_position, D) fp32 [cos | sin] table to fuse with, or None to run unfused:
        fusion off, or a rotary without a whole-head neox table (``cos_sin_cache``)."""
        table_of = getattr(rotary, "cos_sin_cache", None)
        if not self.fuse_rope_store or table_of is None:
            return None
        cos_sin = table_of(query.device)
        return cos_sin if cos_sin.shape[-1] == query.shape[-1] else None

    def _attend(self, query: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata,
                scale: float, out: Optional[torch.Tensor]) -> torch.Tensor:
        """Attention over the cache, the step's K/V already stored; returns out (T, Hq, D)."""
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
