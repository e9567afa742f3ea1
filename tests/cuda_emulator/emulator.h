// Runs the CUDA kernels of csrc/cuda/ as host code, to check their indexing, reductions and
// schedules on a machine without a GPU. Force-included (g++ -include) before the kernels'
// sources, compiled as C++ with -DSE_KERNELS_CUDA_EMULATION.
//
// Each CTA runs its threads as fibers (ucontext) on one OS thread, round-robin from one
// barrier to the next: __syncthreads() and every warp shuffle are block-wide barriers here,
// which is exact for kernels in which all threads of a CTA reach the same barriers (the
// scheduler checks that and fails otherwise). __shared__ becomes `static`: CTAs run one at a
// time. What this cannot show: timing, memory-model races, and anything of the real
// hardware (tests/test_cuda.py and compute-sanitizer check those on a GPU).
#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <ucontext.h>

#include <math.h>  // the kernels call expf, exp, isnan unqualified, as device code does

#include <cstdint>
#include <cstring>
#include <tuple>
#include <utility>
#include <vector>

#undef __global__
#define __global__
#undef __device__
#define __device__
#undef __host__
#define __host__
#undef __launch_bounds__
#define __launch_bounds__(...)
#undef __shared__
#define __shared__ static

namespace se_emu {

struct Thread {
  ucontext_t context;
  std::vector<char> stack;
  uint3 index;
  bool done = false;
  int64_t barriers = 0;
};

struct BlockState {
  ucontext_t scheduler;
  std::vector<Thread> threads;
  int current = 0;
  void (*body)(void*) = nullptr;
  void* body_arg = nullptr;
  double lanes[1024];  // shuffle exchange, one slot per thread
};
inline BlockState block;
inline uint3 block_index;
inline dim3 block_dim;

inline void barrier() {
  Thread& t = block.threads[block.current];
  ++t.barriers;
  swapcontext(&t.context, &block.scheduler);
}

inline void thread_entry() {
  block.body(block.body_arg);
  block.threads[block.current].done = true;
  // returning resumes uc_link: the scheduler
}

// Runs body(arg) as `threads` fibers; fails if the threads reach different barriers.
inline void run_block(int threads, void (*body)(void*), void* arg) {
  constexpr size_t kStack = 256 * 1024;
  block.threads.resize(threads);
  block.body = body;
  block.body_arg = arg;
  for (int i = 0; i < threads; ++i) {
    Thread& t = block.threads[i];
    t.stack.resize(kStack);
    t.index = make_uint3(static_cast<unsigned>(i), 0, 0);
    t.done = false;
    t.barriers = 0;
    getcontext(&t.context);
    t.context.uc_stack.ss_sp = t.stack.data();
    t.context.uc_stack.ss_size = kStack;
    t.context.uc_link = &block.scheduler;
    makecontext(&t.context, thread_entry, 0);
  }
  while (true) {
    bool any_live = false;
    int64_t arrived = -1;
    for (int i = 0; i < threads; ++i) {
      Thread& t = block.threads[i];
      if (t.done) continue;
      block.current = i;
      swapcontext(&block.scheduler, &t.context);
      if (t.done) continue;
      any_live = true;
      TORCH_CHECK(arrived < 0 || arrived == t.barriers,
                  "emulator: threads of a CTA reached different barriers (block ",
                  block_index.x, ", thread ", i, ")");
      arrived = t.barriers;
    }
    if (!any_live) break;
    // Threads that finished while others wait at a barrier would hang a real GPU only if
    // the barrier counts them; CUDA does not, so neither does this loop.
  }
}

template <typename V>
V shfl_xor(V value, int offset) {
  static_assert(sizeof(V) <= sizeof(double));
  const int me = block.current;
  block.lanes[me] = static_cast<double>(value);  // float and double round-trip exactly
  barrier();
  const int lane = me % 32;
  const V other = static_cast<V>(block.lanes[me - lane + (lane ^ offset)]);
  barrier();  // nobody overwrites a slot before every thread has read its partner
  return other;
}

}  // namespace se_emu

#define threadIdx (::se_emu::block.threads[::se_emu::block.current].index)
#define blockIdx (::se_emu::block_index)
#define blockDim (::se_emu::block_dim)

inline void __syncthreads() { se_emu::barrier(); }
template <typename V>
V __shfl_xor_sync(unsigned, V value, int offset) { return se_emu::shfl_xor(value, offset); }
inline uint4 __ldg(const uint4* p) { return *p; }
inline void __stwb(uint4* p, uint4 v) { *p = v; }

namespace se_kernels::cuda::detail {

// Runs kernel(args...) for every CTA of the grid, one after another.
template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), int64_t ctas, int threads, cudaStream_t,
            const Args&... args) {
  TORCH_INTERNAL_ASSERT(ctas > 0 && ctas <= INT32_MAX && threads > 0 && threads <= 1024);
  struct Call {
    void (*kernel)(Params...);
    std::tuple<Params...> params;
  } call{kernel, std::tuple<Params...>(args...)};
  auto body = [](void* p) {
    auto* c = static_cast<Call*>(p);
    std::apply(c->kernel, c->params);
  };
  se_emu::block_dim = dim3(threads, 1, 1);
  for (int64_t b = 0; b < ctas; ++b) {
    se_emu::block_index = make_uint3(static_cast<unsigned>(b), 0, 0);
    se_emu::run_block(threads, body, &call);
  }
}

}  // namespace se_kernels::cuda::detail
