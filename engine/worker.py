"""One worker of a multi-worker replica: a ``ModelRunner`` on one device, run as a Ray actor.

The executor creates one per GPU (or per CPU slice in CI), in a placement group,
and drives them all with the same calls::

    rendezvous()                         worker 0 only: gloo address or NCCL ids (DistInit)
    init(DistInit)                       every worker at once: join the groups, load its shard
    determine_num_blocks()               every worker; the executor takes the minimum
    initialize_kv_cache(num_blocks)
    execute_model(SchedulerOutput)       every step, every worker; the output rank's result counts
    execute_model_pipelined(SO)          async scheduling: launch this step, return the previous one's
    flush()                              ... and the last one's, when no step follows
    export_kv(block_ids) / import_kv     disaggregated prefill/decode: this rank's KV shard
    start_step_loop(StepLoopHandles)     once, after initialize_kv_cache, when on the driver's node

After ``start_step_loop`` the step calls (``StepMethod``: execute_model, execute_model_pipelined,
flush, export_kv, import_kv, shutdown) arrive as ``StepCall`` messages (``engine/step_channel.py``) on a shared-memory
broadcast ring (``engine/distributed/shm_channel.py``) instead of as Ray calls, and one
background thread runs them in order and writes a ``StepReply`` per call to this worker's
reply ring. From then on that thread is the only one that touches the runner.

This class is plain Python (no Ray import): the executor wraps it with
``ray.remote``, and tests may run it in-process.
"""

from __future__ import annotations

import collections
import logging
import os
import threading
import time
import traceback
from typing import Any, Optional

import torch

from engine.config import EngineConfig
from engine.distributed.group import DistInit, WorkerGroups, init_worker_groups, rendezvous
from engine.distributed.shm_channel import Backoff, RingReader, RingWriter, ShmRing
from engine.distributed.topology import ParallelRank
from engine.models.spec import ModelSpec
from engine.scheduler_output import ModelOutput, SchedulerOutput
from engine.step_channel import StepCall, StepLoopHandles, StepMethod, StepReply

logger = logging.getLogger(__name__)

STAMPS_KEPT = 4096  # step-loop calls whose times a worker keeps


