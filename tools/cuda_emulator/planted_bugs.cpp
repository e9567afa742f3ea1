// Small kernels with one GPU bug each, and their correct twins: the emulator's own tests
// (tests/test_cuda_emulator_checks.py). Each check of emulator.h must catch its bug class on
// a kernel built for that purpose, not only on whatever the production kernels do; each
// twin, the same pattern without the bug, must pass in every mode (the checks fire on the
// bugs, not on the patterns). README.md lists which kernel demonstrates which check.
//
// Op cuda_emulator::planted(name) runs kernel `name` over a 4096-element float input (0, 1,
// 2, ...), registered as buffer "in", and returns its float output, registered as "out"
// (NaN where nothing was written). Shared memory starts as NaN, so a read of shared memory
// no thread wrote yet brings NaN into the output. Only emulator.h is needed: these build
// without the kernels of csrc/cuda.
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
#include <vector>

namespace {

using se_emu::launch;
constexpr int kThreads = 256;
constexpr int64_t kElems = 4096;

// ---- shuffles and launch sizes --------------------------------------------------------

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

// Lanes 0-15 shuffle among themselves (mask 0xffff) and read lane (lane ^ lane_mask): with
// 16, a lane of the other half, outside the mask; with 8, their own half.
__global__ void half_warp_shuffle(const float* in, float* out, int lane_mask) {
  const int t = threadIdx.x;
  float v = in[t];
  if (t % 32 < 16) v = __shfl_xor_sync(0x0000ffffu, v, lane_mask);
  out[t] = v;
}

// Every lane calls a shuffle whose mask holds lanes 0-15 only.
__global__ void shuffle_outside_own_mask(const float* in, float* out) {
  const int t = threadIdx.x;
  out[t] = in[t] + __shfl_xor_sync(0x0000ffffu, in[t], 1);
}

// The two halves of every warp call two different full-mask shuffles.
__global__ void divergent_shuffles(const float* in, float* out) {
  const int t = threadIdx.x;
  float v = in[t];
  if (t % 32 < 16)
    v += __shfl_xor_sync(0xffffffffu, v, 1);
  else
    v += __shfl_xor_sync(0xffffffffu, v, 2);
  out[t] = v;
}

// Lane 31 of every warp waits at a barrier while the other lanes shuffle with it (`bug`);
// the twin puts the barrier after the shuffle, for every lane.
__global__ void shuffle_with_lane_at_barrier(const float* in, float* out, bool bug) {
  const int t = threadIdx.x;
  float v = in[t];
  if (bug && t % 32 == 31) {
    __syncthreads();
    out[t] = v;
    return;
  }
  v += __shfl_xor_sync(0xffffffffu, v, 1);
  __syncthreads();
  out[t] = v;
}

// ---- barriers and shared memory -------------------------------------------------------

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

// At most 48 KiB of static shared memory per CTA: N floats, each thread filling its slots.
template <int N>
__global__ void shared_of(const float* in, float* out) {
  SE_SHARED(float, slots, [N]);
  const int t = threadIdx.x;
  for (int i = t; i < N; i += kThreads) slots[i] = in[i % kElems];
  __syncthreads();
  out[t] = slots[N - 1 - t];
}

// Every thread counts itself with an atomic on shared memory, which needs no fence.
__global__ void shared_counter(float* out) {
  SE_SHARED(unsigned, count, [1]);
  if (threadIdx.x == 0) count[0] = 0;
  __syncthreads();
  atomicAdd(&count[0], 1u);
  __syncthreads();
  if (threadIdx.x == 0) out[0] = static_cast<float>(count[0]);
}

// ---- 16-byte accesses -----------------------------------------------------------------

// 16-byte copies from `in + shift` elements; `shift` 1 is misaligned, `count` past the end
// runs out of the buffer.
__global__ void vector_copy(const float* in, float* out, int shift, int count) {
  const int t = threadIdx.x;
  if (t >= count) return;
  const uint4 v = __ldg(reinterpret_cast<const uint4*>(in + shift + 4 * t));
  __stwb(reinterpret_cast<uint4*>(out + 4 * t), v);
}

// Writes out with 16-byte stores, then reads a neighbour's pack of out back: through __ldg
// (the non-coherent cache: a bug) or through __ldcg (L2: the twin).
__global__ void read_back_own_output(const float* in, float* out, bool through_ldg) {
  const int t = threadIdx.x;
  __stwb(reinterpret_cast<uint4*>(out + 4 * t), __ldg(reinterpret_cast<const uint4*>(in + 4 * t)));
  __syncthreads();
  const auto* pack = reinterpret_cast<const uint4*>(out + 4 * ((t + 1) % kThreads));
  const uint4 v = through_ldg ? __ldg(pack) : __ldcg(pack);
  __stwb(reinterpret_cast<uint4*>(out + 4 * (kThreads + t)), v);
}

// ---- atomics and spin-waits between CTAs ----------------------------------------------

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
  if (threadIdx.x == 0)
    while (se_emu::load_acquire(counter) < 1u) {
    }
  __syncthreads();
}

