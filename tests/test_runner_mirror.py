"""RunnerMirror (engine/runner_mirror.py): a request goes to the runner in full once, then as diffs.

Plain Python, as the scheduler that owns it: what the runner is told must rebuild the request's
token ids and block table exactly, after appended tokens, grown tables, copy-on-write
replacements and a preemption (``forget``: sent in full again).
"""

from __future__ import annotations

from engine.request import Request
from engine.runner_mirror import RunnerMirror
from engine.sampling_params import SamplingParams
from engine.scheduler_output import CachedRequestData, NewRequestData


class RunnerView:
    """What a runner rebuilds from the data (as engine/model_runner.py's request states do)."""

    def __init__(self) -> None:
        self.token_ids: list[int] = []
        self.block_ids: list[int] = []

    def apply(self, data) -> None:
        if isinstance(data, NewRequestData):
            self.token_ids, self.block_ids = list(data.token_ids), list(data.block_ids)
            return
        self.token_ids += data.new_token_ids
        for index, block_id in data.replaced_blocks:
            self.block_ids[index] = block_id
        self.block_ids += data.new_block_ids


def make_request() -> Request:
    request = Request("r", [1, 2, 3, 4, 5], SamplingParams(max_tokens=16))
    request.block_ids = [10, 11]
    return request


def test_full_once_then_only_what_changed():
    mirror, runner, request = RunnerMirror(), RunnerView(), make_request()
    first = mirror.request_data(request, copies=[])
    assert isinstance(first, NewRequestData)
    runner.apply(first)
    request.append_output_token(6)
    request.append_output_token(7)
    request.block_ids.append(12)
    diff = mirror.request_data(request, copies=[])
    assert isinstance(diff, CachedRequestData)
    assert diff.new_token_ids == [6, 7] and diff.new_block_ids == [12] and diff.replaced_blocks == []
    runner.apply(diff)
    assert runner.token_ids == request.all_token_ids and runner.block_ids == request.block_ids
    nothing = mirror.request_data(request, copies=[])  # nothing changed since: an empty diff
    assert nothing.new_token_ids == [] and nothing.new_block_ids == []


def test_copy_on_write_replaces_only_blocks_the_runner_holds():
    mirror, runner, request = RunnerMirror(), RunnerView(), make_request()
    runner.apply(mirror.request_data(request, copies=[]))
    request.block_ids[1] = 21  # the shared last block, copied (11 -> 21)
    request.block_ids.append(22)
    diff = mirror.request_data(request, copies=[(11, 21)])
    assert diff.replaced_blocks == [(1, 21)] and diff.new_block_ids == [22]
    runner.apply(diff)
    assert runner.block_ids == [10, 21, 22]


def test_forget_sends_the_request_in_full_again():
    mirror, request = RunnerMirror(), make_request()
    mirror.request_data(request, copies=[])
    request.append_output_token(6)
    mirror.forget("r")  # preempted: the runner dropped it
    again = mirror.request_data(request, copies=[])
    assert isinstance(again, NewRequestData) and again.token_ids == [1, 2, 3, 4, 5, 6]
    mirror.forget("never-sent")  # harmless
