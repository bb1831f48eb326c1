"""Keeping a server's start-up heap out of Python's garbage collector (no torch import: the
ingress uses it too)."""

from __future__ import annotations

import gc
import os

GC_FREEZE_ENV = "KVMESH_GC_FREEZE"


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
