// The stream ops' host interface (se_kernels/_stream_ops.py, DESIGN.md §1.4), free of torch
// headers as se_cuda.h: each op is one pass over x on the streaming tiles, planned, then
// launched (plan_stream and launch_stream, overloaded on the op's arguments). A reduce pass
// whose rows the plan splits into pieces needs plan.workspace_elems accumulation-dtype
// elements of scratch for the pieces' partial sums; a map pass needs none.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "se_problem.h"
#include "se_tiling.h"

namespace se_kernels::cuda {

// Pointers: x-sized tensors dense in the problem's layout and dtype, [N, C] vectors in the
// accumulation dtype; nullptr for an optional input absent or an output not asked for; the
// workspace, plan.workspace_elems elements (none for a map pass).
struct StreamReduceArgs {
  const void* x;
  void* sum;
  void* sumsq;  // optional
  void* max;    // optional
  void* min;    // optional
  void* workspace;
};

struct StreamMapArgs {
  const void* x;
  const void* scale;
  const void* shift;     // optional
  const void* residual;  // optional
  bool relu;
  void* out;
  void* workspace;
};

struct StreamGradReduceArgs {
  const void* grad_out;
  const void* out;   // only under an output ReLU
  const void* x;
  const void* peak;  // optional
  void* sdy;         // optional
  void* sdyx;
  void* count;       // with peak
  void* dresidual;   // optional: the masked dy
  void* workspace;
};

struct StreamGradMapArgs {
  const void* grad_out;
  const void* out;  // only under an output ReLU
  const void* x;
  const void* dy_scale;
  const void* x_scale;     // optional
  const void* shift;       // optional
  const void* peak;        // optional, with peak_shift
  const void* peak_shift;
  void* dx;
  void* workspace;
};

// A stream pass: the problem (S and the SE options unused), its tiles, and its scratch.
struct StreamPlan {
  Problem problem;
  detail::PassTiling pass;
  int64_t workspace_elems;
};

StreamPlan plan_stream(const Problem& problem, const StreamReduceArgs& args);
StreamPlan plan_stream(const Problem& problem, const StreamMapArgs& args);
StreamPlan plan_stream(const Problem& problem, const StreamGradReduceArgs& args);
StreamPlan plan_stream(const Problem& problem, const StreamGradMapArgs& args);

void launch_stream(const StreamPlan& plan, const StreamReduceArgs& args, cudaStream_t stream);
void launch_stream(const StreamPlan& plan, const StreamMapArgs& args, cudaStream_t stream);
void launch_stream(const StreamPlan& plan, const StreamGradReduceArgs& args, cudaStream_t stream);
void launch_stream(const StreamPlan& plan, const StreamGradMapArgs& args, cudaStream_t stream);

}  // namespace se_kernels::cuda
