"""Keeping a server's start-up heap out of Python's garbage collector (no torch import: the
ingress uses it too)."""

from __future__ import annotations

import gc
import os

GC_FREEZE_ENV = "KVMESH_GC_FREEZE"
GC_THRESHOLDS_ENV = "KVMESH_GC_THRESHOLDS"
# Young collections every 20,000 net allocations instead of 700, the middle generation every 20
# of them, a full one every 50 of those. On 2 H200s (bench/disagg_serve.py's timelines) a decode
# replica paused ~85 times in 30 s (gen 0: 1.5 ms mean, gen 1: 4 ms) while holding the GIL, each
# one a late step for every stream: ~1.5% of steps, right where ITL p99 is read. Fewer, larger
# pauses move that cost past p99.9.
DEFAULT_GC_THRESHOLDS = (20_000, 20, 50)


def freeze_startup_heap() -> None:
    """Moves every object alive now (the model, its modules, CUDA graphs' Python side, Ray and
    Serve state: hundreds of thousands of long-lived objects) out of the garbage collector's
    reach. A full collection walks all tracked objects while holding the GIL; with the startup
    heap in it, one pause can stall the engine thread and every stream for tens to hundreds of
    milliseconds, an ITL spike at p99.9. What is allocated while serving is collected as
    before. Servers call it again once their own start-up is done (the replica's KV connector,
    the ingress's tokenizer): a 2-H200 run still had 75-245 ms gen-2 pauses in the decode and
    prefill replicas and the ingress without that. ``KVMESH_GC_FREEZE=0`` turns it off."""
    if os.environ.get(GC_FREEZE_ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return
    gc.collect()
    gc.freeze()
    thresholds = gc_thresholds()
    if thresholds is not None:
        gc.set_threshold(*thresholds)


def gc_thresholds() -> "tuple[int, int, int] | None":
    """The collector thresholds servers use: ``KVMESH_GC_THRESHOLDS`` ("g0,g1,g2"; "0": Python's
    own), else ``DEFAULT_GC_THRESHOLDS``."""
    raw = os.environ.get(GC_THRESHOLDS_ENV, "").strip()
    if not raw:
        return DEFAULT_GC_THRESHOLDS
    if raw == "0":
        return None
    try:
        values = tuple(int(v) for v in raw.split(","))
    except ValueError:
        values = ()
    if len(values) != 3 or min(values) < 1:
        raise ValueError(f"{GC_THRESHOLDS_ENV} must be three positive integers 'g0,g1,g2' or 0, got {raw!r}")
    return values  # type: ignore[return-value]
