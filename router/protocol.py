"""OpenAI API wire format (pydantic, the HTTP boundary only).

Requests are parsed strictly (``"5"`` is not an integer) from the raw body so a
malformed or mistyped request becomes a 400 with an OpenAI error object.
Unknown fields are ignored, as the OpenAI server does; the vLLM extras
(``top_k``, ``min_p``, ``repetition_penalty``, ``ignore_eos``, ``min_tokens``,
``stop_token_ids``, ``skip_special_tokens``, ``include_stop_str_in_output``)
are accepted. Sampling values are range-checked by ``engine.SamplingParams``.
"""

from __future__ import annotations

import time
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from engine.sampling_params import SamplingParams


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class _Out(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ---- errors -------------------------------------------------------------------------------------
class ErrorInfo(_Out):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[Union[str, int]] = None


class ErrorResponse(_Out):
    error: ErrorInfo


class APIError(Exception):
    """An error the ingress answers with ``status_code`` and an OpenAI error object."""

    def __init__(self, status_code: int, message: str, type: str = "invalid_request_error",
                 param: Optional[str] = None, code: Optional[str] = None) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.info = ErrorInfo(message=message, type=type, param=param, code=code)

    def to_response(self) -> ErrorResponse:
        return ErrorResponse(error=self.info)


def validation_error_to_api_error(exc: ValidationError) -> APIError:
    """The first pydantic error as a 400 naming the offending field (``messages.0.role``)."""
    errors = exc.errors()
    err = errors[0]
    if err.get("type") == "json_invalid":
        return APIError(400, f"request body is not valid JSON: {err.get('msg')}", code="invalid_json")
    if err.get("type") == "model_type" and not err.get("loc"):
        return APIError(400, "request body must be a JSON object", code="invalid_json")
    loc = _field_path(err.get("loc", ()))
    if err.get("type") == "missing":
        return APIError(400, f"missing required field '{loc}'", param=loc or None, code="missing_field")
    # A value that fits none of a union's members yields one error per member, tagged by type.
    expected = sorted({_type_tag(e["loc"]) for e in errors
                       if _field_path(e.get("loc", ())) == loc and _type_tag(e["loc"])})
    detail = f"expected {' or '.join(expected)}" if len(expected) > 1 else err.get("msg", "")
    return APIError(400, f"invalid value for '{loc}': {detail}" if loc else detail,
                    param=loc or None, code="invalid_value")


def _is_type_tag(part: Any) -> bool:
    return isinstance(part, str) and (not part.isidentifier() or part in _TYPE_NAMES or part[:1].isupper())


_TYPE_NAMES = {"str", "int", "float", "bool", "list", "dict", "none"}


def _field_path(loc: tuple) -> str:
    return ".".join(str(p) for p in loc if not _is_type_tag(p))


def _type_tag(loc: tuple) -> Optional[str]:
    tags = [p for p in loc if _is_type_tag(p)]
    return tags[0] if tags else None


# ---- shared request fields ----------------------------------------------------------------------
class StreamOptions(_Strict):
    include_usage: bool = False


class _SamplingRequest(_Strict):
    model: str
    n: int = 1
    max_tokens: Optional[int] = None
    temperature: Optional[float] = None  # None: 1.0, as OpenAI
    top_p: Optional[float] = None
    seed: Optional[int] = None
    stop: Optional[Union[str, list[str]]] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    user: Optional[str] = None
    # vLLM-style extras
    top_k: Optional[int] = None
    min_p: Optional[float] = None
    repetition_penalty: Optional[float] = None
    ignore_eos: bool = False
    min_tokens: int = 0
    stop_token_ids: Optional[list[int]] = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    priority: int = 0  # lower is served first under the "priority" scheduling policy

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def _sampling_params(self, max_tokens: Optional[int], logprobs: Optional[int]) -> SamplingParams:
        """Raises ``ValueError`` (from SamplingParams) for out-of-range values."""
        return SamplingParams(
            n=self.n,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=0 if self.top_k is None else self.top_k,
            min_p=0.0 if self.min_p is None else self.min_p,
            repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            seed=self.seed,
            max_tokens=max_tokens,
            min_tokens=self.min_tokens,
            stop=[self.stop] if isinstance(self.stop, str) else list(self.stop or []),
            stop_token_ids=list(self.stop_token_ids or []),
            ignore_eos=self.ignore_eos,
            include_stop_str_in_output=self.include_stop_str_in_output,
            logprobs=logprobs,
            skip_special_tokens=self.skip_special_tokens,
        )


# ---- chat completions ---------------------------------------------------------------------------
class TextContentPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Optional[Union[str, list[TextContentPart]]] = None
    name: Optional[str] = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = None
    logprobs: bool = False
    top_logprobs: Optional[int] = None
    add_generation_prompt: bool = True

    def to_sampling_params(self) -> SamplingParams:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs to be true")
        max_tokens = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        return self._sampling_params(max_tokens, (self.top_logprobs or 0) if self.logprobs else None)

    def to_template_messages(self) -> list[dict[str, str]]:
        return [{"role": m.role, "content": m.text()} for m in self.messages]


class ChatLogprobAlternative(_Out):
    token: str
    logprob: float
    bytes: Optional[list[int]] = None


class ChatLogprobToken(_Out):
    token: str
    logprob: float
    bytes: Optional[list[int]] = None
    top_logprobs: list[ChatLogprobAlternative] = Field(default_factory=list)


class ChatLogprobs(_Out):
    content: Optional[list[ChatLogprobToken]] = None


class UsageInfo(_Out):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int) -> "UsageInfo":
        return cls(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                   total_tokens=prompt_tokens + completion_tokens)


