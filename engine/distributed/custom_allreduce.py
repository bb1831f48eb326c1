"""One-shot peer-to-peer all-reduce for small messages over CUDA IPC (one node, 2/4/8 GPUs).

NCCL spends ~20 us on an 8 KiB all-reduce; a TP decode step does 64 of them. Here every rank
maps every peer's buffer (CUDA IPC) and one kernel does the whole all-reduce::

    rank r, block b, round R (a per-block counter kept on the device: CUDA graphs replay it)
    1. copy my input's part b into my staging area (same byte offsets)
    2. start barrier: write R into every peer's start[b][r]; spin until my start[b][q] >= R
    3. sum part b of every rank's staging area in fp32, in rank order 0..n-1 (so every rank
       gets bit-identical results), and write it over my input (in place)
    4. end barrier: write R into every peer's end[b][r]; spin until my end[b][q] >= R
       (after it no peer still reads my staging area, so the next call may overwrite it)

One buffer per rank (``cudaMalloc``: IPC needs whole allocations, not the caching allocator's)::

    byte 0      start flags u32[MAX_BLOCKS][MAX_RANKS]   (written by peers)
    1152        end flags   u32[MAX_BLOCKS][MAX_RANKS]   (written by peers)
    2304        round       u32[MAX_BLOCKS]              (mine: calls block b took part in)
    2448        error       u32                          (a wait timed out: self-check only)
    4096        peer data pointers   u64[MAX_RANKS]      (staging area of rank q, mine included)
    4160        peer buffer pointers u64[MAX_RANKS]      (base of rank q's buffer)
    8192        staging area, max_bytes

Invariants: all ranks call with the same shapes and dtypes in the same order (the
``Communicator`` rule), so the grid, the work of block b and every block's round agree across
ranks; the grid depends only on the byte count (never on pointer alignment). Construction is
collective and never leaves ranks disagreeing: each decision (wanted, set up, self-check passed)
is agreed by a NCCL all-reduce, and the path is off unless every rank says yes. Waits spin
without limit in service (like NCCL); only the self-check's kernels give up after a timeout.
cupy is imported lazily: importing this module on a CPU-only machine is fine.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import time
from typing import Optional

import torch

from engine.distributed.custom_allreduce_kernel import KERNEL_SOURCE as _KERNEL_SOURCE

logger = logging.getLogger(__name__)

DISABLE_ENV = "KVMESH_DISABLE_CUSTOM_ALLREDUCE"
DEFAULT_MAX_BYTES = 512 * 1024
SUPPORTED_WORLD_SIZES = (2, 4, 8)
MAX_RANKS = 8
MAX_BLOCKS = 36  # <= SM count, so every block of the grid is resident at once (they spin)
THREADS = 512
SIGNAL_BYTES = 8192  # the flags and pointer tables; the staging area starts here
TABLE_OFFSET = 4096
HANDLE_BYTES = 64  # cudaIpcMemHandle_t
PAYLOAD_BYTES = 128  # handle (64) | node id (32) | ok (1) | padding
SELF_CHECK_KERNEL_TIMEOUT_NS = 2_000_000_000
_DTYPE_CODES = {torch.bfloat16: 0, torch.float16: 1, torch.float32: 2}
_TOLERANCE = {torch.bfloat16: (2e-2, 5e-2), torch.float16: (2e-3, 5e-3), torch.float32: (1e-5, 1e-5)}

_ERROR_BYTE_OFFSET = 4 * (2 * MAX_BLOCKS * MAX_RANKS + MAX_BLOCKS)


def kernel_source() -> str:
    """The CUDA C source (compiled per dtype with ``-DKV_DTYPE=<0|1|2>``); for offline checks."""
    return _KERNEL_SOURCE


def grid_size(nbytes: int) -> int:
    """Blocks for a message: a function of its size alone, so every rank picks the same grid."""
    num_packs = nbytes // 16
    return max(1, min(MAX_BLOCKS, -(-num_packs // THREADS)))


def _node_id() -> bytes:
    """32 bytes naming this host (hostname and kernel boot id): IPC only works within one node."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = ""
    return hashlib.sha256(f"{socket.gethostname()}|{boot}".encode()).digest()


