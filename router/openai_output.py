"""OpenAI output: prompt rendering, and replica outputs turned into responses and SSE chunks.

``router.ingress`` starts one job per prompt and merges the jobs' ``OutputDelta`` streams
(``router.deltas``: only new tokens and text); this module
- gathers each prompt's deltas into its output so far (``JobOutput``);
- builds the non-streaming chat and completion responses, with exact ``usage``;
- turns the merged stream into SSE chunks (one per choice that has something new,
  ``data: [DONE]`` last), with the ``x-kvmesh-trace`` latency stamps as an SSE comment.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Optional, Protocol

from router.deltas import OutputDelta
from router.messages import GenerateRequest
from router.protocol import (APIError, AssistantMessage, ChatCompletionChoice, ChatCompletionChunk,
                             ChatCompletionChunkChoice, ChatCompletionRequest,
                             ChatCompletionResponse, ChatLogprobAlternative, ChatLogprobs,
                             ChatLogprobToken, CompletionChoice, CompletionLogprobs,
                             CompletionRequest, CompletionResponse, DeltaMessage, UsageInfo, dump)


# ---- prompt rendering ---------------------------------------------------------------------------
class PromptRenderer:
    """Chat template + tokenizer of the served model (the engine's own helpers)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    @classmethod
    def from_model_info(cls, info: dict) -> "PromptRenderer":
        from engine.tokenizer import load_tokenizer
        return cls(load_tokenizer(info.get("tokenizer") or info["model_path"]))

    def render_chat(self, messages: list[dict], add_generation_prompt: bool) -> str:
        from engine.tokenizer import apply_chat_template
        return apply_chat_template(self.tokenizer, messages, add_generation_prompt=add_generation_prompt)

    def encode(self, text: str) -> list[int]:
        from engine.tokenizer import encode_prompt
        return encode_prompt(self.tokenizer, text)

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids)


RendererFactory = Callable[[dict], PromptRenderer]


# ---- per-choice and per-prompt output -----------------------------------------------------------
@dataclass
class _ChoiceState:
    """What a stream already sent of one choice."""

    text_offset: int = 0  # completions logprobs: offset of the next token in the text
    finish_reason: Optional[str] = None
    has_role: bool = False


@dataclass
class _ChoiceOutput:
    """One choice's output so far, gathered from its deltas (a cumulative ``CompletionOutput``)."""

    index: int
    text_parts: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: Optional[list] = None
    finish_reason: Optional[str] = None

    @property
    def text(self) -> str:
        return "".join(self.text_parts)


@dataclass
class JobOutput:
    """A prompt's outputs so far (what the last cumulative ``RequestOutput`` held)."""

    choices: dict[int, _ChoiceOutput] = field(default_factory=dict)
    finished: bool = False
    error: Optional[str] = None

    @property
    def outputs(self) -> list[_ChoiceOutput]:
        return [self.choices[i] for i in sorted(self.choices)]

    def add(self, delta: OutputDelta) -> int:
        """Appends a delta; returns how many tokens it brought."""
        num_tokens = 0
        for d in delta.choices:
            c = self.choices.get(d.index)
            if c is None:
                c = self.choices[d.index] = _ChoiceOutput(d.index)
            if d.text:
                c.text_parts.append(d.text)
            c.token_ids.extend(d.token_ids)
            num_tokens += len(d.token_ids)
            if d.logprobs is not None:
                if c.logprobs is None:
                    c.logprobs = []
                c.logprobs.extend(d.logprobs)
            c.finish_reason = d.finish_reason or c.finish_reason
        self.finished = self.finished or delta.finished
        self.error = delta.error or self.error
        return num_tokens


class PromptJob(Protocol):
    """What the builders below read of one prompt's job (``router.replica_calls.Job``)."""

    prompt_index: int
    prompt_text: str
    request: GenerateRequest
    final: JobOutput  # every delta received so far


JobEvents = AsyncIterator[tuple[PromptJob, OutputDelta]]  # the merged stream: (job, its new delta)


def usage(jobs: list[PromptJob]) -> UsageInfo:
    """Exact token counts: prompt tokens once per prompt, completion tokens over all n choices."""
    prompt = sum(j.request.num_prompt_tokens for j in jobs)
    completion = sum(len(c.token_ids) for j in jobs if j.final for c in j.final.outputs)
    return UsageInfo.of(prompt, completion)


