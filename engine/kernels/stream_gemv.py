"""A persistent one-row GEMV that streams its weight through shared memory (Hopper, CUDA C).

At batch 1 every linear layer is one read of its weight, and between two GEMVs of a decode step
runs a small kernel (norm, attention, SiLU-and-mul, and at TP=2 the LL all-reduce, which mostly
waits for the peer) during which HBM idles. The Triton one-row GEMV (gemv.py) is launched as a
programmatic dependent, but it can load only what fits its registers before it waits
(stops 19-20: more preload cost registers and lost). This kernel takes the other road:

- one CTA per SM (persistent), CTA c owns a contiguous slab of whole rows of W (N, K), rows of
  W being contiguous in memory, so its slab is one contiguous byte range;
- the slab streams through a ring of ``stages`` shared-memory buffers of ``rows_per_chunk``
  rows each, filled by TMA bulk copies (``cp.async.bulk``, completion on an mbarrier per buffer);
- the first ``stages`` copies are issued BEFORE ``griddepcontrol.wait``: the weight never
  changes, so up to ~190 KB a CTA (~25 MB over 132 SMs, ~5.5 µs of HBM time on an H200) streams
  while the kernel before still runs; only x is read after the wait.

    y (N,) = W (N, K) @ x (K,)      bf16/fp16 in, fp32 sums, out in x's dtype

Work split inside a chunk: item = (row of the chunk, K segment); ``wpr`` warps share a row (each
a segment of K, so even one 28 KB row keeps 8 warps busy), warp w takes items w, w+8, ...; each
lane reads 16 bytes of the row and of x (from shared memory) per step, and the per-segment sums
land in shared memory, added up per row in segment order at the end (deterministic).
"""

from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass
from typing import Optional

import torch

from engine.distributed.custom_allreduce import DEVICE_PRELUDE
from engine.kernels import pdl

THREADS = 256
WARPS = THREADS // 32
MAX_STAGES = 8
STAGE_BYTES_BUDGET = 192 * 1024  # shared memory for the weight ring; x and the sums come on top
CHUNK_TARGET = 32 * 1024  # bytes a ring buffer aims at (whole rows)
MAX_SMEM = 227 * 1024  # an H100/H200 block's opt-in maximum

