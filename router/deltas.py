"""Incremental outputs: what a replica streams to the ingress for one request.

The engine's ``RequestOutput`` is cumulative (all tokens and text so far, the prompt's
token ids, metrics). Sending one per token across Ray costs O(tokens so far) to
pickle and ship each time. ``LLMServer.generate_deltas`` instead sends ``OutputDelta``s:
only the tokens, text and logprobs that are new since the previous item, per choice.
When the engine produced several steps while the replica was busy, ``AsyncLLM``
hands over only the latest cumulative output and one delta covers all of them, so a
backlog becomes fewer, larger items rather than more of them.

    engine ──RequestOutput (cumulative)──▶ DeltaTracker (replica) ──OutputDelta──▶ ingress
    prefill reply + decode pool deltas ──DeltaTrimmer (ingress, disaggregated mode)──▶ OutputDelta

Invariant: concatenating the deltas of a choice, in order, gives exactly the final
cumulative output (text, token ids, logprobs); ``finish_reason`` is set on the
choice's last delta only. A choice appears in a delta only when something of it changed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional


@dataclass
class ChoiceDelta:
    index: int  # which of the n samples
    text: str  # new text since the previous delta of this choice
    token_ids: list[int]  # new token ids
    logprobs: Optional[list[dict]] = None  # new entries (engine.outputs.Logprob dicts); None: not asked
    finish_reason: Optional[str] = None  # set once, on the choice's last delta
    stop_reason: Optional[int | str] = None


@dataclass
class OutputDelta:
    replica_id: str  # Serve replica unique id of the replica that ran the request
    choices: list[ChoiceDelta]  # the choices that changed, by index
    finished: bool  # every choice has finished
    error: Optional[str] = None  # set when a choice ends with finish_reason "error"
    trace: Optional[dict[str, float]] = None  # x-kvmesh-trace: replica/engine time.monotonic() stamps
    kv_transfer: Optional[tuple[int, float]] = None  # decode pool, once: the prompt KV's (bytes, seconds)


@dataclass
class _Seen:
    text: str = ""
    num_tokens: int = 0
    num_logprobs: int = 0
    is_finished: bool = False


@dataclass
class DeltaTracker:
    """Turns one request's cumulative ``RequestOutput``s into ``OutputDelta``s."""

    replica_id: str
    _seen: dict[int, _Seen] = field(default_factory=dict)

    def update(self, out: Any) -> Optional[OutputDelta]:
        """The delta from the previous output to ``out``; None when nothing changed."""
        choices = []
        for c in out.outputs:
            seen = self._seen.setdefault(c.index, _Seen())
            if seen.is_finished:
                continue
            text = _new_text(seen.text, c.text)
            new_ids = list(c.token_ids[seen.num_tokens:])
            new_logprobs = None
            if c.logprobs is not None:
                new_logprobs = list(c.logprobs[seen.num_logprobs:])
                seen.num_logprobs = len(c.logprobs)
            seen.text, seen.num_tokens = c.text, len(c.token_ids)
            seen.is_finished = c.finish_reason is not None
            if text or new_ids or new_logprobs or c.finish_reason is not None:
                choices.append(ChoiceDelta(c.index, text, new_ids, new_logprobs, c.finish_reason,
                                           c.stop_reason))
        if not choices and not out.finished:
            return None
        return OutputDelta(self.replica_id, choices, bool(out.finished), getattr(out, "error", None))


def _new_text(old: str, new: str) -> str:
    """``new`` past ``old``. The engine's text only grows; should a detokenizer ever revise
    its tail, what follows the common prefix is sent (as the ingress always did)."""
    if new.startswith(old):
        return new[len(old):]
    common = 0
    limit = min(len(old), len(new))
    while common < limit and old[common] == new[common]:
        common += 1
    return new[common:]


@dataclass
class DeltaTrimmer:
    """Merges several sources of one request's deltas into one stream without repeats.

    In disaggregated serving the client gets the first token from the prefill reply, and
    the decode replica's deltas start from token 0 again; after a decode replica is lost,
    a retry's deltas start from 0 once more. Each source is deterministic (same tokens and
    text), so what a source sends that the client already has is a prefix of it: per
    choice, the first tokens / characters / logprobs up to what was sent are cut.
    """

    _sent: dict[int, list[int]] = field(default_factory=dict)  # choice -> [tokens, chars, logprobs]

    def new_source(self) -> "_Source":
        return _Source(self)

    def _trim(self, source: "_Source", delta: OutputDelta) -> Optional[OutputDelta]:
        choices = []
        for c in delta.choices:
            got = source.got.setdefault(c.index, [0, 0, 0])
            sent = self._sent.setdefault(c.index, [0, 0, 0])
            skip = [max(0, s - g) for s, g in zip(sent, got)]
            got[0] += len(c.token_ids)
            got[1] += len(c.text)
            got[2] += len(c.logprobs) if c.logprobs is not None else 0
            for i in range(3):
                sent[i] = max(sent[i], got[i])
            trimmed = ChoiceDelta(c.index, c.text[skip[1]:], c.token_ids[skip[0]:],
                                  c.logprobs[skip[2]:] if c.logprobs is not None else None,
                                  c.finish_reason, c.stop_reason)
            if trimmed.token_ids or trimmed.text or trimmed.logprobs or trimmed.finish_reason is not None:
                choices.append(trimmed)
        if not choices and not delta.finished:
            return None
        return OutputDelta(delta.replica_id, choices, delta.finished, delta.error, delta.trace, delta.kv_transfer)


@dataclass
class _Source:
    trimmer: DeltaTrimmer
    got: dict[int, list[int]] = field(default_factory=dict)

    def trim(self, delta: OutputDelta) -> Optional[OutputDelta]:
        """``delta`` less what the client already has (None: nothing new)."""
        return self.trimmer._trim(self, delta)

