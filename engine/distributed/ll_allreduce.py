"""Low-latency all-reduce for decode-sized rows, optionally fused with residual add + RMSNorm.

Why: a TP decode step of an 8B model does 65 all-reduces of one 8 KiB row each, and after every
one of them an add + RMSNorm kernel. NCCL's LL all-reduce takes ~6.7 µs inside a CUDA graph on
H100s (plus launch gaps from its 4 KiB kernel arguments), the norm ~2.1 µs. Here one kernel does
both, and it never waits for a barrier: it uses NCCL's "LL" idea of putting a flag next to every
8 bytes of data, so a reader knows the data is there by looking at the data itself::

    rank r, row b (one CTA per row), the call's round R (a counter on the device, so CUDA graph
    replays advance it: each CTA reads it at the start, the last CTA to finish advances it, a
    call of one CTA as soon as it has read it; no fences, as only the next call reads it, and
    the next call starts after this one ended, in stream order), parity p = R & 1
    1. load my row's partial sums (lines of 8 bytes) into registers
    2. push: for every peer q, store each line as a 16-byte {data0, R, data1, R} into q's receive
       area slot (p, r, b, line) with one volatile 16-byte store over NVLink (no reads of peers'
       memory at all: remote reads are the slow part of a P2P all-reduce)
    3. sum in fp32 in rank order 0..n-1 (so every rank gets bit-identical results): my own lines
       from registers, a peer's by spinning on my receive slot (p, q, b, line) until both of its
       flags equal R (8-byte halves are written atomically; the two flags catch a torn 16 bytes)
    4. mode "sum": write the rounded sums; mode "norm": x = round(sum), r = round(x + residual)
       -> residual_out, out = weight * round(r * rsqrt(mean(r^2) + eps)), exactly as the
       separate all-reduce and ``rms_norm`` kernel would compute it

Measured on 2 H200s inside a CUDA graph (bench/ll_allreduce.py), one 8 KiB row: NCCL all-reduce +
Triton norm 8.26 µs, this kernel fused 4.66 µs (3.43 µs for the sum alone; before the lean end,
5.62 and 4.07 µs). In the 8B TP=2 decode step its 65 calls took 386 µs a step on rank 0 (589 µs
before; bench/results/parallel_h200x2_lean_ll.json).

Pushed by the GEMV (``gemv_push``, batch-1 decode): a dense decoder's o_proj and down_proj
outputs go unchanged into this kernel, so their GEMV (``gemv.gemv_row_push``) stores each
program's outputs straight into the peers' slots as it finishes, under the coming call's round
(the round word + 1), and the call then skips step 2 (``pushed``): the NVLink hop overlaps the
GEMV instead of following it. Each rank decides alone (a peer only waits for the flags), so
ranks whose GEMV tuners chose differently still agree. The call after ``gemv_push`` must take
its output (checked: ``_take_pushed``). ``KVMESH_LL_PUSH=0`` turns it off.

No-wait (on by default since stop 25, ``KVMESH_LL_NO_WAIT=0`` to turn off; the TP=2 8B batch-1
step on 2 H200s, one call, in turn: 2.501 and 2.418 ms against 2.455 and 2.535 waiting, and
2.400 with the (1024, 1) build below; runs of one setting vary by 0.04-0.08 ms. A "signal" mode
on top of it, in which the next GEMV waited for a READY flag of this call instead of its end, made
that step 2.927 ms against 2.498 in stop 24 and was removed): that GEMV
also stores its lines into my own slot, under the same flags, and writes nothing else, so the LL
call reads every rank's partial sums, mine included, only through flagged lines and skips its
``griddepcontrol.wait`` on the GEMV: it sums as soon as the last line lands, instead of once the
GEMV's grid has ended, an end that waits for the GEMV's NVLink stores to be acknowledged. What
else it reads (residual, norm weight, round) was written by kernels that ended before the GEMV
let the call launch. It advances the round only once every line is in (each GEMV program read
the round word before it stored its lines), and its outputs may take memory the GEMV read, which
every program has done before it stores its lines. The GEMV leaves its returned tensor
unwritten: a plain store there could land after the call ended and the memory went to a later
kernel.

Why one round per call, two parities and no end barrier: rank r can only start call R+1 after its
call R read data of call R from every peer, which each peer wrote after its call R-1 kernel had
finished (stream order), i.e. after that peer read everything of parity (R-1) & 1 = (R+1) & 1. So
the slots r overwrites in call R+1 have been read. A slot's flag is the round of the call that
last wrote it, so it equals R only once this call's write landed, whatever rows and hidden size
earlier calls had (a per-row count would not do: calls of other shapes map other rows onto the
same slots, and two rows' counts can agree). R starts at 1, slots at 0.

Buffer (one per rank, ``cudaMalloc``, mapped by every peer through CUDA IPC)::

    byte 0      round  u32             (mine: the last finished call's round)
    4           done   u32             (CTAs of the running call that finished)
    2448        error  u32             (a wait timed out: self-check only; same place as the
                                        one-shot kernel's, so ``_read_error`` is shared)
    4096        receive-area pointers u64[MAX_RANKS] (rank q's area, mine included)
    8192        receive area: [2 parities][world][max_lines] lines of 16 bytes
    then        with KVMESH_LL_STAMPS=1: STAMP_SLOTS x 4 u64 stamps (``read_stamps``)

Rules: every rank calls with the same shapes and dtypes in the same order; the choice of path is
a function of shape and dtype alone (``can_reduce``). A row spans at most THREADS * MAX_LPT lines
(32 KiB of data: hidden 16384 in bf16) and a call at most MAX_ROWS rows (each CTA spins, so all
must be resident at once: fewer than any GPU's SM count) and ``max_bytes`` bytes.
Set-up, agreement and self-check are ``CustomAllReduce``'s (custom_allreduce.py).
"""

