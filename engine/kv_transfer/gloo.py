"""Gloo pair communicators (torch.distributed's CPU collectives library, over TCP).

The sender's rendezvous is a ``TCPStore`` it serves on a free port; the receiver
connects to it. Used for CPU replicas and CI; the bytes go over loopback or the
node network.
"""

from __future__ import annotations

import datetime
import uuid
from typing import Any

import torch
import torch.distributed as dist

from engine.kv_transfer.base import (CommunicatorBackend, KVTransferError, KVTransportKind,
                                     PairCommunicator, call_with_timeout)

_TAG = 7


class GlooPair(PairCommunicator):
    def __init__(self, group: Any, store: Any, rank: int) -> None:
        self._group = group
        self._store = store  # kept alive: rank 0 serves it
        self._peer = 1 - rank

    def send(self, tensor: torch.Tensor, timeout_s: float) -> None:
        self._wait(self._group.send([_bytes(tensor)], self._peer, _TAG), timeout_s, "send")

    def recv(self, tensor: torch.Tensor, timeout_s: float) -> None:
        self._wait(self._group.recv([_bytes(tensor)], self._peer, _TAG), timeout_s, "recv")

    @staticmethod
    def _wait(work: Any, timeout_s: float, what: str) -> None:
        try:
            work.wait(datetime.timedelta(seconds=timeout_s))
        except RuntimeError as exc:
            raise KVTransferError(f"gloo {what} failed: {str(exc).splitlines()[0][:300]}") from None

    def close(self) -> None:
        group, self._group = self._group, None
        abort = getattr(group, "abort", None)
        if abort is not None:
            try:
                abort()
            except Exception:  # already broken
                pass


def _bytes(tensor: torch.Tensor) -> torch.Tensor:
    """A flat uint8 view (gloo moves bytes; any dtype, including bfloat16)."""
    return tensor.contiguous().view(-1).view(torch.uint8)


class GlooBackend(CommunicatorBackend):
    kind = KVTransportKind.GLOO

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.host = host
        self._pending: dict[str, Any] = {}  # rendezvous prefix -> the TCPStore rank 0 serves

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def new_rendezvous(self) -> tuple[str, int, str]:
        store = dist.TCPStore(self.host, 0, world_size=2, is_master=True, wait_for_workers=False)
        prefix = uuid.uuid4().hex
        self._pending[prefix] = store  # connect(rank=0) picks it up
        return self.host, store.port, prefix

    def connect(self, info: tuple[str, int, str], rank: int, timeout_s: float) -> GlooPair:
        host, port, prefix = info

        def join() -> GlooPair:
            if rank == 0:
                store = self._pending.pop(prefix)
            else:
                store = dist.TCPStore(host, port, world_size=2, is_master=False,
                                      timeout=datetime.timedelta(seconds=timeout_s))
            group = dist.ProcessGroupGloo(dist.PrefixStore(prefix, store), rank, 2,
                                          datetime.timedelta(seconds=timeout_s))
            return GlooPair(group, store, rank)

        return call_with_timeout(join, timeout_s, f"gloo pair connect (rank {rank})")
