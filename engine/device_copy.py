"""Host -> device copies that do not wait for the device.

``torch.tensor(values, device="cuda")`` copies from pageable memory and then
synchronizes the stream, so it waits for every kernel already queued. With
async scheduling the previous step is still running while the next one's inputs
are built, and such a copy would stall the host for that whole step. Staging
through pinned memory with ``non_blocking=True`` only queues the copy (torch's
pinned allocator keeps the staging buffer alive until the copy has run).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch


def to_device(values: "Sequence[int] | Sequence[float] | np.ndarray", dtype: torch.dtype,
              device: torch.device) -> torch.Tensor:
    """A tensor of ``values`` on ``device``; on CUDA the copy is queued, never waited for."""
    host = torch.as_tensor(values, dtype=dtype)
    if device.type != "cuda":
        return host if device.type == "cpu" else host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


ALIGN_BYTES = 16


def packed_to_device(parts: Sequence["Sequence[int] | np.ndarray"], dtype: torch.dtype,
                     device: torch.device) -> list[torch.Tensor]:
    """Several int arrays in one staging buffer and one copy; returns a device view per part.

    Each view starts on a 16-byte boundary. Triton specializes a kernel on whether each
    pointer argument is 16-byte aligned, so views at offsets that depend on the batch (the
    sequence lengths after R + 1 query starts) would make new variants of the attention
    kernels appear mid-serving, each a JIT compile of about a second in the engine thread.
    """
    np_dtype = np.int64 if dtype == torch.long else np.int32
    per_align = ALIGN_BYTES // np.dtype(np_dtype).itemsize
    arrays = [np.asarray(p, dtype=np_dtype).ravel() for p in parts]
    starts, padded = [], []
    size = 0
    for a in arrays:
        starts.append(size)
        pad = -a.size % per_align
        padded.append(np.pad(a, (0, pad)) if pad else a)
        size += a.size + pad
    flat = to_device(np.concatenate(padded) if padded else np.zeros(0, dtype=np_dtype), dtype, device)
    return [flat[start:start + a.size] for start, a in zip(starts, arrays)]