from __future__ import annotations

import logging
import os
from typing import Optional

import torch

from engine.kernels import gemv, pdl
from engine.distributed.ll_kernel import KERNEL_SOURCE as LL_KERNEL_SOURCE
from engine.distributed.custom_allreduce import (_DTYPE_CODES, _TOLERANCE,
                                                 SELF_CHECK_KERNEL_TIMEOUT_NS, SIGNAL_BYTES, CustomAllReduce)

logger = logging.getLogger(__name__)

LL_DISABLE_ENV = "KVMESH_DISABLE_LL_ALLREDUCE"
LL_PUSH_ENV = "KVMESH_LL_PUSH"  # 0: row-parallel GEMVs never push (the LL kernel always does)
# 1: a pushing GEMV also pushes into my own slot, and its LL call reads only flagged lines and
# never waits for that GEMV to end (module doc: "no-wait", the default); 0: the call waits for it
LL_NO_WAIT_ENV = "KVMESH_LL_NO_WAIT"
# When the kernel after an LL call may launch (PDL): "start" of the call (default) or "wait",
# once the kernel before it has ended (see the kernel); kept for A/B runs
LL_TRIGGER_ENV = "KVMESH_LL_TRIGGER"
# 1: every call stamps (globaltimer, ns) its start, the end of its wait for the kernel before,
# the moment every peer's line was in, and its end, into STAMP_SLOTS slots past the receive area
# (``read_stamps``; engine/profiling.py's ``ll_stamp_summary``): where a call's time goes. For
# measurements only: it adds one barrier to each call.
LL_STAMPS_ENV = "KVMESH_LL_STAMPS"
# 1: the kernel's own push stores are st.relaxed.sys instead of st.volatile (an A/B for the
# loopback harness; stop 21, one H200: no difference, 2.66 vs 2.66 µs after the wait at 2 ranks)
LL_RELAXED_STORES_ENV = "KVMESH_LL_RELAXED_STORES"
STAMP_SLOTS = 4096
LL_DEFAULT_MAX_BYTES = 256 * 1024  # 32 decode rows of hidden 4096 in bf16
MAX_ROWS = 64
THREADS = 512
MAX_LPT = 8  # lines (8 bytes of data each) per thread
# The kernel's builds, (threads, lines per thread): a call takes the first that holds its row.
# (1024, 1) (rows of up to 1024 lines: 4096 wide in bf16) measured 2.56 / 2.59 us after the wait
# against 2.75 / 2.75 for (512, 2), the default of stops 20-24 (2 ranks, bench/ll_loopback.py on
# one H200, stop 25); (512, 2) had measured 2.56 against 3.46 for (512, 8), the only build before
# stop 20; (512, 4) spilled in bf16. KVMESH_LL_BUILDS (e.g. "512x2": the build of before) is kept
# for A/B runs; (512, MAX_LPT), which holds every row the path takes, is always there, last.
LL_BUILDS_ENV = "KVMESH_LL_BUILDS"


