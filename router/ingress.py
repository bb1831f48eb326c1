"""OpenAI-compatible HTTP ingress (FastAPI inside a Serve deployment).

Life of a request here:
1. Check the API key (401), parse the body strictly (400), check the model name (404)
   and build ``SamplingParams`` (400 on bad values).
2. Render the chat template and tokenize ONCE; reject prompts that do not fit
   ``max_model_len`` (400). Compute the prompt's block-hash chain with the
   engine's block size (``engine.block_hash``) for the prefix-aware router.
3. Admission from the replicas' reported stats: no healthy replica (503), too many
   waiting requests per replica (429).
4. Send one ``GenerateRequest`` per prompt to the replicas and merge their outputs
   (``router.replica_calls``: the request router picks each replica; deltas come over
   Serve's streaming or the stream channel, or through the disaggregated flow).
5. Turn the replica's ``OutputDelta`` stream (only new tokens and text; ``router.deltas``)
   into SSE chunks (per choice index, ``data: [DONE]`` last) or one response with exact
   ``usage`` (``router.openai_output``). The ``x-kvmesh-replica`` header names the replica
   that served each prompt, and ``x-kvmesh-ingress`` the ingress replica whose router chose it.
6. If the client goes away, Serve cancels this handler; we cancel the replica calls,
   and the replica aborts the engine request (its KV blocks are freed).

Errors are OpenAI error objects ``{"error": {"message", "type", "param", "code"}}``.

Debugging latency: a streaming request with the header ``x-kvmesh-trace: 1`` gets, before
``data: [DONE]``, an SSE comment ``: kvmesh-trace {...}`` (clients ignore comments) with
``time.monotonic()`` stamps of its first token's way through the ingress, the replica and
the engine (``bench/http_overhead.py`` reads them).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from typing import Any, AsyncIterator, Optional, Union

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from engine.gc_freeze import freeze_startup_heap
from engine.block_hash import block_hash_chain
from engine.step_timeline import StepTimeline
from engine.step_timeline import summarize as summarize_timeline
from router.config import DeploymentConfig
from router.direct_http import DirectHTTPServer
from router.disagg import DisaggregatedFlow
from router.messages import GenerateRequest
from router.metrics import CONTENT_TYPE, HTTPRequestCounter, RequestTimer, get_metrics
from router.openai_output import (PromptRenderer, RendererFactory, chat_response,
                                  chat_stream, completion_response, completion_stream)
from router.protocol import (APIError, ChatCompletionRequest, CompletionRequest, ModelCard, ModelList,
                             dump, validation_error_to_api_error)
from router.replica_calls import Job, ReplicaCalls
from router.stream_channel import StreamReceiver, stream_channel_from_env

logger = logging.getLogger(__name__)

STATS_MAX_AGE_S = 0.25  # the ingress re-reads the stats board at most this often
REPLICA_HEADER = "x-kvmesh-replica"  # replica id(s) that served the request, one per prompt
INGRESS_HEADER = "x-kvmesh-ingress"  # the ingress replica (and so the router) that routed it
TRACE_HEADER = "x-kvmesh-trace"  # "1": stream the request's latency stamps as an SSE comment


app = FastAPI(title="kvmesh", description="OpenAI-compatible API served by kvmesh")


@app.exception_handler(APIError)
async def _api_error_handler(request: Request, exc: APIError) -> JSONResponse:
    return JSONResponse(dump(exc.to_response()), status_code=exc.status_code)


@app.exception_handler(StarletteHTTPException)
async def _http_error_handler(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    err = APIError(exc.status_code, str(exc.detail), type="invalid_request_error",
                   code="not_found" if exc.status_code == 404 else None)
    return JSONResponse(dump(err.to_response()), status_code=exc.status_code)


@app.exception_handler(Exception)
async def _internal_error_handler(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("internal error on %s", request.url.path)
    err = APIError(500, f"internal error: {exc!r}", type="internal_server_error")
    return JSONResponse(dump(err.to_response()), status_code=500)


app.add_middleware(HTTPRequestCounter)


class OpenAIIngress:
    """The ingress deployment body; ``router.app`` wraps it with ``serve.ingress(app)``."""

    async def __init__(self, cfg: DeploymentConfig, llm_handle: Any, board_handle: Any,
                       renderer_factory: Optional[RendererFactory] = None,
                       prefill_handle: Any = None) -> None:
        self.cfg = cfg
        self.llm = llm_handle  # the replicas, or the decode pool when disaggregated
        # Disaggregated mode: each request goes through the prefill pool, then the decode pool.
        # Deltas come straight from the replicas when the stream channel is on (it listens on
        # first use); None: Serve streaming (off in the config or by KVMESH_STREAM_CHANNEL=0).
        self.calls = ReplicaCalls(
            llm_handle,
            DisaggregatedFlow(cfg.disaggregation, prefill_handle, llm_handle, get_metrics())
            if prefill_handle is not None else None,
            StreamReceiver() if cfg.ingress.stream_channel and stream_channel_from_env() else None)
        self.board = board_handle
        self.ingress_id = serve.get_replica_context().replica_id.unique_id
        self.api_keys = cfg.auth.resolve_api_keys()
        self.metrics = get_metrics()
        self._renderer_factory = renderer_factory or PromptRenderer.from_model_info
        self._renderer: Optional[PromptRenderer] = None
        self._model_info: Optional[dict] = None
        self._init_lock: Optional[asyncio.Lock] = None
        self._stats: dict[str, dict] = {}
        self._stats_time = 0.0
        self._stats_lock: Optional[asyncio.Lock] = None
        self._stats_refresh: Optional[asyncio.Task] = None
        # Load the tokenizer in the background now, so the first requests do not wait for it.
        self._warmup = asyncio.get_running_loop().create_task(self._warm_up())
        # KVMESH_STEP_TIMELINE=1 (benchmarks): this loop's lags and GC pauses, for attributing
        # stalls that clients see (engine/step_timeline.py; GET /kvmesh/timeline).
        self._timeline = StepTimeline.from_env()
        self._lag_probe = (asyncio.get_running_loop().create_task(self._timeline.watch_loop_lag())
                           if self._timeline is not None else None)
        # http.direct_port: this app also on the replicas' shared port, skipping Serve's proxy;
        # it listens once Serve has made this object the replica's (the routes' ``self``).
        self._direct: Optional[DirectHTTPServer] = None
        if cfg.http.direct_port is not None:
            self._direct = DirectHTTPServer(app, cfg.http.host, cfg.http.direct_port)
            self._direct.start(ready=lambda: serve.get_replica_context().servable_object is self)

    # ---- endpoints ----------------------------------------------------------------------------
    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Response:
        arrival = time.monotonic()
        self._authorize(request)
        raw = await request.body()  # Serve fetches the body from the proxy: one more hop
        body_read = time.monotonic()
        body = self._parse(ChatCompletionRequest, raw)
        self._check_model(body.model)
        params = self._sampling_params(body)
        renderer, info = await self._ready()
        try:
            text = renderer.render_chat(body.to_template_messages(), body.add_generation_prompt)
        except Exception as exc:
            raise APIError(400, f"cannot apply the chat template: {exc}", param="messages") from None
        token_ids = renderer.encode(text)
        trace = _start_trace(request, body.stream, arrival, body_read)
        self._check_prompt(token_ids, params, info, "messages")
        api_id = f"chatcmpl-{uuid.uuid4().hex}"
        jobs = [Job(0, self._generate_request(f"{api_id}-0", token_ids, params, text, body.priority), text)]
        await self._admit()
        timer = RequestTimer(self.metrics, "chat", arrival)
        outputs = await self.calls.start(jobs, trace)
        self.metrics.prompt_tokens.labels("chat").inc(len(token_ids))
        if trace is not None:
            trace["ingress_response"] = time.monotonic()
        if body.stream:
            events = outputs.events(timer)
            return self._sse(chat_stream(api_id, self.cfg.served_model_name, body, jobs, events, renderer,
                                         trace),
                             self._routing_headers(jobs))
        await outputs.drain(timer)
        return JSONResponse(dump(chat_response(api_id, self.cfg.served_model_name, body, jobs, renderer)),
                            headers=self._routing_headers(jobs))

    @app.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        arrival = time.monotonic()
        self._authorize(request)
        raw = await request.body()
        body_read = time.monotonic()
        body = self._parse(CompletionRequest, raw)
        self._check_model(body.model)
        params = self._sampling_params(body)
        renderer, info = await self._ready()
        try:
            prompts = body.prompts()
        except ValueError as exc:
            raise APIError(400, str(exc), param="prompt") from None
        api_id = f"cmpl-{uuid.uuid4().hex}"
        jobs = []
        for i, prompt in enumerate(prompts):
            if isinstance(prompt, str):
                text, token_ids = prompt, (renderer.encode(prompt) if prompt else [])
            else:
                text, token_ids = None, list(prompt)
            self._check_prompt(token_ids, params, info, "prompt")
            if text is None:
                text = renderer.decode(token_ids) if body.echo else ""
            jobs.append(Job(i, self._generate_request(f"{api_id}-{i}", token_ids, params, text,
                                                       body.priority), text))
        trace = _start_trace(request, body.stream, arrival, body_read)
        await self._admit()
        timer = RequestTimer(self.metrics, "completions", arrival)
        outputs = await self.calls.start(jobs, trace)
        self.metrics.prompt_tokens.labels("completions").inc(sum(j.request.num_prompt_tokens for j in jobs))
        if trace is not None:
            trace["ingress_response"] = time.monotonic()
        if body.stream:
            events = outputs.events(timer)
            return self._sse(completion_stream(api_id, self.cfg.served_model_name, body, jobs, events,
                                               renderer, trace),
                             self._routing_headers(jobs))
        await outputs.drain(timer)
        return JSONResponse(dump(completion_response(api_id, self.cfg.served_model_name, body, jobs,
                                                     renderer)),
                            headers=self._routing_headers(jobs))

    @app.get("/v1/models")
    async def models(self, request: Request) -> Response:
        self._authorize(request)
        max_len = self._model_info["max_model_len"] if self._model_info else None
        return JSONResponse(dump(ModelList(data=[ModelCard(id=self.cfg.served_model_name,
                                                           max_model_len=max_len)])))

    @app.get("/health")
    async def health(self) -> Response:
        healthy = [s for s in (await self._replica_stats()).values() if s.get("is_healthy")]
        if not healthy:
            return JSONResponse({"status": "unhealthy", "num_healthy_replicas": 0}, status_code=503)
        return JSONResponse({"status": "ok", "num_healthy_replicas": len(healthy)})

    @app.get("/metrics")
    async def prometheus_metrics(self) -> Response:
        self.metrics.replicas.update(await self._replica_stats(max_age_s=0.0))
        return Response(self.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/kvmesh/status")
    async def status(self) -> Response:
        """Per-replica load and cache figures (what ``kvmesh status`` prints)."""
        stats = await self._replica_stats(max_age_s=0.0)
        return JSONResponse({"app": self.cfg.name, "model": self.cfg.served_model_name,
                             "min_replicas": self.cfg.replicas.min_replicas,
                             "max_replicas": self.cfg.replicas.max_replicas,
                             "router": self.cfg.routing.kind.value,
                             "stream_channel": self.calls.receiver.stats() if self.calls.receiver else None,
                             "replicas": [stats[r] for r in sorted(stats)]})

    @app.get("/kvmesh/timeline")
    async def timeline(self, start_s: Optional[float] = None, end_s: Optional[float] = None,
                       top: int = 50) -> Response:
        """This ingress replica's loop lags and GC pauses over a monotonic window (the host's
        clock), summarized by ``engine.step_timeline.summarize``; ``enabled: false`` when off."""
        if self._timeline is None:
            return JSONResponse({"enabled": False, "ingress_id": self.ingress_id})
        summary = summarize_timeline(self._timeline, top, start_s=start_s, end_s=end_s)
        return JSONResponse({**summary, "ingress_id": self.ingress_id, "pid": os.getpid()})

    # ---- request checks -----------------------------------------------------------------------
    def _authorize(self, request: Request) -> None:
        if not self.api_keys:
            return
        header = request.headers.get("authorization", "")
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or key.strip() not in self.api_keys:
            raise APIError(401, "invalid or missing API key (send 'Authorization: Bearer <key>')",
                           type="authentication_error", code="invalid_api_key")

    @staticmethod
    def _parse(model_cls: type, raw: bytes) -> Any:
        try:
            return model_cls.model_validate_json(raw or b"")
        except ValidationError as exc:
            raise validation_error_to_api_error(exc) from None

    def _check_model(self, model: str) -> None:
        if model != self.cfg.served_model_name:
            raise APIError(404, f"the model '{model}' does not exist; this server serves "
                                f"'{self.cfg.served_model_name}'", param="model", code="model_not_found")

    @staticmethod
    def _sampling_params(body: Union[ChatCompletionRequest, CompletionRequest]) -> Any:
        try:
            return body.to_sampling_params()
        except (ValueError, TypeError) as exc:
            param = str(exc).split(" ", 1)[0]
            raise APIError(400, str(exc), param=param if param.isidentifier() else None,
                           code="invalid_value") from None

    @staticmethod
    def _check_prompt(token_ids: list[int], params: Any, info: dict, param: str) -> None:
        max_len = info["max_model_len"]
        if not token_ids:
            raise APIError(400, "the prompt is empty", param=param)
        if len(token_ids) >= max_len:
            raise APIError(400, f"this model's maximum context length is {max_len} tokens, but the "
                                f"prompt has {len(token_ids)} tokens", param=param,
                           code="context_length_exceeded")
        if params.max_tokens is not None and len(token_ids) + params.max_tokens > max_len:
            raise APIError(400, f"this model's maximum context length is {max_len} tokens; the prompt "
                                f"({len(token_ids)} tokens) plus max_tokens ({params.max_tokens}) "
                                "exceeds it", param="max_tokens", code="context_length_exceeded")

    def _generate_request(self, request_id: str, token_ids: list[int], params: Any, text: str,
                          priority: int) -> GenerateRequest:
        block_size = self._model_info["block_size"] if self._model_info else self.cfg.block_size
        hashes = block_hash_chain(token_ids, block_size, salt=self.cfg.engine.cache.cache_salt)
        return GenerateRequest(request_id=request_id, prompt_token_ids=token_ids,
                               sampling_params=params, block_hashes=hashes, prompt=text,
                               priority=priority)

    async def _ready(self) -> tuple[PromptRenderer, dict]:
        """Model facts from a replica and the tokenizer, loaded once on first use."""
        if self._renderer is not None:
            return self._renderer, self._model_info
        if self._init_lock is None:
            self._init_lock = asyncio.Lock()
        async with self._init_lock:
            if self._renderer is None:
                try:
                    info = await asyncio.wait_for(self.llm.model_info.remote(), timeout=60)
                except Exception as exc:
                    raise APIError(503, f"no healthy replica: {exc!r}", type="service_unavailable",
                                   code="no_healthy_replica") from None
                self._renderer = await asyncio.to_thread(self._renderer_factory, info)
                self._model_info = info
        return self._renderer, self._model_info

    async def _warm_up(self) -> None:
        try:
            await self._ready()
        except Exception as exc:  # retried by the first request
            logger.warning("ingress warm-up failed: %r", exc)
            return
        # Tokenizer, Serve and FastAPI state out of the collector's reach: gen-2 pauses of
        # 200-245 ms in this process stalled every stream at once (2-H200 runs of disagg_serve).
        freeze_startup_heap()

    async def _replica_stats(self, max_age_s: float = STATS_MAX_AGE_S, wait: bool = True) -> dict[str, dict]:
        """The board's snapshot, re-read when older than ``max_age_s``.

        ``wait=False`` (admission, on every request's path): stale stats are refreshed in
        the background and this request uses the ones at hand, so no request waits for
        a board round trip once the first snapshot is in.
        """
        if self._stats_lock is None:
            self._stats_lock = asyncio.Lock()
        if not wait and self._stats_time > 0.0 and time.monotonic() - self._stats_time > max_age_s:
            if not self._stats_lock.locked():
                self._stats_refresh = asyncio.get_running_loop().create_task(self._replica_stats(max_age_s))
            return self._stats
        async with self._stats_lock:
            if time.monotonic() - self._stats_time > max_age_s:
                try:
                    self._stats = await asyncio.wait_for(self.board.snapshot.remote(), timeout=5)
                except Exception as exc:
                    logger.warning("cannot read the replica stats board: %r", exc)
                    self._stats = {}
                self._stats_time = time.monotonic()
        return self._stats

    async def _admit(self) -> None:
        stats = await self._replica_stats(wait=False)
        if not stats:
            stats = await self._replica_stats(max_age_s=0.0)
        healthy = [s for s in stats.values() if s.get("is_healthy")]
        if not healthy:
            raise APIError(503, "no healthy replica is available", type="service_unavailable",
                           code="no_healthy_replica")
        limit = self.cfg.admission.max_waiting_per_replica
        if limit is not None:
            waiting = sum(s.get("num_waiting", 0) for s in healthy) / len(healthy)
            if waiting >= limit:
                raise APIError(429, f"server overloaded: {waiting:.0f} requests waiting per replica "
                                    f"(limit {limit}); retry later", type="rate_limit_error",
                               code="overloaded")

    # ---- responses ----------------------------------------------------------------------------
    def _routing_headers(self, jobs: list[Job]) -> dict[str, str]:
        """Who served each prompt (``_start`` saw one output of every job, so all are known)."""
        replica_ids = [j.replica_id for j in sorted(jobs, key=lambda j: j.prompt_index) if j.replica_id]
        headers = {INGRESS_HEADER: self.ingress_id}
        if replica_ids:
            headers[REPLICA_HEADER] = ",".join(replica_ids)
        return headers

    @staticmethod
    def _sse(chunks: AsyncIterator[str], headers: dict[str, str]) -> StreamingResponse:
        return StreamingResponse(chunks, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no",
                                          **headers})


# serve.ingress rewrites the routes of ``app`` (and the signatures of the methods above) in
# place. It must run at import time, so every process that unpickles the deployment
# (the ingress replicas) sees the same rewritten routes.
OpenAIIngressDeployment = serve.ingress(app)(OpenAIIngress)


# ---- helpers ------------------------------------------------------------------------------------
def _start_trace(request: Request, stream: bool, arrival: float,
                 body_read: float) -> Optional[dict[str, float]]:
    """Latency stamps for a streaming request that asked for them (``x-kvmesh-trace: 1``)."""
    if not stream or request.headers.get(TRACE_HEADER) != "1":
        return None
    return {"ingress_arrival": arrival, "ingress_body_read": body_read, "ingress_tokenized": time.monotonic()}
