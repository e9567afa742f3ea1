// Device properties, the vector width of a pass, and the one launch path every kernel
// takes, on the GPU and on the CPU emulator (tools/cuda_emulator), which replaces the
// shared-memory and synchronization hooks below.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>
#include <initializer_list>

#include "se_cuda_dtypes.cuh"

namespace se_kernels::cuda {
namespace detail {

// ---- device properties, queried once per device -------------------------------------

DeviceInfo current_device_info();  // se_forward.cu

// Vector width for tensors whose base pointers are `ptrs` and whose contiguous row is `row`
// long: 16-byte accesses when every pointer is 16-aligned (the tensors share one layout, so
// an element's offset from a 16-byte boundary is then the same in all of them) and, for
// channels-last (`row` = C), the row is a whole number of vectors; NCHW rows peel their
// unaligned ends, wherever in the tensor the row starts (walk_row).
template <typename T>
int pass_width(int64_t row, bool channels_last, std::initializer_list<const void*> ptrs) {
  constexpr int w = vector_width<T>();
  if (channels_last && row % w != 0) return 1;
  for (const void* p : ptrs)
    if (p != nullptr && reinterpret_cast<uintptr_t>(p) % 16 != 0) return 1;
  return w;
}

// ---- launching ----------------------------------------------------------------------

#ifndef SE_KERNELS_CUDA_EMULATION
// The CPU emulation in tools/cuda_emulator replaces these: it gives every CTA its own shared
// memory, leaves NaN gaps between the buffers of a workspace, and runs launches as host code.
#define SE_SHARED(T, name, dims) __shared__ T name dims
inline void workspace_region(const char*, const void*, int64_t) {}

// The value of a sync counter, ordered before this thread's later loads (acquire, GPU scope).
__device__ __forceinline__ unsigned load_acquire(const unsigned* p) {
  unsigned v;
  asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}
__device__ __forceinline__ void spin_pause() { __nanosleep(64); }
#endif

// kernel<<<ctas, threads, 0, stream>>>(args...), then the launch check. Every launch goes
// through here, on the GPU and on the emulator, which records `what` (the kernel's code in
// the trace encoding of se_trace.h) so tests can check launches against the plan.
template <typename... Params, typename... Args>
void launch(TraceKernel what, void (*kernel)(Params...), int64_t ctas, int threads,
            cudaStream_t stream, const Args&... args) {
  TORCH_INTERNAL_ASSERT(ctas > 0 && ctas <= INT_MAX && threads > 0 && threads <= kThreads);
#ifdef SE_KERNELS_CUDA_EMULATION
  (void)stream;
  emulated_launch(what, kernel, ctas, threads, args...);
#else
  (void)what;
  kernel<<<static_cast<unsigned>(ctas), threads, 0, stream>>>(args...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
#endif
}

}  // namespace detail
}  // namespace se_kernels::cuda