def _builds(text: str) -> tuple[tuple[int, int], ...]:
    builds = [tuple(int(n) for n in b.strip().split("x")) for b in text.split(",") if b.strip()]
    builds = [b for b in builds if b != (THREADS, MAX_LPT)]
    return tuple(sorted(builds, key=lambda b: b[0] * b[1])) + ((THREADS, MAX_LPT),)


BUILDS = _builds(os.environ.get(LL_BUILDS_ENV, "1024x1"))
LINE_DATA_BYTES = 8
LINE_BYTES = 16
MODE_SUM, MODE_NORM, MODE_NORM_NO_RESIDUAL = 0, 1, 2
# The kernel's ``pushed`` argument: who sent this call's partial sums, and where mine are
NOT_PUSHED, PUSHED_TO_PEERS, PUSHED_TO_ALL = 0, 1, 2


def kernel_source() -> str:
    """The CUDA C source (engine/distributed/ll_kernel.py; compiled per build, see
    ``_kernel_builds``); for offline checks."""
    return LL_KERNEL_SOURCE


def rows_and_lines(shape: tuple[int, ...], dtype: torch.dtype) -> tuple[int, int]:
    """(rows, lines per row) of a (..., hidden) tensor: a function of shape and dtype only."""
    hidden = shape[-1] if shape else 1
    rows = 1
    for n in shape[:-1]:
        rows *= n
    row_bytes = hidden * dtype.itemsize  # not torch.tensor([]).element_size(): ~6 µs a call on the host
    return rows, (row_bytes // LINE_DATA_BYTES if row_bytes % LINE_DATA_BYTES == 0 else -1)


class LLAllReduce(CustomAllReduce):
    """The flag-per-line all-reduce of one NCCL group (set-up as ``CustomAllReduce``'s)."""

    KERNEL_SOURCE = LL_KERNEL_SOURCE
    KERNEL_NAME = "kvmesh_ll_all_reduce"
    KERNEL_OPTIONS = ((("-DLL_TRIGGER_AFTER_WAIT=1",)
                       if os.environ.get(LL_TRIGGER_ENV, "start").strip().lower() == "wait" else ())
                      + (("-DLL_STAMPS=1",) if os.environ.get(LL_STAMPS_ENV, "0") not in ("", "0") else ())
                      + (("-DLL_STORE_RELAXED=1",)
                         if os.environ.get(LL_RELAXED_STORES_ENV, "0") not in ("", "0") else ()))

    def __init__(self, comm, max_bytes: int = LL_DEFAULT_MAX_BYTES,
                 self_check_timeout_s: float = 5.0) -> None:
        self.max_lines = int(max_bytes) // LINE_DATA_BYTES
        self._push_table: Optional[torch.Tensor] = None  # gemv_row_push's addresses (set-up)
        self._pushed: Optional[torch.Tensor] = None  # a pushed partial its LL call has not taken
        self._pushed_mode = NOT_PUSHED  # how it was pushed
        # gemv_push pushes into my own slot too and its LL call does not wait for it (no-wait)
        self.no_wait = os.environ.get(LL_NO_WAIT_ENV, "1") not in ("", "0")
        self._dependent_launch_ok = True  # off for good after a failed cuLaunchKernelEx
        self._functions: dict[tuple, int] = {}  # (dtype, threads, lines per thread) -> CUfunction
        super().__init__(comm, max_bytes=max_bytes, self_check_timeout_s=self_check_timeout_s)
        if self.is_enabled and os.environ.get(LL_PUSH_ENV, "1") not in ("", "0"):
            self._push_table = self._make_push_table()

    # ---- use ------------------------------------------------------------------------------------

    def can_reduce(self, tensor: torch.Tensor) -> bool:
        """Whether this path takes a (..., hidden) tensor (a function of shape, dtype, device)."""
        return (tensor.is_cuda and tensor.device.index == self._device_index
                and self._takes_shape(tuple(tensor.shape), tensor.dtype))

    def _takes_shape(self, shape: tuple[int, ...], dtype: torch.dtype) -> bool:
        if not (self.is_enabled and dtype in _DTYPE_CODES and len(shape) >= 1):
            return False
        rows, lines = rows_and_lines(shape, dtype)
        return 0 < rows <= MAX_ROWS and 0 < lines <= THREADS * MAX_LPT and rows * lines <= self.max_lines

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """The sum over the group, in a new tensor, on torch's current stream (graph-capturable)."""
        x = _aligned(tensor)
        out = torch.empty_like(x)
        self._launch_ll(x, None, None, out, None, 0.0, MODE_SUM, timeout_ns=0)
        return out

    def all_reduce_rms_norm(self, x: torch.Tensor, residual: Optional[torch.Tensor],
                            weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(sum(x) + residual) * weight, sum(x) + residual); without a residual,
        (norm(sum(x)) * weight, sum(x)). Same rounding as all_reduce then ``rms_norm``."""
        x = _aligned(x)
        residual = _aligned(residual) if residual is not None else None
        out, residual_out = torch.empty_like(x), torch.empty_like(x)
        mode = MODE_NORM if residual is not None else MODE_NORM_NO_RESIDUAL
        self._launch_ll(x, residual, _aligned(weight), out, residual_out, eps, mode, timeout_ns=0)
        return out, residual_out

    def gemv_push(self, x: torch.Tensor, weight: torch.Tensor) -> Optional[torch.Tensor]:
        """A row-parallel layer's partial sums x (1, K) @ weight.T -> (1, N), computed by the GEMV
        that also pushes them to the peers (``gemv.gemv_row_push``); the next LL call must then
        be on this output. None where that GEMV does not run (see ``gemv_row_push``), or the
        output is not the LL path's: the caller computes and reduces as usual. Whether a rank
        pushes is its own affair (a peer only waits for lines flagged with the round), so this
        may differ between ranks, e.g. where their GEMV tuners chose differently."""
        if self._push_table is None or self._pushed is not None or x.dim() != 2 or x.shape[0] != 1:
            return None
        if not (x.is_cuda and x.device.index == self._device_index
                and self._takes_shape((1, weight.shape[0]), x.dtype)):  # the output's shape
            return None
        out = gemv.gemv_row_push(x, weight, self._push_table, self.rank, self.world_size,
                                 2 * self.max_lines, self_slot=self.no_wait)
        if out is not None:
            self._pushed = out
            self._pushed_mode = PUSHED_TO_ALL if self.no_wait else PUSHED_TO_PEERS
        return out

    def _take_pushed(self, x: torch.Tensor) -> int:
        """How x was pushed (NOT_PUSHED, PUSHED_TO_PEERS or PUSHED_TO_ALL: the kernel's
        ``pushed``); a pushed x must be the partial ``gemv_push`` sent, which this call must
        not push again (and, pushed to all, whose values only the slots hold)."""
        pushed, self._pushed = self._pushed, None
        if pushed is None:
            return NOT_PUSHED
        if pushed.data_ptr() != x.data_ptr() or pushed.shape != x.shape:
            raise RuntimeError("the LL call after gemv_push must reduce gemv_push's output: the "
                               "peers already hold it under this call's round")
        return self._pushed_mode

    def destroy(self) -> None:
        self._push_table, self._pushed = None, None  # no GEMV may push into freed buffers
        super().destroy()

    # ---- set-up ---------------------------------------------------------------------------------

    def _make_push_table(self) -> torch.Tensor:
        """int64 (world + 1,) on my GPU, for ``gemv_row_push``: entry q = (rank q's receive area -
        the table's address) / 8, entry world = (my round word - the table's address) / 8."""
        table = torch.zeros(self.world_size + 1, dtype=torch.int64, device=self._device)
        base = table.data_ptr()
        areas = [(self._base if q == self.rank else self._peer_bases[q]) + SIGNAL_BYTES
                 for q in range(self.world_size)]
        deltas = [(a - base) // 8 for a in areas] + [(self._base - base) // 8]
        if any((a - base) % 8 for a in areas + [self._base]):
            raise RuntimeError("LL buffers are not 8-byte aligned against the push table")
        table.copy_(torch.tensor(deltas, dtype=torch.int64))
        return table

    def _unwanted_reason(self) -> Optional[str]:
        if os.environ.get(LL_DISABLE_ENV, "0") not in ("", "0"):
            return f"{LL_DISABLE_ENV} is set"
        return super()._unwanted_reason()

    def _buffer_bytes(self) -> int:
        return self._stamps_offset() + (STAMP_SLOTS * 4 * 8 if self.stamps_enabled else 0)

    @property
    def stamps_enabled(self) -> bool:
        return "-DLL_STAMPS=1" in self.KERNEL_OPTIONS

    def _stamps_offset(self) -> int:
        return SIGNAL_BYTES + 2 * self.world_size * self.max_lines * LINE_BYTES

    def read_stamps(self) -> Optional[list[tuple[int, int, int, int]]]:
        """With ``KVMESH_LL_STAMPS=1``: (start, waited, peers in, end) in globaltimer ns of the
        last calls, oldest first (slot = round % STAMP_SLOTS; a call of several rows stamps its
        first row). Synchronizes the device. None when stamps are off."""
        if not self.stamps_enabled or not self.is_enabled:
            return None
        torch.cuda.synchronize(self._device)
        host = torch.zeros(STAMP_SLOTS, 4, dtype=torch.int64)
        runtime = self._cupy.cuda.runtime
        with self._cupy.cuda.Device(self._device_index):
            runtime.memcpy(host.data_ptr(), self._base + self._stamps_offset(), host.numel() * 8,
                           runtime.memcpyDeviceToHost)
        rows = [tuple(int(v) for v in r) for r in host.tolist() if r[0] > 0 and r[3] >= r[0]]
        return sorted(rows)

    def _self_check(self, timeout_s: float) -> Optional[str]:
        """Both modes against NCCL (+ the torch reference norm) on random rows; each case twice
        with new data, so a stale read of a parity's previous round shows."""
        cases = []
        for dtype in _DTYPE_CODES:
            size = dtype.itemsize
            for hidden in (8 // size, 4096, 5120):
                max_rows = min(MAX_ROWS, self.max_lines // max(1, hidden * size // LINE_DATA_BYTES))
                for rows in sorted({1, 3, max_rows}):
                    for mode in (MODE_SUM, MODE_NORM, MODE_NORM_NO_RESIDUAL):
                        cases.append((dtype, rows, hidden, mode))
        cases = cases * 2
        gen = torch.Generator(device=self._device).manual_seed(4321 + self.rank)
        inputs = []
        for dtype, rows, hidden, mode in cases:
            x = torch.randn(rows, hidden, generator=gen, device=self._device).to(dtype)
            residual = torch.randn(rows, hidden, generator=gen, device=self._device).to(dtype)
            weight = (torch.rand(hidden, generator=gen, device=self._device) + 0.5).to(dtype)
            summed = x.clone()
            self.comm.nccl_all_reduce(summed)
            inputs.append((x, residual, weight, summed))
        torch.cuda.synchronize(self._device)
        for (dtype, rows, hidden, mode), (x, residual, weight, summed) in zip(cases, inputs):
            out, residual_out = torch.empty_like(x), torch.empty_like(x)
            try:
                self._launch_ll(x, residual if mode == MODE_NORM else None, weight, out,
                                residual_out, 1e-5, mode, timeout_ns=SELF_CHECK_KERNEL_TIMEOUT_NS)
            except Exception as e:  # noqa: BLE001
                return f"kernel launch failed: {e!r}"
            self._wait_for_stream(timeout_s)
            if self._read_error():
                return f"a peer did not arrive within the kernel timeout ({dtype}, {rows}x{hidden})"
            if mode == MODE_SUM:
                expected = [(out, summed)]
            else:
                ref_res = (summed.float() + residual.float()).to(dtype) if mode == MODE_NORM else summed
                r32 = ref_res.float()
                normed = (r32 * torch.rsqrt(r32.pow(2).mean(-1, keepdim=True) + 1e-5)).to(dtype)
                expected = [(residual_out, ref_res), (out, weight * normed)]
            rtol, atol = _TOLERANCE[dtype]
            for got, ref in expected:
                if not torch.allclose(got.float(), ref.float(), rtol=rtol, atol=atol * self.world_size):
                    err = (got.float() - ref.float()).abs().max().item()
                    return (f"result differs from the reference ({dtype}, {rows}x{hidden}, mode {mode}, "
                            f"max abs err {err})")
        return None

    def _kernel_builds(self) -> list[tuple[object, tuple[str, ...]]]:
        """One build per dtype and entry of BUILDS (threads, lines per thread)."""
        return [((dtype, threads, lpt), (f"-DKV_DTYPE={code}", f"-DTHREADS={threads}", f"-DLPT={lpt}"))
                for dtype, code in _DTYPE_CODES.items() for threads, lpt in BUILDS]

    def _launch_ll(self, x: torch.Tensor, residual: Optional[torch.Tensor],
                   weight: Optional[torch.Tensor], out: torch.Tensor,
                   residual_out: Optional[torch.Tensor], eps: float, mode: int,
                   timeout_ns: int) -> None:
        import numpy as np
        rows, lines = rows_and_lines(tuple(x.shape), x.dtype)
        pushed = self._take_pushed(x)
        addr = lambda t: np.uint64(t.data_ptr() if t is not None else 0)  # noqa: E731
        args = (np.uint64(self._base), addr(x), addr(residual), addr(weight), addr(out),
                addr(residual_out), np.int32(lines), np.int32(x.shape[-1]), np.int64(self.max_lines),
                np.float32(eps), np.int32(mode), np.int32(self.rank), np.int32(self.world_size),
                np.uint64(timeout_ns), np.int32(pushed))
        threads, lpt = next(b for b in BUILDS if b[0] * b[1] >= lines)  # the first that holds the row
        build = (x.dtype, threads, lpt)
        if self._dependent_launch_ok and pdl.ll_pdl(x.device):
            try:
                pdl.launch_dependent(self._function(build), rows, threads,
                                     torch.cuda.current_stream(x.device).cuda_stream, _as_ctypes(args))
                return
            except Exception as exc:  # noqa: BLE001 - the plain launch below is always right
                self._dependent_launch_ok = False
                logger.warning("LL all-reduce: no dependent launch (%r); plain launches from now on", exc)
        self._run(build, rows, args, threads=threads)

    def _function(self, build: tuple[torch.dtype, int, int]) -> int:
        """The CUfunction of the (dtype, threads, lines per thread) build on this device (CuPy's),
        looked up once per build, not on every call."""
        if build not in self._functions:
            with self._cupy.cuda.Device(self._device_index):
                self._functions[build] = int(self._kernels[build].kernel.ptr)
        return self._functions[build]


def _as_ctypes(args: tuple) -> list:
    """The kernel's numpy-typed arguments as ctypes values of the same C types."""
    import ctypes
    import numpy as np
    types = {np.uint64: ctypes.c_uint64, np.int64: ctypes.c_int64, np.int32: ctypes.c_int32,
             np.float32: ctypes.c_float}
    return [types[type(a)](a.item()) for a in args]


def _aligned(tensor: torch.Tensor) -> torch.Tensor:
    """Contiguous and 16-byte aligned (the kernel moves 8-byte lines): a copy if not. Copying
    depends on the pointer, which may differ across ranks, but only the data's place changes,
    never which collective runs."""
    tensor = tensor.contiguous()
    return tensor if tensor.data_ptr() % 16 == 0 else tensor.clone()