KERNEL_SOURCE = DEVICE_PRELUDE + r"""
#ifndef THREADS
#define THREADS 256
#endif
#define WARPS (THREADS / 32)
#define MAX_STAGES 8

__device__ __forceinline__ u32 smem_addr(const void* p) { return (u32)__cvta_generic_to_shared(p); }

__device__ __forceinline__ void mbar_init(u32 bar) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" :: "r"(bar) : "memory");
}
// one TMA bulk copy global -> shared of `bytes` (multiple of 16), completing on `bar`
__device__ __forceinline__ void bulk_load(u32 dst, const void* src, u32 bytes, u32 bar) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" :: "r"(bar), "r"(bytes) : "memory");
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
               :: "r"(dst), "l"(src), "r"(bytes), "r"(bar) : "memory");
}
__device__ __forceinline__ void mbar_wait(u32 bar, u32 phase) {
  asm volatile("{\n"
               ".reg .pred p;\n"
               "WAIT:\n"
               "mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n"
               "@!p bra WAIT;\n"
               "}\n" :: "r"(bar), "r"(phase) : "memory");
}
// 8 elements (16 bytes) as fp32 pairs, dot with 8 of x
__device__ __forceinline__ float dot8(uint4 w, uint4 x) {
#if KV_DTYPE == 0
  float s = 0.f;
  const u32 wv[4] = {w.x, w.y, w.z, w.w};
  const u32 xv[4] = {x.x, x.y, x.z, x.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    s = fmaf(__uint_as_float(wv[i] << 16), __uint_as_float(xv[i] << 16), s);
    s = fmaf(__uint_as_float(wv[i] & 0xffff0000u), __uint_as_float(xv[i] & 0xffff0000u), s);
  }
  return s;
#else
  float s = 0.f;
  const u32 wv[4] = {w.x, w.y, w.z, w.w};
  const u32 xv[4] = {x.x, x.y, x.z, x.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    s = fmaf(to_f32((elem_t)(wv[i] & 0xffffu)), to_f32((elem_t)(xv[i] & 0xffffu)), s);
    s = fmaf(to_f32((elem_t)(wv[i] >> 16)), to_f32((elem_t)(xv[i] >> 16)), s);
  }
  return s;
#endif
}

extern "C" __global__ void __launch_bounds__(THREADS, 2)
kvmesh_stream_gemv(u64 w_addr, u64 x_addr, u64 y_addr, int N, int K, int rows_per_chunk,
                   int stages, int wpr, int max_rows) {
  extern __shared__ __align__(128) unsigned char smem[];
  const int t = threadIdx.x, lane = t & 31, warp = t >> 5;
  const u64 row_bytes = (u64)K * sizeof(elem_t);
  const u32 chunk_bytes = (u32)(row_bytes * rows_per_chunk);
  // shared memory: [stages][chunk] weights | x (K) | sums (max_rows, wpr) fp32 | mbarriers
  unsigned char* ring = smem;
  elem_t* xs = (elem_t*)(smem + (u64)stages * chunk_bytes);
  float* sums = (float*)(xs + ((K + 7) & ~7));
  u64* bars = (u64*)((((u64)(sums + max_rows * wpr)) + 7) & ~7ull);

  // my rows: [r0, r0 + nrows), spread as evenly as N allows
  const int base = N / gridDim.x, rem = N % gridDim.x, c = blockIdx.x;
  const int r0 = c * base + min(c, rem);
  const int nrows = base + (c < rem ? 1 : 0);
  const int nchunks = (nrows + rows_per_chunk - 1) / rows_per_chunk;
  const unsigned char* slab = (const unsigned char*)w_addr + (u64)r0 * row_bytes;

  if (t == 0) {
    for (int s = 0; s < stages; ++s) mbar_init(smem_addr(&bars[s]));
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    // the weight never changes: the first `stages` chunks stream before the wait below
    for (int s = 0; s < stages && s < nchunks; ++s) {
      const int rows = min(rows_per_chunk, nrows - s * rows_per_chunk);
      bulk_load(smem_addr(ring + (u64)s * chunk_bytes), slab + (u64)s * chunk_bytes,
                (u32)(rows * row_bytes), smem_addr(&bars[s]));
    }
  }
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  // Launched as a programmatic dependent: wait for the kernel that writes x (a no-op otherwise),
  // then let the next kernel launch (it waits for this grid to end before reading y)
  asm volatile("griddepcontrol.wait;" ::: "memory");
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
  // x into shared memory, 16 bytes a thread per step (K % 8 == 0)
  for (int i = t; i < K / 8; i += THREADS) ((uint4*)xs)[i] = ((const uint4*)x_addr)[i];
  __syncthreads();  // x, and the barriers' init, seen by every thread

  const int seg = ((K / 8 + wpr - 1) / wpr) * 8;  // elements of K per segment (multiple of 8)
  for (int ch = 0; ch < nchunks; ++ch) {
    const int s = ch % stages;
    const int rows = min(rows_per_chunk, nrows - ch * rows_per_chunk);
    mbar_wait(smem_addr(&bars[s]), (u32)((ch / stages) & 1));
    const elem_t* wbuf = (const elem_t*)(ring + (u64)s * chunk_bytes);
    for (int item = warp; item < rows * wpr; item += WARPS) {
      const int r = item / wpr, sg = item % wpr;
      const int k_end = min(K, (sg + 1) * seg);
      const elem_t* wrow = wbuf + (u64)r * K;
      float acc = 0.f;
      for (int k = sg * seg + lane * 8; k < k_end; k += 256)
        acc += dot8(*(const uint4*)(wrow + k), *(const uint4*)(xs + k));
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
      if (lane == 0) sums[(ch * rows_per_chunk + r) * wpr + sg] = acc;
    }
    __syncthreads();  // every warp is done with buffer s
    if (t == 0 && ch + stages < nchunks) {
      const int nxt = ch + stages;
      const int nrow = min(rows_per_chunk, nrows - nxt * rows_per_chunk);
      bulk_load(smem_addr(ring + (u64)s * chunk_bytes), slab + (u64)nxt * chunk_bytes,
                (u32)(nrow * row_bytes), smem_addr(&bars[s]));
    }
  }
  // y: each row's segment sums in order
  for (int r = t; r < nrows; r += THREADS) {
    float v = 0.f;
    for (int sg = 0; sg < wpr; ++sg) v += sums[r * wpr + sg];
    ((elem_t*)y_addr)[r0 + r] = from_f32(v);
  }
}
"""


