// The "cuda" backend's kernels for the se_kernels ops: argument checks, layouts and memory
// from torch, kernels from the torch-free se_forward.cu / se_backward.cu (see se_cuda.h) and,
// for the stream ops, se_stream.cu (se_stream.h).
//
// Every launch runs on the current stream of x's device; scratch comes from the torch
// caching allocator; nothing waits on the device. That makes the ops safe under CUDA-graph
// capture, and the kernels' fixed reduction orders make them deterministic.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../se_common.h"
#include "se_cuda.h"
#include "se_cuda_tensors.h"

namespace se_kernels {
namespace {

void check_on_cuda(const at::Tensor& x) {
  TORCH_CHECK(x.is_cuda(), "se_kernels: the cuda kernels need x on a CUDA device, got ",
              x.device());
}

cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

ForwardResult se_forward_cuda(const at::Tensor& x, const at::Tensor& w1,
                              const std::optional<at::Tensor>& b1, const at::Tensor& w2,
                              const std::optional<at::Tensor>& b2,
                              const std::optional<at::Tensor>& residual,
                              c10::string_view activation, c10::string_view gate,
                              c10::string_view pool, c10::string_view out_activation) {
  check_on_cuda(x);
  const c10::cuda::CUDAGuard device_guard(x.device());
  ForwardTensors t = prepare_forward(x, w1, b1, w2, b2, residual, activation, gate, pool,
                                     out_activation);
  if (t.geo.N == 0) return {t.out, t.z, t.zmax, t.a, t.g};

  cuda::ForwardArgs args{};
  args.x = t.x.const_data_ptr();
  args.w1 = t.w1.const_data_ptr();
  args.b1 = data_or_null(t.b1);
  args.w2 = t.w2.const_data_ptr();
  args.b2 = data_or_null(t.b2);
  args.residual = data_or_null(t.residual);
  args.out = t.out.mutable_data_ptr();
  args.z = t.z.mutable_data_ptr();
  args.zmax = t.opt.uses_max() ? t.zmax.mutable_data_ptr() : nullptr;
  args.a = t.a.mutable_data_ptr();
  args.g = t.g.mutable_data_ptr();
  const cuda::Plan plan = cuda::plan_forward(make_problem(t.x, t.geo, t.S, t.opt), args);
  at::Tensor workspace = at::empty({plan.workspace_elems}, t.z.options());
  args.workspace = workspace.mutable_data_ptr();
  cuda::launch_forward(plan, args, current_stream());
  return {t.out, t.z, t.zmax, t.a, t.g};
}

BackwardResult se_backward_cuda(const at::Tensor& grad_out, const at::Tensor& x,
                                const std::optional<at::Tensor>& out, const at::Tensor& w1,
                                const at::Tensor& w2, const at::Tensor& z, const at::Tensor& zmax,
                                const at::Tensor& a, const at::Tensor& g,
                                c10::string_view activation, c10::string_view gate,
                                c10::string_view pool, c10::string_view out_activation,
                                bool residual_grad) {
  check_on_cuda(x);
  const c10::cuda::CUDAGuard device_guard(x.device());
  BackwardTensors t = prepare_backward(grad_out, x, out, w1, w2, z, zmax, a, g, activation, gate,
                                       pool, out_activation, residual_grad);
  const int64_t C = t.geo.C, S = t.S;
  at::Tensor dw1 = at::empty({S, C}, w1.options());
  at::Tensor db1 = at::empty({S}, w1.options());
  at::Tensor dw2 = at::empty({C, S}, w2.options());
  at::Tensor db2 = at::empty({C}, w2.options());

  cuda::BackwardArgs args{};
  args.grad_out = t.grad_out.const_data_ptr();
  args.x = t.x.const_data_ptr();
  args.out = data_or_null(t.out);
  args.w1 = t.w1.const_data_ptr();
  args.w2 = t.w2.const_data_ptr();
  args.z = t.z.const_data_ptr();
  args.zmax = data_or_null(t.zmax);
  args.a = t.a.const_data_ptr();
  args.g = t.g.const_data_ptr();
  args.dx = t.dx.mutable_data_ptr();
  args.dresidual = t.dresidual.numel() ? t.dresidual.mutable_data_ptr() : nullptr;
  args.dw1 = dw1.mutable_data_ptr();
  args.db1 = db1.mutable_data_ptr();
  args.dw2 = dw2.mutable_data_ptr();
  args.db2 = db2.mutable_data_ptr();
  // With N == 0 the plan has no groups and the weight gradients come out as zeros.
  const cuda::Plan plan = cuda::plan_backward(make_problem(t.x, t.geo, S, t.opt), args);
  at::Tensor workspace = at::empty({plan.workspace_elems}, t.z.options());
  args.workspace = mutable_data_or_null(workspace);
  cuda::launch_backward(plan, args, current_stream());
  return {t.dx, dw1, db1, dw2, db2, t.dresidual};
}

// A prepared stream op on x's device and current stream, with the kernels' arguments
// `args` (stream_args by default), its scratch from the caching allocator (freed on
// return, once the kernels that use it are enqueued on that stream).
template <typename Tensors, typename Args>
void run_stream_cuda(Tensors& t, Args args) {
  at::Tensor scratch;
  const auto acc = t.x.options().dtype(accumulate_type(t.x.scalar_type()));
  run_stream_args(
      t, args,
      [&](int64_t elems) {
        scratch = at::empty({elems}, acc);
        return scratch.mutable_data_ptr();
      },
      current_stream());
}
template <typename Tensors>
void run_stream_cuda(Tensors& t) {
  run_stream_cuda(t, stream_args(t));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> stream_reduce_cuda(const at::Tensor& x,
                                                                              bool squares,
                                                                              bool maxima,
                                                                              bool minima) {
  check_on_cuda(x);
  const c10::cuda::CUDAGuard device_guard(x.device());
  StreamReduceTensors t = prepare_stream_reduce(x, squares, maxima, minima);
  run_stream_cuda(t);
  return {t.sum, t.sumsq, t.max, t.min};
}

at::Tensor stream_map_cuda(const at::Tensor& x, const at::Tensor& scale,
                           const std::optional<at::Tensor>& shift,
                           const std::optional<at::Tensor>& residual,
                           c10::string_view out_activation) {
  check_on_cuda(x);
  const c10::cuda::CUDAGuard device_guard(x.device());
  StreamMapTensors t = prepare_stream_map(x, scale, shift, residual, out_activation);
  run_stream_cuda(t);
  return t.out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> stream_grad_reduce_cuda(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& out, const at::Tensor& x,
    const std::optional<at::Tensor>& peak, c10::string_view out_activation, bool sum_dy,
    bool residual_grad) {
  check_on_cuda(x);
  const c10::cuda::CUDAGuard device_guard(x.device());
  StreamGradReduceTensors t = prepare_stream_grad_reduce(grad_out, out, x, peak, out_activation,
                                                         sum_dy, residual_grad);
  run_stream_cuda(t);
  return {t.sdy, t.sdyx, t.count, t.dresidual};
}

at::Tensor stream_grad_map_cuda(const at::Tensor& grad_out, const std::optional<at::Tensor>& out,
                                const at::Tensor& x, const at::Tensor& dy_scale,
                                const std::optional<at::Tensor>& x_scale,
                                const std::optional<at::Tensor>& shift,
                                const std::optional<at::Tensor>& peak,
                                const std::optional<at::Tensor>& peak_shift,
                                c10::string_view out_activation) {
  check_on_cuda(x);
  const c10::cuda::CUDAGuard device_guard(x.device());
  StreamGradMapTensors t = prepare_stream_grad_map(grad_out, out, x, dy_scale, x_scale, shift,
                                                   peak, peak_shift, out_activation);
  run_stream_cuda(t);
  return t.dx;
}

// The act tail's ops (DESIGN.md §1.5).
at::Tensor stream_act_reduce_cuda(const at::Tensor& x, const at::Tensor& in_scale,
                                  const at::Tensor& in_shift, c10::string_view activation) {
  check_on_cuda(x);
  const c10::cuda::CUDAGuard device_guard(x.device());
  StreamActTensors t = prepare_stream_act_reduce(x, in_scale, in_shift, activation);
  run_stream_cuda(t, act_reduce_args(t));
  return t.sum;
}

at::Tensor stream_act_map_cuda(const at::Tensor& x, const at::Tensor& in_scale,
                               const at::Tensor& in_shift, c10::string_view activation,
                               const at::Tensor& scale) {
  check_on_cuda(x);
  const c10::cuda::CUDAGuard device_guard(x.device());
  StreamActTensors t = prepare_stream_act_map(x, in_scale, in_shift, activation, scale);
  run_stream_cuda(t, act_map_args(t));
  return t.out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> stream_act_grad_reduce_cuda(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& in_scale,
    const at::Tensor& in_shift, c10::string_view activation, bool statistics) {
  check_on_cuda(x);
  const c10::cuda::CUDAGuard device_guard(x.device());
  StreamActTensors t =
      prepare_stream_act_grad_reduce(grad_out, x, in_scale, in_shift, activation, statistics);
  run_stream_cuda(t, act_grad_reduce_args(t));
  return {t.sdyv, t.sdyd, t.sdydx, t.sd, t.sdx};
}

at::Tensor stream_act_grad_map_cuda(const at::Tensor& grad_out, const at::Tensor& x,
                                    const at::Tensor& in_scale, const at::Tensor& in_shift,
                                    c10::string_view activation, const at::Tensor& dy_scale,
                                    const at::Tensor& act_shift,
                                    const std::optional<at::Tensor>& x_scale,
                                    const std::optional<at::Tensor>& shift) {
  check_on_cuda(x);
  const c10::cuda::CUDAGuard device_guard(x.device());
  StreamActTensors t = prepare_stream_act_grad_map(grad_out, x, in_scale, in_shift, activation,
                                                   dy_scale, act_shift, x_scale, shift);
  run_stream_cuda(t, act_grad_map_args(t));
  return t.out;
}

}  // namespace

TORCH_LIBRARY_IMPL(se_kernels, CUDA, m) {
  m.impl("se_forward", &se_forward_cuda);
  m.impl("se_backward", &se_backward_cuda);
  m.impl("stream_reduce", &stream_reduce_cuda);
  m.impl("stream_map", &stream_map_cuda);
  m.impl("stream_grad_reduce", &stream_grad_reduce_cuda);
  m.impl("stream_grad_map", &stream_grad_map_cuda);
  m.impl("stream_act_reduce", &stream_act_reduce_cuda);
  m.impl("stream_act_map", &stream_act_map_cuda);
  m.impl("stream_act_grad_reduce", &stream_act_grad_reduce_cuda);
  m.impl("stream_act_grad_map", &stream_act_grad_map_cuda);
}

}  // namespace se_kernels
