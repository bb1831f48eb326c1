"""The one-shot IPC all-reduce's CUDA C source (engine/distributed/custom_allreduce.py compiles
it with CuPy's NVRTC, per dtype: ``-DKV_DTYPE=<0|1|2>``), and the device prelude it shares with
the LL all-reduce's kernel (engine/distributed/ll_kernel.py). The flag and table layout it
assumes is described, and sized, in custom_allreduce.py.
"""

# Shared with ll_allreduce.py's kernel: the integer types, the element type of KV_DTYPE with its
# fp32 conversions, and the global timer.
DEVICE_PRELUDE = r"""
// KV_DTYPE: 0 bfloat16, 1 float16, 2 float32 (set with -D). No headers: NVRTC built-ins only.
typedef unsigned int u32;
typedef unsigned long long u64;

#if KV_DTYPE == 2
typedef float elem_t;
__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float from_f32(float x) { return x; }
#else
typedef unsigned short elem_t;
__device__ __forceinline__ float to_f32(unsigned short h) {
#if KV_DTYPE == 0
  return __uint_as_float(((u32)h) << 16);
#else
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
  return f;
#endif
}
__device__ __forceinline__ unsigned short from_f32(float f) {
  unsigned short h;
#if KV_DTYPE == 0
  asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(f));
#else
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
#endif
  return h;
}
#endif
// x rounded to the element type and back (the identity for fp32)
__device__ __forceinline__ float round_f32(float x) { return to_f32(from_f32(x)); }
__device__ __forceinline__ u64 now_ns() {
  u64 t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}
"""

KERNEL_SOURCE = DEVICE_PRELUDE + r"""
#define MAX_RANKS 8
#define MAX_BLOCKS 36
#define START_OFF 0
#define END_OFF (MAX_BLOCKS * MAX_RANKS)
#define ROUND_OFF (2 * MAX_BLOCKS * MAX_RANKS)
#define ERROR_OFF (ROUND_OFF + MAX_BLOCKS)
#define TABLE_OFFSET 4096

#define EPP (16 / sizeof(elem_t))  // elements per 16-byte pack
union pack_t { uint4 v; elem_t e[EPP]; };

__device__ __forceinline__ void st_release_sys(u32* p, u32 v) {
  asm volatile("st.release.sys.global.u32 [%0], %1;" :: "l"(p), "r"(v) : "memory");
}
__device__ __forceinline__ u32 ld_acquire_sys(const u32* p) {
  u32 v;
  asm volatile("ld.acquire.sys.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}
__device__ __forceinline__ uint4 ld_volatile_pack(const void* p) {
  uint4 v;
  asm volatile("ld.volatile.global.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p) : "memory");
  return v;
}
// Spins until *flag reaches round (wrap-safe compare). timeout_ns == 0: no limit.
__device__ void wait_flag(const u32* flag, u32 round, u64 timeout_ns, u32* error) {
  const u64 start = timeout_ns ? now_ns() : 0;
  while ((int)(ld_acquire_sys(flag) - round) < 0) {
    if (timeout_ns && now_ns() - start > timeout_ns) {
      *(volatile u32*)error = 1u;
      break;
    }
  }
}

extern "C" __global__ void __launch_bounds__(512)
kvmesh_custom_all_reduce(u64 self_base, u64 io_addr, long long num_packs, long long numel,
                         int rank, int world, u64 timeout_ns) {
  u32* self_sig = (u32*)self_base;
  const u64* data_ptrs = (const u64*)(self_base + TABLE_OFFSET);
  const u64* base_ptrs = data_ptrs + MAX_RANKS;
  char* my_data = (char*)data_ptrs[rank];
  char* io = (char*)io_addr;
  u32* error = self_sig + ERROR_OFF;
  const int b = blockIdx.x;
  const int t = threadIdx.x;
  const long long stride = (long long)gridDim.x * blockDim.x;
  const bool io_aligned = (io_addr & 15ull) == 0;
  const long long tail_start = num_packs * (long long)EPP;
  __shared__ u32 s_round;
  if (t == 0) s_round = self_sig[ROUND_OFF + b] + 1u;

  // 1. my input -> my staging area (pack i and the tail are always handled by the same thread)
  for (long long i = (long long)b * blockDim.x + t; i < num_packs; i += stride) {
    pack_t p;
    if (io_aligned) {
      p.v = *(const uint4*)(io + i * 16);
    } else {
      for (int j = 0; j < (int)EPP; ++j) p.e[j] = ((const elem_t*)io)[i * EPP + j];
    }
    *(uint4*)(my_data + i * 16) = p.v;
  }
  if (b == 0) {
    for (long long k = tail_start + t; k < numel; k += blockDim.x)
      ((elem_t*)my_data)[k] = ((const elem_t*)io)[k];
  }
  __syncthreads();
  const u32 round = s_round;

  // 2. start barrier: my part b is staged; wait for every peer's
  if (t < world) {
    __threadfence_system();
    st_release_sys((u32*)base_ptrs[t] + START_OFF + b * MAX_RANKS + rank, round);
    wait_flag(self_sig + START_OFF + b * MAX_RANKS + t, round, timeout_ns, error);
  }
  __syncthreads();

  // 3. sum in fp32 in rank order, write in place
  for (long long i = (long long)b * blockDim.x + t; i < num_packs; i += stride) {
    float acc[EPP];
    for (int q = 0; q < world; ++q) {
      pack_t p;
      p.v = ld_volatile_pack((const char*)data_ptrs[q] + i * 16);
      for (int j = 0; j < (int)EPP; ++j) acc[j] = (q == 0) ? to_f32(p.e[j]) : acc[j] + to_f32(p.e[j]);
    }
    pack_t out;
    for (int j = 0; j < (int)EPP; ++j) out.e[j] = from_f32(acc[j]);
    if (io_aligned) {
      *(uint4*)(io + i * 16) = out.v;
    } else {
      for (int j = 0; j < (int)EPP; ++j) ((elem_t*)io)[i * EPP + j] = out.e[j];
    }
  }
  if (b == 0) {
    for (long long k = tail_start + t; k < numel; k += blockDim.x) {
      float acc = 0.0f;
      for (int q = 0; q < world; ++q) {
        const float v = to_f32(((volatile const elem_t*)data_ptrs[q])[k]);
        acc = (q == 0) ? v : acc + v;
      }
      ((elem_t*)io)[k] = from_f32(acc);
    }
  }
  __syncthreads();

  // 4. end barrier: nobody reads part b of my staging area any more
  if (t < world) {
    st_release_sys((u32*)base_ptrs[t] + END_OFF + b * MAX_RANKS + rank, round);
    wait_flag(self_sig + END_OFF + b * MAX_RANKS + t, round, timeout_ns, error);
  }
  if (t == 0) self_sig[ROUND_OFF + b] = round;
}
"""
