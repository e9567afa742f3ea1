// The "cuda" backend's kernels for the se_kernels ops: argument checks, layouts and memory
// from torch, kernels from the torch-free se_forward.cu / se_backward.cu (see se_cuda.h).
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

namespace se_kernels {
namespace {

cuda::DType cuda_dtype(at::ScalarType t) {
  switch (t) {
    case at::kHalf: return cuda::DType::Half;
    case at::kBFloat16: return cuda::DType::BFloat16;
    case at::kFloat: return cuda::DType::Float;
    case at::kDouble: return cuda::DType::Double;
    default: break;
  }
  TORCH_CHECK(false, "se_kernels: unsupported dtype ", t);  // check_forward_args ruled it out
}

cuda::Problem make_problem(const at::Tensor& x, const Geometry& geo, int64_t S, const Options& opt) {
  cuda::PoolKind pool = cuda::PoolKind::Avg;
  if (opt.pool == Pool::Max) pool = cuda::PoolKind::Max;
  if (opt.pool == Pool::AvgMax) pool = cuda::PoolKind::AvgMax;
  return cuda::Problem{cuda_dtype(x.scalar_type()), geo.N, geo.C, geo.P, S, geo.channels_last,
                       opt.activation == Activation::SiLU, opt.gate == Gate::HardSigmoid, pool,
                       opt.out_relu()};
}

void check_on_cuda(const at::Tensor& x) {
  TORCH_CHECK(x.is_cuda(), "se_kernels: the cuda kernels need x on a CUDA device, got ",
              x.device());
}

const void* data_or_null(const at::Tensor& t) { return t.defined() ? t.const_data_ptr() : nullptr; }
void* mutable_data_or_null(at::Tensor& t) { return t.defined() ? t.mutable_data_ptr() : nullptr; }

ForwardResult se_forward_cuda(const at::Tensor& x_in, const at::Tensor& w1,
                              const std::optional<at::Tensor>& b1, const at::Tensor& w2,
                              const std::optional<at::Tensor>& b2,
                              const std::optional<at::Tensor>& residual_in,
                              c10::string_view activation, c10::string_view gate,
                              c10::string_view pool, c10::string_view out_activation) {
  const Options opt = parse_options(activation, gate, pool, out_activation);
  check_forward_args(x_in, w1, b1, w2, b2, residual_in);
  check_on_cuda(x_in);
  const c10::cuda::CUDAGuard device_guard(x_in.device());
  const Geometry geo = geometry_of(x_in);
  const auto fmt = geo.memory_format();
  // Dense inputs are read in place, in either layout; anything else is made dense first.
  const at::Tensor x = x_in.contiguous(fmt);
  const at::Tensor residual = residual_in ? residual_in->contiguous(fmt) : at::Tensor();
  const at::Tensor w1c = w1.contiguous(), w2c = w2.contiguous();
  const at::Tensor b1c = b1 ? b1->contiguous() : at::Tensor();
  const at::Tensor b2c = b2 ? b2->contiguous() : at::Tensor();
  const int64_t S = w1.size(0);
  const auto acc = x.options().dtype(accumulate_type(x.scalar_type()));

  at::Tensor out = at::empty(x.sizes(), x.options().memory_format(fmt));
  at::Tensor z = at::empty({geo.N, geo.C}, acc);
  at::Tensor zmax = opt.uses_max() ? at::empty({geo.N, geo.C}, acc) : at::empty({0}, acc);
  at::Tensor a = at::empty({geo.N, S}, acc);
  at::Tensor g = at::empty({geo.N, geo.C}, acc);
  if (geo.N == 0) return {out, z, zmax, a, g};

  cuda::ForwardArgs args{};
  args.x = x.const_data_ptr();
  args.w1 = w1c.const_data_ptr();
  args.b1 = data_or_null(b1c);
  args.w2 = w2c.const_data_ptr();
  args.b2 = data_or_null(b2c);
  args.residual = data_or_null(residual);
  args.out = out.mutable_data_ptr();
  args.z = z.mutable_data_ptr();
  args.zmax = opt.uses_max() ? zmax.mutable_data_ptr() : nullptr;
  args.a = a.mutable_data_ptr();
  args.g = g.mutable_data_ptr();
  const cuda::Plan plan = cuda::plan_forward(make_problem(x, geo, S, opt), args);
  at::Tensor workspace = at::empty({plan.workspace_elems}, acc);
  args.workspace = workspace.mutable_data_ptr();
  cuda::launch_forward(plan, args, c10::cuda::getCurrentCUDAStream().stream());
  return {out, z, zmax, a, g};
}

BackwardResult se_backward_cuda(const at::Tensor& grad_out_in, const at::Tensor& x_in,
                                const std::optional<at::Tensor>& out_in, const at::Tensor& w1,
                                const at::Tensor& w2, const at::Tensor& z, const at::Tensor& zmax,
                                const at::Tensor& a, const at::Tensor& g,
                                c10::string_view activation, c10::string_view gate,
                                c10::string_view pool, c10::string_view out_activation,
                                bool residual_grad) {
  const Options opt = parse_options(activation, gate, pool, out_activation);
  check_backward_args(grad_out_in, x_in, out_in, w1, w2, z, zmax, a, g, opt);
  check_on_cuda(x_in);
  const c10::cuda::CUDAGuard device_guard(x_in.device());
  const Geometry geo = geometry_of(x_in);
  const auto fmt = geo.memory_format();
  const at::Tensor x = x_in.contiguous(fmt);
  const at::Tensor grad_out = grad_out_in.contiguous(fmt);
  const at::Tensor out = opt.out_relu() ? out_in->contiguous(fmt) : at::Tensor();
  const at::Tensor w1c = w1.contiguous(), w2c = w2.contiguous();
  const at::Tensor zc = z.contiguous(), ac = a.contiguous(), gc = g.contiguous();
  const at::Tensor zmaxc = opt.uses_max() ? zmax.contiguous() : at::Tensor();
  const int64_t S = w1.size(0);
  const auto acc = x.options().dtype(accumulate_type(x.scalar_type()));

  at::Tensor dx = at::empty(x.sizes(), x.options().memory_format(fmt));
  at::Tensor dresidual = opt.out_relu() && residual_grad
                             ? at::empty(x.sizes(), x.options().memory_format(fmt))
                             : at::empty({0}, x.options());
  at::Tensor dw1 = at::empty({S, geo.C}, w1.options());
  at::Tensor db1 = at::empty({S}, w1.options());
  at::Tensor dw2 = at::empty({geo.C, S}, w2.options());
  at::Tensor db2 = at::empty({geo.C}, w2.options());

  cuda::BackwardArgs args{};
  args.grad_out = grad_out.const_data_ptr();
  args.x = x.const_data_ptr();
  args.out = data_or_null(out);
  args.w1 = w1c.const_data_ptr();
  args.w2 = w2c.const_data_ptr();
  args.z = zc.const_data_ptr();
  args.zmax = data_or_null(zmaxc);
  args.a = ac.const_data_ptr();
  args.g = gc.const_data_ptr();
  args.dx = dx.mutable_data_ptr();
  args.dresidual = dresidual.numel() ? dresidual.mutable_data_ptr() : nullptr;
  args.dw1 = dw1.mutable_data_ptr();
  args.db1 = db1.mutable_data_ptr();
  args.dw2 = dw2.mutable_data_ptr();
  args.db2 = db2.mutable_data_ptr();
  // With N == 0 the plan has no groups and the weight gradients come out as zeros.
  const cuda::Plan plan = cuda::plan_backward(make_problem(x, geo, S, opt), args);
  at::Tensor workspace = at::empty({plan.workspace_elems}, acc);
  args.workspace = mutable_data_or_null(workspace);
  cuda::launch_backward(plan, args, c10::cuda::getCurrentCUDAStream().stream());
  return {dx, dw1, db1, dw2, db2, dresidual};
}

}  // namespace

TORCH_LIBRARY_IMPL(se_kernels, CUDA, m) {
  m.impl("se_forward", &se_forward_cuda);
  m.impl("se_backward", &se_backward_cuda);
}

}  // namespace se_kernels
