// The stream ops' host interface (se_kernels/_stream_ops.py, DESIGN.md §1.4), free of torch
// headers as se_cuda.h: each op is one pass over x on the streaming tiles, planned, then
// launched (plan_stream and launch_stream, overloaded on the op's arguments, which
// se_stream_plan.h defines with the CUDA-free part of the plan). A reduce pass
// whose rows the plan splits into pieces needs plan.workspace_elems accumulation-dtype
// elements of scratch for the pieces' partial sums; a map pass needs none.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "se_stream_plan.h"

namespace se_kernels::cuda {

StreamPlan plan_stream(const Problem& problem, const StreamReduceArgs& args);
StreamPlan plan_stream(const Problem& problem, const StreamMapArgs& args);
StreamPlan plan_stream(const Problem& problem, const StreamGradReduceArgs& args);
StreamPlan plan_stream(const Problem& problem, const StreamGradMapArgs& args);

void launch_stream(const StreamPlan& plan, const StreamReduceArgs& args, cudaStream_t stream);
void launch_stream(const StreamPlan& plan, const StreamMapArgs& args, cudaStream_t stream);
void launch_stream(const StreamPlan& plan, const StreamGradReduceArgs& args, cudaStream_t stream);
void launch_stream(const StreamPlan& plan, const StreamGradMapArgs& args, cudaStream_t stream);

// The act tail's ops (DESIGN.md §1.5).
StreamPlan plan_stream(const Problem& problem, const StreamActReduceArgs& args);
StreamPlan plan_stream(const Problem& problem, const StreamActMapArgs& args);
StreamPlan plan_stream(const Problem& problem, const StreamActGradReduceArgs& args);
StreamPlan plan_stream(const Problem& problem, const StreamActGradMapArgs& args);

void launch_stream(const StreamPlan& plan, const StreamActReduceArgs& args, cudaStream_t stream);
void launch_stream(const StreamPlan& plan, const StreamActMapArgs& args, cudaStream_t stream);
void launch_stream(const StreamPlan& plan, const StreamActGradReduceArgs& args,
                   cudaStream_t stream);
void launch_stream(const StreamPlan& plan, const StreamActGradMapArgs& args, cudaStream_t stream);

}  // namespace se_kernels::cuda
