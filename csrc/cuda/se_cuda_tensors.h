// Torch tensors as the kernels' torch-free host interfaces take them: the dtype, and for the
// stream ops (se_stream.h) the problem and the pointers of their prepared tensors
// (se_common.h), planned and launched by run_stream. The CUDA ops (se_cuda.cpp) and the
// emulator's (tools/cuda_emulator/binding) run the stream ops with these.
#pragma once

#include <ATen/core/Tensor.h>

#include "../se_common.h"
#include "se_stream.h"

namespace se_kernels {

inline cuda::DType cuda_dtype(at::ScalarType t) {
  switch (t) {
    case at::kHalf: return cuda::DType::Half;
    case at::kBFloat16: return cuda::DType::BFloat16;
    case at::kFloat: return cuda::DType::Float;
    case at::kDouble: return cuda::DType::Double;
    default: break;
  }
  TORCH_CHECK(false, "se_kernels: unsupported dtype ", t);  // the argument checks ruled it out
}

inline const void* data_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr() : nullptr;
}
inline void* mutable_data_or_null(at::Tensor& t) {
  return t.defined() ? t.mutable_data_ptr() : nullptr;
}
// An output of a stream op, nullptr when it is not asked for (an empty tensor: with N == 0
// nothing is launched).
inline void* output_or_null(at::Tensor& t) {
  return t.numel() > 0 ? t.mutable_data_ptr() : nullptr;
}

inline cuda::Problem make_problem(const at::Tensor& x, const Geometry& geo, int64_t S,
                                  const Options& opt) {
  return cuda::Problem{cuda_dtype(x.scalar_type()), geo.N, geo.C, geo.P, S, geo.channels_last,
                       opt};
}
// A stream pass has no MLP and no SE options.
inline cuda::Problem stream_problem(const at::Tensor& x, const Geometry& geo) {
  return make_problem(x, geo, 0, Options{});
}

inline cuda::StreamReduceArgs stream_args(StreamReduceTensors& t) {
  return {t.x.const_data_ptr(), output_or_null(t.sum), output_or_null(t.sumsq),
          output_or_null(t.max), output_or_null(t.min), nullptr};
}
inline cuda::StreamMapArgs stream_args(StreamMapTensors& t) {
  return {t.x.const_data_ptr(), t.scale.const_data_ptr(), data_or_null(t.shift),
          data_or_null(t.residual), t.relu, output_or_null(t.out), nullptr};
}
inline cuda::StreamGradReduceArgs stream_args(StreamGradReduceTensors& t) {
  return {t.grad_out.const_data_ptr(), data_or_null(t.out), t.x.const_data_ptr(),
          data_or_null(t.peak), output_or_null(t.sdy), output_or_null(t.sdyx),
          output_or_null(t.count), output_or_null(t.dresidual), nullptr};
}
inline cuda::StreamGradMapArgs stream_args(StreamGradMapTensors& t) {
  return {t.grad_out.const_data_ptr(), data_or_null(t.out), t.x.const_data_ptr(),
          t.dy_scale.const_data_ptr(), data_or_null(t.x_scale), data_or_null(t.shift),
          data_or_null(t.peak), data_or_null(t.peak_shift), output_or_null(t.dx), nullptr};
}

// The act tail's ops share one prepared struct; each takes its own arguments from it.
inline cuda::StreamActReduceArgs act_reduce_args(StreamActTensors& t) {
  return {t.x.const_data_ptr(), t.in_scale.const_data_ptr(), t.in_shift.const_data_ptr(),
          t.activation, output_or_null(t.sum), nullptr};
}
inline cuda::StreamActMapArgs act_map_args(StreamActTensors& t) {
  return {t.x.const_data_ptr(), t.in_scale.const_data_ptr(), t.in_shift.const_data_ptr(),
          t.activation, t.scale.const_data_ptr(), output_or_null(t.out), nullptr};
}
inline cuda::StreamActGradReduceArgs act_grad_reduce_args(StreamActTensors& t) {
  return {t.grad_out.const_data_ptr(), t.x.const_data_ptr(), t.in_scale.const_data_ptr(),
          t.in_shift.const_data_ptr(), t.activation, output_or_null(t.sdyv),
          output_or_null(t.sdyd), output_or_null(t.sdydx), output_or_null(t.sd),
          output_or_null(t.sdx), nullptr};
}
inline cuda::StreamActGradMapArgs act_grad_map_args(StreamActTensors& t) {
  return {t.grad_out.const_data_ptr(), t.x.const_data_ptr(), t.in_scale.const_data_ptr(),
          t.in_shift.const_data_ptr(), t.activation, t.scale.const_data_ptr(),
          t.act_shift.const_data_ptr(), data_or_null(t.x_scale), data_or_null(t.shift),
          output_or_null(t.out), nullptr};
}

// Plans the pass of a prepared stream op with the kernels' arguments `args` and launches it
// on `stream`, its scratch from workspace(elems), a buffer of that many accumulation-dtype
// elements.
template <typename Tensors, typename Args, typename Workspace>
void run_stream_args(Tensors& t, Args args, const Workspace& workspace, cudaStream_t stream) {
  const cuda::StreamPlan plan = cuda::plan_stream(stream_problem(t.x, t.geo), args);
  args.workspace = workspace(plan.workspace_elems);
  cuda::launch_stream(plan, args, stream);
}

// The same with the op's arguments from its prepared tensors (stream_args).
template <typename Tensors, typename Workspace>
void run_stream(Tensors& t, const Workspace& workspace, cudaStream_t stream) {
  run_stream_args(t, stream_args(t), workspace, stream);
}

}  // namespace se_kernels
