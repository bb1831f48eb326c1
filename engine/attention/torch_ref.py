"""Reference attention backend in plain PyTorch (CPU and GPU).

Readable rather than fast: scatter the new K/V into their slots, then for each
request gather its whole context from the block table and run causal
scaled-dot-product attention for its new tokens. The GPU kernels are checked
against this.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.attention.base import AttentionBackend, AttentionMetadata


def write_kv(key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """key, value (T, Hkv, D) -> kv_cache[0/1] at flat slots."""
    _, num_blocks, block_size, num_kv_heads, head_dim = kv_cache.shape
    flat = kv_cache.view(2, num_blocks * block_size, num_kv_heads, head_dim)
    flat[0].index_copy_(0, slot_mapping, key.to(kv_cache.dtype))
    flat[1].index_copy_(0, slot_mapping, value.to(kv_cache.dtype))


def gather_context(kv_cache: torch.Tensor, block_table_row: torch.Tensor,
                   seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns K, V of one request's first ``seq_len`` tokens, each (seq_len, Hkv, D)."""
    block_size = kv_cache.shape[2]
    num_blocks = (seq_len + block_size - 1) // block_size
    ids = block_table_row[:num_blocks].long()
    k = kv_cache[0, ids].flatten(0, 1)[:seq_len]
    v = kv_cache[1, ids].flatten(0, 1)[:seq_len]
    return k, v


class TorchRefBackend(AttentionBackend):
    name = "torch_ref"

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                kv_cache: torch.Tensor, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        write_kv(key, value, kv_cache, meta.slot_mapping)
        out = torch.empty_like(query)
        num_q_heads = query.shape[1]
        for r in range(meta.num_reqs):
            q_start, q_end = meta.query_start_loc_cpu[r], meta.query_start_loc_cpu[r + 1]
            if q_end == q_start:
                continue
            seq_len = meta.seq_lens_cpu[r]
            k, v = gather_context(kv_cache, meta.block_tables[r], seq_len)  # (S, Hkv, D)
            group = num_q_heads // k.shape[1]
            k = k.repeat_interleave(group, dim=1).transpose(0, 1).to(query.dtype)  # (Hq, S, D)
            v = v.repeat_interleave(group, dim=1).transpose(0, 1).to(query.dtype)
            q = query[q_start:q_end].transpose(0, 1)  # (Hq, Q, D)
            num_new = q_end - q_start
            # Query i sits at absolute position seq_len - num_new + i and sees keys 0..that position.
            q_pos = torch.arange(seq_len - num_new, seq_len, device=query.device)[:, None]
            k_pos = torch.arange(seq_len, device=query.device)[None, :]
            mask = k_pos <= q_pos  # (Q, S)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
            out[q_start:q_end] = o.transpose(0, 1)
        return out