class CustomAllReduce:
    """The one-shot IPC all-reduce of one NCCL group; ``is_enabled`` says whether it may be used.

    Collective: every rank of ``comm``'s group constructs it at the same time. ``comm`` (an
    ``NcclCommunicator``) is used for set-up only: handle exchange, agreement and the reference
    results of the self-check. Never raises for an unusable path (it stays disabled, with
    ``disabled_reason``), except when the GPU stream is left blocked or the CUDA context broken,
    where no collective can work any more.
    """

    KERNEL_SOURCE = _KERNEL_SOURCE
    KERNEL_NAME = "kvmesh_custom_all_reduce"
    KERNEL_OPTIONS: tuple[str, ...] = ()  # more nvcc/NVRTC options (subclasses)

    def __init__(self, comm, max_bytes: int = DEFAULT_MAX_BYTES,
                 self_check_timeout_s: float = 5.0) -> None:
        self.comm = comm
        self.rank = comm.rank
        self.world_size = comm.world_size
        self.max_bytes = int(max_bytes)
        self.is_enabled = False
        self.disabled_reason: Optional[str] = None
        self._device = comm.device
        self._device_index = (self._device.index if self._device.index is not None
                              else torch.cuda.current_device())
        self._base: Optional[int] = None  # my buffer
        self._peer_bases: dict[int, int] = {}  # opened IPC mappings of peers' buffers
        self._kernels: dict = {}  # build (see _kernel_builds) -> CuPy RawKernel
        self._streams: dict[int, object] = {}
        self._cupy = None

        reason = self._unwanted_reason()
        if not self._agree(reason is None):
            return self._disable(reason or "another rank does not use it", collective=False)
        try:
            payload = self._allocate()
        except Exception as e:  # noqa: BLE001 - any failure here only means: use NCCL
            payload, reason = torch.zeros(PAYLOAD_BYTES, dtype=torch.uint8), f"set-up failed: {e!r}"
        peers = self._exchange(payload)
        if reason is None:
            try:
                self._open_peers(peers)
                self._compile()
            except Exception as e:  # noqa: BLE001
                reason = f"opening peers or compiling failed: {e!r}"
        if not self._agree(reason is None):
            return self._disable(reason or "set-up failed on another rank", collective=True)
        reason = self._self_check(self_check_timeout_s)
        if not self._agree(reason is None):
            return self._disable(reason or "self-check failed on another rank", collective=True)
        self.is_enabled = True
        logger.info("custom all-reduce on (rank %d of %d, up to %d bytes)", self.rank,
                    self.world_size, self.max_bytes)

    # ---- use ------------------------------------------------------------------------------------

    def can_reduce(self, tensor: torch.Tensor) -> bool:
        """Whether ``all_reduce`` takes this tensor (a function of shape, dtype, device only)."""
        nbytes = tensor.numel() * tensor.element_size()
        return (self.is_enabled and tensor.dtype in _DTYPE_CODES and tensor.is_cuda
                and tensor.device.index == self._device_index and tensor.is_contiguous()
                and 0 < nbytes <= self.max_bytes)

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sums ``tensor`` over the group in place on torch's current stream (graph-capturable)."""
        self._launch(tensor, timeout_ns=0)
        return tensor

    def destroy(self) -> None:
        """Frees the buffer and closes the peers' mappings (not collective; no kernel may run)."""
        self.is_enabled = False
        self._release()

    # ---- set-up steps ---------------------------------------------------------------------------

    def _unwanted_reason(self) -> Optional[str]:
        if os.environ.get(DISABLE_ENV, "0") not in ("", "0"):
            return f"{DISABLE_ENV} is set"
        if self._device.type != "cuda":
            return "not a CUDA group"
        if self.world_size not in SUPPORTED_WORLD_SIZES:
            return f"world size {self.world_size} not in {SUPPORTED_WORLD_SIZES}"
        if self.max_bytes <= 0 or self.max_bytes % 16:
            return f"max_bytes {self.max_bytes} must be a positive multiple of 16"
        try:
            import cupy  # noqa: F401
        except ImportError as e:
            return f"cupy missing: {e}"
        major, _ = torch.cuda.get_device_capability(self._device_index)
        if major < 8:  # cvt.rn.bf16.f32 needs sm_80
            return f"compute capability {major}.x < 8.0"
        return None

    def _agree(self, ok: bool) -> bool:
        """True on every rank iff ``ok`` on every rank (one NCCL all-reduce)."""
        flag = torch.tensor([1 if ok else 0], dtype=torch.int32, device=self._device)
        self.comm.nccl_all_reduce(flag)
        torch.cuda.synchronize(self._device)
        return int(flag.item()) == self.world_size

    def _buffer_bytes(self) -> int:
        """My buffer's size: the flags and tables, then the data area."""
        return SIGNAL_BYTES + self.max_bytes

    def _allocate(self) -> torch.Tensor:
        """My zeroed buffer; returns my payload (IPC handle, node id, ok) as a CPU uint8 tensor."""
        import cupy
        self._cupy = cupy
        runtime = cupy.cuda.runtime
        with cupy.cuda.Device(self._device_index):
            nbytes = self._buffer_bytes()
            self._base = runtime.malloc(nbytes)
            runtime.memset(self._base, 0, nbytes)
            runtime.deviceSynchronize()  # zeroed before any peer can see the handle
            handle = bytes(runtime.ipcGetMemHandle(self._base))
        if len(handle) != HANDLE_BYTES:
            raise RuntimeError(f"IPC handle of {len(handle)} bytes, expected {HANDLE_BYTES}")
        payload = bytearray(PAYLOAD_BYTES)
        payload[0:HANDLE_BYTES] = handle
        payload[HANDLE_BYTES:HANDLE_BYTES + 32] = _node_id()
        payload[HANDLE_BYTES + 32] = 1
        return torch.frombuffer(payload, dtype=torch.uint8).clone()

    def _exchange(self, payload: torch.Tensor) -> list[bytes]:
        """All ranks' payloads, in rank order (NCCL all-gather; every rank calls it)."""
        gathered = self.comm.all_gather(payload.to(self._device), dim=0)
        torch.cuda.synchronize(self._device)
        flat = bytes(gathered.cpu().numpy().tobytes())
        return [flat[q * PAYLOAD_BYTES:(q + 1) * PAYLOAD_BYTES] for q in range(self.world_size)]

    def _open_peers(self, peers: list[bytes]) -> None:
        mine = peers[self.rank]
        for q, payload in enumerate(peers):
            if payload[HANDLE_BYTES + 32] != 1:
                raise RuntimeError(f"rank {q} has no buffer")
            if payload[HANDLE_BYTES:HANDLE_BYTES + 32] != mine[HANDLE_BYTES:HANDLE_BYTES + 32]:
                raise RuntimeError(f"rank {q} is on another node")
        runtime = self._cupy.cuda.runtime
        bases = {}
        with self._cupy.cuda.Device(self._device_index):
            for q, payload in enumerate(peers):
                if q != self.rank:  # a process cannot open its own handle
                    self._peer_bases[q] = self._map_peer(q, payload)
                bases[q] = self._base if q == self.rank else self._peer_bases[q]
            table = [bases[q] + SIGNAL_BYTES for q in range(self.world_size)]
            table += [0] * (MAX_RANKS - self.world_size)
            table += [bases[q] for q in range(self.world_size)] + [0] * (MAX_RANKS - self.world_size)
            host = torch.tensor(table, dtype=torch.int64)  # u64 addresses fit in int64 (< 2**63)
            runtime.memcpy(self._base + TABLE_OFFSET, host.data_ptr(), 8 * len(table),
                           runtime.memcpyHostToDevice)
            runtime.deviceSynchronize()

    def _map_peer(self, q: int, payload: bytes) -> int:
        """Rank q's buffer in my address space, from its payload: CUDA IPC (a loopback harness
        with every rank in one process, bench/ll_loopback.py, maps it another way)."""
        return self._cupy.cuda.runtime.ipcOpenMemHandle(payload[:HANDLE_BYTES], 1)  # 1: lazy peer access

    def _unmap_peer(self, ptr: int) -> None:
        self._cupy.cuda.runtime.ipcCloseMemHandle(ptr)

    def _kernel_builds(self) -> list[tuple[object, tuple[str, ...]]]:
        """(build, its compile options) for every build ``_run`` may launch: one per dtype here
        (the LL kernel also builds per threads and lines per thread)."""
        return [(dtype, (f"-DKV_DTYPE={code}",)) for dtype, code in _DTYPE_CODES.items()]

    def _compile(self) -> None:
        cupy = self._cupy
        with cupy.cuda.Device(self._device_index):
            for build, options in self._kernel_builds():
                kernel = cupy.RawKernel(self.KERNEL_SOURCE, self.KERNEL_NAME,
                                        options=(*options, *self.KERNEL_OPTIONS))
                if hasattr(kernel, "compile"):  # compile and load now, never during a graph capture
                    kernel.compile()
                _ = kernel.attributes  # loads the module on this device (older CuPy: compiles too)
                self._kernels[build] = kernel

    def _self_check(self, timeout_s: float) -> Optional[str]:
        """Reduces random tensors with NCCL and with the kernel (same order on every rank); the
        reason it failed, or None. Every rank runs all NCCL references first, so an early stop
        here can only make a peer's (timed) kernel give up, never a collective hang."""
        cases = []
        for dtype in _DTYPE_CODES:
            max_numel = self.max_bytes // dtype.itemsize
            cases += [(dtype, n) for n in (1, 7, 4096, 4099, 12345, max_numel - 3, max_numel)]
        cases = cases * 2  # twice with new data: a stale read of the last round shows
        gen = torch.Generator(device=self._device).manual_seed(1234 + self.rank)
        inputs, refs = [], []
        for dtype, numel in cases:
            x = torch.randn(numel, generator=gen, device=self._device).to(dtype)
            ref = x.clone()
            self.comm.nccl_all_reduce(ref)
            inputs.append(x)
            refs.append(ref)
        torch.cuda.synchronize(self._device)
        for (dtype, numel), x, ref in zip(cases, inputs, refs):
            try:
                self._launch(x, timeout_ns=SELF_CHECK_KERNEL_TIMEOUT_NS)
            except Exception as e:  # noqa: BLE001
                return f"kernel launch failed: {e!r}"
            self._wait_for_stream(timeout_s)
            if self._read_error():
                return f"a peer did not arrive within the kernel timeout ({dtype}, {numel} elements)"
            rtol, atol = _TOLERANCE[dtype]
            if not torch.allclose(x.float(), ref.float(), rtol=rtol, atol=atol * self.world_size):
                err = (x.float() - ref.float()).abs().max().item()
                return f"result differs from NCCL ({dtype}, {numel} elements, max abs err {err})"
        return None

    def _wait_for_stream(self, timeout_s: float) -> None:
        """Waits for the self-check's kernel; raises if it outlived its own in-kernel timeout
        (then the stream is stuck and no collective can work any more)."""
        done = torch.cuda.Event()
        done.record(torch.cuda.current_stream(self._device))
        deadline = time.monotonic() + timeout_s
        while not done.query():
            if time.monotonic() > deadline:
                raise RuntimeError(f"{type(self).__name__} self-check kernel hung; GPU stream blocked")
            time.sleep(0.0005)

    def _read_error(self) -> bool:
        runtime = self._cupy.cuda.runtime
        host = torch.zeros(1, dtype=torch.int32)
        with self._cupy.cuda.Device(self._device_index):
            runtime.memcpy(host.data_ptr(), self._base + _ERROR_BYTE_OFFSET, 4, runtime.memcpyDeviceToHost)
        return int(host.item()) != 0

    def _launch(self, tensor: torch.Tensor, timeout_ns: int) -> None:
        import numpy as np
        nbytes = tensor.numel() * tensor.element_size()
        args = (np.uint64(self._base), np.uint64(tensor.data_ptr()), np.int64(nbytes // 16),
                np.int64(tensor.numel()), np.int32(self.rank), np.int32(self.world_size),
                np.uint64(timeout_ns))
        self._run(tensor.dtype, grid_size(nbytes), args)

    def _run(self, build, grid: int, args: tuple, threads: int = THREADS) -> None:
        """Launches the kernel built for ``build`` (``_kernel_builds``: a dtype; the LL kernel's
        (dtype, threads, lines per thread)) on torch's current stream (graph-capturable)."""
        stream_ptr = torch.cuda.current_stream(self._device).cuda_stream
        with self._cupy.cuda.Device(self._device_index):
            stream = self._streams.get(stream_ptr)
            if stream is None:  # made on this device (CuPy ties a stream to the current device)
                stream = self._streams[stream_ptr] = self._cupy.cuda.ExternalStream(stream_ptr)
            with stream:
                self._kernels[build]((grid,), (threads,), args)

    def _disable(self, reason: str, collective: bool) -> None:
        self.disabled_reason = reason
        self.is_enabled = False
        log = logger.info if reason.startswith(DISABLE_ENV) else logger.warning
        log("custom all-reduce off, using NCCL (rank %d): %s", self.rank, reason)
        if collective:  # peers close their mappings of my buffer before I free it
            self._release(free=False)
            self._agree(True)
        self._release()

    def _release(self, free: bool = True) -> None:
        if self._cupy is None:
            return
        runtime = self._cupy.cuda.runtime
        with self._cupy.cuda.Device(self._device_index):
            runtime.deviceSynchronize()
            for q, ptr in list(self._peer_bases.items()):
                try:
                    self._unmap_peer(ptr)
                except Exception as e:  # noqa: BLE001 - closing is best effort
                    logger.warning("closing rank %d's IPC mapping failed: %r", q, e)
            self._peer_bases.clear()
            if free and self._base is not None:
                runtime.free(self._base)
                self._base = None
