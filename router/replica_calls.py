"""One API request's replica calls: one per prompt, their outputs merged into one stream.

The ingress (router/ingress.py) builds a ``Job`` per prompt and hands them to
``ReplicaCalls.start``, which

1. starts each job's call: ``LLMServer.generate_deltas`` through the replica handle (the
   request router picks the replica), or the disaggregated flow (prefill pool, then decode
   pool; router/disagg.py). With the stream channel on, the request names this ingress's
   ``StreamReceiver`` and the replica pushes its deltas there (router/stream_channel.py);
   the Serve call then carries errors, cancellation and the final count only;
2. relays every job's stream onto one queue as ``OutputDelta``s (a task per job);
3. waits for one output, or an error, from every job before returning, so input errors the
   replica finds still become a 4xx status instead of a broken stream.

``MergedOutputs.events`` then yields (job, delta) until every job finished; leaving it early
(the client went away, an error) cancels the replica calls, and the replicas abort the engine
requests, freeing their KV blocks. ``api_error_from`` maps a replica call's exception to the
OpenAI error the client gets.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Optional

from router.deltas import DeltaTracker, OutputDelta
from router.disagg import DisaggregatedFlow
from router.messages import GenerateRequest, ReplicaOutput
from router.metrics import RequestTimer
from router.openai_output import JobOutput
from router.protocol import APIError
from router.stream_channel import ChannelStream, StreamReceiver

logger = logging.getLogger(__name__)

_END = object()  # a job's stream ended


@dataclass
class Job:
    """One ``GenerateRequest`` of an API request (one prompt), and its stream."""

    prompt_index: int
    request: GenerateRequest
    prompt_text: str
    stream: Any = None  # DeploymentResponseGenerator, ChannelStream or DisaggregatedStream
    final: JobOutput = field(default_factory=JobOutput)  # everything received so far
    replica_id: Optional[str] = None  # set by the first output
    is_done: bool = False
    trace: Optional[dict[str, float]] = None  # x-kvmesh-trace stamps (the first job only)


class ReplicaCalls:
    """Starts an API request's jobs on the replicas (one ingress replica holds one)."""

    def __init__(self, llm_handle: Any, disagg: Optional[DisaggregatedFlow],
                 receiver: Optional[StreamReceiver]) -> None:
        self.llm = llm_handle  # the replicas, or the decode pool when disaggregated
        self.disagg = disagg
        # None: Serve streaming (the channel is off, or it could not listen); listens on first use
        self.receiver = receiver
        self._stream_handle: Any = None  # self.llm.options(stream=True), made once

    async def start(self, jobs: list[Job], trace: Optional[dict[str, float]] = None) -> "MergedOutputs":
        """Starts every job's replica call; waits for the first output so input errors are 4xx."""
        queue: asyncio.Queue = asyncio.Queue()
        if self._stream_handle is None:
            # By value over Serve's gRPC transport, not as Ray objects: each streamed item
            # then skips the object store and ownership protocol (bench/http_overhead.py:
            # about half the ingress's CPU per token, and a shorter TTFT). Items are plain
            # dataclasses of importable modules, so the C pickler does (Serve's default,
            # cloudpickle, runs a Python-level pickler per item in the replica).
            self._stream_handle = self.llm.options(stream=True, _by_reference=False,
                                                   response_serialization="pickle")
        tasks = []
        if trace is not None:
            jobs[0].trace = trace
            trace["ingress_dispatch"] = time.monotonic()
        receiver = await self._started_receiver()
        for job in jobs:
            if self.disagg is not None:
                job.stream = self.disagg.start(job.request, receiver)
            else:
                job.stream = self._call_replica(self._stream_handle, job, receiver)
            tasks.append(asyncio.get_running_loop().create_task(_pump(job, queue)))
        # Wait for one output (or an error) per job before answering with a status code.
        pending: list = []
        seen: set[int] = set()
        try:
            while len(seen) < len(jobs):
                item = await queue.get()
                index, payload = item
                if isinstance(payload, BaseException):
                    raise api_error_from(payload)
                seen.add(index)
                pending.append(item)
        except BaseException:
            _cancel(jobs, tasks)
            raise
        return MergedOutputs(jobs, queue, pending, tasks)

    async def _started_receiver(self) -> Optional[StreamReceiver]:
        """The started receiver, or None (Serve streaming): off, or it could not listen."""
        if self.receiver is not None and not self.receiver.is_started:
            try:
                await self.receiver.start()
            except OSError as exc:
                logger.warning("stream channel: cannot listen (%r); replicas stream over Serve", exc)
                self.receiver = None
        return self.receiver

    @staticmethod
    def _call_replica(handle: Any, job: Job, receiver: Optional[StreamReceiver]) -> Any:
        """Starts the job's ``generate_deltas`` call; with a receiver, its deltas come over the channel."""
        queue = None
        if receiver is not None:
            job.request = dataclasses.replace(job.request, stream_to=receiver.address)
            queue = receiver.subscribe(job.request.request_id)  # before the replica can send
        kwargs = {"trace": True} if job.trace is not None else {}
        call = handle.generate_deltas.remote(job.request, **kwargs)
        if receiver is None:
            return call
        return ChannelStream(receiver, job.request.request_id, queue, call)