TILE_SOURCE = KERNEL_SOURCE + r"""
#ifndef LOADER
#define LOADER 0
#endif
// One CTA: `rows_per_cta` whole rows of W (one contiguous tile), copied into shared memory
// BEFORE griddepcontrol.wait (the weight never changes), so the first wave of CTAs on the SMs
// streams its tiles while the kernel before still runs; x is read after the wait. Warp w takes
// row w / wpr, K segment w % wpr.
extern "C" __global__ void __launch_bounds__(256)
kvmesh_tile_gemv(u64 w_addr, u64 x_addr, u64 y_addr, int N, int K, int rows_per_cta, int wpr) {
  extern __shared__ __align__(128) unsigned char smem[];
  const int t = threadIdx.x, lane = t & 31, warp = t >> 5, nthreads = blockDim.x;
  const int row0 = blockIdx.x * rows_per_cta;
  const int rows = min(rows_per_cta, N - row0);
  const u64 row_bytes = (u64)K * sizeof(elem_t);
  const u32 bytes = (u32)(rows * row_bytes);
  const unsigned char* src = (const unsigned char*)w_addr + (u64)row0 * row_bytes;
  float* part = (float*)(smem + (u64)rows_per_cta * row_bytes);  // (rows_per_cta, wpr)
#if LOADER == 0
  for (u32 off = (u32)t * 16u; off < bytes; off += (u32)nthreads * 16u)
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" :: "r"(smem_addr(smem + off)), "l"(src + off) : "memory");
  asm volatile("cp.async.commit_group;" ::: "memory");
#else
  u64* bar = (u64*)(part + rows_per_cta * wpr + 2);
  bar = (u64*)((((u64)bar) + 7) & ~7ull);
  if (t == 0) {
    mbar_init(smem_addr(bar));
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    bulk_load(smem_addr(smem), src, bytes, smem_addr(bar));
  }
#endif
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
#if LOADER == 0
  asm volatile("cp.async.wait_all;" ::: "memory");
  __syncthreads();
#else
  __syncthreads();  // the barrier's init
  mbar_wait(smem_addr(bar), 0u);
#endif
  const int r = warp / wpr, sg = warp % wpr;
  const int seg = ((K / 8 + wpr - 1) / wpr) * 8;
  float acc = 0.f;
  if (r < rows) {
    const elem_t* wrow = (const elem_t*)smem + (u64)r * K;
    const int k_end = min(K, (sg + 1) * seg);
#pragma unroll 4
    for (int k = sg * seg + lane * 8; k < k_end; k += 256)
      acc += dot8(*(const uint4*)(wrow + k), *(const uint4*)((const elem_t*)x_addr + k));
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
  }
  if (wpr == 1) {
    if (lane == 0 && r < rows) ((elem_t*)y_addr)[row0 + r] = from_f32(acc);
    return;
  }
  if (lane == 0) part[warp] = acc;
  __syncthreads();
  if (t < rows) {
    float v = 0.f;
    for (int s2 = 0; s2 < wpr; ++s2) v += part[t * wpr + s2];
    ((elem_t*)y_addr)[row0 + t] = from_f32(v);
  }
}
"""


