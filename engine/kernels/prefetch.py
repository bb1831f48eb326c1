"""Weight prefetch into L2 during latency-bound kernels of a decode step.

Why: at batch 1 a decode step is a chain of GEMVs that stream weights from HBM, with short
kernels between them that move a few KiB and mostly wait: the RMSNorm, and under tensor
parallelism the all-reduce fused with it (engine/distributed/ll_allreduce.py), which waits on
NVLink for the peers' rows. While such a kernel runs, HBM is idle. Each of them knows which
weight is read next (the norm's output is the next linear layer's only input), so it starts
pulling that weight's first bytes into L2: a few extra CTAs issue ``prefetch.global.L2`` over
it and exit. The GEMV that follows then finds its first waves' rows in L2 (or on the way).

Both kernels take the same hint, ``(address, lines)``, from ``plan``; 0 lines means none.
Only decode-sized calls (at most ``MAX_ROWS`` rows) prefetch: a prefill's GEMMs re-read
every weight many times and would gain nothing.

``KVMESH_WEIGHT_PREFETCH_MB`` caps the bytes per hint (default 16; 0 turns prefetching off).
H100 and H200 have 50 MB of L2; an all-reduce's ~5-7 µs of waiting covers ~20-30 MB of HBM
reads, so more would arrive after the GEMV has started reading anyway.
"""

from __future__ import annotations

import os
from typing import Optional

import torch

PREFETCH_ENV = "KVMESH_WEIGHT_PREFETCH_MB"
DEFAULT_MB = 16.0
LINE_BYTES = 128  # what one prefetch.global.L2 asks for
PREFETCH_CTAS = 32  # extra CTAs (programs) that issue the prefetches, on other SMs
MAX_ROWS = 64


def max_bytes() -> int:
    """The cap per hint from the environment (read per call: tests and benchmarks set it)."""
    raw = os.environ.get(PREFETCH_ENV, "")
    try:
        mb = float(raw) if raw.strip() else DEFAULT_MB
    except ValueError:
        raise ValueError(f"{PREFETCH_ENV} must be a number of MB, got {raw!r}") from None
    return max(0, int(mb * (1 << 20)))


def plan(weight: Optional[torch.Tensor], rows: int) -> tuple[int, int]:
    """(address, 128-byte lines) to prefetch before a call of ``rows`` rows; (0, 0) for none.

    The first bytes of the weight in memory order: the rows the next GEMV's first CTAs read."""
    if weight is None or not weight.is_cuda or not 0 < rows <= MAX_ROWS:
        return 0, 0
    nbytes = min(weight.numel() * weight.element_size(), max_bytes())
    return (weight.data_ptr(), nbytes // LINE_BYTES) if nbytes >= LINE_BYTES else (0, 0)
