// Small kernels with one GPU bug each, and their correct twins, for the emulator's own tests
// (tests/test_cuda_emulation.py): each of the emulator's checks and modes must catch its bug
// class on a kernel built for that purpose, not only on whatever the production kernels do.
//
// Op se_kernels_emu::planted(name) runs kernel `name` over a 4096-element float input (0, 1,
// 2, ...) and returns its float output (NaN where nothing was written). Shared memory starts
// as NaN, so a read of shared memory no thread wrote yet brings NaN into the output.
#define SE_KERNELS_CUDA_EMULATION
#include "emulator.h"

#include <ATen/core/Tensor.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/full.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <functional>
#include <limits>
#include <map>
#include <string>

#include "../../csrc/cuda/se_cuda_schedules.cuh"

namespace {

// The production launch path; planted kernels are in no plan's trace, so their code is moot.
template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), int64_t ctas, int threads, cudaStream_t stream,
            const Args&... args) {
  se_kernels::cuda::detail::launch(se_kernels::cuda::detail::TraceKernel::Map, kernel, ctas,
                                   threads, stream, args...);
}
constexpr int kThreads = se_kernels::cuda::detail::kThreads;
constexpr int64_t kElems = 4096;

// A warp sum by butterfly (every lane gets it) or by shifting down (lane 0 gets it); with
// `exit_early` lane 31 leaves before the full-mask shuffles.
__global__ void warp_sum(const float* in, float* out, bool exit_early, bool down) {
  const int t = threadIdx.x;
  float v = in[t];
  if (exit_early && t % 32 == 31) return;
  for (int offset = 16; offset > 0; offset /= 2)
    v += down ? __shfl_down_sync(0xffffffffu, v, offset) : __shfl_xor_sync(0xffffffffu, v, offset);
  out[t] = v;
}

// Lanes 0-15 shuffle among themselves but read lane (lane ^ 16), outside their mask.
__global__ void half_warp_reads_other_half(const float* in, float* out) {
  const int t = threadIdx.x;
  float v = in[t];
  if (t % 32 < 16) v = __shfl_xor_sync(0x0000ffffu, v, 16);
  out[t] = v;
}

// The first warp and the others meet at two different __syncthreads().
__global__ void divergent_barrier(const float* in, float* out) {
  const int t = threadIdx.x;
  if (t < 32) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[t] = in[t];
}

// Each thread reads its neighbour's shared slot; `barrier` says whether it waits for it.
__global__ void neighbour_read(const float* in, float* out, bool barrier) {
  SE_SHARED(float, slots, [kThreads]);
  const int t = threadIdx.x;
  slots[t] = in[t];
  if (barrier) __syncthreads();
  out[t] = slots[(t + 1) % kThreads];
}

// Every thread writes slot 0 before one barrier: a write-write race.
__global__ void racing_writes(const float* in, float* out) {
  SE_SHARED(float, slot, [1]);
  const int t = threadIdx.x;
  slot[0] = in[t];
  __syncthreads();
  out[t] = slot[0];
}

// Only CTA 0 fills shared memory; the others read what they never wrote.
__global__ void shared_from_another_cta(const float* in, float* out) {
  SE_SHARED(float, slots, [kThreads]);
  const int t = threadIdx.x;
  if (blockIdx.x == 0) slots[t] = in[t];
  __syncthreads();
  out[blockIdx.x * kThreads + t] = slots[t];
}

// One slot per thread plus one past the end.
__global__ void shared_overflow(const float* in, float* out) {
  SE_SHARED(float, slots, [kThreads]);
  const int t = threadIdx.x;
  slots[t + 1] = in[t];
  __syncthreads();
  out[t] = slots[t];
}

// 16-byte copies from `in + shift` elements; `shift` 1 is misaligned, `count` past the end
// runs out of the buffer.
__global__ void vector_copy(const float* in, float* out, int shift, int count) {
  const int t = threadIdx.x;
  if (t >= count) return;
  const uint4 v = __ldg(reinterpret_cast<const uint4*>(in + shift + 4 * t));
  __stwb(reinterpret_cast<uint4*>(out + 4 * t), v);
}

// Writes out with 16-byte stores, then reads a neighbour's pack of out back through __ldg.
__global__ void ldg_of_own_output(const float* in, float* out) {
  const int t = threadIdx.x;
  __stwb(reinterpret_cast<uint4*>(out + 4 * t), __ldg(reinterpret_cast<const uint4*>(in + 4 * t)));
  __syncthreads();
  const uint4 v = __ldg(reinterpret_cast<const uint4*>(out + 4 * ((t + 1) % kThreads)));
  __stwb(reinterpret_cast<uint4*>(out + 4 * (kThreads + t)), v);
}

