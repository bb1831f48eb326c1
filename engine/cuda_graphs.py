"""CUDA graphs for all-decode steps.

A decode step of a small batch is a few hundred small kernel launches; on an
H100 launching them from Python costs more than running them. So the model
forward of an all-decode batch is captured once per padded batch size and
replayed. Everything the graph reads lives in static buffers:

    input_ids, positions, slot_mapping   (max_batch,)
    query_start_loc                      (max_batch + 1,)   = 0, 1, 2, ... (one token per request)
    seq_lens                             (max_batch,)
    block_tables                         (max_batch, max_blocks_per_req)

A batch of R requests runs in the graph of the smallest captured size B >= R.
Rows R..B-1 are padding: they write their K/V into a scratch block that the
scheduler never hands out (block id ``scratch_block``, one past its pool) and
attend to that one slot, so they touch nothing real.

The attention backend must size its decode grid from the batch size alone
(the Triton backend does); MoE layers sync with the host and are never captured.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch

from engine.attention.base import AttentionBackend, AttentionMetadata, ForwardContext

logger = logging.getLogger(__name__)

DEFAULT_CAPTURE_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256, 320, 384, 448, 512)


class DecodeGraphRunner:
    def __init__(self, model: Callable, backend: AttentionBackend, kv_caches: list[torch.Tensor],
                 hidden_size: int, dtype: torch.dtype, device: torch.device, block_size: int,
                 max_blocks_per_req: int, scratch_block: int, max_batch: int,
                 capture_sizes: tuple[int, ...] = DEFAULT_CAPTURE_SIZES) -> None:
        self.model = model
        self.backend = backend
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.scratch_block = scratch_block
        self.sizes = sorted(s for s in capture_sizes if s <= max_batch) or [1]
        self.max_batch = self.sizes[-1]
        self.max_seq_len = max_blocks_per_req * block_size
        b = self.max_batch
        self.input_ids = torch.zeros(b, dtype=torch.long, device=device)
        self.positions = torch.zeros(b, dtype=torch.long, device=device)
        self.slot_mapping = torch.zeros(b, dtype=torch.long, device=device)
        self.query_start_loc = torch.arange(b + 1, dtype=torch.int32, device=device)
        self.seq_lens = torch.ones(b, dtype=torch.int32, device=device)
        self.block_tables = torch.full((b, max_blocks_per_req), scratch_block, dtype=torch.int32, device=device)
        self.hidden_out = torch.zeros(b, hidden_size, dtype=dtype, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.pool = None
        self.num_replays = 0

    def _metadata(self, batch: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:batch], query_start_loc=self.query_start_loc[:batch + 1],
            seq_lens=self.seq_lens[:batch], block_tables=self.block_tables[:batch],
            max_query_len=1, max_seq_len=self.max_seq_len,
            query_start_loc_cpu=list(range(batch + 1)), seq_lens_cpu=[self.max_seq_len] * batch)

    def _pad_rows(self, start: int) -> None:
        """Rows from ``start`` on write to and read from the scratch block only."""
        self.slot_mapping[start:] = self.scratch_block * self.block_size
        self.seq_lens[start:] = 1
        self.block_tables[start:, 0] = self.scratch_block
        self.input_ids[start:] = 0
        self.positions[start:] = 0

    @torch.inference_mode()
    def capture(self) -> None:
        self._pad_rows(0)
        for batch in reversed(self.sizes):  # largest first, so smaller graphs reuse its pool
            ctx = ForwardContext(self._metadata(batch), self.kv_caches, self.backend)
            for _ in range(2):  # warm up: Triton autotuning / compilation outside the capture
                self.model(self.input_ids[:batch], self.positions[:batch], ctx)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                out = self.model(self.input_ids[:batch], self.positions[:batch], ctx)
            if self.pool is None:
                self.pool = graph.pool()
            self.graphs[batch] = graph
            self.outputs[batch] = out
        torch.cuda.synchronize()
        logger.info("captured CUDA graphs for decode batch sizes %s", self.sizes)

    def can_run(self, meta: AttentionMetadata) -> bool:
        return meta.is_all_decode and meta.num_reqs <= self.max_batch and meta.max_seq_len <= self.max_seq_len

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Replays the graph of the smallest captured size >= the batch; returns hidden (R, H)."""
        num_reqs = meta.num_reqs
        batch = next(s for s in self.sizes if s >= num_reqs)
        blocks = meta.block_tables.shape[1]
        self.input_ids[:num_reqs].copy_(input_ids)
        self.positions[:num_reqs].copy_(positions)
        self.slot_mapping[:num_reqs].copy_(meta.slot_mapping)
        self.seq_lens[:num_reqs].copy_(meta.seq_lens)
        self.block_tables[:num_reqs, :blocks].copy_(meta.block_tables)
        if batch > num_reqs:
            self._pad_rows(num_reqs)
        self.graphs[batch].replay()
        self.num_replays += 1
        return self.outputs[batch][:num_reqs]