class Worker:
    def __init__(self, config: EngineConfig, spec: ModelSpec, model_path: str, rank: ParallelRank,
                 max_model_len: int) -> None:
        """Cheap: nothing is loaded until ``init`` (which needs every worker to exist)."""
        from engine.executor import resolve_device, resolve_dtype

        self.config = config
        self.spec = spec
        self.model_path = model_path
        self.rank = rank
        self.max_model_len = max_model_len
        self.device = resolve_device(config)
        if self.device.type == "cuda":  # Ray gives each actor one GPU through CUDA_VISIBLE_DEVICES
            self.device = torch.device("cuda", 0)
            torch.cuda.set_device(self.device)
        else:
            torch.set_num_threads(1)  # fractional CPU slices: don't oversubscribe the node
        self.dtype = resolve_dtype(config, spec, self.device)
        self.groups: Optional[WorkerGroups] = None
        self.runner = None
        self._pending = None  # StepFuture of the last pipelined step (async scheduling)
        self._step_thread: Optional[threading.Thread] = None
        self._profiler = None  # engine.profiling.KernelProfiler while ``profile`` runs one
        self._stamps: Optional[collections.deque] = None  # set up with the step loop
        self._launched_at: Optional[float] = None  # when the current pipelined call had launched

    def rendezvous(self, backend) -> DistInit:
        """Worker 0: where the others meet it (a gloo address on this node, or NCCL ids)."""
        return rendezvous(backend, self.rank.world_size, self.rank.pp_size)

    def init(self, dist_init: DistInit) -> None:
        """Joins the replica's groups, then loads this rank's shard of its stage."""
        from engine.model_runner import ModelRunner

        self.groups = init_worker_groups(self.rank, dist_init, self.device)
        self.runner = ModelRunner(self.config, self.spec, self.model_path, self.device, self.dtype,
                                  self.max_model_len, rank=self.rank, stage_comm=self.groups.stage,
                                  world_comm=self.groups.world)

    def determine_num_blocks(self) -> int:
        return self.runner.determine_num_blocks()

    def initialize_kv_cache(self, num_blocks: int) -> None:
        self.runner.initialize_kv_cache(num_blocks)

    def execute_model(self, scheduler_output: SchedulerOutput) -> Optional[ModelOutput]:
        """The step's output on the output rank (last stage, stage rank 0); None elsewhere."""
        output = self.runner.execute_model(scheduler_output)
        return output if self.rank.is_output_rank else None

    def execute_model_pipelined(self, scheduler_output: SchedulerOutput) -> Optional[ModelOutput]:
        """Launches this step, then returns the previous step's output (waiting for its device work
        only), so the GPU has the next step queued before this worker's host work for it ends."""
        future = self.runner.execute_model_async(scheduler_output)
        self._launched_at = time.monotonic()
        return self._take_pending(future)

    def flush(self) -> Optional[ModelOutput]:
        """The output of the last pipelined step (no later step to carry it)."""
        return self._take_pending(None)

    def _take_pending(self, future) -> Optional[ModelOutput]:
        previous, self._pending = self._pending, future
        if previous is None:
            return None
        output = previous.result()
        return output if self.rank.is_output_rank else None

    def export_kv(self, block_ids: list[int]) -> torch.Tensor:
        """This rank's KV of the blocks (its layers and heads), on the CPU for the executor."""
        return self.runner.export_kv(block_ids).cpu()

    def import_kv(self, block_ids: list[int], kv_per_rank: list[torch.Tensor]) -> None:
        """Writes this rank's entry of ``kv_per_rank`` (as ``export_kv`` gave it) into the blocks."""
        self.runner.import_kv(block_ids, kv_per_rank[self.rank.rank].to(self.device))

    # ---- the step loop (shared-memory channel) -------------------------------------------------
    def start_step_loop(self, handles: StepLoopHandles) -> None:
        """Attaches the rings and starts the one thread that runs every step call from now on."""
        if self._step_thread is not None:
            raise RuntimeError("the step loop is already running")
        # (seq, read, ran, replied): time.monotonic() of each step-loop call, the host's clock
        # (one for every process of a node), so ranks' calls line up (``step_stamps``)
        self._stamps = collections.deque(maxlen=STAMPS_KEPT)
        self._stamps_lock = threading.Lock()
        backoff = Backoff(spin_s=handles.spin_s)
        calls = RingReader(ShmRing.attach(handles.calls), handles.reader_index, backoff)
        replies = RingWriter(ShmRing.attach(handles.replies), backoff)
        self._step_thread = threading.Thread(target=self._step_loop, args=(calls, replies),
                                             name="kvmesh-step-loop", daemon=True)
        self._step_thread.start()

    def run_step_call(self, call: StepCall) -> Any:
        handlers = {StepMethod.EXECUTE_MODEL: self.execute_model,
                    StepMethod.EXECUTE_MODEL_PIPELINED: self.execute_model_pipelined,
                    StepMethod.FLUSH: self.flush, StepMethod.EXPORT_KV: self.export_kv,
                    StepMethod.IMPORT_KV: self.import_kv, StepMethod.SHUTDOWN: self.shutdown}
        return handlers[call.method](*call.args)

    def _step_loop(self, calls: RingReader, replies: RingWriter) -> None:
        if self.device.type == "cuda":  # the current device is per thread
            torch.cuda.set_device(self.device)
        try:
            while True:
                call: StepCall = calls.read()
                read = time.monotonic()
                self._launched_at = None
                try:
                    reply = StepReply(call.seq, self.run_step_call(call))
                except Exception as exc:  # noqa: BLE001 - travels to the executor, which fails the step
                    reply = StepReply(call.seq, error=f"{type(exc).__name__}: {exc}",
                                      traceback=traceback.format_exc())
                ran = time.monotonic()
                try:
                    replies.write(reply)
                except Exception as exc:  # noqa: BLE001 - e.g. an unpicklable value: say so instead
                    replies.write(StepReply(call.seq, error=f"reply not sent: {type(exc).__name__}: {exc}",
                                            traceback=traceback.format_exc()))
                with self._stamps_lock:
                    launched = ran if self._launched_at is None else self._launched_at
                    self._stamps.append((call.seq, read, launched, ran, time.monotonic()))
                if call.method is StepMethod.SHUTDOWN:
                    return
        finally:
            calls.ring.close()
            replies.ring.close()

    def step_stamps(self, last: int) -> list[tuple[int, float, float, float, float]]:
        """The last ``last`` step-loop calls as (seq, read, launched, ran, replied)
        ``time.monotonic()``s: when the call came off the ring; for a pipelined step, when its
        device work was all queued (else = ran); when it had run (for a pipelined step: the step
        before it had also finished on the device); when the reply was written."""
        if self._stamps is None or last <= 0:  # no step loop: steps come as Ray calls
            return []
        with self._stamps_lock:
            return list(self._stamps)[-last:]

    def replay_decode_graph(self, replays: int, rounds: int) -> Optional[dict]:
        """This rank's batch-1 step on the device alone (``engine.profiling.replay_decode_graph``);
        every rank of a TP group at once."""
        from engine.profiling import replay_decode_graph
        if self.device.type == "cuda":  # the current device is per thread
            torch.cuda.set_device(self.device)
        return replay_decode_graph(self.runner, replays, rounds)

    def profile(self, action: str, num_steps: int = 1) -> Optional[dict]:
        """``"start"``, then ``"stop"`` after ``num_steps`` steps: this rank's kernels per step
        (``engine/profiling.py``; GPU workers only)."""
        from engine.profiling import KernelProfiler
        if action == "start":
            self._profiler = KernelProfiler()
            self._profiler.start()
            return None
        profile, self._profiler = self._profiler.stop(num_steps), None
        # which kernel each batch-1 linear shape got at load, and the timings behind it
        result = {"rank": self.rank.rank, **profile.to_dict(),
                  "gemv_tuning": getattr(self.runner, "gemv_report", None)}
        stage = self.groups.stage if self.groups is not None else None
        stamps = stage.ll_stamps() if stage is not None else None
        if stamps:  # KVMESH_LL_STAMPS=1: where the recent LL calls' time went
            from engine.profiling import ll_stamp_summary
            result["ll_stamps"] = ll_stamp_summary(stamps)
        return result

    def ping(self) -> int:
        return os.getpid()

    def shutdown(self) -> None:
        if self.groups is not None:
            self.groups.destroy()
            self.groups = None
