// The "cuda" backend's launch schedule from its own planning code (plan_forward,
// plan_backward, plan_pass and group_size of csrc/cuda/), for benchmarks/launch_counts.py.
// The kernels' sources are compiled as host code, as tests/cuda_emulator does; nothing is
// launched. Per L2 group, forward() and backward() launch: the reduce pass (plus its
// combine kernel when the plan splits rows into pieces), two MLP kernels and the map pass;
// backward() adds two weight-gradient kernels for the whole batch.
#define SE_KERNELS_CUDA_EMULATION
#include "emulator.h"
#include "../csrc/cuda/se_forward.cu"
#include "../csrc/cuda/se_backward.cu"

#include <torch/library.h>

#include <string>
#include <vector>

namespace se_kernels::cuda::detail {
DeviceInfo current_device_info() { return {132, 50 * 1024 * 1024}; }  // H100 SXM
}  // namespace se_kernels::cuda::detail

namespace {

using namespace se_kernels;
using namespace se_kernels::cuda;

// [forward launches, backward launches, samples per forward group, per backward group,
//  pieces of the first forward group's passes].
std::vector<int64_t> cuda_launches(int64_t N, int64_t C, int64_t P, int64_t S,
                                   int64_t element_size, bool channels_last,
                                   const std::string& pool, bool out_relu) {
  const DType dtype = element_size == 2 ? DType::BFloat16
                      : element_size == 8 ? DType::Double
                                          : DType::Float;
  const Options opt{Activation::ReLU, Gate::Sigmoid, find_option(pool, kPoolNames).value(),
                    out_relu ? OutActivation::ReLU : OutActivation::None};
  const Problem problem{dtype, N, C, P, S, channels_last, opt};
  alignas(16) static char aligned[16];  // 16-byte aligned stand-ins: the vector path
  ForwardArgs fargs{};
  fargs.x = fargs.out = aligned;
  BackwardArgs bargs{};
  bargs.grad_out = bargs.x = bargs.dx = aligned;
  bargs.out = out_relu ? aligned : nullptr;
  const Plan forward = plan_forward(problem, fargs);
  const Plan backward = plan_backward(problem, bargs);
  auto launches = [&](const Plan& plan) {
    int64_t count = 0;
    for (int64_t n0 = 0; n0 < N; n0 += plan.group) {
      const int64_t n = std::min(plan.group, N - n0);
      const cuda::detail::PassPlan pass =
          cuda::detail::plan_pass(n, C, P, channels_last, plan.width, plan.sm_count);
      count += (pass.pieces > 1 ? 2 : 1) + 2 + 1;
    }
    return count;
  };
  const cuda::detail::PassPlan first = cuda::detail::plan_pass(
      std::min(forward.group, N), C, P, channels_last, forward.width, forward.sm_count);
  return {launches(forward), launches(backward) + 2, forward.group, backward.group,
          first.pieces};
}

}  // namespace

TORCH_LIBRARY(se_schedule, m) {
  m.def("cuda_launches(int N, int C, int P, int S, int element_size, bool channels_last, "
        "str pool, bool out_relu) -> int[]",
        &cuda_launches);
}
