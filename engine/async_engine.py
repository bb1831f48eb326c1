"""Async engine for the server: add a request, get an async stream of its outputs.

The ``LLMEngine`` is not thread-safe, so one background thread owns it and runs
the step loop. Callers talk to that thread through a command queue (add,
abort); outputs come back to each request's stream on the caller's event loop,
all outputs of one step for one event loop in one thread-safe hand-off (one
wake-up per step, not one per request). The thread sleeps on the queue when
there is no work.

Outputs are cumulative, so when a consumer falls behind (several steps' outputs
of its request waiting), it gets only the latest: fewer, larger updates instead
of a growing backlog. ``stream_interval`` / ``max_outputs_per_step`` make the
engine itself produce fewer outputs (every N tokens, widened under load;
``engine/output_processor.py``), so per-token work on the event loop, which
shares the GIL with this thread, shrinks too.

    engine = AsyncLLM.from_config(EngineConfig.create(model="kvmesh-tiny"))
    async for out in engine.generate("Hello", SamplingParams(max_tokens=8), "req-1"):
        print(out.outputs[0].text)      # cumulative text so far
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from typing import Any, AsyncIterator, Optional

from engine.config import EngineConfig
from engine.kv_transfer.plan import (DeferredPlan, KVArrival, KVExport, KVReservation, KVTransferPlan,
                                     TransferFailurePolicy)
from engine.llm_engine import LLMEngine, PromptType
from engine.outputs import EngineStats, RequestOutput
from engine.gc_freeze import freeze_startup_heap
from engine.sampling_params import SamplingParams
from engine.step_timeline import KVDeliver, StatsRefresh, StepTimeline
from engine.async_streams import (AbortCommand, AddCommand, DeliverKV, RemotePrefill, RequestStream, Reserved,
                                  call_soon_threadsafe, name_native_thread, push_all, set_result,
                                  set_switch_interval)

logger = logging.getLogger(__name__)

STATS_REFRESH_S = 0.2  # how often the loop republishes its stats snapshot


class EngineDeadError(RuntimeError):
    """The engine loop stopped; the replica must be replaced."""


class AsyncLLM:
    def __init__(self, engine: LLMEngine) -> None:
        set_switch_interval()
        freeze_startup_heap()
        self.engine = engine
        self.config = engine.config
        self.tokenizer = engine.tokenizer
        self.max_model_len = engine.max_model_len
        self._commands: "queue.Queue[object]" = queue.Queue()
        self._streams: dict[str, RequestStream] = {}
        self._stats = engine.get_stats(with_block_hashes=True)
        # Steps and stalls for ITL diagnosis (KVMESH_STEP_TIMELINE=1); None: off, no cost.
        self.timeline: Optional[StepTimeline] = StepTimeline.from_env()
        self._dead: Optional[BaseException] = None
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run_loop, name="kvmesh-engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_config(cls, config: EngineConfig, engine_process: bool = False) -> "AsyncLLM":
        """``engine_process``: run the ``LLMEngine`` and its step loop in a child process
        (``engine/engine_process.py``), off this process's GIL; same API."""
        if engine_process:
            from engine.engine_process import ProcessAsyncLLM
            return ProcessAsyncLLM(config)
        return cls(LLMEngine(config))

    @property
    def block_size(self) -> int:
        return self.config.cache.block_size

    # ---- public API ---------------------------------------------------------------------------
    async def generate(self, prompt: PromptType, sampling_params: Optional[SamplingParams] = None,
                       request_id: str = "", priority: int = 0,
                       stream_interval: int = 1,
                       max_outputs_per_step: Optional[int] = None) -> AsyncIterator[RequestOutput]:
        """Streams cumulative outputs; the last one has ``finished=True``.

        ``stream_interval``: an output at the first token, then every that many new tokens
        (per sample) and at the end; fewer outputs, same tokens and text.
        ``max_outputs_per_step``: under load the interval widens to ceil(active requests / this)
        (``LLMEngine.add_request``).
        Raises ``ValueError`` before the first output for an invalid request. If the
        consumer stops iterating (client gone), the request is aborted.
        """
        async for item in self._run_request(prompt, sampling_params, request_id, priority, None,
                                            stream_interval, max_outputs_per_step):
            yield item

    # ---- disaggregated serving (engine/kv_transfer) --------------------------------------------
    async def generate_with_remote_prefill(
            self, prompt: PromptType, sampling_params: Optional[SamplingParams], request_id: str,
            lease_timeout_s: float, min_remote_tokens: int = 1,
            on_failure: TransferFailurePolicy = TransferFailurePolicy.RECOMPUTE,
            priority: int = 0, stream_interval: int = 1,
            max_outputs_per_step: Optional[int] = None) -> AsyncIterator[Optional[KVReservation] | RequestOutput]:
        """Decode side: first yields the ``KVReservation`` a prefill replica must fill, or
        None when the prompt is computed here; then cumulative outputs like ``generate``.

        The KV comes in through ``deliver_kv``; if it does not within the lease, the
        request is computed here or failed (``on_failure``). Leaving early aborts it
        and frees its reserved blocks.
        """
        mode = RemotePrefill(lease_timeout_s, min_remote_tokens, on_failure)
        async for item in self._run_request(prompt, sampling_params, request_id, priority, mode,
                                            stream_interval, max_outputs_per_step):
            yield item.reservation if isinstance(item, Reserved) else item

    async def prefill(self, prompt: PromptType, sampling_params: Optional[SamplingParams],
                      request_id: str, plan: "KVTransferPlan | DeferredPlan",
                      priority: int = 0) -> tuple[RequestOutput, Optional[KVExport]]:
        """Prefill side: computes the prompt and samples the first token.

        Returns that output (not finished) and the staged KV the plan asks for, or
        the final output and None when the first token already ended the request.
        """
        items = self._run_request(prompt, sampling_params, request_id, priority, plan)
        output: Optional[RequestOutput] = None
        try:
            async for item in items:
                if isinstance(item, KVExport):
                    return output, item
                output = item
                if output.finished:
                    return output, None
        finally:
            await items.aclose()
        raise EngineDeadError(f"prefill of {request_id} ended without output")

    def deliver_kv(self, arrival: KVArrival) -> None:
        """Hands KV that arrived for a reservation to the engine thread (any thread may call)."""
        self._commands.put(DeliverKV(arrival))

    async def _run_request(self, prompt: PromptType, sampling_params: Optional[SamplingParams],
                           request_id: str, priority: int, kv_mode: Any,
                           stream_interval: int = 1,
                           max_outputs_per_step: Optional[int] = None) -> AsyncIterator[Any]:
        self.check_health()
        if stream_interval < 1:
            raise ValueError(f"stream_interval must be >= 1, got {stream_interval}")
        if max_outputs_per_step is not None and max_outputs_per_step < 1:
            raise ValueError(f"max_outputs_per_step must be >= 1 or None, got {max_outputs_per_step}")
        params = sampling_params or SamplingParams()
        # Validate here, in the caller, so bad input fails fast with a clear error.
        _, token_ids = self.engine.tokenize_prompt(prompt)
        self.engine._validate_prompt(token_ids)
        stream = RequestStream(asyncio.get_running_loop())
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use")
        self._streams[request_id] = stream
        self._submit(AddCommand(request_id, token_ids if not isinstance(prompt, str) else prompt,
                          params, priority, stream, kv_mode, stream_interval, max_outputs_per_step))
        finished = False
        try:
            while True:
                item = await stream.get()
                if isinstance(item, BaseException):
                    raise item
                # A prefill-only request ends here with its staged KV.
                finished = isinstance(item, KVExport) or getattr(item, "finished", False)
                yield item
                if finished:
                    return
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                await self._abort_quietly(request_id)

    async def abort(self, request_id: str) -> None:
        """Aborts a request; its KV blocks are free when this returns."""
        if self._dead is not None:
            return
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        self._submit(AbortCommand(request_id, done, loop))
        await done

    def _submit(self, command: object) -> None:
        """Hands a command to the engine loop."""
        self._commands.put(command)

    async def _abort_quietly(self, request_id: str) -> None:
        try:
            await asyncio.shield(self.abort(request_id))
        except (asyncio.CancelledError, Exception):  # still freed by the loop
            pass

    def get_stats(self) -> EngineStats:
        return self._stats

    def check_health(self) -> None:
        if self._dead is not None:
            raise EngineDeadError(f"engine loop died: {self._dead!r}")
        self.engine.check_health()  # a replica whose worker died must be replaced

    @property
    def is_running(self) -> bool:
        return self._thread.is_alive() and self._dead is None

    def shutdown(self) -> None:
        self._stopping.set()
        self._commands.put(None)
        self._thread.join(timeout=30)
        if self.timeline is not None:
            self.timeline.close()
        self.engine.shutdown()

    # ---- the engine thread --------------------------------------------------------------------
    def _run_loop(self) -> None:
        name_native_thread(self._thread.name)
        last_stats = 0.0
        try:
            while not self._stopping.is_set():
                block = not self.engine.has_unfinished_requests()
                self._drain_commands(block)
                self._publish(self.engine.expire_kv_leases())
                if self.engine.has_unfinished_requests():
                    self._step()
                    for export in self.engine.take_kv_exports():
                        self._publish_item(export.plan.request_id, export)
                now = time.monotonic()
                if now - last_stats > STATS_REFRESH_S or not self.engine.has_unfinished_requests():
                    self._stats = self.engine.get_stats(with_block_hashes=True)
                    last_stats = now
                    if self.timeline is not None:
                        self.timeline.record(StatsRefresh(now, time.monotonic()))
        except BaseException as exc:  # noqa: BLE001 - the loop must report any death
            logger.exception("engine loop died")
            self._dead = exc
            for stream in list(self._streams.values()):
                stream.put(EngineDeadError(f"engine loop died: {exc!r}"))

    def _step(self) -> None:
        timeline = self.timeline
        if timeline is None:
            self._publish(self.engine.step())
            return
        start = time.monotonic()
        outputs = self.engine.step()
        end = time.monotonic()
        # The step's shape: decoding requests schedule one token, prompt chunks more.
        scheduled = self.engine.last_scheduled
        counts = scheduled.num_scheduled_tokens.values() if scheduled is not None else ()
        num_decode = sum(1 for n in counts if n == 1)
        num_prefill_tokens = sum(counts) - num_decode
        timeline.record_step(start, end, len(self.engine.scheduler.running), num_decode,
                             num_prefill_tokens, len(outputs))
        self._publish(outputs)

    def _drain_commands(self, block: bool) -> None:
        try:
            command = self._commands.get(timeout=0.5) if block else self._commands.get_nowait()
        except queue.Empty:
            return
        while command is not None:
            self._handle(command)
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return

    def _handle(self, command: object) -> None:
        if isinstance(command, AddCommand):
            try:
                self._add(command)
            except ValueError as exc:
                command.stream.put(exc)
        elif isinstance(command, DeliverKV):
            start = time.monotonic()
            outputs = self.engine.import_remote_kv(command.arrival)
            if self.timeline is not None:
                header = command.arrival.header
                self.timeline.record(KVDeliver(start, time.monotonic(), header.request_id,
                                               command.arrival.num_bytes or 0))
            self._publish(outputs)
        elif isinstance(command, AbortCommand):
            self._publish(self.engine.abort_request(command.request_id))
            self._stats = self.engine.get_stats(with_block_hashes=True)
            command.loop.call_soon_threadsafe(set_result, command.done)

    def _add(self, command: AddCommand) -> None:
        mode, engine = command.kv_mode, self.engine
        if mode is None:
            engine.add_request(command.request_id, command.prompt, command.params, priority=command.priority,
                               stream_interval=command.stream_interval,
                               max_outputs_per_step=command.max_outputs_per_step)
        elif isinstance(mode, (KVTransferPlan, DeferredPlan)):
            engine.add_prefill_request(command.request_id, command.prompt, command.params, mode,
                                       priority=command.priority)
        else:
            reservation = engine.add_remote_prefill_request(
                command.request_id, command.prompt, command.params, mode.lease_timeout_s,
                mode.min_remote_tokens, mode.on_failure, priority=command.priority,
                stream_interval=command.stream_interval, max_outputs_per_step=command.max_outputs_per_step)
            command.stream.put(Reserved(reservation))

    def _publish_item(self, request_id: str, item: Any) -> None:
        stream = self._streams.get(request_id)
        if stream is not None:
            stream.put(item)

    def _publish(self, outputs: list[RequestOutput]) -> None:
        """Hands a step's outputs to their streams: one thread-safe call per event loop."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[RequestStream, Any]]] = {}
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is not None:
                by_loop.setdefault(stream.loop, []).append((stream, out))
        for loop, batch in by_loop.items():
            call_soon_threadsafe(loop, push_all, batch)
