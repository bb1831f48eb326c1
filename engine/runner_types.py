"""What the model runner (engine/model_runner.py) keeps and hands back, apart from the forward:
a request's state on the worker, the future of a launched step (async scheduling), and the
pipeline's micro-batch cut and merge.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from engine.sampler import SamplerOutput, SamplingBatch, SamplingRequest, to_token_logprobs
from engine.sampling_params import SamplingParams
from engine.scheduler_output import ModelOutput


@dataclass
class RunnerRequestState:
    request_id: str
    token_ids: list[int]
    num_prompt_tokens: int
    block_ids: list[int]
    num_computed_tokens: int
    sampling_params: SamplingParams
    num_pending: int = 0  # tokens this runner sampled that the scheduler has not sent back yet

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_known_tokens(self) -> int:
        return len(self.token_ids) + self.num_pending

    def sampling_request(self) -> SamplingRequest:
        """What the sampler needs of this request for its next token. The prompt and output ids
        only where penalties read them: copying them every step would cost O(context) a request."""
        params = self.sampling_params
        index = len(self.token_ids) - self.num_prompt_tokens + self.num_pending  # of the token drawn
        if not params.needs_history:
            return params, params.seed, index, (), ()
        return params, params.seed, index, self.token_ids[:self.num_prompt_tokens], self.output_token_ids


class StepFuture:
    """The ``ModelOutput`` of a launched step; ``result()`` waits for the sampled ids only."""

    def __init__(self, output: Optional[ModelOutput] = None, req_ids: Optional[list[str]] = None,
                 host_ids: Optional[torch.Tensor] = None, host_logprobs: Optional[SamplerOutput] = None,
                 batch: Optional[SamplingBatch] = None, ready: Optional[torch.cuda.Event] = None) -> None:
        self._output = output
        self._req_ids = req_ids
        self._host_ids = host_ids  # (R,) int64, on the host (pinned on CUDA: filled by an async copy)
        self._host_logprobs = host_logprobs
        self._batch = batch
        self._ready = ready  # recorded after the device->host copies

    def result(self) -> ModelOutput:
        if self._output is None:
            if self._ready is not None:
                self._ready.synchronize()
            token_ids = self._host_ids.tolist()
            logprobs = ([None] * len(token_ids) if self._host_logprobs is None
                        else to_token_logprobs(self._host_logprobs, self._batch))
            self._output = ModelOutput(req_ids=self._req_ids, sampled_token_ids=[[t] for t in token_ids],
                                       logprobs=logprobs)
        return self._output


def split_microbatches(scheduled: list[tuple[str, int]], max_num: int) -> list[list[tuple[str, int]]]:
    """Cuts the step's requests, in order, into at most ``max_num`` runs of similar token counts.

    Whole requests only (a request's tokens stay in one forward), so a step with one
    long prefill has one micro-batch. Deterministic: every stage cuts alike.
    """
    num = min(max_num, len(scheduled))
    total = sum(n for _, n in scheduled)
    batches: list[list[tuple[str, int]]] = [[]]
    done = 0
    for i, (req_id, n) in enumerate(scheduled):
        remaining_reqs = len(scheduled) - i
        remaining_batches = num - len(batches)
        # close the current batch once it holds its share, or when each later batch needs a request
        if batches[-1] and remaining_batches > 0 and (done >= total * len(batches) / num
                                                      or remaining_reqs == remaining_batches):
            batches.append([])
        batches[-1].append((req_id, n))
        done += n
    return batches


def merge_model_outputs(outputs: list[ModelOutput]) -> ModelOutput:
    merged = ModelOutput()
    for out in outputs:
        merged.req_ids += out.req_ids
        merged.sampled_token_ids += out.sampled_token_ids
        merged.logprobs += out.logprobs
    return merged
