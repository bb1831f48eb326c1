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

The LL all-reduce (engine/distributed/ll_allreduce.py, compiled by CuPy, whose launch call
has no launch attributes) goes through ``launch_dependent``: the driver's ``cuLaunchKernelEx``
with the programmatic-serialization attribute, through ctypes. It loads the norm weight, waits,
then reads its inputs. It lets its own dependents launch at its start, or after its wait with
``KVMESH_LL_TRIGGER=wait`` (engine/distributed/ll_allreduce.py).

``KVMESH_PDL``: ``1`` (default) all of the above; ``triton``: the Triton kernels but not the
LL all-reduce; ``gemv``: the one-row GEMVs only (stop 16's setting); ``0``: none. The middle
two are kept for A/B runs.
"""

from __future__ import annotations

import ctypes
import enum
import functools
import os
from typing import Sequence

import torch


class PDLMode(enum.Enum):
    OFF = "0"
    GEMV = "gemv"
    TRITON = "triton"
    ALL = "1"


def mode_from_env() -> PDLMode:
    value = os.environ.get("KVMESH_PDL", "1").strip().lower()
    if value in ("", "0", "off", "false"):
        return PDLMode.OFF
    if value == "gemv":
        return PDLMode.GEMV
    if value == "triton":
        return PDLMode.TRITON
    if value in ("1", "on", "true", "all"):
        return PDLMode.ALL
    raise ValueError(f"KVMESH_PDL={value!r}: expected 1 (all kernels), triton (not the LL "
                     f"all-reduce), gemv (one-row GEMVs only) or 0")


MODE = mode_from_env()


def gemv_pdl(device: torch.device) -> bool:
    """Launch the one-row GEMVs on ``device`` as dependents."""
    return MODE is not PDLMode.OFF and has_pdl(device)


def small_pdl(device: torch.device) -> bool:
    """Launch the small per-token kernels on ``device`` as dependents."""
    return MODE in (PDLMode.TRITON, PDLMode.ALL) and has_pdl(device)


def ll_pdl(device: torch.device) -> bool:
    """Launch the LL all-reduce on ``device`` as a dependent (``launch_dependent``)."""
    return MODE is PDLMode.ALL and has_pdl(device) and _driver() is not None


def has_pdl(device: torch.device) -> bool:
    return device.type == "cuda" and _capability_major(device.index or 0) >= 9


@functools.lru_cache(maxsize=None)
def _capability_major(device_index: int) -> int:
    return torch.cuda.get_device_capability(device_index)[0]


# ---- cuLaunchKernelEx through ctypes (CUDA 12 driver API; the layouts are cuda.h's) ----------

_PROGRAMMATIC_STREAM_SERIALIZATION = 6  # CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION


class _LaunchAttribute(ctypes.Structure):
    # CUlaunchAttribute: id, 4 bytes of padding, a 64-byte value union (here: an int)
    _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_char * 4), ("value", ctypes.c_char * 64)]


class _LaunchConfig(ctypes.Structure):
    _fields_ = [("gridDimX", ctypes.c_uint), ("gridDimY", ctypes.c_uint), ("gridDimZ", ctypes.c_uint),
                ("blockDimX", ctypes.c_uint), ("blockDimY", ctypes.c_uint), ("blockDimZ", ctypes.c_uint),
                ("sharedMemBytes", ctypes.c_uint), ("hStream", ctypes.c_void_p),
                ("attrs", ctypes.POINTER(_LaunchAttribute)), ("numAttrs", ctypes.c_uint)]


@functools.lru_cache(maxsize=None)
def _driver():
    """libcuda's cuLaunchKernelEx, or None where it cannot be loaded."""
    try:
        fn = ctypes.CDLL("libcuda.so.1").cuLaunchKernelEx
    except (OSError, AttributeError):
        return None
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.POINTER(_LaunchConfig), ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p),
                   ctypes.c_void_p]
    return fn


@functools.lru_cache(maxsize=1)
def _attribute() -> _LaunchAttribute:
    attr = _LaunchAttribute(id=_PROGRAMMATIC_STREAM_SERIALIZATION)
    ctypes.c_int.from_buffer(attr, _LaunchAttribute.value.offset).value = 1
    return attr


def launch_dependent(function: int, grid: int, block: int, stream: int,
                     args: Sequence[ctypes._SimpleCData]) -> None:
    """Launches the CUfunction ``function`` (grid, block) on ``stream`` as a programmatic
    dependent of the kernel before it; ``args`` are the kernel's parameters as ctypes values,
    in order and of the kernel's types. Graph-capturable, like any launch on the stream."""
    params = (ctypes.c_void_p * len(args))(*(ctypes.cast(ctypes.byref(a), ctypes.c_void_p) for a in args))
    attr = _attribute()
    config = _LaunchConfig(grid, 1, 1, block, 1, 1, 0, stream, ctypes.pointer(attr), 1)
    err = _driver()(ctypes.byref(config), function, params, None)
    if err != 0:
        raise RuntimeError(f"cuLaunchKernelEx failed: CUresult {err}")
