"""Programmatic dependent launch (PDL; Hopper and later): which kernels launch as dependents.

A kernel launched with the PDL attribute may be scheduled while the kernel before it on the
stream is still running, once every program of that kernel has run
``griddepcontrol.launch_dependents`` (``tl.extra.cuda.gdc_launch_dependents``) or exited.
Before it reads anything the earlier kernel wrote, or writes anything that kernel may still
read, it runs ``griddepcontrol.wait`` (``gdc_wait``): that returns once the earlier kernel has
finished and its writes are visible. So each launch gap (about 0.5-1 µs between two kernels of
a CUDA graph) overlaps the kernel before, and the one-row GEMVs load their first weight tile
before they wait (engine/kernels/gemv.py).

The small per-token kernels (norm, rotary + KV store, decode attention and its reduce,
SiLU-and-mul) wait first and then let their own dependents go: nothing is read early, only the
launch is hidden. Without the PDL attribute both instructions are no-ops, and a kernel after
one that never runs ``launch_dependents`` starts when that kernel ends, as before.

``KVMESH_PDL``: ``1`` (default) every kernel above; ``gemv``: the one-row GEMVs only (stop
16's setting, kept for A/B runs); ``0``: none.
"""

from __future__ import annotations

import enum
import functools
import os

import torch


class PDLMode(enum.Enum):
    OFF = "0"
    GEMV = "gemv"
    ALL = "1"


def mode_from_env() -> PDLMode:
    value = os.environ.get("KVMESH_PDL", "1").strip().lower()
    if value in ("", "0", "off", "false"):
        return PDLMode.OFF
    if value == "gemv":
        return PDLMode.GEMV
    if value in ("1", "on", "true", "all"):
        return PDLMode.ALL
    raise ValueError(f"KVMESH_PDL={value!r}: expected 1 (all kernels), gemv (one-row GEMVs only) or 0")


MODE = mode_from_env()


def gemv_pdl(device: torch.device) -> bool:
    """Launch the one-row GEMVs on ``device`` as dependents."""
    return MODE is not PDLMode.OFF and has_pdl(device)


def small_pdl(device: torch.device) -> bool:
    """Launch the small per-token kernels on ``device`` as dependents."""
    return MODE is PDLMode.ALL and has_pdl(device)


def has_pdl(device: torch.device) -> bool:
    return device.type == "cuda" and _capability_major(device.index or 0) >= 9


@functools.lru_cache(maxsize=None)
def _capability_major(device_index: int) -> int:
    return torch.cuda.get_device_capability(device_index)[0]
