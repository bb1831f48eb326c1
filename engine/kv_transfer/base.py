"""The KV transport interface: a backend makes pair communicators; a pair sends and receives tensors.

A *pair* is one prefill rank and the matching decode rank (same tensor-parallel
rank). Its communicator is created once, the first time the prefill rank sends
to that decode rank, and reused for every later transfer between them:

    prefill rank r                         decode rank r (its mailbox)
    info = backend.new_rendezvous() ──PairRendezvous(pair_id, info)──▶ queue of pair_id
    backend.connect(info, rank=0)     ◀── both block until joined ──▶ backend.connect(info, rank=1)
    per transfer: post KVTransferHeader, then pair.send(kv)  ══▶  pair.recv(kv) in header order

Point-to-point messages on one pair are ordered, so the receiver handles one
pair's headers strictly in arrival order (``KVReceiver``); different pairs are
independent. A pair whose send or recv failed or timed out is dropped on both
sides (its next use creates a new one) because the stream of bytes on it can
no longer be trusted.

Backends (``KVTransportKind``): ``gloo`` (torch.distributed's CPU library, for CI
and CPU replicas) and ``nccl`` (CuPy's NCCL bindings, GPU to GPU over NVLink /
InfiniBand). Both move raw bytes; the header carries shape and dtype.
"""

from __future__ import annotations

import enum
import threading
from abc import ABC, abstractmethod
from typing import Any, Callable, TypeVar

T = TypeVar("T")


class KVTransportKind(str, enum.Enum):
    GLOO = "gloo"  # torch.distributed gloo pairs over TCP (CPU tensors)
    NCCL = "nccl"  # CuPy NCCL pairs (CUDA tensors)


class KVTransferError(RuntimeError):
    """A transfer (or the pair it used) failed: peer gone, timeout, bad header."""


class PairCommunicator(ABC):
    """Two ranks (0 = sender, 1 = receiver) that move whole tensors, in order."""

    @abstractmethod
    def send(self, tensor: Any, timeout_s: float) -> None:
        """Blocks until ``tensor`` is sent; raises ``KVTransferError`` on failure or timeout."""

    @abstractmethod
    def recv(self, tensor: Any, timeout_s: float) -> None:
        """Blocks until ``tensor`` (from ``empty``) is filled; raises ``KVTransferError`` on failure or timeout."""

    def empty(self, shape: tuple[int, ...], dtype: Any, device: Any) -> Any:
        """A new tensor to ``recv`` into, its memory ordered with this pair's transfers."""
        import torch
        return torch.empty(shape, dtype=dtype, device=device)

    def close(self) -> None:
        """Releases the pair (a failed pair is closed so its peer's pending call fails too)."""


class CommunicatorBackend(ABC):
    """Creates pair communicators of one kind on one device."""

    kind: KVTransportKind

    @abstractmethod
    def new_rendezvous(self) -> Any:
        """Picklable info the sender makes and the receiver needs to join (host/port, NCCL id)."""

    @abstractmethod
    def connect(self, info: Any, rank: int, timeout_s: float) -> PairCommunicator:
        """Joins the pair as ``rank`` (0 sender, 1 receiver); blocks until both joined."""

    @property
    @abstractmethod
    def device(self) -> Any:
        """The torch device the received tensors are allocated on."""


def create_backend(kind: KVTransportKind | str, device: Any, host: str = "127.0.0.1") -> CommunicatorBackend:
    """The backend for ``kind`` on ``device`` (gloo listens on ``host``)."""
    kind = KVTransportKind(kind)
    if kind is KVTransportKind.GLOO:
        from engine.kv_transfer.gloo import GlooBackend
        return GlooBackend(host=host)
    from engine.kv_transfer.nccl import NcclBackend
    return NcclBackend(device)


def call_with_timeout(fn: Callable[[], T], timeout_s: float, what: str) -> T:
    """Runs a blocking call on a daemon thread; raises ``KVTransferError`` after ``timeout_s``.

    For library calls that cannot be interrupted (NCCL communicator init, a
    TCPStore wait): on timeout the thread is abandoned, not killed.
    """
    result: dict[str, Any] = {}

    def run() -> None:
        try:
            result["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller
            result["error"] = exc

    thread = threading.Thread(target=run, name=f"kvmesh-{what}", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise KVTransferError(f"{what} did not finish within {timeout_s:.1f}s")
    if "error" in result:
        err = result["error"]
        if isinstance(err, KVTransferError):
            raise err
        raise KVTransferError(f"{what} failed: {err}") from err
    return result["value"]
