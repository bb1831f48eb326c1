"""A replica's step timeline: engine steps and what else happened meanwhile, to explain ITL stalls.

A decoding stream sees one new token per engine step, so on the replica the gap
between two consecutive step ends is what the stream experiences as
inter-token latency. When that gap is long, something overlapped it. This
module records, in two bounded rings (no locks: ``deque.append`` is atomic):

    steps   Step(start_s, end_s, num_running, num_decode_reqs, num_prefill_tokens, num_outputs)
            appended by AsyncLLM's engine thread around each ``LLMEngine.step()``
    events  GCPause       gc.callbacks start/stop (gen 0 only when >= 1 ms: they are frequent)
            KVRecv        KVReceiver: header taken, staging tensor allocated, bytes received
            KVDeliver     engine thread: an arrival scattered into its reserved blocks
            LoopLag       a 5 ms sleeper on the replica's event loop that woke > 2 ms late
            StatsRefresh  engine thread: the periodic ``get_stats(with_block_hashes=True)``

``summarize`` (pure; plain dicts) ranks the longest step-end gaps and the
longest steps, and lists the events overlapping each, plus, over all gaps and
steps above a threshold, the fraction overlapping each event kind.

All times are ``time.monotonic()``: one clock for every process on a host, so a
benchmark driver on the same host can pass its own load window to ``summarize``.

Off unless ``KVMESH_STEP_TIMELINE=1`` (``StepTimeline.from_env`` returns None and
every hook is one ``is not None`` test). No torch here.
"""

from __future__ import annotations

import asyncio
import bisect
import dataclasses
import gc
import os
import threading
import time
from collections import deque
from dataclasses import dataclass
from enum import Enum
from typing import Any, ClassVar, Iterable, Optional, Sequence, Union

STEP_TIMELINE_ENV = "KVMESH_STEP_TIMELINE"
DEFAULT_MAX_STEPS = 20_000  # ~2 minutes of 6 ms decode steps
DEFAULT_MAX_EVENTS = 20_000


class EventKind(str, Enum):
    GC = "gc"
    KV_RECV = "kv_recv"
    KV_DELIVER = "kv_deliver"
    LOOP_LAG = "loop_lag"
    STATS_REFRESH = "stats_refresh"


# ---- the records ------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Step:
    """One ``LLMEngine.step()`` on the engine thread."""

    start_s: float
    end_s: float
    num_running: int  # requests running after the step: streams waiting for the next one
    num_decode_reqs: int  # requests scheduled with one token (decoding)
    num_prefill_tokens: int  # the other scheduled tokens (prompt chunks)
    num_outputs: int


@dataclass(frozen=True, slots=True)
class GCPause:
    """A garbage collection; it holds the GIL, so every thread of the process stops."""

    kind: ClassVar[EventKind] = EventKind.GC
    start_s: float
    end_s: float
    generation: int
    num_collected: int
    thread: str  # the thread whose allocation triggered it


@dataclass(frozen=True, slots=True)
class KVRecv:
    """One KV transfer received by the ``KVReceiver`` (decode side).

    [start_s, alloc_end_s]: the staging ``torch.empty`` on the event loop thread (a cudaMalloc
    when the caching allocator has no block that fits); [alloc_end_s, end_s]: the bytes
    arriving (``comm.recv`` in a worker thread)."""

    kind: ClassVar[EventKind] = EventKind.KV_RECV
    start_s: float  # the pair's task took the header
    end_s: float
    alloc_end_s: float
    request_id: str
    num_bytes: int
    error: Optional[str] = None


@dataclass(frozen=True, slots=True)
class KVDeliver:
    """The engine thread writing an arrival into its reserved blocks (``import_remote_kv``)."""

    kind: ClassVar[EventKind] = EventKind.KV_DELIVER
    start_s: float
    end_s: float
    request_id: str
    num_bytes: int


@dataclass(frozen=True, slots=True)
class LoopLag:
    """The event loop was busy (or starved of the GIL) from when a sleeper was due until it woke."""

    kind: ClassVar[EventKind] = EventKind.LOOP_LAG
    start_s: float  # when the sleeper was due
    end_s: float  # when it ran