// Every CTA sums its slice into partial[cta]; the last CTA to take a ticket adds the
// partials in CTA order into out[0] and resets the counter. `fence` publishes the partials
// before the ticket, as the memory model requires.
__global__ void last_cta_sum(const float* in, float* partial, unsigned* counter, float* out,
                             bool fence) {
  SE_SHARED(float, slots, [kThreads]);
  SE_SHARED(bool, last, [1]);
  const int t = threadIdx.x;
  slots[t] = in[blockIdx.x * kThreads + t];
  __syncthreads();
  if (t == 0) {
    float s = 0;
    for (int i = 0; i < kThreads; ++i) s += slots[i];
    partial[blockIdx.x] = s;
    if (fence) __threadfence();
    last[0] = atomicAdd(counter, 1u) == gridDim.x - 1;
  }
  __syncthreads();
  if (last[0] && t == 0) {
    float s = 0;
    for (unsigned b = 0; b < gridDim.x; ++b) s += partial[b];
    out[0] = s;
    *counter = 0;
  }
}

// Waits for a counter that no CTA advances: on a GPU, a hang.
__global__ void spin_forever(const unsigned* counter) {
  using se_kernels::cuda::detail::load_acquire, se_kernels::cuda::detail::spin_pause;
  if (threadIdx.x == 0)
    while (load_acquire(counter) < 1u) spin_pause();
  __syncthreads();
}

at::Tensor planted(const std::string& name) {
  const auto f32 = at::TensorOptions().dtype(at::kFloat);
  const at::Tensor in = at::arange(kElems, f32);
  at::Tensor out = at::full({kElems}, std::numeric_limits<float>::quiet_NaN(), f32);
  at::Tensor partial = at::full({kElems / kThreads}, std::numeric_limits<float>::quiet_NaN(), f32);
  at::Tensor counter = at::zeros({1}, at::TensorOptions().dtype(at::kInt));
  const float* x = in.const_data_ptr<float>();
  float* y = out.mutable_data_ptr<float>();
  auto* ticket = reinterpret_cast<unsigned*>(counter.mutable_data_ptr<int>());
  se_emu::clear_buffers();
  se_emu::add_buffer("in", x, kElems * 4);
  se_emu::add_buffer("out", y, kElems * 4);
  struct Clear {
    ~Clear() { se_emu::clear_buffers(); }
  } clear;
  const int64_t ctas = kElems / kThreads;
  float* part = partial.mutable_data_ptr<float>();
  const std::map<std::string, std::function<void()>> kernels = {
      {"spin_forever", [&] { launch(spin_forever, 2, kThreads, nullptr, ticket); }},
      {"warp_sum", [&] { launch(warp_sum, 1, kThreads, nullptr, x, y, false, false); }},
      {"warp_sum_down", [&] { launch(warp_sum, 1, kThreads, nullptr, x, y, false, true); }},
      {"warp_sum_lane_exits", [&] { launch(warp_sum, 1, kThreads, nullptr, x, y, true, false); }},
      {"half_warp_reads_other_half",
       [&] { launch(half_warp_reads_other_half, 1, kThreads, nullptr, x, y); }},
      {"divergent_barrier", [&] { launch(divergent_barrier, 1, kThreads, nullptr, x, y); }},
      {"neighbour_read", [&] { launch(neighbour_read, 1, kThreads, nullptr, x, y, true); }},
      {"neighbour_read_no_barrier",
       [&] { launch(neighbour_read, 1, kThreads, nullptr, x, y, false); }},
      {"racing_writes", [&] { launch(racing_writes, 1, kThreads, nullptr, x, y); }},
      {"shared_from_another_cta",
       [&] { launch(shared_from_another_cta, ctas, kThreads, nullptr, x, y); }},
      {"shared_overflow", [&] { launch(shared_overflow, 1, kThreads, nullptr, x, y); }},
      {"vector_copy", [&] { launch(vector_copy, 1, kThreads, nullptr, x, y, 0, kThreads); }},
      {"vector_copy_misaligned",
       [&] { launch(vector_copy, 1, kThreads, nullptr, x, y, 1, kThreads - 1); }},
      {"vector_copy_past_end",  // the last thread's pack starts at the end of `in`
       [&] {
         launch(vector_copy, 1, kThreads, nullptr, x + kElems - 4 * kThreads, y, 4, kThreads);
       }},
      {"ldg_of_own_output", [&] { launch(ldg_of_own_output, 1, kThreads, nullptr, x, y); }},
      {"too_many_threads",
       [&] { launch(warp_sum, 1, 2 * kThreads, nullptr, x, y, false, false); }},
      {"last_cta_sum",
       [&] { launch(last_cta_sum, ctas, kThreads, nullptr, x, part, ticket, y, true); }},
      {"last_cta_sum_no_fence",
       [&] { launch(last_cta_sum, ctas, kThreads, nullptr, x, part, ticket, y, false); }},
  };
  const auto kernel = kernels.find(name);
  TORCH_CHECK(kernel != kernels.end(), "emulator: no planted kernel named '", name, "'");
  kernel->second();
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(se_kernels_emu, m) {
  m.def("planted(str name) -> Tensor", &planted);
}
