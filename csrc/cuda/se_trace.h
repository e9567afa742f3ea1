// The encoding of the cuda backend's trace: the flat int list that se_kernels::cuda_schedule
// (csrc/cuda_schedule.cpp) returns and se_kernels/schedule.py's decode_cuda_trace reads, and
// the kernel codes every launch is logged with (se_cuda_launch.cuh), so tests can compare
// real launches with the plan. Per launch: kernel code, CTAs, access count, then (tensor
// code, byte offset, bytes, is_write) per access in the order the launch makes them. The
// codes index se_kernels/schedule.py's CUDA_TRACE_KERNELS and TRACE_TENSORS, in order
// (tests/test_options.py reads the enums below to check it). What a planned call's trace
// holds is se_plan_trace.h's.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace se_kernels::cuda {
namespace detail {

enum class TraceKernel : int64_t {
  ZeroSync = 0, ForwardPipeline, BackwardPipeline, Reduce, Combine, Mlp, Map, WeightGrad,
  WeightGradCombine
};
enum class TraceTensor : int64_t {
  X = 0, Residual, Out, GradOut, Dx, Dresidual, Weights, Scratch
};

struct Trace {
  std::vector<int64_t> data;
  size_t count_at = 0;
  void launch(TraceKernel kernel, int64_t ctas) {
    data.insert(data.end(), {static_cast<int64_t>(kernel), ctas, 0});
    count_at = data.size() - 1;
  }
  void access(TraceTensor tensor, int64_t offset, int64_t bytes, bool write) {
    if (bytes <= 0) return;
    data.insert(data.end(), {static_cast<int64_t>(tensor), offset, bytes, write ? 1 : 0});
    ++data[count_at];
  }
};

}  // namespace detail
}  // namespace se_kernels::cuda
