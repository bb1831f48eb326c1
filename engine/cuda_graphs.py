"""CUDA graphs for small steps: all-decode batches, and small steps with a prefill in them.

A small step is a few hundred to ~900 kernel launches (32 layers x ~12 ops, plus
the attention launches); on an H100 launching them from Python costs more than
running them: a fresh 256-token prompt needs ~8 ms of GPU work but ~15-20 ms of
host launches. So the model forward of a small step is captured once per padded
shape and replayed. Everything a graph reads lives in static buffers, and every
launch in it has a grid that depends on the padded shape only.

Two families share one memory pool:

    decode graphs, one per batch size B (1, 2, 4, ... 512): every request has one new token
        input_ids, positions, slot_mapping   (B,)
        query_start_loc                      (B + 1,)   = 0, 1, 2, ...   (never rewritten)
        seq_lens                             (B,)
        block_tables                         (B, max_blocks_per_req)

    mixed graphs, one per token count T (16, 32, ... max_prefill_tokens), for steps with a
    prefill (a fresh prompt, a prompt chunk, decodes mixed in): R_real <= max_reqs requests
        input_ids, positions, slot_mapping   (T,)
        query_start_loc                      (max_reqs + 2,)
        seq_lens                             (max_reqs + 1,)
        block_tables                         (max_reqs + 1, max_blocks_per_req)

Padding, so that the padded rows touch nothing real:
- decode: rows R..B-1 write their K/V into a scratch block the scheduler never hands
  out (block id ``scratch_block``, one past its pool) and attend to that one slot.
- mixed: tokens T_real..T-1 belong to one padding request, number R_real, whose
  context is empty and whose block-table row is all scratch blocks; they write to
  a scratch slot and attend among themselves. Requests R_real+1 .. max_reqs own
  no tokens (their query_start_loc entries are T), and the prefill kernel's
  programs for them exit at once.

The attention backend must size its grids from these shapes alone (the Triton
backend does: decode splits from the batch size, prefill grid T // BLOCK_Q + num_reqs).
MoE layers sync with the host and are never captured. Off CUDA (tests), ``capture=False``
runs the same padded batches eagerly, so the padding is checked on the CPU reference backend.
"""

from __future__ import annotations

import logging
from typing import Callable, Optional

import torch

from engine.attention.base import AttentionBackend, AttentionMetadata, ForwardContext

logger = logging.getLogger(__name__)

DEFAULT_CAPTURE_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256, 320, 384, 448, 512)
DEFAULT_MIXED_TOKEN_SIZES = (16, 32, 64, 96, 128, 192, 256, 320, 384, 448, 512, 640, 768, 896, 1024)


class DecodeGraphs:
    """Graphs of all-decode steps, one per padded batch size."""

    def __init__(self, model: Callable, backend: AttentionBackend, kv_caches: list[torch.Tensor],
                 device: torch.device, block_size: int, max_blocks_per_req: int, scratch_block: int,
                 max_batch: int, capture_sizes: tuple[int, ...] = DEFAULT_CAPTURE_SIZES) -> None:
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
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
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

    def capture(self, pool) -> object:
        self._pad_rows(0)
        for batch in reversed(self.sizes):  # largest first, so smaller graphs reuse its memory
            ctx = ForwardContext(self._metadata(batch), self.kv_caches, self.backend)
            self.graphs[batch], self.outputs[batch], pool = _capture(
                lambda: self.model(self.input_ids[:batch], self.positions[:batch], ctx), pool)
        return pool

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


