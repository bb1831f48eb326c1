"""The LL all-reduce's CUDA C source (compiled by CuPy's NVRTC, one build per dtype and
(threads, lines per thread)): the protocol, the buffer layout and the host side are in
engine/distributed/ll_allreduce.py, which launches it.

Compile-time knobs (``LLAllReduce.KERNEL_OPTIONS`` and ``_kernel_builds``): ``KV_DTYPE``,
``THREADS`` and ``LPT`` per build; ``LL_TRIGGER_AFTER_WAIT`` (``KVMESH_LL_TRIGGER=wait``),
``LL_STAMPS`` (``KVMESH_LL_STAMPS=1``), ``LL_STORE_RELAXED`` (``KVMESH_LL_RELAXED_STORES=1``).
"""

from __future__ import annotations

from engine.distributed.custom_allreduce_kernel import DEVICE_PRELUDE

KERNEL_SOURCE = DEVICE_PRELUDE + r"""
#ifndef LL_TRIGGER_AFTER_WAIT
#define LL_TRIGGER_AFTER_WAIT 0
#endif
#ifndef LL_STAMPS
#define LL_STAMPS 0
#endif
#define STAMP_SLOTS 4096
#define MAX_ROWS 64
#ifndef THREADS
#define THREADS 512
#endif
#define MAX_LPT 8
// Lines per thread this build holds (<= MAX_LPT), with THREADS threads: one build per entry of
// BUILDS, so a 4096-wide bf16 row (1024 lines, 512 x 2) keeps few registers
#ifndef LPT
#define LPT MAX_LPT
#endif
#define ROUND_OFF 0
#define DONE_OFF 1
#define ERROR_OFF 612
#define TABLE_OFFSET 4096

#define EPL (8 / sizeof(elem_t))  // elements per line
union line_t { uint2 u; elem_t e[EPL]; };

#ifndef LL_STORE_RELAXED
#define LL_STORE_RELAXED 0
#endif
__device__ __forceinline__ void st_line(uint4* p, uint2 d, u32 flag) {
#if LL_STORE_RELAXED
  // KVMESH_LL_RELAXED_STORES=1: a relaxed system-scope store, still morally strong for the
  // peer's polling loads; the loopback harness suggests a thread's volatile stores go one
  // after another (stop 20), which a relaxed one need not
  asm volatile("st.relaxed.sys.global.v4.u32 [%0], {%1, %2, %3, %4};"
               :: "l"(p), "r"(d.x), "r"(flag), "r"(d.y), "r"(flag) : "memory");
#else
  asm volatile("st.volatile.global.v4.u32 [%0], {%1, %2, %3, %4};"
               :: "l"(p), "r"(d.x), "r"(flag), "r"(d.y), "r"(flag) : "memory");
#endif
}
__device__ __forceinline__ uint4 ld_line(const uint4* p) {
  uint4 v;
  asm volatile("ld.volatile.global.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p) : "memory");
  return v;
}

extern "C" __global__ void __launch_bounds__(THREADS)
kvmesh_ll_all_reduce(u64 self_base, u64 x_addr, u64 residual_addr, u64 weight_addr, u64 out_addr,
                     u64 residual_out_addr, int lines_per_row, int hidden, long long max_lines,
                     float eps, int mode, int rank, int world, u64 timeout_ns, int pushed) {
#if LL_STAMPS
  const u64 t_start = now_ns();
#endif
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900 && !LL_TRIGGER_AFTER_WAIT
  // The kernel after this one may start now if it was launched as a programmatic dependent
  // (the one-row GEMVs: gemv.py, KVMESH_PDL): it loads its first weight tile while this call
  // waits for the peers, and waits for this grid to end before it reads anything of ours.
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
  const int t = threadIdx.x;
  // The norm weight never changes: loaded before the wait below
  line_t wgt[LPT];
#pragma unroll
  for (int k = 0; k < LPT; ++k) {
    const int line = t + k * THREADS;
    if (mode != 0 && line < lines_per_row) wgt[k].u = ((const uint2*)weight_addr)[line];
  }
  // pushed: 0, this call pushes my partial sums itself; 1, the GEMV before (gemv_row_push)
  // pushed them to the peers and x holds them; 2 (no-wait), that GEMV pushed them to every
  // rank, me included, as flagged lines, and wrote nothing else: this call reads what it
  // wrote through the flags alone, so it never waits for that GEMV to END, an end that waits
  // for the GEMV's NVLink stores to be acknowledged. One row only (one CTA). The residual, the
  // round and the norm weight were written before that GEMV started: kernels before it ended
  // before it let this one launch (it waits, then lets dependents launch).
  const bool no_wait = pushed >= 2;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  // Launched as a programmatic dependent itself (engine/kernels/pdl.py: launch_dependent), this
  // call may start while the kernel that wrote x (the row-parallel GEMV) still runs: wait for
  // that kernel to end before reading x, the residual or the round. A no-op otherwise.
  if (!no_wait) asm volatile("griddepcontrol.wait;" ::: "memory");
#if LL_TRIGGER_AFTER_WAIT
  // KVMESH_LL_TRIGGER=wait: the next GEMV's programs get on the SMs only now, once the GEMV
  // before has ended, so what they load before they wait streams while this call waits for
  // the peers instead of beside that GEMV's last programs
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
#endif
#if LL_STAMPS
  const u64 t_waited = now_ns();
#endif
  u32* sig = (u32*)self_base;
  const u64* areas = (const u64*)(self_base + TABLE_OFFSET);
  const int row = blockIdx.x;
  __shared__ u32 s_round;
  __shared__ float s_sum[THREADS / 32];
  const long long row_line0 = (long long)row * lines_per_row;
  // 1. what does not come from the peers, loaded at once so the latencies overlap each other
  //    and the round's read: my partial sums and, for the norm, the residual
  line_t mine[LPT], res[LPT];
#pragma unroll
  for (int k = 0; k < LPT; ++k) {
    const int line = t + k * THREADS;
    if (line < lines_per_row) {
      if (!no_wait) mine[k].u = ((const uint2*)x_addr)[row_line0 + line];
      if (mode == 1) res[k].u = ((const uint2*)residual_addr)[row_line0 + line];
    }
  }
  if (t == 0) s_round = ((volatile u32*)sig)[ROUND_OFF] + 1u;
  __syncthreads();
  const u32 round = s_round;
  // One CTA (a decode row): it has read the round, so it advances it now, with no end-of-call
  // counter. The next call reads it after this kernel ended (stream order), so no fence either.
  // No-wait: only once every line is in (below), as the GEMV's programs read the round word
  // while this call may already run; each has read it before it stored its lines.
  if (gridDim.x == 1 && t == 0 && !no_wait) sig[ROUND_OFF] = round;
  const long long parity = round & 1u;

  // 2. push them into every peer's slot (parity, me, row, line), unless the GEMV that made
  //    them already did (gemv.gemv_row_push: "pushed")
  for (int q = 0; q < world && !pushed; ++q) {
    if (q == rank) continue;
    uint4* dst = (uint4*)areas[q] + (parity * world + rank) * max_lines + row_line0;
#pragma unroll
    for (int k = 0; k < LPT; ++k) {
      const int line = t + k * THREADS;
      if (line < lines_per_row) st_line(dst + line, mine[k].u, round);
    }
  }
  // 3. sum in rank order
  float acc[LPT][EPL];
  const u64 start = timeout_ns ? now_ns() : 0;
  for (int q = 0; q < world; ++q) {
    const uint4* src = (const uint4*)areas[rank] + (parity * world + q) * max_lines + row_line0;
#pragma unroll
    for (int k = 0; k < LPT; ++k) {
      const int line = t + k * THREADS;
      if (line >= lines_per_row) continue;
      line_t p;
      if (q == rank && !no_wait) {
        p = mine[k];
      } else {
        uint4 v = ld_line(src + line);
        while (v.y != round || v.w != round) {
          if (timeout_ns && now_ns() - start > timeout_ns) {
            *(volatile u32*)(sig + ERROR_OFF) = 1u;
            break;
          }
          v = ld_line(src + line);
        }
        p.u.x = v.x;
        p.u.y = v.z;
      }
#pragma unroll
      for (int j = 0; j < (int)EPL; ++j) acc[k][j] = (q == 0) ? to_f32(p.e[j]) : acc[k][j] + to_f32(p.e[j]);
    }
  }
  if (no_wait) {
    __syncthreads();  // every line is in: every program of the GEMV has read the round word
    if (t == 0) sig[ROUND_OFF] = round;
  }
#if LL_STAMPS
  __syncthreads();  // every thread has its peers' lines
  const u64 t_in = now_ns();
#endif
  // 4. write the sums, or add the residual and normalize the row
  if (mode == 0) {
#pragma unroll
    for (int k = 0; k < LPT; ++k) {
      const int line = t + k * THREADS;
      if (line >= lines_per_row) continue;
      line_t o;
#pragma unroll
      for (int j = 0; j < (int)EPL; ++j) o.e[j] = from_f32(acc[k][j]);
      ((uint2*)out_addr)[row_line0 + line] = o.u;
    }
  } else {
    float ss = 0.0f;
#pragma unroll
    for (int k = 0; k < LPT; ++k) {
      const int line = t + k * THREADS;
      if (line >= lines_per_row) continue;
      line_t o;
#pragma unroll
      for (int j = 0; j < (int)EPL; ++j) {
        float v = round_f32(acc[k][j]);  // what a separate all-reduce would have stored
        if (mode == 1) v = round_f32(v + to_f32(res[k].e[j]));  // what rms_norm's residual add stores
        acc[k][j] = v;
        o.e[j] = from_f32(v);
        ss += v * v;
      }
      ((uint2*)residual_out_addr)[row_line0 + line] = o.u;
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, off);
    if ((t & 31) == 0) s_sum[t >> 5] = ss;
    __syncthreads();
    if (t < 32) {
      float v = (t < THREADS / 32) ? s_sum[t] : 0.0f;
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
      if (t == 0) s_sum[0] = v;
    }
    __syncthreads();
    const float inv_rms = rsqrtf(s_sum[0] / (float)hidden + eps);
#pragma unroll
    for (int k = 0; k < LPT; ++k) {
      const int line = t + k * THREADS;
      if (line >= lines_per_row) continue;
      line_t o;
#pragma unroll
      for (int j = 0; j < (int)EPL; ++j)
        o.e[j] = from_f32(to_f32(wgt[k].e[j]) * round_f32(acc[k][j] * inv_rms));
      ((uint2*)out_addr)[row_line0 + line] = o.u;
    }
  }
#if LL_STAMPS
  if (row == 0 && t == 0) {  // slot (round % STAMP_SLOTS), past the two parities' receive areas
    u64* stamp = (u64*)(areas[rank] + 2ull * world * max_lines * 16) + (u64)(round % STAMP_SLOTS) * 4;
    stamp[0] = t_start;
    stamp[1] = t_waited;
    stamp[2] = t_in;
    stamp[3] = now_ns();
  }
#endif
  if (gridDim.x > 1) {  // the last CTA to finish advances the round for the next call
    __syncthreads();
    if (t == 0 && atomicAdd(sig + DONE_OFF, 1u) == gridDim.x - 1) {
      sig[DONE_OFF] = 0u;
      sig[ROUND_OFF] = round;
    }
  }
}
"""
