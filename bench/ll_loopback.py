"""The LL all-reduce with every rank in ONE process on ONE GPU: a loopback harness.

Most device time lent to this project comes on one-GPU machines, where NCCL cannot run two ranks
("Duplicate GPU detected") and so neither can the LL all-reduce's set-up. Here each rank has its
own CUDA stream and is set up by its own thread; ``LoopbackComm`` stands in for the NCCL
communicator in the set-up's few collectives (an all-gather of the payloads, the agreement
flags: summed on the host), and ``loopback_ll`` maps a peer's buffer by its pointer, as CUDA
IPC cannot open a handle in the process that made it. Then ONE thread issues every rank's calls
in turn (``LoopbackGroup.issue``). The kernels are the engine's own,
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
# CUDA initializes, so it must be set before anything touches CUDA (LoopbackGroup checks).
os.environ.setdefault("CUDA_MODULE_LOADING", "EAGER")

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import torch  # noqa: E402

from engine.distributed.ll_allreduce import LLAllReduce  # noqa: E402

EPS = 1e-5


class LoopbackHub:
    """What the set-up threads of one loopback group share: a barrier and a slot per rank."""

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


def loopback_ll(hub: LoopbackHub, stamps: bool = False, options: tuple[str, ...] = ()) -> type:
    """``LLAllReduce`` whose peers' buffers are mapped by pointer (one process); ``stamps``:
    compiled with ``-DLL_STAMPS=1`` whatever ``KVMESH_LL_STAMPS`` says; ``options``: more
    compile options (later -D's win)."""
    base = tuple(o for o in LLAllReduce.KERNEL_OPTIONS if o != "-DLL_STAMPS=1")

    class LoopbackLL(LLAllReduce):
        KERNEL_OPTIONS = base + (("-DLL_STAMPS=1",) if stamps else ()) + tuple(options)

        def _map_peer(self, q: int, payload: bytes) -> int:
            hub.bases[self.rank] = self._base
            hub.barrier.wait()  # every rank has put its base in
            return hub.bases[q]

        def _unmap_peer(self, ptr: int) -> None:
            pass  # the owner frees it

        def _self_check(self, timeout_s: float) -> Optional[str]:
            return None  # its ranks' kernels would run from their own threads: see LoopbackGroup

    return LoopbackLL


class LoopbackGroup:
    """``world_size`` LL ranks of one process on one GPU, each with its own stream.

    Set up by one thread per rank (the set-up's collectives meet in the hub); used from ONE
    thread that issues every rank's call in turn (``issue``), so nothing the host does between
    two ranks' kernels (an allocation, a copy on the legacy stream, a module load) can keep a
    later rank's kernel from running beside an earlier one that spins for it. The LL self-check
    is skipped (it runs each rank's kernels from its own thread); callers check the results."""

    def __init__(self, world_size: int, stamps: bool = False, device: Optional[torch.device] = None,
                 timeout_s: float = 120.0, options: tuple[str, ...] = ()) -> None:
        if os.environ.get("CUDA_MODULE_LOADING") != "EAGER":
            raise RuntimeError("loopback ranks need CUDA_MODULE_LOADING=EAGER, set before CUDA starts "
                               "(a lazily loaded kernel can wait for a peer's spinning LL kernel)")
        self.device = device or torch.device("cuda", torch.cuda.current_device())
        self.world_size = world_size
        self.hub = LoopbackHub(world_size)
        cls = loopback_ll(self.hub, stamps, options)
        self.comms = [LoopbackComm(self.hub, r, self.device) for r in range(world_size)]
        self.streams = [torch.cuda.Stream(self.device) for _ in range(world_size)]
        self.lls: list[Optional[LLAllReduce]] = [None] * world_size
        errors: list[Optional[BaseException]] = [None] * world_size

        def setup(rank: int) -> None:
            torch.cuda.set_device(self.device)
            try:
                with torch.cuda.stream(self.streams[rank]):
                    self.lls[rank] = cls(self.comms[rank])
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors[rank] = exc
                self.hub.barrier.abort()

        threads = [threading.Thread(target=setup, args=(r,), daemon=True) for r in range(world_size)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=timeout_s)
        if any(t.is_alive() for t in threads):
            raise TimeoutError(f"loopback set-up still running after {timeout_s:.0f}s")
        for rank, exc in enumerate(errors):
            if exc is not None and not isinstance(exc, threading.BrokenBarrierError):
                raise RuntimeError(f"rank {rank}'s set-up failed: {exc!r}") from exc
        off = [(r, ll.disabled_reason) for r, ll in enumerate(self.lls) if ll is None or not ll.is_enabled]
        if off:
            raise RuntimeError(f"the LL path is off on ranks {off}")
        for stream in self.streams:  # each stream's allocator pool gets a segment now, not mid-call
            with torch.cuda.stream(stream):
                torch.empty(1 << 20, dtype=torch.uint8, device=self.device).zero_()
                torch.empty(4096, dtype=torch.uint8, device=self.device).zero_()
        torch.cuda.synchronize(self.device)

    def issue(self, fn: Callable[[int, LLAllReduce], Any]) -> list:
        """``fn(rank, ll)`` for every rank in turn, each on its rank's stream, after what the
        caller's stream has queued (its inputs); the results."""
        out = []
        caller = torch.cuda.current_stream(self.device)
        for rank, ll in enumerate(self.lls):
            self.streams[rank].wait_stream(caller)
            with torch.cuda.stream(self.streams[rank]):
                out.append(fn(rank, ll))
        return out

    def synchronize(self) -> None:
        for stream in self.streams:
            stream.synchronize()

    def close(self) -> None:
        self.synchronize()
        for ll in self.lls:
            if ll is not None:
                ll.destroy()
        self.lls = [None] * self.world_size


def rank_inputs(rank: int, rows: int, hidden: int, dtype: torch.dtype, seed: int, device="cuda") -> tuple:
    """(x, residual, norm weight) of one rank's call: (rows, hidden) x2 and (hidden,), seeded."""
    gen = torch.Generator(device=device).manual_seed(seed * 131 + rank)
    x = torch.randn(rows, hidden, generator=gen, device=device).to(dtype)
    residual = torch.randn(rows, hidden, generator=gen, device=device).to(dtype)
    weight = (torch.rand(hidden, generator=gen, device=device) + 0.5).to(dtype)
    return x, residual, weight


def pushing_gemv(group: LoopbackGroup, hidden: int, k: int = 2048) -> Callable[[], list]:
    """A function that runs every rank's one-row GEMV (1, k) x (hidden, k), pushing into the
    peers' LL slots (``gemv_push``, as a decode step's o_proj does), and returns the outputs."""
    from engine.kernels import gemv
    gen = torch.Generator(device=group.device).manual_seed(11)
    a = [torch.randn(1, k, generator=gen, device=group.device).to(torch.bfloat16) for _ in range(group.world_size)]
    w = [(torch.randn(hidden, k, generator=gen, device=group.device) / k ** 0.5).to(torch.bfloat16)
         for _ in range(group.world_size)]
    gemv.gemv_row(a[0], w[0])  # tunes the shape before any LL kernel runs
    gemv._USE_GEMV[(hidden, k, torch.bfloat16)] = ("row", None)
    return lambda: group.issue(lambda r, ll: ll.gemv_push(a[r], w[r]))


def time_calls(group: LoopbackGroup, calls: int, hidden: int, pushed: bool = False) -> list[dict]:
    """``calls`` fused LL calls of one row per rank, issued rank after rank (eager), then each
    rank's stamps' summary. The last rank issued finds its peers' lines already in: its
    ``peers``/``finish`` parts are the kernel's own cost; the others' include the host's
    launch gap to the later ranks. ``pushed``: each call's input comes from the pushing GEMV
    (every rank's GEMV first, then the calls), as in a TP decode step."""
    from engine.profiling import ll_stamp_summary
    inputs = [rank_inputs(r, 1, hidden, torch.bfloat16, 7, group.device) for r in range(group.world_size)]
    push = pushing_gemv(group, hidden) if pushed else None

    def one_call() -> None:
        xs = push() if push else [x for x, _, _ in inputs]
        group.issue(lambda r, ll: ll.all_reduce_rms_norm(xs[r], inputs[r][1], inputs[r][2], EPS))

    for _ in range(10):  # warm-up
        one_call()
    group.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        one_call()
    group.synchronize()
    seconds = time.perf_counter() - start
    reports = []
    for rank, ll in enumerate(group.lls):
        stamps = ll.read_stamps() or []
        reports.append({"rank": rank, "issued": "last" if rank == group.world_size - 1 else "earlier",
                        "calls": calls, "wall_us_per_call": seconds / calls * 1e6,
                        "stamps": ll_stamp_summary(stamps[-min(len(stamps), calls):])})
    return reports


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--pushed", action="store_true", help="inputs from the pushing GEMV (a decode step's calls)")
    ap.add_argument("--option", action="append", default=[], help="an extra kernel compile option, e.g. -DLL_STORE_RELAXED=1")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    group = LoopbackGroup(args.ranks, stamps=True, options=tuple(args.option))
    try:
        reports = time_calls(group, args.calls, args.hidden, args.pushed)
    finally:
        group.close()
    result = {"benchmark": "ll_loopback", "gpu": torch.cuda.get_device_name(0), "torch": torch.__version__,
              "ranks": args.ranks, "hidden": args.hidden, "pushed": args.pushed, "options": args.option,
              "time": time.time(), "reports": reports}
    for r in reports:
        print(json.dumps(r))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
