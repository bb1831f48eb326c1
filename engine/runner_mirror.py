"""What the model runner holds for each request, as the scheduler last told it: the diffs.

The runner (engine/model_runner.py) gets a request in full once (``NewRequestData``) and
afterwards only what changed (``CachedRequestData``: new token ids, new block ids, blocks
replaced by copy-on-write), and in full again after a preemption. This mirror keeps, per request,
how many token ids and block ids the runner knows, and turns a scheduled request into the one
or the other. Plain Python, no torch.
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.request import Request
from engine.scheduler_output import CachedRequestData, NewRequestData

BlockCopies = list[tuple[int, int]]  # (source block, destination block) copies this step


@dataclass
class _SentState:
    """What the runner holds for a request; diffs are taken against it."""

    num_token_ids: int  # prompt + outputs the runner knows
    num_block_ids: int  # length of the block table the runner knows


class RunnerMirror:
    def __init__(self) -> None:
        self._sent: dict[str, _SentState] = {}

    def request_data(self, request: Request, copies: BlockCopies) -> NewRequestData | CachedRequestData:
        """The request in full if the runner does not hold it, else its diff; the runner holds
        it as it is now afterwards."""
        block_ids = request.block_ids
        sent = self._sent.get(request.request_id)
        if sent is None:
            self._sent[request.request_id] = _SentState(request.num_tokens, len(block_ids))
            return NewRequestData(
                request_id=request.request_id, token_ids=request.all_token_ids,
                num_prompt_tokens=request.num_prompt_tokens, block_ids=list(block_ids),
                num_computed_tokens=request.num_computed_tokens,
                sampling_params=request.sampling_params, num_output_tokens=request.num_output_tokens)
        replaced = []
        for _, dst in copies:  # copy-on-write: a block the runner holds changed
            index = block_ids.index(dst)
            if index < sent.num_block_ids:
                replaced.append((index, dst))
        data = CachedRequestData(
            request_id=request.request_id,
            new_token_ids=request.output_token_ids[sent.num_token_ids - request.num_prompt_tokens:],
            new_block_ids=block_ids[sent.num_block_ids:], replaced_blocks=replaced,
            num_computed_tokens=request.num_computed_tokens)
        sent.num_token_ids, sent.num_block_ids = request.num_tokens, len(block_ids)
        return data

    def forget(self, request_id: str) -> None:
        """The runner drops the request (preempted, finished): it is sent in full next time."""
        self._sent.pop(request_id, None)