@dataclass(frozen=True, slots=True)
class StatsRefresh:
    """The engine thread's periodic stats snapshot (with the cached block hashes)."""

    kind: ClassVar[EventKind] = EventKind.STATS_REFRESH
    start_s: float
    end_s: float


Event = Union[GCPause, KVRecv, KVDeliver, LoopLag, StatsRefresh]


@dataclass(frozen=True)
class TimelineSnapshot:
    """A copy of the rings, what ``summarize`` reads."""

    steps: tuple[Step, ...]
    events: tuple[Event, ...]


# ---- the recorder -----------------------------------------------------------------------------
class StepTimeline:
    """Bounded rings of steps and events; any thread may record.

    ``attach_gc()`` / ``close()`` add and remove this timeline's ``gc.callbacks`` entry;
    ``watch_loop_lag()`` is a task to run on the loop to watch.
    """

    def __init__(self, max_steps: int = DEFAULT_MAX_STEPS, max_events: int = DEFAULT_MAX_EVENTS,
                 min_gen0_gc_s: float = 0.001) -> None:
        self.steps: deque[Step] = deque(maxlen=max_steps)
        self.events: deque[Event] = deque(maxlen=max_events)
        self.min_gen0_gc_s = min_gen0_gc_s
        self._gc_started: Optional[float] = None  # collections never nest (the GIL is held)
        self._gc_attached = False

    @classmethod
    def from_env(cls) -> Optional["StepTimeline"]:
        """A timeline with GC tracking when ``KVMESH_STEP_TIMELINE`` is on, else None."""
        if os.environ.get(STEP_TIMELINE_ENV, "0").strip().lower() not in ("1", "true", "yes", "on"):
            return None
        timeline = cls()
        timeline.attach_gc()
        return timeline

    def record_step(self, start_s: float, end_s: float, num_running: int, num_decode_reqs: int,
                    num_prefill_tokens: int, num_outputs: int) -> None:
        self.steps.append(Step(start_s, end_s, num_running, num_decode_reqs, num_prefill_tokens, num_outputs))

    def record(self, event: Event) -> None:
        self.events.append(event)

    # ---- GC pauses ----------------------------------------------------------------------------
    def attach_gc(self) -> None:
        if not self._gc_attached:
            gc.callbacks.append(self._on_gc)
            self._gc_attached = True

    def close(self) -> None:
        if self._gc_attached:
            gc.callbacks.remove(self._on_gc)
            self._gc_attached = False

    def _on_gc(self, phase: str, info: dict) -> None:
        now = time.monotonic()
        if phase == "start":
            self._gc_started = now
            return
        started, self._gc_started = self._gc_started, None
        if started is None:  # attached mid-collection
            return
        generation = info.get("generation", -1)
        if generation == 0 and now - started < self.min_gen0_gc_s:
            return
        self.events.append(GCPause(started, now, generation, info.get("collected", 0),
                                   threading.current_thread().name))

    # ---- event-loop lag -----------------------------------------------------------------------
    async def watch_loop_lag(self, period_s: float = 0.005, min_lag_s: float = 0.002) -> None:
        """Sleeps ``period_s`` in a loop and records each wake-up later than ``min_lag_s``.

        Costs the loop ~200 short wake-ups a second; only runs while the timeline is on."""
        while True:
            due = time.monotonic() + period_s
            await asyncio.sleep(period_s)
            woke = time.monotonic()
            if woke - due > min_lag_s:
                self.events.append(LoopLag(due, woke))

    def snapshot(self) -> TimelineSnapshot:
        return TimelineSnapshot(_copy(self.steps), _copy(self.events))


def _copy(ring: deque) -> tuple:
    # Copying iterates the deque; a GC callback appending meanwhile (another thread, or the
    # collection the copy's own allocation triggered) makes the iteration raise. Try again.
    for _ in range(100):
        try:
            return tuple(ring)
        except RuntimeError:
            continue
    return ()


# ---- the summary ------------------------------------------------------------------------------
DEFAULT_STALL_MS = 20.0
# Attribution labels: the event kinds, plus the parts of a KV receive and the step's own prefill.
_GC_GEN2 = "gc_gen2"
_KV_ALLOC = "kv_alloc"
_PREFILL = "prefill_in_step"
_NONE = "none"
_LABELS = [k.value for k in EventKind] + [_GC_GEN2, _KV_ALLOC, _PREFILL, _NONE]


