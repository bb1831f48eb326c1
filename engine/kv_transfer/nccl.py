"""NCCL pair communicators through CuPy (GPU to GPU: NVLink within a node, IB/RoCE across).

The sender makes an NCCL unique id; both ranks build a 2-rank communicator
from it once per pair. Each send/recv runs on the pair's own CUDA stream and
moves raw bytes (``ncclUint8``), so any KV dtype works. Completion is polled
with a CUDA event so a peer that died cannot hang us: after ``timeout_s`` the
communicator is aborted and the pair dropped.

Not supported: communicator init cannot be interrupted (a peer that never joins
leaves a parked daemon thread behind, see ``call_with_timeout``).
"""

from __future__ import annotations

import time
from typing import Any

import torch

from engine.kv_transfer.base import (CommunicatorBackend, KVTransferError, KVTransportKind,
                                     PairCommunicator, call_with_timeout)

_NCCL_UINT8 = 1  # ncclUint8 in NCCL's datatype enum


def _nccl():
    try:
        from cupy.cuda import nccl
    except ImportError as exc:
        raise KVTransferError("the nccl KV transport needs CuPy with NCCL "
                              "(pip install cupy-cuda12x)") from exc
    return nccl


class NcclPair(PairCommunicator):
    def __init__(self, comm: Any, rank: int, device: torch.device) -> None:
        self._comm = comm
        self._peer = 1 - rank
        self._device = device
        self._stream = torch.cuda.Stream(device)

    # Neither call waits for the compute stream: that stream runs the replica's next steps, and
    # a pair stream ordered after it made every hand-off wait for the step in flight (decode,
    # ~5 ms) or, on the prefill side, for the steps queued after the export (tens of ms).
    def send(self, tensor: torch.Tensor, timeout_s: float) -> None:
        """``tensor``'s writes must be complete (``export_kv`` synchronizes after its gather)."""
        self._run("send", tensor, timeout_s)

    def recv(self, tensor: torch.Tensor, timeout_s: float) -> None:
        """Into a tensor from ``empty``: allocated on this pair's stream, so memory the caching
        allocator hands out again is ordered after its last use there."""
        self._run("recv", tensor, timeout_s)

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        # Whoever reads it on another stream records that stream on it (scatter_blocks does).
        with torch.cuda.device(self._device), torch.cuda.stream(self._stream):
            return torch.empty(shape, dtype=dtype, device=self._device)

    def _run(self, op: str, tensor: torch.Tensor, timeout_s: float) -> None:
        if self._comm is None:
            raise KVTransferError("the NCCL pair was closed")
        assert tensor.is_contiguous() and tensor.device == self._device
        nbytes = tensor.numel() * tensor.element_size()
        with torch.cuda.device(self._device):
            getattr(self._comm, op)(tensor.data_ptr(), nbytes, _NCCL_UINT8, self._peer,
                                    self._stream.cuda_stream)
            done = torch.cuda.Event()
            done.record(self._stream)
        # Poll every 50 us for the first 2 ms, then back off to 2 ms. Most transfers (a short
        # prompt's KV) end within the first window, and the poll's delay is part of the stream's
        # wait for its second token (2 H200s: the prefill-to-decode hand-off was ~25 ms at p50).
        # Long transfers (up to ~1 GB) back off: each poll takes the GIL, which the replica's
        # engine thread needs between steps.
        now = time.monotonic()
        deadline, fine_until, pause = now + timeout_s, now + 0.002, 0.00005
        while not done.query():
            now = time.monotonic()
            if now > deadline:
                self.close()
                raise KVTransferError(f"NCCL {op} of {nbytes} bytes timed out after {timeout_s:.1f}s")
            time.sleep(pause)
            if now > fine_until:
                pause = min(pause * 2, 0.002)

    def close(self) -> None:
        comm, self._comm = self._comm, None
        if comm is not None:
            try:
                comm.abort()
            except Exception:
                pass


class NcclBackend(CommunicatorBackend):
    kind = KVTransportKind.NCCL

    def __init__(self, device: torch.device) -> None:
        if device.type != "cuda":
            raise ValueError(f"the nccl KV transport needs CUDA KV caches, got device {device}")
        self._device = torch.device("cuda", device.index if device.index is not None
                                    else torch.cuda.current_device())

    @property
    def device(self) -> torch.device:
        return self._device

    def new_rendezvous(self) -> Any:
        return _nccl().get_unique_id()

    def connect(self, info: Any, rank: int, timeout_s: float) -> NcclPair:
        nccl = _nccl()

        def join() -> NcclPair:
            import cupy
            with cupy.cuda.Device(self._device.index):
                comm = nccl.NcclCommunicator(2, info, rank)
            return NcclPair(comm, rank, self._device)

        return call_with_timeout(join, timeout_s, f"NCCL pair init (rank {rank})")