class AssistantMessage(_Out):
    role: Literal["assistant"] = "assistant"
    content: Optional[str] = None


class ChatCompletionChoice(_Out):
    index: int
    message: AssistantMessage
    logprobs: Optional[ChatLogprobs] = None
    finish_reason: Optional[str] = None


class ChatCompletionResponse(_Out):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatCompletionChoice]
    usage: UsageInfo
    system_fingerprint: Optional[str] = None


class DeltaMessage(_Out):
    role: Optional[Literal["assistant"]] = None
    content: Optional[str] = None


class ChatCompletionChunkChoice(_Out):
    index: int
    delta: DeltaMessage
    logprobs: Optional[ChatLogprobs] = None
    finish_reason: Optional[str] = None


class ChatCompletionChunk(_Out):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatCompletionChunkChoice]
    usage: Optional[UsageInfo] = None
    system_fingerprint: Optional[str] = None


# ---- completions --------------------------------------------------------------------------------
class CompletionRequest(_SamplingRequest):
    # one prompt (text or token ids) or a batch of them
    prompt: Union[str, list[int], list[str], list[list[int]]]
    max_tokens: Optional[int] = 16  # OpenAI's default for completions
    logprobs: Optional[int] = None
    echo: bool = False

    def prompts(self) -> list[Union[str, list[int]]]:
        """The prompt batch: a list of strings or of token-id lists (never empty)."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            raise ValueError("prompt must not be empty")
        if isinstance(p[0], int):
            return [list(p)]  # one prompt given as token ids
        return list(p)

    def to_sampling_params(self) -> SamplingParams:
        return self._sampling_params(self.max_tokens, self.logprobs)


class CompletionLogprobs(_Out):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[Optional[float]] = Field(default_factory=list)
    top_logprobs: list[Optional[dict[str, float]]] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(_Out):
    index: int
    text: str
    logprobs: Optional[CompletionLogprobs] = None
    finish_reason: Optional[str] = None


class CompletionResponse(_Out):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Optional[UsageInfo] = None  # always set in full responses; on the last stream chunk only
    system_fingerprint: Optional[str] = None


# ---- models -------------------------------------------------------------------------------------
class ModelCard(_Out):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "kvmesh"
    max_model_len: Optional[int] = None


class ModelList(_Out):
    object: Literal["list"] = "list"
    data: list[ModelCard]


def dump(model: BaseModel) -> dict[str, Any]:
    """JSON-ready dict; ``None`` fields are kept (OpenAI clients expect the keys)."""
    return model.model_dump(mode="json")
