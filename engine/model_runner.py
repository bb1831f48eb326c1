"""Model runner: turns a ``SchedulerOutput`` into one flattened forward and a ``ModelOutput``.

It keeps a small state per request (token ids, block table, sampling params),
created from ``NewRequestData`` and updated from ``CachedRequestData`` diffs, so
after first contact only changes cross the scheduler/worker boundary.

One step, for the requests in scheduling order::

    request r:  tokens[c_r : c_r + n_r]  at positions c_r .. c_r + n_r - 1     (c = computed, n = scheduled)
    flat batch: [ r0 tokens | r1 tokens | ... ]                       (num_tokens,)
    slot of position p of r = block_ids_r[p // block_size] * block_size + p % block_size
    r samples a token iff c_r + n_r == len(tokens_r) (its known tokens are all computed)

In a replica with several workers (``engine/worker.py``) every worker runs this
same code on the same ``SchedulerOutput``: TP ranks of a stage do identical
steps with collectives inside the layers. With pipeline stages the step's
requests are cut into up to ``pp_size`` micro-batches that flow through the
stages one after another, so stage 0 computes micro-batch 1 while stage 1
computes micro-batch 0 (GPipe within one step)::

    stage 0:  mb0 ─send▶ mb1 ─send▶                 (then idle until the next step)
    stage 1:        mb0 ─send▶ mb1 ─send▶
    stage 2:              mb0 → sample  mb1 → sample  ─▶ ModelOutput

Only the last stage samples; the executor returns the output of its stage rank 0.
The pipeline is drained at the end of every step (the scheduler needs the step's
tokens before it schedules the next one), so the bubble is (P-1)/(M+P-1) of a
step with M micro-batches.

Async scheduling (one worker, ``execute_model_async``): the step is launched and
a ``StepFuture`` returned at once; the sampled ids are copied to pinned host
memory behind a CUDA event, and ``result()`` waits for that event only. The
engine schedules and launches the next step before calling ``result()``, so the
GPU never waits for the host. A request sampled by the previous step then has a
token the runner has not been sent yet (``num_pending``): its input id is taken
from the previous step's sampled ids on the device::

    input_ids[flat index of r's pending token] = prev_sampled[r's row last step]
"""

from __future__ import annotations

import logging
from typing import Optional

import numpy as np
import torch

from engine.attention.base import AttentionMetadata, ForwardContext, allocate_kv_cache, copy_blocks
from engine.attention.selector import get_attention_backend
from engine.config import EngineConfig
from engine.cuda_graphs import DecodeGraphs, GraphRunner, MixedGraphs
from engine.device_copy import packed_to_device, to_device
from engine.distributed.communicator import Communicator
from engine.distributed.topology import SINGLE_RANK, ParallelRank
from engine.models.llama import IntermediateTensors
from engine.models.loader import load_model
from engine.models.spec import ModelSpec
from engine.runner_types import RunnerRequestState, StepFuture, merge_model_outputs, split_microbatches
from engine.sampler import Sampler, SamplerLogprobs, SamplerOutput, SamplingBatch
from engine.scheduler_output import ModelOutput, SchedulerOutput

logger = logging.getLogger(__name__)


