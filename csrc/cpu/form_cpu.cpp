// se_kernels::linear_form_forward(_saved) and linear_form_backward on CPU tensors
// (se_kernels/_form_ops.py): the staged path of a linear excitation form in one call each
// way. The arguments are checked and the outputs allocated by se_common's prepare_linear_form*;
// the samples go through the kernels in groups sized to stay in cache, as se_cpu's do.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "../se_common.h"
#include "groups.h"
#include "kernels.h"

namespace se_kernels {

namespace {

using cpu::at_sample;

LinearFormTensors run_linear_form(const at::Tensor& x, c10::string_view form,
                                  const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                  c10::string_view gate, c10::string_view pool,
                                  const std::optional<at::Tensor>& residual,
                                  c10::string_view out_activation) {
  LinearFormTensors t =
      prepare_linear_form(x, form, weight, bias, gate, pool, residual, out_activation);
  const Geometry& geo = t.geo;
  const int64_t N = geo.N;
  const int64_t group = cpu::samples_per_group(N, geo.C * geo.P * t.x.element_size(),
                                               t.weight.numel() * t.weight.element_size());
  for (int64_t n0 = 0; n0 < N; n0 += group) {
    cpu::LinearFormArgs args{};
    args.geo = Geometry{std::min(group, N - n0), geo.C, geo.P, geo.channels_last};
    args.opt = t.opt;
    args.dtype = t.x.scalar_type();
    args.form = t.form;
    args.kernel = t.kernel;
    args.x = at_sample(t.x, n0);
    args.residual = at_sample(t.residual, n0);
    args.out = at_sample(t.out, n0);
    args.weight = t.weight.const_data_ptr();
    args.bias = at_sample(t.bias, 0);
    args.z = at_sample(t.z, n0);
    args.zmax = t.opt.uses_max() ? at_sample(t.zmax, n0) : nullptr;
    args.g = at_sample(t.g, n0);
    cpu::kernels().linear_form(args);
  }
  return t;
}

at::Tensor linear_form_forward_cpu(const at::Tensor& x, c10::string_view form,
                                   const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                   c10::string_view gate, c10::string_view pool,
                                   const std::optional<at::Tensor>& residual,
                                   c10::string_view out_activation) {
  return run_linear_form(x, form, weight, bias, gate, pool, residual, out_activation).out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_form_forward_saved_cpu(
    const at::Tensor& x, c10::string_view form, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, c10::string_view gate, c10::string_view pool,
    const std::optional<at::Tensor>& residual, c10::string_view out_activation) {
  LinearFormTensors t =
      run_linear_form(x, form, weight, bias, gate, pool, residual, out_activation);
  return {t.out, t.z, t.zmax, t.g};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_form_backward_cpu(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& out, const at::Tensor& x,
    c10::string_view form, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& z, const std::optional<at::Tensor>& zmax, const at::Tensor& g,
    c10::string_view gate, c10::string_view pool, c10::string_view out_activation,
    bool residual_grad) {
  LinearFormGradTensors t = prepare_linear_form_backward(
      grad_out, out, x, form, weight, bias, z, zmax, g, gate, pool, out_activation, residual_grad);
  const Geometry& geo = t.geo;
  const int64_t N = geo.N;
  const int64_t read_per_sample = geo.C * geo.P * t.x.element_size() * (t.out.defined() ? 3 : 2);
  const int64_t group = cpu::samples_per_group(N, read_per_sample,
                                               2 * t.weight.numel() * t.weight.element_size());
  for (int64_t n0 = 0; n0 < N; n0 += group) {
    cpu::LinearFormGradArgs args{};
    args.geo = Geometry{std::min(group, N - n0), geo.C, geo.P, geo.channels_last};
    args.opt = t.opt;
    args.dtype = t.x.scalar_type();
    args.form = t.form;
    args.kernel = t.kernel;
    args.grad_out = at_sample(t.grad_out, n0);
    args.out = at_sample(t.out, n0);
    args.x = at_sample(t.x, n0);
    args.weight = t.weight.const_data_ptr();
    args.z = at_sample(t.z, n0);
    args.zmax = at_sample(t.zmax, n0);
    args.g = at_sample(t.g, n0);
    args.dx = at_sample(t.dx, n0);
    args.dresidual = t.dresidual.numel() ? at_sample(t.dresidual, n0) : nullptr;
    // Each group adds its share, in group order: deterministic for any thread count.
    args.dweight = t.dweight.data_ptr();
    args.dbias = t.dbias.numel() ? t.dbias.data_ptr() : nullptr;
    args.accumulate = n0 > 0;
    cpu::kernels().linear_form_backward(args);
  }
  return {t.dx, t.dresidual, t.dweight, t.dbias};
}

}  // namespace

TORCH_LIBRARY_IMPL(se_kernels, CPU, m) {
  m.impl("linear_form_forward", &linear_form_forward_cpu);
  m.impl("linear_form_forward_saved", &linear_form_forward_saved_cpu);
  m.impl("linear_form_backward", &linear_form_backward_cpu);
}

}  // namespace se_kernels