class MixedGraphs:
    """Graphs of steps with a prefill in them, one per padded token count (module doc)."""

    def __init__(self, model: Callable, backend: AttentionBackend, kv_caches: list[torch.Tensor],
                 device: torch.device, block_size: int, max_blocks_per_req: int, scratch_block: int,
                 max_tokens: int, max_reqs: int,
                 token_sizes: tuple[int, ...] = DEFAULT_MIXED_TOKEN_SIZES, capture: bool = True) -> None:
        self.model = model
        self.backend = backend
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.scratch_block = scratch_block
        self.max_blocks_per_req = max_blocks_per_req
        self.max_seq_len = max_blocks_per_req * block_size
        self.sizes = sorted(s for s in token_sizes if 2 <= s <= max_tokens)
        self.max_tokens = self.sizes[-1] if self.sizes else 0
        self.max_reqs = max_reqs  # real requests; row max_reqs is the padding request
        self.use_graphs = capture
        t, r = max(self.max_tokens, 1), max_reqs + 1
        self.input_ids = torch.zeros(t, dtype=torch.long, device=device)
        self.positions = torch.zeros(t, dtype=torch.long, device=device)
        self.slot_mapping = torch.full((t,), scratch_block * block_size, dtype=torch.long, device=device)
        self.query_start_loc = torch.zeros(r + 1, dtype=torch.int32, device=device)
        self.seq_lens = torch.zeros(r, dtype=torch.int32, device=device)
        self.block_tables = torch.full((r, max_blocks_per_req), scratch_block, dtype=torch.int32, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.num_replays = 0
        self.num_padding_tokens = 0

    def _metadata(self, num_tokens: int, query_start_cpu: Optional[list[int]] = None,
                  seq_lens_cpu: Optional[list[int]] = None) -> AttentionMetadata:
        """Metadata over the static buffers. Captured graphs bake in only the shapes; the host
        lists matter to eager runs (``capture=False``), which pass the real padded ones."""
        r = self.max_reqs + 1
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:num_tokens], query_start_loc=self.query_start_loc,
            seq_lens=self.seq_lens, block_tables=self.block_tables,
            max_query_len=num_tokens, max_seq_len=self.max_seq_len,
            query_start_loc_cpu=query_start_cpu or [0] * r + [num_tokens],
            seq_lens_cpu=seq_lens_cpu or [num_tokens] + [0] * (r - 1))

    def capture(self, pool) -> object:
        # Warm-up and capture on one all-padding request (its tokens attend among themselves).
        for num_tokens in reversed(self.sizes):
            self.query_start_loc.fill_(num_tokens)
            self.query_start_loc[0] = 0
            self.seq_lens.zero_()
            self.seq_lens[0] = num_tokens
            ctx = ForwardContext(self._metadata(num_tokens), self.kv_caches, self.backend)
            self.graphs[num_tokens], self.outputs[num_tokens], pool = _capture(
                lambda: self.model(self.input_ids[:num_tokens], self.positions[:num_tokens], ctx), pool)
        return pool

    def can_run(self, meta: AttentionMetadata, num_tokens: int) -> bool:
        return (not meta.is_all_decode and 2 <= num_tokens <= self.max_tokens
                and meta.num_reqs <= self.max_reqs and meta.max_seq_len <= self.max_seq_len
                and meta.block_tables.shape[1] <= self.max_blocks_per_req)

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Runs the step padded to the smallest captured token count; returns hidden (T_real, H)."""
        num_real, num_reqs = input_ids.shape[0], meta.num_reqs
        num_tokens = next(s for s in self.sizes if s >= num_real)
        blocks = meta.block_tables.shape[1]
        self.input_ids[:num_real].copy_(input_ids)
        self.positions[:num_real].copy_(positions)
        self.slot_mapping[:num_real].copy_(meta.slot_mapping)
        self.query_start_loc[:num_reqs + 1].copy_(meta.query_start_loc)
        self.seq_lens[:num_reqs].copy_(meta.seq_lens)
        self.block_tables[:num_reqs, :blocks].copy_(meta.block_tables)
        # The padding request (row num_reqs) owns tokens num_real..num_tokens-1 with no context;
        # the rows after it own nothing.
        self.query_start_loc[num_reqs + 1:] = num_tokens
        self.seq_lens[num_reqs] = num_tokens - num_real
        self.seq_lens[num_reqs + 1:] = 0
        self.block_tables[num_reqs] = self.scratch_block
        if num_tokens > num_real:
            self.input_ids[num_real:num_tokens] = 0
            self.positions[num_real:num_tokens] = 0
            self.slot_mapping[num_real:num_tokens] = self.scratch_block * self.block_size
        self.num_replays += 1
        self.num_padding_tokens += num_tokens - num_real
        if self.use_graphs:
            self.graphs[num_tokens].replay()
            return self.outputs[num_tokens][:num_real]
        pad = self.max_reqs - num_reqs
        query_start = meta.query_start_loc_cpu + [num_tokens] * (pad + 1)
        seq_lens = meta.seq_lens_cpu + [num_tokens - num_real] + [0] * pad
        ctx = ForwardContext(self._metadata(num_tokens, query_start, seq_lens), self.kv_caches, self.backend)
        return self.model(self.input_ids[:num_tokens], self.positions[:num_tokens], ctx)[:num_real]


class GraphRunner:
    """Both families; the model runner asks ``can_run`` and then ``run`` for each step."""

    def __init__(self, decode: Optional[DecodeGraphs], mixed: Optional[MixedGraphs]) -> None:
        self.decode = decode
        self.mixed = mixed

    def capture(self) -> None:
        pool = None
        if self.decode is not None:
            pool = self.decode.capture(pool)
        if self.mixed is not None and self.mixed.sizes and self.mixed.use_graphs:
            pool = self.mixed.capture(pool)
        torch.cuda.synchronize()
        logger.info("captured CUDA graphs: decode batch sizes %s; prefill/mixed token counts %s "
                    "(up to %d requests)", self.decode.sizes if self.decode else [],
                    self.mixed.sizes if self.mixed else [], self.mixed.max_reqs if self.mixed else 0)

    @property
    def num_replays(self) -> int:
        return sum(g.num_replays for g in (self.decode, self.mixed) if g is not None)

    def can_run(self, meta: AttentionMetadata, num_tokens: int) -> bool:
        return ((self.decode is not None and self.decode.can_run(meta))
                or (self.mixed is not None and self.mixed.can_run(meta, num_tokens)))

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """hidden (T, H) for the step's T tokens (decode steps: T = R)."""
        if self.decode is not None and self.decode.can_run(meta):
            return self.decode.run(input_ids, positions, meta)
        return self.mixed.run(input_ids, positions, meta)


@torch.inference_mode()
def _capture(forward: Callable[[], torch.Tensor], pool) -> tuple:
    for _ in range(2):  # warm up: Triton compilation and cuBLAS plans outside the capture
        forward()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        out = forward()
    return graph, out, pool if pool is not None else graph.pool()
