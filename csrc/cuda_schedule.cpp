// se_kernels::cuda_schedule: the "cuda" backend's plan of one call (cuda/se_plan.h), as its
// trace (cuda/se_plan_trace.h), for a device given by its SM count and L2 size. Built into
// every extension, with or without CUDA: it runs the kernels' own planning code on the
// host, so `se-kernels plan` (se_kernels/plan.py) answers for any GPU on any machine.
#include <torch/library.h>

#include <string>
#include <vector>

#include "cuda/se_plan.h"
#include "cuda/se_plan_trace.h"

namespace se_kernels {
namespace {

std::vector<int64_t> cuda_schedule(int64_t N, int64_t C, int64_t P, int64_t S,
                                   int64_t element_size, bool channels_last, bool residual,
                                   c10::string_view pool, bool out_relu, bool backward,
                                   int64_t sm_count, int64_t l2_bytes) {
  TORCH_CHECK(N >= 0 && C > 0 && P > 0 && S > 0, "se_kernels: cuda_schedule needs N >= 0 and "
              "C, P, S > 0, got N=", N, " C=", C, " P=", P, " S=", S);
  TORCH_CHECK(sm_count > 0 && l2_bytes > 0, "se_kernels: cuda_schedule needs a device with SMs "
              "and an L2, got sm_count=", sm_count, " l2_bytes=", l2_bytes);
  using cuda::DType;
  TORCH_CHECK(element_size == 2 || element_size == 4 || element_size == 8,
              "se_kernels: cuda_schedule's element_size is 2, 4 or 8 bytes, got ", element_size);
  const DType dtype = element_size == 2 ? DType::BFloat16
                      : element_size == 8 ? DType::Double
                                          : DType::Float;
  const auto pool_kind = find_option(std::string_view(pool.data(), pool.size()), kPoolNames);
  TORCH_CHECK(pool_kind.has_value(), "se_kernels: cuda_schedule's pool is avg, max or avgmax, "
              "got '", std::string(pool.data(), pool.size()), "'");
  const Options opt{Activation::ReLU, Gate::Sigmoid, *pool_kind,
                    out_relu ? OutActivation::ReLU : OutActivation::None};
  const cuda::Problem problem{dtype, N, C, P, S, channels_last, opt,
                              residual && (!backward || out_relu)};
  // 16-byte aligned tensors: the vector path wherever the layout allows it.
  const int vector = static_cast<int>(16 / element_size);
  const int width = channels_last && C % vector != 0 ? 1 : vector;
  const cuda::Plan plan = cuda::detail::make_plan(
      problem, backward, width, {static_cast<int>(sm_count), l2_bytes});
  return cuda::detail::trace(plan, backward);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(se_kernels, m) {
  m.def("cuda_schedule(int N, int C, int P, int S, int element_size, bool channels_last, "
        "bool residual, str pool, bool out_relu, bool backward, int sm_count, int l2_bytes) "
        "-> int[]",
        &cuda_schedule);
}

}  // namespace se_kernels