class MergedOutputs:
    """The jobs' merged outputs, those ``ReplicaCalls.start`` already took off the queue first."""

    def __init__(self, jobs: list[Job], queue: asyncio.Queue, pending: list,
                 tasks: list[asyncio.Task]) -> None:
        self.jobs = jobs
        self._queue = queue
        self._pending = list(pending)
        self._tasks = tasks

    async def _get(self) -> tuple[int, Any]:
        if self._pending:
            return self._pending.pop(0)
        return await self._queue.get()

    async def events(self, timer: RequestTimer) -> AsyncIterator[tuple[Job, OutputDelta]]:
        """(job, OutputDelta) until every job finished, each delta also added to ``job.final``;
        cancels the replica calls on early exit."""
        by_index = {j.prompt_index: j for j in self.jobs}
        num_left = len(self.jobs)
        try:
            while num_left:
                index, payload = await self._get()
                job = by_index[index]
                if job.is_done:
                    continue
                if payload is _END:
                    job.is_done, num_left = True, num_left - 1
                    continue
                if isinstance(payload, BaseException):
                    raise api_error_from(payload)
                timer.on_tokens(job.final.add(payload), time.monotonic())
                if payload.finished:
                    job.is_done, num_left = True, num_left - 1
                yield job, payload
            timer.on_finish(time.monotonic(), [c.finish_reason for j in self.jobs if j.final
                                               for c in j.final.outputs])
        finally:
            _cancel(self.jobs, self._tasks)

    async def drain(self, timer: RequestTimer) -> None:
        """Every output into the jobs' ``final``; a generation that failed is a 500."""
        async for _ in self.events(timer):
            pass
        for job in self.jobs:
            for c in job.final.outputs:
                if c.finish_reason == "error":
                    raise APIError(500, f"generation failed: {job.final.error or 'engine error'}",
                                   type="internal_server_error")


async def _pump(job: Job, queue: asyncio.Queue) -> None:
    """Relays one job's stream as ``OutputDelta``s onto the request's merged queue."""
    tracker: Optional[DeltaTracker] = None
    try:
        async for item in job.stream:
            if isinstance(item, ReplicaOutput):  # disaggregated: cumulative outputs
                if tracker is None:
                    tracker = DeltaTracker(item.replica_id)
                tracker.replica_id = item.replica_id  # a retry may move to another replica
                item = tracker.update(item.output)
                if item is None:
                    continue
            job.replica_id = item.replica_id
            if job.trace is not None and "ingress_first_output" not in job.trace:
                job.trace.update(item.trace or {})
                job.trace["ingress_first_output"] = time.monotonic()
            queue.put_nowait((job.prompt_index, item))
        queue.put_nowait((job.prompt_index, _END))
    except asyncio.CancelledError:
        job.stream.cancel()
        raise
    except Exception as exc:  # delivered to the consumer, which maps it to an API error
        queue.put_nowait((job.prompt_index, exc))


def _cancel(jobs: list[Job], tasks: list[asyncio.Task]) -> None:
    for task in tasks:
        task.cancel()
    for job in jobs:
        if job.stream is not None and not job.is_done:
            job.stream.cancel()


def api_error_from(exc: BaseException) -> APIError:
    """Maps an error from a replica call to the HTTP error the client gets."""
    if isinstance(exc, APIError):
        return exc
    names = {cls.__name__ for cls in type(exc).__mro__}
    if "BackPressureError" in names:
        return APIError(429, "server overloaded: replica queues are full; retry later",
                        type="rate_limit_error", code="overloaded")
    if names & {"EngineDeadError", "RayActorError", "ActorDiedError", "ActorUnavailableError",
                "DeploymentUnavailableError", "ReplicaUnavailableError"}:
        return APIError(503, f"no healthy replica: {_cause_message(exc)}", type="service_unavailable",
                        code="no_healthy_replica")
    if isinstance(exc, ValueError):
        return APIError(400, _cause_message(exc), code="invalid_value")
    return APIError(500, f"generation failed: {_cause_message(exc)}", type="internal_server_error")


def _cause_message(exc: BaseException) -> str:
    cause = getattr(exc, "cause", None)
    if isinstance(cause, BaseException):
        return str(cause)
    return str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