def sse_data(model: Any) -> str:
    return f"data: {model.model_dump_json()}\n\n"


def sse_trace(trace: dict[str, float]) -> str:
    """An SSE comment line: clients skip it, ``bench/http_overhead.py`` reads it."""
    return f": kvmesh-trace {json.dumps(trace)}\n\n"


# ---- SSE framing ---------------------------------------------------------------------------------
async def sse_stream(chunks: AsyncIterator[Any], trace: Optional[dict[str, float]] = None) -> AsyncIterator[str]:
    """The framing chat and completion streams share: each chunk as a ``data:`` line, an
    ``APIError`` raised mid-stream as an error chunk, the trace comment, then ``[DONE]``."""
    if trace is not None:
        trace["ingress_stream_start"] = time.monotonic()
    try:
        async for chunk in chunks:
            if trace is not None:
                trace.setdefault("ingress_first_chunk", time.monotonic())
            yield sse_data(chunk)
    except APIError as exc:
        yield f"data: {json.dumps(dump(exc.to_response()))}\n\n"
    if trace is not None:
        yield sse_trace(trace)
    yield "data: [DONE]\n\n"


# ---- chat responses -----------------------------------------------------------------------------
def chat_response(api_id: str, model: str, body: ChatCompletionRequest, jobs: list[PromptJob],
                  renderer: PromptRenderer) -> ChatCompletionResponse:
    """The whole answer of a finished chat request (one prompt, n choices)."""
    out = jobs[0].final
    choices = []
    for c in sorted(out.outputs, key=lambda c: c.index):
        logprobs = (ChatLogprobs(content=chat_logprobs(c.token_ids, c.logprobs or [],
                                                       body.top_logprobs or 0, renderer))
                    if body.logprobs else None)
        choices.append(ChatCompletionChoice(index=c.index, message=AssistantMessage(content=c.text),
                                            logprobs=logprobs, finish_reason=c.finish_reason))
    return ChatCompletionResponse(id=api_id, model=model, choices=choices, usage=usage(jobs))


def chat_stream(api_id: str, model: str, body: ChatCompletionRequest, jobs: list[PromptJob],
                events: JobEvents, renderer: PromptRenderer,
                trace: Optional[dict[str, float]] = None) -> AsyncIterator[str]:
    """SSE chunks of a chat request's ``events``; an error mid-stream becomes an error chunk."""
    return sse_stream(_chat_chunks(api_id, model, body, jobs, events, renderer), trace)


async def _chat_chunks(api_id: str, model: str, body: ChatCompletionRequest, jobs: list[PromptJob],
                       events: JobEvents, renderer: PromptRenderer) -> AsyncIterator[ChatCompletionChunk]:
    created = int(time.time())
    states: dict[int, _ChoiceState] = {}
    async for _, out in events:
        for c in out.choices:
            st = states.setdefault(c.index, _ChoiceState())
            delta_text, new_logprobs, new_ids = c.text, c.logprobs or [], c.token_ids
            finish = c.finish_reason if c.finish_reason and st.finish_reason is None else None
            if finish:
                st.finish_reason = finish
            if not (delta_text or finish or not st.has_role or new_logprobs):
                continue
            delta = DeltaMessage(content=delta_text)
            if not st.has_role:
                delta.role, st.has_role = "assistant", True
            logprobs = (ChatLogprobs(content=chat_logprobs(new_ids, new_logprobs,
                                                           body.top_logprobs or 0, renderer))
                        if body.logprobs else None)
            yield ChatCompletionChunk(
                id=api_id, created=created, model=model,
                choices=[ChatCompletionChunkChoice(index=c.index, delta=delta, logprobs=logprobs,
                                                   finish_reason=finish)])
    if body.include_usage:
        yield ChatCompletionChunk(id=api_id, created=created, model=model, choices=[], usage=usage(jobs))


# ---- completion responses -----------------------------------------------------------------------
def completion_response(api_id: str, model: str, body: CompletionRequest, jobs: list[PromptJob],
                        renderer: PromptRenderer) -> CompletionResponse:
    """The whole answer of a finished completion request (choice index: prompt_index * n + index)."""
    n = body.n
    choices = []
    for job in jobs:
        prefix = job.prompt_text if body.echo else ""
        for c in sorted(job.final.outputs, key=lambda c: c.index):
            logprobs = None
            if body.logprobs is not None:
                logprobs = completion_logprobs(c.token_ids, c.logprobs or [], body.logprobs,
                                               renderer, len(prefix))
            choices.append(CompletionChoice(index=job.prompt_index * n + c.index, text=prefix + c.text,
                                            logprobs=logprobs, finish_reason=c.finish_reason))
    return CompletionResponse(id=api_id, model=model, choices=choices, usage=usage(jobs))