// CTA 1 waits for CTA 0 to publish out[0] and advance the counter: fine while CTA 0 runs
// first or beside it, a hang where CTA 1 holds the only SM CTA 0 could run on.
__global__ void wait_for_cta0(unsigned* counter, float* out) {
  if (threadIdx.x == 0 && blockIdx.x == 0) {
    out[0] = 1;
    __threadfence();
    atomicAdd(counter, 1u);
  }
  if (threadIdx.x == 0 && blockIdx.x == 1) {
    while (se_emu::load_acquire(counter) < 1u) {
    }
    out[1] = out[0] + 1;
  }
  __syncthreads();
}

// What a planted kernel is launched with: planted()'s buffers.
struct Buffers {
  const float* x;   // "in": 0, 1, 2, ...
  float* y;         // "out": NaN
  float* partial;   // one float per CTA of a 4096-element grid
  unsigned* ticket;  // 0
};
constexpr int64_t kCtas = kElems / kThreads;

const std::map<std::string, std::function<void(const Buffers&)>>& planted_kernels() {
  using B = const Buffers&;
  static const std::map<std::string, std::function<void(B)>> kernels = {
      {"warp_sum", [](B b) { launch(warp_sum, 1, kThreads, b.x, b.y, false, false); }},
      {"warp_sum_down", [](B b) { launch(warp_sum, 1, kThreads, b.x, b.y, false, true); }},
      {"warp_sum_lane_exits", [](B b) { launch(warp_sum, 1, kThreads, b.x, b.y, true, false); }},
      {"warp_sum_partial_warp", [](B b) { launch(warp_sum, 1, 16, b.x, b.y, false, false); }},
      {"warp_sum_1024_threads", [](B b) { launch(warp_sum, 1, 1024, b.x, b.y, false, false); }},
      {"too_many_threads", [](B b) { launch(warp_sum, 1, 2048, b.x, b.y, false, false); }},
      {"half_warp_shuffle", [](B b) { launch(half_warp_shuffle, 1, kThreads, b.x, b.y, 8); }},
      {"half_warp_reads_other_half",
       [](B b) { launch(half_warp_shuffle, 1, kThreads, b.x, b.y, 16); }},
      {"shuffle_outside_own_mask",
       [](B b) { launch(shuffle_outside_own_mask, 1, kThreads, b.x, b.y); }},
      {"divergent_shuffles", [](B b) { launch(divergent_shuffles, 1, kThreads, b.x, b.y); }},
      {"shuffle_then_barrier",
       [](B b) { launch(shuffle_with_lane_at_barrier, 1, kThreads, b.x, b.y, false); }},
      {"shuffle_with_lane_at_barrier",
       [](B b) { launch(shuffle_with_lane_at_barrier, 1, kThreads, b.x, b.y, true); }},
      {"divergent_barrier", [](B b) { launch(divergent_barrier, 1, kThreads, b.x, b.y); }},
      {"neighbour_read", [](B b) { launch(neighbour_read, 1, kThreads, b.x, b.y, true); }},
      {"neighbour_read_no_barrier",
       [](B b) { launch(neighbour_read, 1, kThreads, b.x, b.y, false); }},
      {"racing_writes", [](B b) { launch(racing_writes, 1, kThreads, b.x, b.y); }},
      {"shared_from_another_cta",
       [](B b) { launch(shared_from_another_cta, kCtas, kThreads, b.x, b.y); }},
      {"shared_overflow", [](B b) { launch(shared_overflow, 1, kThreads, b.x, b.y); }},
      {"shared_48k", [](B b) { launch(shared_of<12 * 1024>, 1, kThreads, b.x, b.y); }},
      {"shared_64k", [](B b) { launch(shared_of<16 * 1024>, 1, kThreads, b.x, b.y); }},
      {"shared_counter", [](B b) { launch(shared_counter, 1, kThreads, b.y); }},
      {"vector_copy", [](B b) { launch(vector_copy, 1, kThreads, b.x, b.y, 0, kThreads); }},
      {"vector_copy_misaligned",
       [](B b) { launch(vector_copy, 1, kThreads, b.x, b.y, 1, kThreads - 1); }},
      {"vector_copy_past_end",  // the last thread's pack starts at the end of `in`
       [](B b) {
         launch(vector_copy, 1, kThreads, b.x + kElems - 4 * kThreads, b.y, 4, kThreads);
       }},
      {"ldcg_of_own_output",
       [](B b) { launch(read_back_own_output, 1, kThreads, b.x, b.y, false); }},
      {"ldg_of_own_output",
       [](B b) { launch(read_back_own_output, 1, kThreads, b.x, b.y, true); }},
      {"last_cta_sum",
       [](B b) { launch(last_cta_sum, kCtas, kThreads, b.x, b.partial, b.ticket, b.y, true); }},
      {"last_cta_sum_no_fence",
       [](B b) { launch(last_cta_sum, kCtas, kThreads, b.x, b.partial, b.ticket, b.y, false); }},
      {"wait_for_cta0", [](B b) { launch(wait_for_cta0, 2, kThreads, b.ticket, b.y); }},
      {"spin_forever", [](B b) { launch(spin_forever, 2, kThreads, b.ticket); }},
  };
  return kernels;
}

