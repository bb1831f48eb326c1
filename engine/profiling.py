"""Device-kernel profiles of engine steps, per process (a worker rank, or the driver's runner).

    profiler = KernelProfiler(); profiler.start(); ...N steps...; profiler.stop(N) -> KernelProfile

A tensor-parallel step's time is set by its slowest rank, and each rank runs in its own
process: the driver cannot see their kernels. ``Worker.profile`` runs this inside each
worker, so ``bench/parallel.py --profile`` gets one table per rank (which kernels, how many
microseconds of each per step) to put next to the step's wall time.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Optional

import torch


@dataclass
class KernelRow:
    name: str
    us_per_step: float
    calls_per_step: float


@dataclass
class KernelProfile:
    num_steps: int
    kernel_us_per_step: float  # sum of device-kernel time (kernels, memcpy, memset) a step
    rows: list[KernelRow] = field(default_factory=list)  # largest first

    def to_dict(self) -> dict:
        return asdict(self)


class KernelProfiler:
    """torch.profiler over CUDA activity only (CUPTI sees every thread of the process). Without
    CUDA (CPU smoke runs) it times CPU ops instead, each op's self time, of the thread that
    started it only (a worker's step loop runs in another thread: its table comes back empty)."""

    def __init__(self) -> None:
        self._prof: Optional[torch.profiler.profile] = None
        self.cuda = torch.cuda.is_available()

    def start(self) -> None:
        if self._prof is not None:
            raise RuntimeError("profiler already running")
        _sync()
        activity = torch.profiler.ProfilerActivity.CUDA if self.cuda else torch.profiler.ProfilerActivity.CPU
        self._prof = torch.profiler.profile(activities=[activity])
        self._prof.start()

    def stop(self, num_steps: int, top: int = 25) -> KernelProfile:
        if self._prof is None:
            raise RuntimeError("profiler not running")
        _sync()
        prof, self._prof = self._prof, None
        prof.stop()
        from torch.autograd import DeviceType
        totals: dict[str, list[float]] = {}
        device = DeviceType.CUDA if self.cuda else DeviceType.CPU
        for event in prof.events():
            if event.device_type != device:
                continue
            row = totals.setdefault(event.name, [0.0, 0])
            row[0] += event.device_time_total if self.cuda else event.self_cpu_time_total
            row[1] += 1
        steps = max(num_steps, 1)
        rows = sorted((KernelRow(name[:90], us / steps, calls / steps) for name, (us, calls) in totals.items()),
                      key=lambda r: -r.us_per_step)
        return KernelProfile(num_steps, sum(r.us_per_step for r in rows), rows[:top])


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