def completion_stream(api_id: str, model: str, body: CompletionRequest, jobs: list[PromptJob],
                      events: JobEvents, renderer: PromptRenderer,
                      trace: Optional[dict[str, float]] = None) -> AsyncIterator[str]:
    """SSE chunks of a completion request's ``events``; an error mid-stream becomes an error chunk."""
    return sse_stream(_completion_chunks(api_id, model, body, jobs, events, renderer), trace)


async def _completion_chunks(api_id: str, model: str, body: CompletionRequest, jobs: list[PromptJob],
                             events: JobEvents, renderer: PromptRenderer) -> AsyncIterator[CompletionResponse]:
    created = int(time.time())
    states: dict[int, _ChoiceState] = {}
    async for job, out in events:
        for c in out.choices:
            index = job.prompt_index * body.n + c.index
            is_new = index not in states
            st = states.setdefault(index, _ChoiceState())
            if is_new and body.echo:
                st.text_offset = len(job.prompt_text)
            delta_text, new_logprobs, new_ids = c.text, c.logprobs or [], c.token_ids
            finish = c.finish_reason if c.finish_reason and st.finish_reason is None else None
            if finish:
                st.finish_reason = finish
            if is_new and body.echo:
                delta_text = job.prompt_text + delta_text
            if not (delta_text or finish or new_logprobs):
                continue
            logprobs = None
            if body.logprobs is not None:
                logprobs = completion_logprobs(new_ids, new_logprobs, body.logprobs, renderer,
                                               st.text_offset)
                st.text_offset += sum(len(t) for t in logprobs.tokens)
            yield CompletionResponse(
                id=api_id, created=created, model=model,
                choices=[CompletionChoice(index=index, text=delta_text, logprobs=logprobs,
                                          finish_reason=finish)])
    if body.include_usage:
        yield CompletionResponse(id=api_id, created=created, model=model, choices=[], usage=usage(jobs))


# ---- logprobs -----------------------------------------------------------------------------------
def _token_text(token_id: int, logprob: Any, renderer: PromptRenderer) -> str:
    text = getattr(logprob, "decoded_token", None)
    return text if text is not None else renderer.decode([token_id])


def _top(entry: dict, k: int) -> list[tuple[int, Any]]:
    items = sorted(entry.items(), key=lambda kv: (kv[1].rank if kv[1].rank is not None else 1 << 30,
                                                  -kv[1].logprob))
    return items[:k]


def chat_logprobs(token_ids: list[int], entries: list[dict], k: int,
                  renderer: PromptRenderer) -> list[ChatLogprobToken]:
    """Chat ``logprobs.content``: each token with its ``k`` most likely alternatives."""
    result = []
    for token_id, entry in zip(token_ids, entries):
        chosen = entry.get(token_id)
        token = _token_text(token_id, chosen, renderer)
        alternatives = [ChatLogprobAlternative(token=(t := _token_text(tid, lp, renderer)),
                                               logprob=lp.logprob, bytes=list(t.encode()))
                        for tid, lp in _top(entry, k)]
        result.append(ChatLogprobToken(token=token, logprob=chosen.logprob if chosen else float("-inf"),
                                       bytes=list(token.encode()), top_logprobs=alternatives))
    return result


def completion_logprobs(token_ids: list[int], entries: list[dict], k: int, renderer: PromptRenderer,
                        offset: int) -> CompletionLogprobs:
    """Completion ``logprobs``; ``offset``: where the first token starts in the choice's text."""
    out = CompletionLogprobs()
    for token_id, entry in zip(token_ids, entries):
        chosen = entry.get(token_id)
        token = _token_text(token_id, chosen, renderer)
        out.tokens.append(token)
        out.token_logprobs.append(chosen.logprob if chosen else None)
        out.top_logprobs.append({_token_text(tid, lp, renderer): lp.logprob for tid, lp in _top(entry, k)}
                                if k else None)
        out.text_offset.append(offset)
        offset += len(token)
    return out