def summarize(timeline: Union[StepTimeline, TimelineSnapshot], top: int = 20,
              stall_ms: float = DEFAULT_STALL_MS, start_s: Optional[float] = None,
              end_s: Optional[float] = None) -> dict[str, Any]:
    """Where a replica's long inter-step gaps and long steps came from (JSON-able dicts).

    Gap i runs from step i-1's end to step i's end and counts only when step i-1 left
    requests running (a stream was waiting for step i; an idle engine is no stall). Its
    ``between_ms`` part is the engine thread outside ``step()`` (commands, KV scatter,
    stats, publishing outputs), ``step_ms`` the step itself. ``start_s`` / ``end_s``
    (monotonic) keep steps and events inside a window (e.g. a benchmark's load phase).
    Times in the result: ms, and ``t_s`` relative to the first kept step's start.
    """
    snap = timeline.snapshot() if isinstance(timeline, StepTimeline) else timeline
    lo = float("-inf") if start_s is None else start_s
    hi = float("inf") if end_s is None else end_s
    steps = [s for s in snap.steps if s.start_s >= lo and s.end_s <= hi]
    events = sorted((e for e in snap.events if e.end_s >= lo and e.start_s <= hi), key=lambda e: e.start_s)
    index = _EventIndex(events)
    t0 = steps[0].start_s if steps else (events[0].start_s if events else 0.0)

    gaps = [_Window(prev.end_s, cur.end_s, cur, cur.start_s - prev.end_s)
            for prev, cur in zip(steps, steps[1:]) if prev.num_running > 0]
    long_steps = [_Window(s.start_s, s.end_s, s, 0.0) for s in steps]
    lags = [e for e in events if isinstance(e, LoopLag)]
    stall_s = stall_ms / 1000

    return {
        "enabled": True,
        "t0_monotonic_s": t0,
        "span_s": round((steps[-1].end_s - t0) if steps else 0.0, 3),
        "num_steps": len(steps),
        "num_events": {k.value: sum(1 for e in events if e.kind is k) for k in EventKind},
        "step_ms": _quantiles([s.end_s - s.start_s for s in steps]),
        "gap_ms": _quantiles([g.duration_s for g in gaps]),
        "stall_ms": stall_ms,
        "stalls": {
            "gaps": _attribution([g for g in gaps if g.duration_s > stall_s], index),
            "steps": _attribution([w for w in long_steps if w.duration_s > stall_s], index),
            "loop_lags": {"count": sum(1 for e in lags if e.end_s - e.start_s > stall_s)},
        },
        "top_gaps": [_describe_window(g, index, t0) for g in _largest(gaps, top)],
        "top_steps": [_describe_window(w, index, t0) for w in _largest(long_steps, top)],
        "top_loop_lags": [{"t_s": round(e.start_s - t0, 4), "ms": _ms(e.end_s - e.start_s),
                           "overlaps": [_describe_event(o, e.start_s, e.end_s, t0)
                                        for o in index.overlapping(e.start_s, e.end_s) if o is not e]}
                          for e in sorted(lags, key=lambda e: e.start_s - e.end_s)[:top]],
        "gc": _gc_totals(events),
        "kv_recv": _kv_recv_totals(events),
        "kv_deliver": _totals([e for e in events if isinstance(e, KVDeliver)]),
        "stats_refresh": _totals([e for e in events if isinstance(e, StatsRefresh)]),
    }


@dataclass(frozen=True)
class _Window:
    start_s: float
    end_s: float
    step: Step  # the step that ends the window
    between_s: float  # for gaps: the engine thread outside step() before that step

    @property
    def duration_s(self) -> float:
        return self.end_s - self.start_s


class _EventIndex:
    """Events sorted by start, for "which events overlap [a, b]" without scanning them all."""

    def __init__(self, events: Sequence[Event]) -> None:
        self.events = events
        self.starts = [e.start_s for e in events]
        self.max_duration_s = max((e.end_s - e.start_s for e in events), default=0.0)

    def overlapping(self, start_s: float, end_s: float) -> list[Event]:
        # Candidates start before the window ends and no earlier than the longest event allows.
        first = bisect.bisect_left(self.starts, start_s - self.max_duration_s)
        last = bisect.bisect_left(self.starts, end_s)
        return [e for e in self.events[first:last] if e.end_s > start_s]