class ModelRunner:
    def __init__(self, config: EngineConfig, spec: ModelSpec, model_path: str, device: torch.device,
                 dtype: torch.dtype, max_model_len: int, rank: ParallelRank = SINGLE_RANK,
                 stage_comm: Optional[Communicator] = None,
                 world_comm: Optional[Communicator] = None) -> None:
        """``rank``: this worker's place in the replica; ``stage_comm``: its stage group (TP/EP
        collectives in the layers); ``world_comm``: pipeline send/recv by global rank."""
        self.config = config
        self.spec = spec
        self.max_model_len = max_model_len
        self.device = device
        self.dtype = dtype
        self.block_size = config.cache.block_size
        self.rank = rank
        self.world_comm = world_comm
        self.model = load_model(model_path, spec, dtype, device, config.model.load_format,
                                config.model.seed, tp_rank=rank.tp_rank, tp_size=rank.tp_size,
                                comm=stage_comm, pp_rank=rank.pp_rank, pp_size=rank.pp_size,
                                ep_rank=rank.ep_rank, ep_size=rank.ep_size)
        self.backend = get_attention_backend(config.device.attention_backend, device)
        self.sampler = Sampler()
        self.kv_caches: list[torch.Tensor] = []
        self.graph_runner: GraphRunner | None = None
        self.gemv_report: dict[str, dict] = {}  # weight shape -> µs a call per kernel at batch 1, and the one used
        self.requests: dict[str, RunnerRequestState] = {}
        # The previous step's sampled ids (R,) on the device and each request's row in them.
        self._prev_sampled: Optional[torch.Tensor] = None
        self._prev_rows: dict[str, int] = {}

    # ---- KV cache ---------------------------------------------------------------------------
    def kv_bytes_per_block(self) -> int:
        elem = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.model.num_layers * self.block_size * self.model.num_kv_heads * self.model.head_dim * elem

    def determine_num_blocks(self) -> int:
        """Blocks for the scheduler's pool (one more, the CUDA-graph scratch block, is allocated)."""
        cache = self.config.cache
        if cache.num_blocks is not None:
            return cache.num_blocks
        if self.device.type == "cuda":
            activation_bytes = self._profile_peak_activation()
            free, total = torch.cuda.mem_get_info(self.device)
            weights = torch.cuda.memory_allocated(self.device)
            not_ours = total - free - torch.cuda.memory_reserved(self.device)  # CUDA context, others
            graph_reserve = 0 if self.config.device.enforce_eager else 256 << 20
            budget = total * cache.gpu_memory_utilization - weights - activation_bytes - not_ours - graph_reserve
            logger.info("GPU memory: total %.1f GiB, weights %.1f GiB, peak activations %.2f GiB, "
                        "other %.2f GiB -> KV cache %.1f GiB", total / 2**30, weights / 2**30,
                        activation_bytes / 2**30, not_ours / 2**30, max(budget, 0) / 2**30)
            num_blocks = int(budget // self.kv_bytes_per_block()) - 1
        else:
            num_blocks = int(cache.cpu_kv_cache_gib * (1 << 30) // self.kv_bytes_per_block()) - 1
        if num_blocks < 1:
            raise ValueError("no memory left for the KV cache: lower max_model_len or raise "
                             "gpu_memory_utilization / cpu_kv_cache_gib")
        return num_blocks

    @torch.inference_mode()
    def _profile_peak_activation(self) -> int:
        """Peak extra memory of the largest step: a full token budget of prefill, then logits."""
        num_tokens = min(self.config.scheduler.max_num_batched_tokens, self.max_model_len)
        num_blocks = (num_tokens + self.block_size - 1) // self.block_size
        kv = allocate_kv_cache(self.model.num_layers, num_blocks, self.block_size,
                               self.model.num_kv_heads, self.model.head_dim, self.dtype, self.device)
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        base = torch.cuda.memory_allocated(self.device)
        dev = self.device
        meta = AttentionMetadata(
            slot_mapping=torch.arange(num_tokens, device=dev),
            query_start_loc=torch.tensor([0, num_tokens], dtype=torch.int32, device=dev),
            seq_lens=torch.tensor([num_tokens], dtype=torch.int32, device=dev),
            block_tables=torch.arange(num_blocks, dtype=torch.int32, device=dev)[None],
            max_query_len=num_tokens, max_seq_len=num_tokens,
            query_start_loc_cpu=[0, num_tokens], seq_lens_cpu=[num_tokens])
        ids = torch.zeros(num_tokens, dtype=torch.long, device=dev)
        intermediate = None
        if not self.rank.is_first_stage:
            zeros = torch.zeros(num_tokens, self.spec.hidden_size, dtype=self.dtype, device=dev)
            intermediate = IntermediateTensors(zeros, zeros.clone())
        hidden = self.model(ids, torch.arange(num_tokens, device=dev), ForwardContext(meta, kv, self.backend),
                            intermediate)
        if self.rank.is_last_stage:
            num_rows = min(self.config.scheduler.max_num_seqs, num_tokens)
            self.model.compute_logits(hidden[:num_rows])
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device) - base
        del kv, hidden
        torch.cuda.empty_cache()
        return peak

    def initialize_kv_cache(self, num_blocks: int) -> None:
        # One block past the scheduler's pool: the scratch block padded CUDA-graph rows write to.
        self.kv_caches = allocate_kv_cache(self.model.num_layers, num_blocks + 1, self.block_size,
                                           self.model.num_kv_heads, self.model.head_dim,
                                           self.dtype, self.device)
        logger.info("KV cache: %d blocks x %d tokens (%.2f GiB), max concurrency at %d tokens: %.1f",
                    num_blocks, self.block_size, num_blocks * self.kv_bytes_per_block() / (1 << 30),
                    self.max_model_len, num_blocks * self.block_size / self.max_model_len)
        if self._use_cuda_graphs():
            from engine.kernels import gemv_tune
            # per weight shape: cuBLAS or the GEMV at batch <= 4, before capture
            self.gemv_report = gemv_tune.tune(self.model)
            self.graph_runner = self._graph_runner(scratch_block=num_blocks, capture=True)
            self.graph_runner.capture()

    def _graph_runner(self, scratch_block: int, capture: bool) -> GraphRunner:
        """Decode graphs up to max_num_seqs; mixed graphs for steps of up to
        ``cuda_graph_max_prefill_tokens`` tokens (``engine/cuda_graphs.py``)."""
        device_cfg, sched = self.config.device, self.config.scheduler
        common = dict(model=self.model, backend=self.backend, kv_caches=self.kv_caches, device=self.device,
                      block_size=self.block_size, scratch_block=scratch_block,
                      max_blocks_per_req=(self.max_model_len + self.block_size - 1) // self.block_size)
        decode = DecodeGraphs(max_batch=sched.max_num_seqs, **common) if capture else None
        max_tokens = min(device_cfg.cuda_graph_max_prefill_tokens, sched.max_num_batched_tokens)
        mixed = (MixedGraphs(max_tokens=max_tokens, capture=capture,
                             max_reqs=min(device_cfg.cuda_graph_max_mixed_reqs, sched.max_num_seqs), **common)
                 if max_tokens >= 2 else None)
        return GraphRunner(decode, mixed)

    # ---- KV export / import (disaggregated prefill, engine/kv_transfer) -------------------------
    def export_kv(self, block_ids: list[int]) -> torch.Tensor:
        """The blocks' KV (this worker's layers and heads) gathered into one staging tensor."""
        from engine.kv_transfer.blocks import gather_blocks
        kv = gather_blocks(self.kv_caches, block_ids)
        if kv.is_cuda:  # a sender thread on its own stream reads it next
            torch.cuda.current_stream(kv.device).synchronize()
        return kv

    def import_kv(self, block_ids: list[int], kv: torch.Tensor) -> None:
        """Writes a staging tensor (from a peer's ``export_kv``) into the blocks."""
        from engine.kv_transfer.blocks import scatter_blocks
        scatter_blocks(self.kv_caches, block_ids, kv)

    def _use_cuda_graphs(self) -> bool:
        # Pipeline stages hand IntermediateTensors on, which the graph runner does not capture;
        # TP collectives (NCCL on the torch stream) are captured like any kernel.
        return (self.device.type == "cuda" and not self.config.device.enforce_eager
                and self.spec.moe is None and self.backend.name == "triton" and self.rank.pp_size == 1)

    # ---- state updates from the scheduler's diffs ---------------------------------------------
    def _update_states(self, so: SchedulerOutput) -> None:
        for req_id in so.finished_req_ids | so.preempted_req_ids:
            self.requests.pop(req_id, None)
        for new in so.scheduled_new_reqs:
            self.requests[new.request_id] = RunnerRequestState(
                new.request_id, list(new.token_ids), new.num_prompt_tokens, list(new.block_ids),
                new.num_computed_tokens, new.sampling_params)
        for diff in so.scheduled_cached_reqs:
            state = self.requests[diff.request_id]
            state.token_ids.extend(diff.new_token_ids)
            # Tokens we sampled come back in a later diff (a token appended by the scheduler
            # itself, a remote prefill's first token, was never pending here).
            state.num_pending = max(state.num_pending - len(diff.new_token_ids), 0)
            state.block_ids.extend(diff.new_block_ids)
            for index, block_id in diff.replaced_blocks:
                state.block_ids[index] = block_id
            state.num_computed_tokens = diff.num_computed_tokens

    # ---- one step -----------------------------------------------------------------------------
    def execute_model(self, so: SchedulerOutput) -> ModelOutput:
        """Runs the step; returns the sampled tokens on the output rank, an empty output elsewhere."""
        return self.execute_model_async(so).result()

    @torch.inference_mode()
    def execute_model_async(self, so: SchedulerOutput) -> StepFuture:
        """Launches the step and returns without waiting for the device (see the module doc)."""
        self._update_states(so)
        if so.is_empty:
            return StepFuture(ModelOutput())
        copy_blocks(self.kv_caches, so.block_copies)
        scheduled = list(so.num_scheduled_tokens.items())
        if self.rank.pp_size == 1:
            future = self._run_batch(scheduled, intermediate=None)
        else:
            future = StepFuture(self._run_pipelined(scheduled))
        # Advance computed counts now: the scheduler already did so on its side.
        for req_id, n in scheduled:
            self.requests[req_id].num_computed_tokens += n
        return future

    def _run_pipelined(self, scheduled: list[tuple[str, int]]) -> ModelOutput:
        """This stage's share of one step: receive, run and pass on each micro-batch in turn."""
        outputs = []
        hidden_size = self.spec.hidden_size
        for batch in split_microbatches(scheduled, self.rank.pp_size):
            intermediate = None
            if not self.rank.is_first_stage:
                num_tokens = sum(n for _, n in batch)
                packed = self.world_comm.recv((2, num_tokens, hidden_size), self.dtype,
                                              self.rank.prev_rank)  # [hidden ; residual]
                intermediate = IntermediateTensors(packed[0], packed[1])
            output = self._run_batch(batch, intermediate)
            if isinstance(output, IntermediateTensors):
                self.world_comm.send(torch.stack([output.hidden, output.residual]), self.rank.next_rank)
            else:
                outputs.append(output.result())
        return merge_model_outputs(outputs)

    def _run_batch(self, scheduled: list[tuple[str, int]], intermediate: Optional[IntermediateTensors]
                   ) -> "StepFuture | IntermediateTensors":
        """Forward of (a micro-batch of) the step; samples on the last stage, else returns what
        the next stage needs. Does not advance the requests' computed counts."""
        input_ids, positions, meta, sample_rows = self._prepare_inputs(scheduled)
        if (self.graph_runner is not None and intermediate is None
                and self.graph_runner.can_run(meta, input_ids.shape[0])):
            hidden = self.graph_runner.run(input_ids, positions, meta)  # (num_tokens, hidden)
        else:
            ctx = ForwardContext(attn_metadata=meta, kv_caches=self.kv_caches, backend=self.backend)
            hidden = self.model(input_ids, positions, ctx, intermediate)  # (num_tokens, hidden)
        if not self.rank.is_last_stage:
            return hidden  # IntermediateTensors
        if not sample_rows:
            self._prev_sampled, self._prev_rows = None, {}
            return StepFuture(ModelOutput())
        req_ids = [req_id for req_id, _ in sample_rows]
        if len(sample_rows) == meta.num_reqs and sample_rows[-1][1] == len(sample_rows) - 1:
            rows = hidden[:len(sample_rows)]  # all decodes: row i is request i (no gather)
        else:
            rows = hidden[to_device([row for _, row in sample_rows], torch.long, self.device)]
        states = [self.requests[r] for r in req_ids]
        if any(s.num_pending and s.sampling_params.needs_history for s in states):
            raise RuntimeError("penalties need every earlier token: schedule them without async scheduling")
        batch = SamplingBatch.from_requests([s.sampling_request() for s in states],
                                            vocab_size=self.spec.vocab_size, device=self.device)
        if batch.is_argmax_only:  # greedy, no logprobs: the argmax without gathering the logits
            out = SamplerOutput(sampled_token_ids=self.model.greedy_ids(rows), logprobs=None)
        else:  # (num_sampling_reqs, vocab) fp32, the same bits on every TP rank (all_gather)
            out = self.sampler(self.model.compute_logits(rows), batch)
        sampled = out.sampled_token_ids  # (R,) int64 on the device
        for s in states:
            s.num_pending += 1
        self._prev_sampled, self._prev_rows = sampled, {r: i for i, r in enumerate(req_ids)}
        if not self.rank.is_output_rank:
            # Every TP rank samples (same logits, same seeded draws, so the same ids) and keeps
            # them for the next step's pending inputs; only the output rank reports them.
            return StepFuture(ModelOutput())
        if sampled.device.type != "cuda":
            return StepFuture(req_ids=req_ids, host_ids=sampled, host_logprobs=out if out.logprobs else None,
                              batch=batch)
        # Async device->host copies (pinned destinations), then one event to wait on.
        host_ids = sampled.to("cpu", non_blocking=True)
        host_out = None
        if out.logprobs is not None:
            lp = out.logprobs
            host_out = SamplerOutput(host_ids, SamplerLogprobs(*(t.to("cpu", non_blocking=True) for t in (
                lp.token_logprobs, lp.ranks, lp.top_token_ids, lp.top_logprobs))))
        ready = torch.cuda.Event()
        ready.record()
        return StepFuture(req_ids=req_ids, host_ids=host_ids, host_logprobs=host_out, batch=batch, ready=ready)

    def _prepare_inputs(self, scheduled: list[tuple[str, int]]):
        """(request id, tokens to compute) in batch order -> flat ids, positions, metadata, and
        the (request id, row) pairs that sample."""
        bs = self.block_size
        input_ids, positions, slots = [], [], []
        query_start, seq_lens, tables, sample_rows = [0], [], [], []
        fill_dst, fill_src = [], []  # flat index <- row of the previous step's sampled ids
        for req_id, n in scheduled:
            state = self.requests[req_id]
            start = state.num_computed_tokens
            known = state.token_ids[start:start + n]
            input_ids.extend(known)
            if len(known) < n:  # the last one is the token the previous step sampled
                assert len(known) == n - 1 and state.num_pending == 1, (req_id, start, n, state.num_pending)
                fill_dst.append(len(input_ids))
                fill_src.append(self._prev_rows[req_id])
                input_ids.append(0)
            if n == 1:  # a decode: plain Python beats numpy for one token
                positions.append(start)
                slots.append(state.block_ids[start // bs] * bs + start % bs)
            else:
                pos = np.arange(start, start + n, dtype=np.int64)
                positions.extend(pos.tolist())
                slots.extend((np.asarray(state.block_ids, dtype=np.int64)[pos // bs] * bs + pos % bs).tolist())
            query_start.append(query_start[-1] + n)
            seq_lens.append(start + n)
            tables.append(state.block_ids)
            if start + n == state.num_known_tokens:
                sample_rows.append((req_id, query_start[-1] - 1))
        max_blocks = max(len(t) for t in tables)
        table_arr = np.zeros((len(tables), max_blocks), dtype=np.int32)
        for i, t in enumerate(tables):
            table_arr[i, :len(t)] = t
        # Two queued host->device copies for everything (see engine/device_copy.py).
        dev = self.device
        ids, pos, slot_mapping, dst, src = packed_to_device(
            [input_ids, positions, slots, fill_dst, fill_src], torch.long, dev)
        query_start_loc, seq_lens_t, flat_tables = packed_to_device(
            [query_start, seq_lens, table_arr], torch.int32, dev)
        meta = AttentionMetadata(
            slot_mapping=slot_mapping, query_start_loc=query_start_loc, seq_lens=seq_lens_t,
            block_tables=flat_tables.view(len(tables), max_blocks),
            max_query_len=max(n for _, n in scheduled),
            max_seq_len=max(seq_lens),
            query_start_loc_cpu=query_start,
            seq_lens_cpu=seq_lens,
        )
        if fill_dst:
            prev = self._prev_sampled  # (R_prev,) int64 on the device
            if len(fill_src) == len(input_ids) and fill_src == list(range(len(fill_src))):
                ids = prev[:len(fill_src)]  # the same batch as last step: take it whole
            else:
                ids = ids.clone()
                ids[dst] = prev[src]
        return ids, pos, meta, sample_rows
