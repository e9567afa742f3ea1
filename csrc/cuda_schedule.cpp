// se_kernels::cuda_schedule and cuda_stream_schedule: the "cuda" backend's plan of one SE call
// (cuda/se_plan.h) or of one stream op's call (cuda/se_stream_plan.h), as its trace
// (cuda/se_plan_trace.h), for a device given by its SM count (and L2 size). Built into every
// extension, with or without CUDA: they run the kernels' own planning code on the host, so
// `se-kernels plan` (se_kernels/plan.py) answers for any GPU on any machine.
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <iterator>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "cuda/se_plan.h"
#include "cuda/se_plan_trace.h"

namespace se_kernels {
namespace {

struct Layout {
  cuda::DType dtype;  // one of each element size: the plan depends on the size alone
  int width;          // elements per access
};

// 16-byte aligned tensors: the vector path wherever the layout allows it.
Layout planned_layout(int64_t element_size, bool channels_last, int64_t C) {
  using cuda::DType;
  TORCH_CHECK(element_size == 2 || element_size == 4 || element_size == 8,
              "se_kernels: a cuda schedule's element_size is 2, 4 or 8 bytes, got ", element_size);
  const DType dtype = element_size == 2 ? DType::BFloat16
                      : element_size == 8 ? DType::Double
                                          : DType::Float;
  const int vector = static_cast<int>(16 / element_size);
  return {dtype, channels_last && C % vector != 0 ? 1 : vector};
}

std::vector<int64_t> cuda_schedule(int64_t N, int64_t C, int64_t P, int64_t S,
                                   int64_t element_size, bool channels_last, bool residual,
                                   c10::string_view pool, bool out_relu, bool backward,
                                   int64_t sm_count, int64_t l2_bytes) {
  TORCH_CHECK(N >= 0 && C > 0 && P > 0 && S > 0, "se_kernels: cuda_schedule needs N >= 0 and "
              "C, P, S > 0, got N=", N, " C=", C, " P=", P, " S=", S);
  TORCH_CHECK(sm_count > 0 && l2_bytes > 0, "se_kernels: cuda_schedule needs a device with SMs "
              "and an L2, got sm_count=", sm_count, " l2_bytes=", l2_bytes);
  const Layout layout = planned_layout(element_size, channels_last, C);
  const auto pool_kind = find_option(std::string_view(pool.data(), pool.size()), kPoolNames);
  TORCH_CHECK(pool_kind.has_value(), "se_kernels: cuda_schedule's pool is avg, max or avgmax, "
              "got '", std::string(pool.data(), pool.size()), "'");
  const Options opt{Activation::ReLU, Gate::Sigmoid, *pool_kind,
                    out_relu ? OutActivation::ReLU : OutActivation::None};
  const cuda::Problem problem{layout.dtype, N, C, P, S, channels_last, opt,
                              residual && (!backward || out_relu)};
  const cuda::Plan plan = cuda::detail::make_plan(
      problem, backward, layout.width, {static_cast<int>(sm_count), l2_bytes});
  return cuda::detail::trace(plan, backward);
}

// The pointers of a stream op's arguments (cuda/se_stream_plan.h) that a call gives, by their
// field names, and "relu" for an output ReLU. Each name must be one the op has.
class Given {
 public:
  Given(std::vector<std::string> names, std::string op)
      : names_(std::move(names)), op_(std::move(op)) {}

  bool has(const char* name) {
    checked_.emplace_back(name);
    return std::find(names_.begin(), names_.end(), name) != names_.end();
  }
  // A stand-in for a given pointer: the plan looks only at which are given, and takes the
  // tensors to be 16-byte aligned.
  void* pointer(const char* name) { return has(name) ? reinterpret_cast<void*>(256) : nullptr; }

  void check_all_known() const {
    for (const auto& name : names_)
      TORCH_CHECK(std::find(checked_.begin(), checked_.end(), name) != checked_.end(),
                  "se_kernels: cuda_stream_schedule: ", op_, " has no argument '", name, "'");
  }