def _labels(window: _Window, overlaps: Iterable[Event]) -> set[str]:
    labels = set()
    for e in overlaps:
        labels.add(e.kind.value)
        if isinstance(e, GCPause) and e.generation == 2:
            labels.add(_GC_GEN2)
        if isinstance(e, KVRecv) and e.start_s < window.end_s and e.alloc_end_s > window.start_s:
            labels.add(_KV_ALLOC)
    if window.step.num_prefill_tokens > 0:
        labels.add(_PREFILL)
    return labels or {_NONE}


def _attribution(windows: list[_Window], index: _EventIndex) -> dict[str, Any]:
    """How many windows, and the fraction of them overlapping each kind of event."""
    counts = dict.fromkeys(_LABELS, 0)
    for w in windows:
        for label in _labels(w, index.overlapping(w.start_s, w.end_s)):
            counts[label] += 1
    n = len(windows)
    return {"count": n, "overlap_fraction": {k: round(v / n, 3) if n else 0.0 for k, v in counts.items()}}


def _largest(windows: list[_Window], top: int) -> list[_Window]:
    return sorted(windows, key=lambda w: w.start_s - w.end_s)[:top]


def _describe_window(w: _Window, index: _EventIndex, t0: float) -> dict[str, Any]:
    s = w.step
    overlaps = index.overlapping(w.start_s, w.end_s)
    return {"t_s": round(w.start_s - t0, 4), "ms": _ms(w.duration_s), "step_ms": _ms(s.end_s - s.start_s),
            "between_ms": _ms(w.between_s), "num_running": s.num_running, "num_decode_reqs": s.num_decode_reqs,
            "num_prefill_tokens": s.num_prefill_tokens, "num_outputs": s.num_outputs,
            "causes": sorted(_labels(w, overlaps)),
            "overlaps": [_describe_event(e, w.start_s, w.end_s, t0) for e in overlaps]}


def _describe_event(e: Event, start_s: float, end_s: float, t0: float) -> dict[str, Any]:
    out = {"kind": e.kind.value, "t_s": round(e.start_s - t0, 4), "ms": _ms(e.end_s - e.start_s),
           "overlap_ms": _ms(min(end_s, e.end_s) - max(start_s, e.start_s))}
    for field in dataclasses.fields(e):
        if field.name not in ("start_s", "end_s", "alloc_end_s"):
            out[field.name] = getattr(e, field.name)
    if isinstance(e, KVRecv):
        out["alloc_ms"] = _ms(e.alloc_end_s - e.start_s)
    return out


def _gc_totals(events: Sequence[Event]) -> dict[str, Any]:
    by_gen: dict[str, list[GCPause]] = {}
    for e in events:
        if isinstance(e, GCPause):
            by_gen.setdefault(f"gen{e.generation}", []).append(e)
    return {gen: _totals(pauses) for gen, pauses in sorted(by_gen.items())}


def _kv_recv_totals(events: Sequence[Event]) -> dict[str, Any]:
    recvs = [e for e in events if isinstance(e, KVRecv)]
    out = _totals(recvs)
    out.update(num_bytes=sum(e.num_bytes for e in recvs), num_errors=sum(1 for e in recvs if e.error),
               max_alloc_ms=_ms(max((e.alloc_end_s - e.start_s for e in recvs), default=0.0)))
    return out


def _totals(events: Sequence[Event]) -> dict[str, Any]:
    durations = [e.end_s - e.start_s for e in events]
    return {"count": len(durations), "total_ms": _ms(sum(durations)), "max_ms": _ms(max(durations, default=0.0))}


def _quantiles(values: list[float]) -> dict[str, Any]:
    """Nearest-rank quantiles in ms."""
    if not values:
        return {"count": 0}
    ordered = sorted(values)

    def q(p: float) -> float:
        return _ms(ordered[min(len(ordered) - 1, int(p * len(ordered)))])

    return {"count": len(ordered), "p50": q(0.5), "p90": q(0.9), "p99": q(0.99), "p99.9": q(0.999),
            "max": _ms(ordered[-1])}


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 3)