at::Tensor planted(const std::string& name) {
  const auto kernel = planted_kernels().find(name);
  TORCH_CHECK(kernel != planted_kernels().end(), "emulator: no planted kernel named '", name,
              "'");
  const auto f32 = at::TensorOptions().dtype(at::kFloat);
  const at::Tensor in = at::arange(kElems, f32);
  at::Tensor out = at::full({kElems}, std::numeric_limits<float>::quiet_NaN(), f32);
  at::Tensor partial = at::full({kCtas}, std::numeric_limits<float>::quiet_NaN(), f32);
  at::Tensor counter = at::zeros({1}, at::TensorOptions().dtype(at::kInt));
  const Buffers buffers{in.const_data_ptr<float>(), out.mutable_data_ptr<float>(),
                        partial.mutable_data_ptr<float>(),
                        reinterpret_cast<unsigned*>(counter.mutable_data_ptr<int>())};
  se_emu::clear_buffers();
  se_emu::add_buffer("in", buffers.x, kElems * 4);
  se_emu::add_buffer("out", buffers.y, kElems * 4);
  struct Clear {
    ~Clear() { se_emu::clear_buffers(); }
  } clear;
  kernel->second(buffers);
  return out;
}

// The names planted() takes, so the tests can check that each is exercised.
std::vector<std::string> planted_names() {
  std::vector<std::string> names;
  for (const auto& [name, kernel] : planted_kernels()) names.push_back(name);
  return names;
}

void set_mode(const std::string& fibers, const std::string& ctas, int64_t resident, int64_t seed,
              bool snapshot) {
  se_emu::set_mode(fibers, ctas, resident, seed, snapshot);
}

}  // namespace

TORCH_LIBRARY(cuda_emulator, m) {
  m.def("planted(str name) -> Tensor", &planted);
  m.def("planted_names() -> str[]", &planted_names);
  m.def("set_mode(str fibers, str ctas, int resident, int seed, bool snapshot) -> ()", &set_mode);
}
