"""The LL all-reduce with every rank in ONE process on ONE GPU: a loopback harness.

Most device time lent to this project comes on one-GPU machines, where NCCL cannot run two ranks
("Duplicate GPU detected") and so neither can the LL all-reduce's set-up. Here each rank is a
thread with its own CUDA stream; ``LoopbackComm`` stands in for the NCCL communicator in the
set-up's few collectives (an all-gather of the payloads, the agreement flags, the self-check's
references: summed on the host), and ``loopback_ll`` maps a peer's buffer by its pointer, as
CUDA IPC cannot open a handle in the process that made it. The kernels are the engine's own,
launched as in the engine (dependent launches on Hopper), and each rank's kernel spins on its
peers' lines as it would across NVLink; the peers' stores only land in the same HBM.

So this checks the LL kernels and the GEMV that pushes into them on one GPU, and times a call's
parts (``KVMESH_LL_STAMPS``) without NVLink: what a call costs besides the link. Needs
``CUDA_MODULE_LOADING=EAGER`` (set here at import, before CUDA starts): a kernel loaded lazily
may wait for every running kernel, and a rank's LL kernel waits for its peers'.

    python bench/ll_loopback.py [--ranks 2] [--calls 2000] [--out bench/results/ll_loopback_h200.json]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from typing import Any, Callable, Optional

# Every kernel loaded when CUDA starts, not at its first launch: loading a kernel lazily may wait
# for the context's running kernels, and a rank's LL kernel runs until its peers' kernels run
# (CUDA's lazy-loading notes: kernels that rely on running concurrently can deadlock). Read when
# CUDA initializes, so it must be set before anything touches CUDA (run_ranks checks).
os.environ.setdefault("CUDA_MODULE_LOADING", "EAGER")

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import torch  # noqa: E402

from engine.distributed.ll_allreduce import LLAllReduce  # noqa: E402

EPS = 1e-5


class LoopbackHub:
    """What the rank threads of one loopback group share: a barrier and a slot per rank."""

    def __init__(self, world_size: int) -> None:
        self.world_size = world_size
        self.barrier = threading.Barrier(world_size, timeout=120)
        self.slots: list[Any] = [None] * world_size
        self.bases: dict[int, int] = {}  # rank -> its LL buffer (loopback_ll's set-up)

    def gather(self, rank: int, value: Any) -> list:
        """Every rank's ``value``, in rank order (all ranks call it)."""
        self.slots[rank] = value
        self.barrier.wait()
        out = list(self.slots)
        self.barrier.wait()  # nobody overwrites a slot before all have read it
        return out


class LoopbackComm:
    """The part of ``NcclCommunicator`` the LL set-up uses, through a ``LoopbackHub``."""

    def __init__(self, hub: LoopbackHub, rank: int, device: torch.device) -> None:
        self.hub, self.rank, self.world_size, self.device = hub, rank, hub.world_size, device

    def nccl_all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        torch.cuda.current_stream(self.device).synchronize()
        parts = self.hub.gather(self.rank, tensor.detach().float().cpu())
        total = parts[0].clone()
        for part in parts[1:]:
            total += part
        tensor.copy_(total.to(tensor.dtype).to(self.device))
        return tensor

    def all_gather(self, tensor: torch.Tensor, dim: int) -> torch.Tensor:
        torch.cuda.current_stream(self.device).synchronize()
        parts = self.hub.gather(self.rank, tensor.detach().cpu())
        return torch.cat(parts, dim=dim).to(self.device)


def loopback_ll(hub: LoopbackHub, stamps: bool = False) -> type:
    """``LLAllReduce`` whose peers' buffers are mapped by pointer (one process); ``stamps``:
    compiled with ``-DLL_STAMPS=1`` whatever ``KVMESH_LL_STAMPS`` says."""
    options = tuple(o for o in LLAllReduce.KERNEL_OPTIONS if o != "-DLL_STAMPS=1")

    class LoopbackLL(LLAllReduce):
        KERNEL_OPTIONS = options + (("-DLL_STAMPS=1",) if stamps else ())

        def _map_peer(self, q: int, payload: bytes) -> int:
            hub.bases[self.rank] = self._base
            hub.barrier.wait()  # every rank has put its base in
            return hub.bases[q]

        def _unmap_peer(self, ptr: int) -> None:
            pass  # the owner frees it

    return LoopbackLL


