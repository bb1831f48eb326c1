"""Offline API shaped like vLLM's ``LLM`` so users can switch without relearning.

    from engine import LLM, SamplingParams
    llm = LLM(model="kvmesh-tiny")           # or any local HF checkpoint folder
    outs = llm.generate(["Hello"], SamplingParams(temperature=0, max_tokens=32))
    print(outs[0].outputs[0].text)
"""

from __future__ import annotations

import itertools
import logging
import sys
import time
from typing import Optional, Sequence

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine, PromptType
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams
from engine.tokenizer import apply_chat_template

logger = logging.getLogger(__name__)

Messages = list[dict]


class LLM:
    def __init__(self, model: str = "kvmesh-tiny", **kwargs) -> None:
        self.engine = LLMEngine(EngineConfig.create(model=model, **kwargs))
        self._ids = itertools.count()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def get_tokenizer(self):
        return self.engine.tokenizer

    def generate(self, prompts: PromptType | Sequence[PromptType],
                 sampling_params: Optional[SamplingParams | Sequence[SamplingParams]] = None,
                 use_tqdm: bool = False, priority: Optional[Sequence[int]] = None) -> list[RequestOutput]:
        """Runs all prompts to completion; returns outputs in prompt order.

        ``prompts``: a string, a list of token ids, or a list of either.
        """
        prompts = self._as_prompt_list(prompts)
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params or SamplingParams()] * len(prompts)
        else:
            params_list = list(sampling_params)
            if len(params_list) != len(prompts):
                raise ValueError(f"got {len(params_list)} sampling params for {len(prompts)} prompts")
        ids = []
        try:
            for i, (prompt, params) in enumerate(zip(prompts, params_list)):
                request_id = f"offline-{next(self._ids)}"
                self.engine.add_request(request_id, prompt, params,
                                        priority=priority[i] if priority else 0, stream=False)
                ids.append(request_id)
        except Exception:
            self.engine.abort_request(ids)  # leave nothing half-added
            raise
        return self._run(ids, use_tqdm)

    def chat(self, messages: Messages | Sequence[Messages],
             sampling_params: Optional[SamplingParams | Sequence[SamplingParams]] = None,
             add_generation_prompt: bool = True, use_tqdm: bool = False) -> list[RequestOutput]:
        """Renders each conversation with the model's chat template, then generates."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        prompts = [apply_chat_template(self.tokenizer, conv, add_generation_prompt=add_generation_prompt)
                   for conv in conversations]
        token_prompts = [self.tokenizer.encode(p, add_special_tokens=False) for p in prompts]
        return self.generate(token_prompts, sampling_params, use_tqdm=use_tqdm)

    @staticmethod
    def _as_prompt_list(prompts) -> list[PromptType]:
        if isinstance(prompts, str):
            return [prompts]
        prompts = list(prompts)
        if prompts and isinstance(prompts[0], int):
            return [prompts]  # one prompt given as token ids
        return prompts

    def _run(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        final: dict[str, RequestOutput] = {}
        start, last_report = time.monotonic(), 0.0
        while self.engine.has_unfinished_requests():
            for out in self.engine.step():
                if out.finished:
                    final[out.request_id] = out
            now = time.monotonic()
            if use_tqdm and now - last_report > 1.0:
                last_report = now
                print(f"\r[kvmesh] {len(final)}/{len(ids)} requests done, {now - start:.1f}s",
                      end="", file=sys.stderr, flush=True)
        if use_tqdm:
            print(f"\r[kvmesh] {len(final)}/{len(ids)} requests done, {time.monotonic() - start:.1f}s",
                  file=sys.stderr)
        missing = [i for i in ids if i not in final]
        if missing:
            raise RuntimeError(f"engine stopped with unfinished requests {missing[:5]}")
        return [final[i] for i in ids]
