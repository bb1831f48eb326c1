"""NCCL collectives through CuPy (``cupy.cuda.nccl``), for CUDA workers.

Each group is one ``NcclCommunicator`` built from a unique id that one member
creates (``new_unique_id``) and the executor hands to all members through Ray.
Collectives are enqueued on torch's current CUDA stream, so they order with
the surrounding kernels without extra synchronisation; tensors are used in
place through their data pointers (no copies, no CuPy arrays).

A group on one node may also turn on the one-shot IPC all-reduce
(``custom_allreduce.py``, ``enable_custom_all_reduce``): ``all_reduce`` then takes it for
messages it qualifies for (a function of shape and dtype, so every rank picks the same
path) and NCCL for the rest.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch

from engine.distributed.communicator import Communicator, gather_parts


def _nccl():
    from cupy.cuda import nccl  # imported on GPU workers only
    return nccl


def new_unique_id() -> tuple:
    """A fresh NCCL unique id (a tuple of ints: picklable, so Ray can ship it)."""
    return _nccl().get_unique_id()


@functools.lru_cache(maxsize=None)  # once per dtype: eager prefill steps call it 65 times a step
def _nccl_dtype(dtype: torch.dtype) -> int:
    nccl = _nccl()
    table = {torch.float32: nccl.NCCL_FLOAT32, torch.float16: nccl.NCCL_FLOAT16,
             torch.bfloat16: getattr(nccl, "NCCL_BFLOAT16", 9),  # ncclBfloat16 = 9 in nccl.h
             torch.int64: nccl.NCCL_INT64, torch.int32: nccl.NCCL_INT32,
             torch.uint8: nccl.NCCL_UINT8}
    try:
        return table[dtype]
    except KeyError:
        raise ValueError(f"NCCL communicator does not handle dtype {dtype}") from None


class NcclCommunicator(Communicator):
    def __init__(self, unique_id: tuple, rank: int, world_size: int, device: torch.device) -> None:
        """Collective over all members: every rank must construct it concurrently."""
        import cupy
        self._device = torch.device(device)
        torch.cuda.set_device(self._device)
        with cupy.cuda.Device(self._device.index or 0):
            self.comm = _nccl().NcclCommunicator(world_size, unique_id, rank)
        self.rank = rank
        self.world_size = world_size
        self._custom = None  # CustomAllReduce, when enable_custom_all_reduce turned it on
        self.custom_disabled_reason: Optional[str] = "not enabled"
        self._ll = None  # LLAllReduce, when enable_ll_all_reduce turned it on
        self.ll_disabled_reason: Optional[str] = "not enabled"

    def enable_ll_all_reduce(self) -> bool:
        """Collective, like ``enable_custom_all_reduce``: whether the LL path is on (all ranks agree)."""
        from engine.distributed.ll_allreduce import LLAllReduce
        ll = LLAllReduce(self)
        self._ll = ll if ll.is_enabled else None
        self.ll_disabled_reason = ll.disabled_reason
        return self._ll is not None

    def enable_custom_all_reduce(self) -> bool:
        """Collective: every rank calls it at once; only for a group within one node. Returns
        whether the IPC all-reduce is on (all ranks agree; NCCL stays the fallback)."""
        from engine.distributed.custom_allreduce import CustomAllReduce
        custom = CustomAllReduce(self)
        self._custom = custom if custom.is_enabled else None
        self.custom_disabled_reason = custom.disabled_reason
        return self._custom is not None

    @property
    def device(self) -> torch.device:
        return self._device

    def _stream(self) -> int:
        return torch.cuda.current_stream(self._device).cuda_stream

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.contiguous()
        if self._ll is not None and self._ll.can_reduce(tensor):
            return self._ll.all_reduce(tensor)
        if self._custom is not None and self._custom.can_reduce(tensor):
            return self._custom.all_reduce(tensor)
        return self.nccl_all_reduce(tensor)

    def fused_all_reduce_rms_norm(self, x: torch.Tensor, residual: Optional[torch.Tensor],
                                  weight: torch.Tensor, eps: float
                                  ) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        if (self._ll is not None and self._ll.can_reduce(x) and weight.dtype == x.dtype
                and (residual is None or (residual.shape == x.shape and residual.dtype == x.dtype))):
            return self._ll.all_reduce_rms_norm(x, residual, weight, eps)
        return None

    def ll_stamps(self) -> Optional[list[tuple[int, int, int, int]]]:
        """The LL calls' stamps (``LLAllReduce.read_stamps``), or None (stamps off, no LL path)."""
        return self._ll.read_stamps() if self._ll is not None else None

    def linear_for_reduce(self, x: torch.Tensor, weight: torch.Tensor) -> Optional[torch.Tensor]:
        return self._ll.gemv_push(x, weight) if self._ll is not None else None

    def nccl_all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """``all_reduce`` through NCCL always (the custom path's set-up and reference)."""
        tensor = tensor.contiguous()
        self.comm.allReduce(tensor.data_ptr(), tensor.data_ptr(), tensor.numel(),
                            _nccl_dtype(tensor.dtype), _nccl().NCCL_SUM, self._stream())
        return tensor

    def all_gather(self, tensor: torch.Tensor, dim: int) -> torch.Tensor:
        tensor = tensor.contiguous()
        parts = torch.empty((self.world_size, *tensor.shape), dtype=tensor.dtype, device=tensor.device)
        self.comm.allGather(tensor.data_ptr(), parts.data_ptr(), tensor.numel(),
                            _nccl_dtype(tensor.dtype), self._stream())
        return gather_parts(parts, dim)

    def send(self, tensor: torch.Tensor, dst: int) -> None:
        tensor = tensor.contiguous()
        self.comm.send(tensor.data_ptr(), tensor.numel(), _nccl_dtype(tensor.dtype), dst, self._stream())

    def recv(self, shape: tuple[int, ...], dtype: torch.dtype, src: int) -> torch.Tensor:
        out = torch.empty(shape, dtype=dtype, device=self._device)
        self.comm.recv(out.data_ptr(), out.numel(), _nccl_dtype(dtype), src, self._stream())
        return out

    def destroy(self) -> None:
        for name in ("_custom", "_ll"):
            path = getattr(self, name, None)
            setattr(self, name, None)
            if path is not None:
                path.destroy()
        comm, self.comm = getattr(self, "comm", None), None
        if comm is not None:
            comm.destroy()