def run_ranks(world_size: int, body: Callable[[int, LLAllReduce, LoopbackComm], Any],
              stamps: bool = False, device: Optional[torch.device] = None, timeout_s: float = 300.0) -> list:
    """Sets up a loopback LL group of ``world_size`` rank threads on one GPU and returns each
    rank's ``body(rank, ll, comm)``, in rank order. Each thread has its own stream. Raises the
    first rank's exception; a rank still running at the deadline fails it (a hang fails)."""
    if os.environ.get("CUDA_MODULE_LOADING") != "EAGER":
        raise RuntimeError("loopback ranks need CUDA_MODULE_LOADING=EAGER, set before CUDA starts "
                           "(lazily loaded kernels can wait for a peer's spinning LL kernel)")
    device = device or torch.device("cuda", torch.cuda.current_device())
    hub = LoopbackHub(world_size)
    cls = loopback_ll(hub, stamps)
    results: list[Any] = [None] * world_size
    errors: list[Optional[BaseException]] = [None] * world_size

    def rank_main(rank: int) -> None:
        torch.cuda.set_device(device)
        ll = None
        with torch.cuda.stream(torch.cuda.Stream(device)):
            try:
                comm = LoopbackComm(hub, rank, device)
                ll = cls(comm)
                if not ll.is_enabled:
                    raise RuntimeError(f"the LL path is off: {ll.disabled_reason}")
                results[rank] = body(rank, ll, comm)
                torch.cuda.current_stream(device).synchronize()
                hub.barrier.wait()  # no rank frees its buffer while a peer may still write to it
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors[rank] = exc
                hub.barrier.abort()  # a peer blocked in the hub fails too, not hangs
            finally:
                if ll is not None:
                    ll.destroy()

    threads = [threading.Thread(target=rank_main, args=(r,), daemon=True) for r in range(world_size)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout_s
    for t in threads:
        t.join(timeout=max(0.0, deadline - time.monotonic()))
    if any(t.is_alive() for t in threads):
        raise TimeoutError(f"loopback ranks still running after {timeout_s:.0f}s (a hang?)")
    for rank, exc in enumerate(errors):
        if exc is not None and not isinstance(exc, threading.BrokenBarrierError):
            raise RuntimeError(f"rank {rank} failed: {exc!r}") from exc
    for rank, exc in enumerate(errors):
        if exc is not None:
            raise RuntimeError(f"rank {rank} failed: {exc!r}") from exc
    return results


def _rows(rank: int, rows: int, hidden: int, dtype: torch.dtype, seed: int, device) -> tuple:
    gen = torch.Generator(device=device).manual_seed(seed * 131 + rank)
    x = torch.randn(rows, hidden, generator=gen, device=device).to(dtype)
    residual = torch.randn(rows, hidden, generator=gen, device=device).to(dtype)
    weight = (torch.rand(hidden, generator=gen, device=device) + 0.5).to(dtype)
    return x, residual, weight


def time_calls(rank: int, ll: LLAllReduce, comm: LoopbackComm, calls: int, hidden: int) -> dict:
    """``calls`` fused LL calls of one row back to back (eager), then the stamps' summary."""
    from engine.profiling import ll_stamp_summary
    x, residual, weight = _rows(rank, 1, hidden, torch.bfloat16, 7, comm.device)
    comm.hub.barrier.wait()
    start = time.perf_counter()
    for _ in range(calls):
        ll.all_reduce_rms_norm(x, residual, weight, EPS)
    torch.cuda.current_stream(comm.device).synchronize()
    seconds = time.perf_counter() - start
    comm.hub.barrier.wait()
    stamps = ll.read_stamps() or []
    return {"rank": rank, "calls": calls, "wall_us_per_call": seconds / calls * 1e6,
            "stamps": ll_stamp_summary(stamps[-min(len(stamps), calls):])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    reports = run_ranks(args.ranks, lambda r, ll, comm: time_calls(r, ll, comm, args.calls, args.hidden),
                        stamps=True)
    result = {"benchmark": "ll_loopback", "gpu": torch.cuda.get_device_name(0), "torch": torch.__version__,
              "ranks": args.ranks, "hidden": args.hidden, "time": time.time(), "reports": reports}
    for r in reports:
        print(json.dumps(r))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