 private:
  std::vector<std::string> names_;
  std::string op_;
  std::vector<std::string> checked_;
};

// The arguments of a call of the stream op `op`, with stand-ins for the pointers it gives.
// The C++ ops read `out` only under an output ReLU (se_common.cpp's prepare_stream_*).
cuda::StreamReduceArgs stream_args(Given& g, cuda::StreamReduceArgs) {
  return {g.pointer("x"), g.pointer("sum"), g.pointer("sumsq"), g.pointer("max"), g.pointer("min"),
          nullptr};
}
cuda::StreamMapArgs stream_args(Given& g, cuda::StreamMapArgs) {
  return {g.pointer("x"), g.pointer("scale"), g.pointer("shift"), g.pointer("residual"),
          g.has("relu"), g.pointer("out"), nullptr};
}
cuda::StreamGradReduceArgs stream_args(Given& g, cuda::StreamGradReduceArgs) {
  void* out = g.pointer("out");
  return {g.pointer("grad_out"), g.has("relu") ? out : nullptr, g.pointer("x"),
          g.pointer("peak"), g.pointer("sdy"), g.pointer("sdyx"), g.pointer("count"),
          g.pointer("dresidual"), nullptr};
}
cuda::StreamGradMapArgs stream_args(Given& g, cuda::StreamGradMapArgs) {
  void* out = g.pointer("out");
  return {g.pointer("grad_out"), g.has("relu") ? out : nullptr, g.pointer("x"),
          g.pointer("dy_scale"), g.pointer("x_scale"), g.pointer("shift"), g.pointer("peak"),
          g.pointer("peak_shift"), g.pointer("dx"), nullptr};
}

// The act tail's ops: the plan and the trace do not depend on the activation.
cuda::StreamActReduceArgs stream_args(Given& g, cuda::StreamActReduceArgs) {
  return {g.pointer("x"), g.pointer("in_scale"), g.pointer("in_shift"), Activation::ReLU,
          g.pointer("sum"), nullptr};
}
cuda::StreamActMapArgs stream_args(Given& g, cuda::StreamActMapArgs) {
  return {g.pointer("x"), g.pointer("in_scale"), g.pointer("in_shift"), Activation::ReLU,
          g.pointer("scale"), g.pointer("out"), nullptr};
}
cuda::StreamActGradReduceArgs stream_args(Given& g, cuda::StreamActGradReduceArgs) {
  return {g.pointer("grad_out"), g.pointer("x"), g.pointer("in_scale"), g.pointer("in_shift"),
          Activation::ReLU, g.pointer("sdyv"), g.pointer("sdyd"), g.pointer("sdydx"),
          g.pointer("sd"), g.pointer("sdx"), nullptr};
}
cuda::StreamActGradMapArgs stream_args(Given& g, cuda::StreamActGradMapArgs) {
  return {g.pointer("grad_out"), g.pointer("x"), g.pointer("in_scale"), g.pointer("in_shift"),
          Activation::ReLU, g.pointer("dy_scale"), g.pointer("act_shift"), g.pointer("x_scale"),
          g.pointer("shift"), g.pointer("dx"), nullptr};
}

template <typename Args>
std::vector<int64_t> stream_trace(const cuda::Problem& problem, int width, int64_t sm_count,
                                  Given& given) {
  const Args args = stream_args(given, Args{});
  given.check_all_known();
  const cuda::StreamPlan plan = cuda::detail::plan_stream_pass(
      problem, width, static_cast<int>(sm_count), cuda::detail::stream_quantities(args));
  return cuda::detail::trace_stream(plan, args);
}

// Each stream op's trace, by the op's name.
using StreamTrace = std::vector<int64_t> (*)(const cuda::Problem&, int, int64_t, Given&);
constexpr std::pair<std::string_view, StreamTrace> kStreamTraces[] = {
    {"stream_reduce", &stream_trace<cuda::StreamReduceArgs>},
    {"stream_map", &stream_trace<cuda::StreamMapArgs>},
    {"stream_grad_reduce", &stream_trace<cuda::StreamGradReduceArgs>},
    {"stream_grad_map", &stream_trace<cuda::StreamGradMapArgs>},
    {"stream_act_reduce", &stream_trace<cuda::StreamActReduceArgs>},
    {"stream_act_map", &stream_trace<cuda::StreamActMapArgs>},
    {"stream_act_grad_reduce", &stream_trace<cuda::StreamActGradReduceArgs>},
    {"stream_act_grad_map", &stream_trace<cuda::StreamActGradMapArgs>},
};

std::string stream_op_names() {
  std::string names;
  for (const auto& entry : kStreamTraces) {
    if (!names.empty()) names += ", ";
    names += entry.first;
  }
  return names;
}

std::vector<int64_t> cuda_stream_schedule(c10::string_view op_name, int64_t N, int64_t C,
                                          int64_t P, int64_t element_size, bool channels_last,
                                          std::vector<std::string> given, int64_t sm_count) {
  TORCH_CHECK(N >= 0 && C > 0 && P > 0, "se_kernels: cuda_stream_schedule needs N >= 0 and "
              "C, P > 0, got N=", N, " C=", C, " P=", P);
  TORCH_CHECK(sm_count > 0, "se_kernels: cuda_stream_schedule needs a device with SMs, got "
              "sm_count=", sm_count);
  const Layout layout = planned_layout(element_size, channels_last, C);
  // A stream pass has no MLP and no SE options.
  const cuda::Problem problem{layout.dtype, N, C, P, 0, channels_last, Options{}};
  const std::string op(op_name.data(), op_name.size());
  Given g(std::move(given), op);
  const auto* found = std::find_if(std::begin(kStreamTraces), std::end(kStreamTraces),
                                   [&](const auto& entry) { return op == entry.first; });
  TORCH_CHECK(found != std::end(kStreamTraces), "se_kernels: cuda_stream_schedule's op is one "
              "of the stream ops (", stream_op_names(), "), got '", op, "'");
  return found->second(problem, layout.width, sm_count, g);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(se_kernels, m) {
  m.def("cuda_schedule(int N, int C, int P, int S, int element_size, bool channels_last, "
        "bool residual, str pool, bool out_relu, bool backward, int sm_count, int l2_bytes) "
        "-> int[]",
        &cuda_schedule);
  m.def("cuda_stream_schedule(str op, int N, int C, int P, int element_size, "
        "bool channels_last, str[] given, int sm_count) -> int[]",
        &cuda_stream_schedule);
}

}  // namespace se_kernels
