// The CUDA kernels' host interface, free of torch headers so the .cu files that implement
// it compile in seconds; csrc/cuda/se_cuda.cpp adapts it to tensors and registers the ops.
//
// A call is planned, then launched: plan_* reads the shapes, the pointers' alignment and the
// device (SM count, L2 size) and makes the plan of se_plan.h, which says how much fp32
// (fp64 for fp64) scratch the launch needs; the caller allocates it with the torch
// allocator, so the whole op stays inside torch's memory pool and CUDA-graph capture.
// Plans depend on shapes and the device only, never on data, and launch_* only enqueues
// kernels on the given stream.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "se_plan.h"

namespace se_kernels::cuda {

// Pointers: x-shaped tensors in the problem's layout and dtype; z, zmax, a, g in the
// accumulation dtype (fp32, fp64 for fp64). Optional ones are nullptr when absent.
struct ForwardArgs {
  const void* x;
  const void* w1;
  const void* b1;        // optional
  const void* w2;
  const void* b2;        // optional
  const void* residual;  // optional
  void* out;
  void* z;     // [N, C]
  void* zmax;  // [N, C], only for max / avgmax pooling
  void* a;     // [N, S]
  void* g;     // [N, C]
  void* workspace;  // plan.workspace_elems accumulation-dtype elements
};

struct BackwardArgs {
  const void* grad_out;
  const void* x;
  const void* out;   // only with out_relu
  const void* w1;
  const void* w2;
  const void* z;     // [N, C]
  const void* zmax;  // [N, C], only for max / avgmax pooling
  const void* a;     // [N, S]
  const void* g;     // [N, C]
  void* dx;
  void* dresidual;   // optional: grad_out masked by the output ReLU
  void* dw1;         // [S, C], x's dtype
  void* db1;         // [S]
  void* dw2;         // [C, S]
  void* db2;         // [C]
  void* workspace;   // plan.workspace_elems accumulation-dtype elements
};

Plan plan_forward(const Problem& problem, const ForwardArgs& args);
void launch_forward(const Plan& plan, const ForwardArgs& args, cudaStream_t stream);

Plan plan_backward(const Problem& problem, const BackwardArgs& args);
void launch_backward(const Plan& plan, const BackwardArgs& args, cudaStream_t stream);

}  // namespace se_kernels::cuda