@dataclass(frozen=True)
class TilePlan:
    """One CTA per ``rows_per_cta`` rows, ``wpr`` warps a row."""
    grid: int
    threads: int
    rows_per_cta: int
    wpr: int
    smem_bytes: int


def tile_plan(n: int, k: int, itemsize: int, tile_target: int = 32 * 1024, min_warps: int = 4) -> TilePlan:
    if k % 8:
        raise ValueError(f"tile GEMV needs K % 8 == 0, got K={k}")
    row_bytes = k * itemsize
    rows = max(1, min(8, tile_target // row_bytes))
    wpr = 1
    while rows * wpr < min_warps and k // (8 * wpr * 2) >= 32:
        wpr *= 2
    smem = rows * row_bytes + rows * wpr * 4 + 32
    return TilePlan(-(-n // rows), rows * wpr * 32, rows, wpr, smem)


class TileGemv:
    """``kvmesh_tile_gemv``: LOADER 0 cp.async (16 bytes a thread), 1 one TMA bulk copy."""

    def __init__(self, tile_target: int = 32 * 1024, loader: int = 0, min_warps: int = 4) -> None:
        self.tile_target, self.loader, self.min_warps = tile_target, loader, min_warps
        self._functions: dict = {}
        self._kernels: dict = {}
        self._plans: dict = {}

    def _function(self, device: torch.device, dtype: torch.dtype) -> int:
        key = (device.index or 0, dtype)
        if key not in self._functions:
            import cupy
            with cupy.cuda.Device(key[0]):
                kernel = cupy.RawKernel(TILE_SOURCE, "kvmesh_tile_gemv",
                                        options=(f"-DKV_DTYPE={_DTYPE_CODES[dtype]}", f"-DLOADER={self.loader}"))
                kernel.compile()
                kernel.max_dynamic_shared_size_bytes = MAX_SMEM
                self._kernels[key] = kernel
                self._functions[key] = int(kernel.kernel.ptr)
        return self._functions[key]

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        n, k = weight.shape
        if out is None:
            out = torch.empty(1, n, dtype=x.dtype, device=x.device)
        key = (n, k, weight.element_size())
        if key not in self._plans:
            self._plans[key] = tile_plan(n, k, weight.element_size(), self.tile_target, self.min_warps)
        p = self._plans[key]
        fn = self._function(x.device, x.dtype)
        args = [ctypes.c_uint64(weight.data_ptr()), ctypes.c_uint64(x.data_ptr()), ctypes.c_uint64(out.data_ptr()),
                ctypes.c_int32(n), ctypes.c_int32(k), ctypes.c_int32(p.rows_per_cta), ctypes.c_int32(p.wpr)]
        pdl.launch_dependent(fn, p.grid, p.threads, torch.cuda.current_stream(x.device).cuda_stream, args,
                             shared_bytes=p.smem_bytes)
        return out


DYN_SOURCE = KERNEL_SOURCE + r"""
// kvmesh_stream_gemv with chunks handed out at run time: CTA c streams chunks c, c + G, ...,
// c + (stages - 1) G before the wait (static, so they can go before anything is read), then
// takes tickets from a counter (atomicAdd) for the rest, so an SM that streams faster takes
// more chunks (a static split waits for the slowest SM). The last CTA to finish zeroes the
// counters; the next call takes tickets only after its wait, when this grid has ended.
extern "C" __global__ void __launch_bounds__(THREADS, 1)
kvmesh_stream_gemv_dyn(u64 w_addr, u64 x_addr, u64 y_addr, int N, int K, int rows_per_chunk,
                       int stages, int wpr, u64 counters) {
  extern __shared__ __align__(128) unsigned char smem[];
  const int t = threadIdx.x, lane = t & 31, warp = t >> 5;
  const int G = gridDim.x, c = blockIdx.x;
  const u64 row_bytes = (u64)K * sizeof(elem_t);
  const u32 chunk_bytes = (u32)(row_bytes * rows_per_chunk);
  const int nchunks = (N + rows_per_chunk - 1) / rows_per_chunk;
  // shared memory: [stages][chunk] weights | x (K) | sums (2, rows_per_chunk, wpr) | chunk ids | mbarriers
  unsigned char* ring = smem;
  elem_t* xs = (elem_t*)(smem + (u64)stages * chunk_bytes);
  float* part = (float*)(xs + ((K + 7) & ~7));
  int* chunk_of = (int*)(part + 2 * rows_per_chunk * wpr);
  u64* bars = (u64*)((((u64)(chunk_of + MAX_STAGES)) + 7) & ~7ull);
  u32* ctr = (u32*)counters;  // [0] tickets taken, [1] CTAs done

  auto issue = [&](int s, int id) {
    const int rows = min(rows_per_chunk, N - id * rows_per_chunk);
    bulk_load(smem_addr(ring + (u64)s * chunk_bytes), (const unsigned char*)w_addr + (u64)id * chunk_bytes,
              (u32)(rows * row_bytes), smem_addr(&bars[s]));
  };
  if (t == 0) {
    for (int s = 0; s < stages; ++s) mbar_init(smem_addr(&bars[s]));
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    for (int s = 0; s < stages; ++s) {
      const int id = c + s * G;
      chunk_of[s] = id < nchunks ? id : -1;
      if (id < nchunks) issue(s, id);
    }
  }
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
  u32 ticket = 0;
  if (t == 0) ticket = atomicAdd(ctr, 1u) + (u32)(stages * G);  // used one chunk later
  for (int i = t; i < K / 8; i += THREADS) ((uint4*)xs)[i] = ((const uint4*)x_addr)[i];
  __syncthreads();

  const int seg = ((K / 8 + wpr - 1) / wpr) * 8;
  for (int it = 0;; ++it) {
    const int s = it % stages;
    const int id = chunk_of[s];
    if (id < 0) break;  // stages drain in order: the first empty one ends the stream
    const int rows = min(rows_per_chunk, N - id * rows_per_chunk);
    mbar_wait(smem_addr(&bars[s]), (u32)((it / stages) & 1));
    const elem_t* wbuf = (const elem_t*)(ring + (u64)s * chunk_bytes);
    float* p = part + (it & 1) * rows_per_chunk * wpr;
    for (int item = warp; item < rows * wpr; item += WARPS) {
      const int r = item / wpr, sg = item % wpr;
      const int k_end = min(K, (sg + 1) * seg);
      const elem_t* wrow = wbuf + (u64)r * K;
      float acc = 0.f;
      for (int k = sg * seg + lane * 8; k < k_end; k += 256)
        acc += dot8(*(const uint4*)(wrow + k), *(const uint4*)(xs + k));
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
      if (lane == 0) p[item] = acc;
    }
    __syncthreads();  // buffer s read, sums in p
    if (t < rows) {
      float v = 0.f;
      for (int sg = 0; sg < wpr; ++sg) v += p[t * wpr + sg];
      ((elem_t*)y_addr)[(u64)id * rows_per_chunk + t] = from_f32(v);
    }
    if (t == 0) {
      if ((int)ticket < nchunks) {
        chunk_of[s] = (int)ticket;
        issue(s, (int)ticket);
        ticket = atomicAdd(ctr, 1u) + (u32)(stages * G);
      } else {
        chunk_of[s] = -1;
      }
    }
    __syncthreads();  // chunk_of[s] for the pass `stages` chunks on
  }
  if (t == 0) {
    __threadfence();
    if (atomicAdd(ctr + 1, 1u) == (u32)G - 1) {
      ctr[0] = 0u;
      ctr[1] = 0u;
    }
  }
}
"""


_DTYPE_CODES = {torch.bfloat16: 0, torch.float16: 1}


@dataclass(frozen=True)
class Plan:
    """How one weight shape streams: launch geometry and shared-memory layout."""
    grid: int
    rows_per_chunk: int
    stages: int
    wpr: int  # warps per row (K segments)
    max_rows: int  # rows of the CTA with the most
    smem_bytes: int


def plan(n: int, k: int, itemsize: int, sms: int, stage_budget: int = STAGE_BYTES_BUDGET,
         chunk_target: int = CHUNK_TARGET, warps: int = THREADS // 32, ctas_per_sm: int = 1) -> Plan:
    """The launch plan for W (n, k): ``ctas_per_sm`` CTAs per SM (fewer if there are fewer rows)."""
    if k % 8:
        raise ValueError(f"stream GEMV needs K % 8 == 0 (16-byte rows), got K={k}")
    row_bytes = k * itemsize
    if row_bytes > stage_budget:
        raise ValueError(f"a row of {row_bytes} bytes does not fit the {stage_budget}-byte ring")
    grid = min(sms * ctas_per_sm, n)
    max_rows = -(-n // grid)
    rows_per_chunk = max(1, min(max_rows, chunk_target // row_bytes))
    stages = max(1, min(MAX_STAGES, stage_budget // (rows_per_chunk * row_bytes), -(-max_rows // rows_per_chunk)))
    wpr = 1
    while rows_per_chunk * wpr < warps and k // (8 * wpr * 2) >= 32:  # segments of >= 256 elements
        wpr *= 2
    smem = stages * rows_per_chunk * row_bytes + ((k + 7) // 8) * 8 * itemsize + max_rows * wpr * 4
    smem = (smem + 7) // 8 * 8 + MAX_STAGES * 8
    if smem > MAX_SMEM:
        raise ValueError(f"stream GEMV plan for {n}x{k} needs {smem} bytes of shared memory")
    return Plan(grid, rows_per_chunk, stages, wpr, max_rows, smem)


class StreamGemv:
    """Compiles the kernel on first use (CuPy NVRTC, per dtype and device) and launches it;
    ``threads``, ``stage_budget`` (bytes of the weight ring a CTA) and ``chunk_target`` (bytes a
    ring buffer aims at) set the build and the plans."""

    def __init__(self, threads: int = THREADS, stage_budget: int = STAGE_BYTES_BUDGET,
                 chunk_target: int = CHUNK_TARGET, ctas_per_sm: int = 1) -> None:
        self.threads, self.stage_budget, self.chunk_target = threads, stage_budget, chunk_target
        self.ctas_per_sm = ctas_per_sm
        self._functions: dict[tuple[int, torch.dtype], int] = {}
        self._kernels: dict = {}
        self._plans: dict[tuple[int, int, int, int], Plan] = {}

    def _function(self, device: torch.device, dtype: torch.dtype, smem: int) -> int:
        key = (device.index or 0, dtype)
        if key not in self._functions:
            import cupy
            with cupy.cuda.Device(key[0]):
                kernel = cupy.RawKernel(KERNEL_SOURCE, "kvmesh_stream_gemv",
                                        options=(f"-DKV_DTYPE={_DTYPE_CODES[dtype]}", f"-DTHREADS={self.threads}"))
                kernel.compile()
                kernel.max_dynamic_shared_size_bytes = MAX_SMEM
                self._kernels[key] = kernel
                self._functions[key] = int(kernel.kernel.ptr)
        return self._functions[key]

    def plan_for(self, weight: torch.Tensor) -> Plan:
        n, k = weight.shape
        key = (n, k, weight.element_size(), weight.device.index or 0)
        if key not in self._plans:
            self._plans[key] = plan(n, k, weight.element_size(), _sm_count(key[3]), self.stage_budget,
                                   self.chunk_target, self.threads // 32, self.ctas_per_sm)
        return self._plans[key]

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x (1, K) or (K,), weight (N, K) contiguous, same 2-byte dtype, on an sm_90+ GPU -> (1, N)."""
        n, k = weight.shape
        if weight.dtype not in _DTYPE_CODES or x.dtype != weight.dtype or x.numel() != k:
            raise ValueError(f"stream GEMV takes one {k}-wide bf16/fp16 row and a matching weight, "
                             f"got x {tuple(x.shape)} {x.dtype}, weight {tuple(weight.shape)} {weight.dtype}")
        if not weight.is_contiguous() or weight.data_ptr() % 16 or x.data_ptr() % 16:
            raise ValueError("stream GEMV needs a contiguous weight and 16-byte aligned pointers")
        x = x.contiguous()
        if out is None:
            out = torch.empty(1, n, dtype=x.dtype, device=x.device)
        p = self.plan_for(weight)
        fn = self._function(x.device, x.dtype, p.smem_bytes)
        args = [ctypes.c_uint64(weight.data_ptr()), ctypes.c_uint64(x.data_ptr()), ctypes.c_uint64(out.data_ptr()),
                ctypes.c_int32(n), ctypes.c_int32(k), ctypes.c_int32(p.rows_per_chunk),
                ctypes.c_int32(p.stages), ctypes.c_int32(p.wpr), ctypes.c_int32(p.max_rows)]
        pdl.launch_dependent(fn, p.grid, self.threads, torch.cuda.current_stream(x.device).cuda_stream, args,
                             shared_bytes=p.smem_bytes)
        return out


class StreamGemvDyn(StreamGemv):
    """``kvmesh_stream_gemv_dyn``: StreamGemv's plan, chunks handed out at run time."""

    def _function(self, device: torch.device, dtype: torch.dtype, smem: int) -> int:
        key = (device.index or 0, dtype)
        if key not in self._functions:
            import cupy
            with cupy.cuda.Device(key[0]):
                kernel = cupy.RawKernel(DYN_SOURCE, "kvmesh_stream_gemv_dyn",
                                        options=(f"-DKV_DTYPE={_DTYPE_CODES[dtype]}", f"-DTHREADS={self.threads}",
                                                 "-std=c++17"))
                kernel.compile()
                kernel.max_dynamic_shared_size_bytes = MAX_SMEM
                self._kernels[key] = kernel
                self._functions[key] = int(kernel.kernel.ptr)
                self._counters = torch.zeros(2, dtype=torch.int32, device=device)
        return self._functions[key]

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        n, k = weight.shape
        if out is None:
            out = torch.empty(1, n, dtype=x.dtype, device=x.device)
        p = self.plan_for(weight)
        fn = self._function(x.device, x.dtype, p.smem_bytes)
        smem = p.stages * p.rows_per_chunk * k * 2 + ((k + 7) // 8) * 16 + 2 * p.rows_per_chunk * p.wpr * 4 + 8 * 4 + 8 + 8 * MAX_STAGES
        args = [ctypes.c_uint64(weight.data_ptr()), ctypes.c_uint64(x.data_ptr()), ctypes.c_uint64(out.data_ptr()),
                ctypes.c_int32(n), ctypes.c_int32(k), ctypes.c_int32(p.rows_per_chunk),
                ctypes.c_int32(p.stages), ctypes.c_int32(p.wpr), ctypes.c_uint64(self._counters.data_ptr())]
        pdl.launch_dependent(fn, p.grid, self.threads, torch.cuda.current_stream(x.device).cuda_stream, args,
                             shared_bytes=smem)
        return out



@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


STREAM_GEMV = StreamGemv()
