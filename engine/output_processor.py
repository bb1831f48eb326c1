"""Turns the scheduler's updated requests into user-facing ``RequestOutput``s.

Detokenizes incrementally, finds stop strings (which the scheduler cannot see:
it has no tokenizer), and gathers the ``n`` sample requests of one prompt back
into one ``RequestOutput`` whose ``outputs[i]`` is sample ``i``. Outputs are
cumulative: each carries all text and tokens so far.

A streamed prompt gets an output at its first token, whenever a sample has at
least ``interval`` tokens not yet in an output, and when it finishes; between
those its tokens only accumulate (and, without stop strings, are not even
decoded: one decode covers them all). ``interval`` is the prompt's
``stream_interval``, or, with ``max_outputs_per_step`` set, at least
ceil(active prompts / max_outputs_per_step): under load each prompt's updates
widen so that one step yields about that many outputs whatever the batch size.
With both at their defaults (1, None) every step that changes a prompt yields
an output. Fewer outputs cut the per-token host work here and in everything
downstream (hand-off, replica, Serve's streaming, ingress), at the cost of
coarser streaming; tokens and text are the same.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Optional

from engine.detokenizer import IncrementalDetokenizer, decode_token
from engine.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput, SampleLogprobs
from engine.request import FinishReason, Request
from engine.sampling_params import SamplingParams
from engine.scheduler_output import TokenLogprobs


@dataclass
class SampleState:
    index: int
    detokenizer: IncrementalDetokenizer
    text: str = ""
    num_tokens_seen: int = 0
    num_tokens_detokenized: int = 0
    num_tokens_emitted: int = 0  # tokens in this sample's latest output
    token_ids: list[int] = field(default_factory=list)
    logprobs: Optional[SampleLogprobs] = None
    finish_reason: Optional[FinishReason] = None
    stop_reason: Optional[int | str] = None


@dataclass
class PromptState:
    request_id: str
    prompt: Optional[str]
    prompt_token_ids: list[int]
    params: SamplingParams
    samples: dict[str, SampleState]  # child request id -> state
    metrics: RequestMetrics
    stream: bool = True  # False: the caller wants only the final output (offline LLM.generate)
    error: Optional[str] = None
    stream_interval: int = 1  # streamed: an output once a sample has this many new tokens
    max_outputs_per_step: Optional[int] = None  # widen the interval past this many outputs a step

    @property
    def detokenize_each_step(self) -> bool:
        """Stop strings must be looked for as tokens come; streams need text each time
        they get an output (every step when ``stream_interval`` is 1)."""
        every_step = self.stream_interval == 1 and self.max_outputs_per_step is None
        return (self.stream and every_step) or bool(self.params.stop)

    def is_output_due(self, sample: "SampleState", num_active_prompts: int) -> bool:
        """Whether this sample's tokens so far should go out now (streamed prompts)."""
        interval = self.stream_interval
        if self.max_outputs_per_step is not None:
            interval = max(interval, -(-num_active_prompts // self.max_outputs_per_step))
        if interval == 1:
            return True  # every step that touches the prompt, as it always was
        num_new = len(sample.token_ids) - sample.num_tokens_emitted
        # The first token goes at once: time to first token is never delayed.
        return num_new >= interval or (sample.num_tokens_emitted == 0 and num_new > 0)

    @property
    def finished(self) -> bool:
        return all(s.finish_reason is not None for s in self.samples.values())


class OutputProcessor:
    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.prompts: dict[str, PromptState] = {}
        self.parent_of: dict[str, str] = {}  # child request id -> prompt request id

    def add(self, request_id: str, prompt: Optional[str], prompt_token_ids: list[int],
            params: SamplingParams, child_ids: list[str], arrival_time: float,
            stream: bool = True, stream_interval: int = 1,
            max_outputs_per_step: Optional[int] = None) -> None:
        if stream_interval < 1:
            raise ValueError(f"stream_interval must be >= 1, got {stream_interval}")
        if max_outputs_per_step is not None and max_outputs_per_step < 1:
            raise ValueError(f"max_outputs_per_step must be >= 1 or None, got {max_outputs_per_step}")
        samples = {}
        for i, child_id in enumerate(child_ids):
            detok = IncrementalDetokenizer(self.tokenizer, prompt_token_ids,
                                           skip_special_tokens=params.skip_special_tokens,
                                           stop=params.stop,
                                           include_stop_str_in_output=params.include_stop_str_in_output)
            samples[child_id] = SampleState(index=i, detokenizer=detok,
                                            logprobs=[] if params.logprobs is not None else None)
            self.parent_of[child_id] = request_id
        self.prompts[request_id] = PromptState(request_id, prompt, prompt_token_ids, params, samples,
                                               RequestMetrics(arrival_time=arrival_time), stream=stream,
                                               stream_interval=stream_interval,
                                               max_outputs_per_step=max_outputs_per_step)

    def child_ids(self, request_id: str) -> list[str]:
        state = self.prompts.get(request_id)
        return list(state.samples) if state else []

    def process(self, updated: list[Request],
                logprobs: dict[str, list[TokenLogprobs]]) -> tuple[list[RequestOutput], list[str]]:
        """Returns (outputs of prompts that changed, child ids that hit a stop string)."""
        changed: dict[str, PromptState] = {}
        stopped: list[str] = []
        now = time.monotonic()
        num_active_prompts = len(self.prompts)
        for req in updated:
            parent_id = self.parent_of.get(req.request_id)
            if parent_id is None:
                continue
            prompt = self.prompts[parent_id]
            sample = prompt.samples[req.request_id]
            if sample.finish_reason is not None:
                continue
            req_finished, each_step = req.is_finished, prompt.detokenize_each_step
            if not each_step and not req_finished and sample.logprobs is None and not prompt.stream:
                continue  # final-only output: the tokens are read from the request when it ends
            output_ids = req.output_token_ids
            sample.token_ids.extend(output_ids[sample.num_tokens_seen:])
            sample.num_tokens_seen = len(output_ids)
            if sample.logprobs is not None:
                for entry in logprobs.get(req.request_id, []):
                    sample.logprobs.append(self._to_logprob_dict(entry))
            is_due = prompt.stream and prompt.is_output_due(sample, num_active_prompts)
            if not each_step and not req_finished and not is_due:
                continue  # tokens only; the text is decoded when an output is due (or at the end)
            update = sample.detokenizer.update(sample.token_ids[sample.num_tokens_detokenized:])
            sample.num_tokens_detokenized = len(sample.token_ids)
            sample.text += update.delta_text
            if update.stop_str is not None:
                sample.finish_reason, sample.stop_reason = FinishReason.STOP, update.stop_str
                stopped.append(req.request_id)
            elif req_finished:
                sample.text += sample.detokenizer.flush()
                sample.finish_reason = req.finish_reason
                sample.stop_reason = req.stop_reason
                if req.finish_reason == FinishReason.ERROR:
                    prompt.error = req.error or "request failed"
            metrics = prompt.metrics
            if metrics.first_token_time is None or metrics.first_scheduled_time is None:  # else no-ops
                metrics.first_scheduled_time = metrics.first_scheduled_time or req.first_scheduled_time
                metrics.first_token_time = metrics.first_token_time or req.first_token_time or now
            if req.num_cached_tokens > metrics.num_cached_tokens:
                metrics.num_cached_tokens = req.num_cached_tokens
            if is_due or sample.finish_reason is not None:
                changed[parent_id] = prompt
        outputs = [self._make_output(p) for p in changed.values() if p.stream or p.finished]
        return outputs, stopped

    def finish(self, request_id: str, reason: FinishReason, error: Optional[str] = None) -> Optional[RequestOutput]:
        """Ends every unfinished sample of a prompt (abort or error); returns its final output."""
        prompt = self.prompts.get(request_id)
        if prompt is None:
            return None
        for sample in prompt.samples.values():
            if sample.finish_reason is None:
                if sample.num_tokens_detokenized < len(sample.token_ids):  # deferred text
                    sample.text += sample.detokenizer.update(
                        sample.token_ids[sample.num_tokens_detokenized:]).delta_text
                    sample.num_tokens_detokenized = len(sample.token_ids)
                sample.text += sample.detokenizer.flush()
                sample.finish_reason = reason
        prompt.error = error or prompt.error
        return self._make_output(prompt)

    def drop(self, request_id: str) -> None:
        """Forgets a prompt without a final output (its samples continue on another replica)."""
        prompt = self.prompts.pop(request_id, None)
        for child_id in (prompt.samples if prompt else ()):
            self.parent_of.pop(child_id, None)

    def _make_output(self, prompt: PromptState) -> RequestOutput:
        samples = prompt.samples.values()
        if len(samples) > 1:
            samples = sorted(samples, key=lambda s: s.index)
        outputs = []
        for s in samples:
            if s.num_tokens_detokenized < len(s.token_ids):  # deferred text (interval > 1)
                s.text += s.detokenizer.update(s.token_ids[s.num_tokens_detokenized:]).delta_text
                s.num_tokens_detokenized = len(s.token_ids)
            s.num_tokens_emitted = len(s.token_ids)
            reason = s.finish_reason
            outputs.append(CompletionOutput(
                index=s.index, text=s.text, token_ids=list(s.token_ids),
                logprobs=list(s.logprobs) if s.logprobs is not None else None,
                finish_reason=reason.value if reason is not None else None, stop_reason=s.stop_reason))
        finished = prompt.finished
        if finished:
            prompt.metrics.finished_time = time.monotonic()
            self.prompts.pop(prompt.request_id, None)
            for child_id in prompt.samples:
                self.parent_of.pop(child_id, None)
        return RequestOutput(request_id=prompt.request_id, prompt=prompt.prompt,
                             prompt_token_ids=prompt.prompt_token_ids, outputs=outputs,
                             finished=finished, metrics=prompt.metrics, error=prompt.error)

    def _to_logprob_dict(self, entry: TokenLogprobs) -> dict[int, Logprob]:
        out = {entry.token_id: Logprob(entry.logprob, entry.rank, decode_token(self.tokenizer, entry.token_id))}
        for rank, (tok, lp) in enumerate(zip(entry.top_token_ids, entry.top_logprobs), start=1):
            out.setdefault(tok, Logprob(lp, rank, decode_token(self.tokenizer, tok)))
        return out
