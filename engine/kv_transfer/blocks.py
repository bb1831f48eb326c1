"""Gather a request's KV blocks into one staging tensor, and scatter one back.

Per layer the cache is ``(2, num_blocks, block_size, num_kv_heads, head_dim)``
(engine/attention/base.py). The staging tensor of ``n`` blocks stacks the layers::

    kv: (num_layers, 2, n, block_size, num_kv_heads, head_dim)
        kv[l, :, i] = cache_l[:, block_ids[i]]

One contiguous tensor means one send per transfer, whatever the block ids. When the
caches are views of one stacked tensor (``allocate_kv_cache``'s ``LayerKVCaches``), the
gather and the scatter are one launch over every layer, not one per layer. With
tensor parallelism each rank stages its own heads (``num_kv_heads`` per rank);
rank r of the prefill replica sends to rank r of the decode replica.
"""

from __future__ import annotations

from typing import Sequence

import torch

from engine.attention.base import stacked_kv


def gather_blocks(kv_caches: list[torch.Tensor], block_ids: Sequence[int]) -> torch.Tensor:
    """A new contiguous staging tensor with the blocks' K and V of every layer."""
    first = kv_caches[0]
    index = torch.tensor(list(block_ids), dtype=torch.long, device=first.device)
    stacked = stacked_kv(kv_caches)
    if stacked is not None:
        return torch.index_select(stacked, 2, index)  # (L, 2, n, ...), contiguous
    out = torch.empty((len(kv_caches), 2, len(block_ids), *first.shape[2:]), dtype=first.dtype,
                      device=first.device)
    for layer, cache in enumerate(kv_caches):
        torch.index_select(cache, 1, index, out=out[layer])
    return out


def scatter_blocks(kv_caches: list[torch.Tensor], block_ids: Sequence[int], kv: torch.Tensor) -> None:
    """Writes a staging tensor into the blocks (shape and dtype must match the cache's)."""
    first = kv_caches[0]
    expected = (len(kv_caches), 2, len(block_ids), *first.shape[2:])
    if tuple(kv.shape) != expected or kv.dtype != first.dtype:
        raise ValueError(f"KV of shape {tuple(kv.shape)} {kv.dtype} does not fit {len(block_ids)} "
                         f"blocks of this cache: expected {expected} {first.dtype}")
    from engine.device_copy import to_device
    kv = kv.to(first.device, non_blocking=True)
    if kv.is_cuda:  # received on a pair's stream (PairCommunicator.empty), read on this one:
        kv.record_stream(torch.cuda.current_stream(kv.device))  # not reused before the copy ran
    # Queued, not waited for: a blocking copy here would stall the decode replica's engine
    # thread until the step in flight ends, once per arriving prompt (engine/device_copy.py).
    index = to_device(list(block_ids), torch.long, first.device)
    stacked = stacked_kv(kv_caches)
    if stacked is not None:
        stacked.index_copy_(2, index, kv)
        return
    for layer, cache in enumerate(kv_caches):
        cache.index_copy_(1, index, kv[layer])


def blocks_from(kv: torch.Tensor, first: int) -> torch.Tensor:
    """A contiguous copy of a staging tensor's blocks from ``first`` on, complete on return.

    On CUDA the copy runs on a stream of its own and is waited for there: a pair's stream does
    not wait for other streams (engine/kv_transfer/nccl.py), and the compute stream may hold
    the replica's next steps, which the copy must not wait behind. Call it off the event loop.
    """
    part = kv[:, :, first:]
    if not kv.is_cuda:
        return part.contiguous()
    stream = torch.cuda.Stream(kv.device)
    with torch.cuda.stream(stream):
        out = part.contiguous()
    stream.synchronize()
    return out
