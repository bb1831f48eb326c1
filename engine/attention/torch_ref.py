"""Reference attention backend in plain PyTorch (CPU and GPU).

Readable rather than fast: scatter the new K/V into their slots, then for each
request with several new tokens (a prompt chunk) gather its whole context from
the block table and run causal scaled-dot-product attention; requests with one
new token (decodes) are batched into one padded attention call, since on CPU a
Python loop over hundreds of decodes costs more than the math. The GPU kernels
are checked against this.
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
        qsl = meta.query_start_loc_cpu
        decode_rows = [r for r in range(meta.num_reqs) if qsl[r + 1] - qsl[r] == 1]
        if len(decode_rows) > 1:
            self._batched_decode(query, kv_cache, meta, decode_rows, scale, out)
            decode_set = set(decode_rows)
        else:
            decode_set = set()
        for r in range(meta.num_reqs):
            q_start, q_end = qsl[r], qsl[r + 1]
            if q_end == q_start or r in decode_set:
                continue
            seq_len = meta.seq_lens_cpu[r]
            k, v = gather_context(kv_cache, meta.block_tables[r], seq_len)  # (S, Hkv, D)
            k = k.transpose(0, 1).to(query.dtype)  # (Hkv, S, D); SDPA broadcasts over the group
            v = v.transpose(0, 1).to(query.dtype)
            q = query[q_start:q_end].transpose(0, 1)  # (Hq, Q, D)
            num_new = q_end - q_start
            # Query i sits at absolute position seq_len - num_new + i and sees keys 0..that position.
            q_pos = torch.arange(seq_len - num_new, seq_len, device=query.device)[:, None]
            k_pos = torch.arange(seq_len, device=query.device)[None, :]
            mask = k_pos <= q_pos  # (Q, S)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
            out[q_start:q_end] = o.transpose(0, 1)
        return out

    @staticmethod
    def _decode_plan(meta: AttentionMetadata, rows: list[int], block_size: int, device) -> tuple:
        """Per step: token rows of the decodes, flat cache slots of their contexts, padding mask."""
        plan = meta.backend_cache.get("torch_ref_decode")
        if plan is None:
            rows_t = torch.tensor(rows, device=device)
            seq_lens = meta.seq_lens[rows_t].long()  # (R,)
            max_len = max(meta.seq_lens_cpu[r] for r in rows)
            positions = torch.arange(max_len, device=device)
            tables = meta.block_tables[rows_t].long()  # (R, max_blocks)
            # slot of context position p of row r: table[r, p // bs] * bs + p % bs    (R, S)
            slots = tables[:, positions // block_size] * block_size + positions % block_size
            mask = positions[None, :] < seq_lens[:, None]  # (R, S)
            token_idx = torch.tensor([meta.query_start_loc_cpu[r] for r in rows], device=device)
            plan = (token_idx, slots.flatten(), mask[:, None, None, :], max_len)
            meta.backend_cache["torch_ref_decode"] = plan
        return plan

    def _batched_decode(self, query: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata,
                        rows: list[int], scale: float, out: torch.Tensor) -> None:
        """One padded attention call for requests that each have a single new token."""
        _, num_blocks, block_size, num_kv_heads, head_dim = kv_cache.shape
        token_idx, slots, mask, max_len = self._decode_plan(meta, rows, block_size, query.device)
        flat = kv_cache.view(2, num_blocks * block_size, num_kv_heads, head_dim)
        k = flat[0].index_select(0, slots).view(len(rows), max_len, num_kv_heads, head_dim)
        v = flat[1].index_select(0, slots).view(len(rows), max_len, num_kv_heads, head_dim)
        q = query[token_idx].unsqueeze(2)  # (R, Hq, 1, D)
        o = F.scaled_dot_product_attention(
            q, k.transpose(1, 2).to(query.dtype), v.transpose(1, 2).to(query.dtype),
            attn_mask=mask, scale=scale, enable_gqa=True)  # (R, Hq, 1, D)
        out[token_idx] = o.squeeze(2)
