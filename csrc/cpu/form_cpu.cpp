// se_kernels::linear_form_forward on CPU tensors (se_kernels/_form_ops.py): the staged path's
// forward of a linear excitation form in one call, for calls autograd does not record. The
// arguments are checked and the outputs allocated by se_common's prepare_linear_form; the
// samples go through the kernel in groups sized to stay in cache, as se_forward's do.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>

#include "../se_common.h"
#include "groups.h"
#include "kernels.h"

namespace se_kernels {

namespace {

at::Tensor linear_form_forward_cpu(const at::Tensor& x, c10::string_view form,
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
    args.x = cpu::at_sample(t.x, n0);
    args.residual = cpu::at_sample(t.residual, n0);
    args.out = cpu::at_sample(t.out, n0);
    args.weight = t.weight.const_data_ptr();
    args.bias = cpu::at_sample(t.bias, 0);
    args.z = cpu::at_sample(t.z, n0);
    args.zmax = t.opt.uses_max() ? cpu::at_sample(t.zmax, n0) : nullptr;
    args.g = cpu::at_sample(t.g, n0);
    cpu::kernels().linear_form(args);
  }
  return t.out;
}

}  // namespace

TORCH_LIBRARY_IMPL(se_kernels, CPU, m) {
  m.impl("linear_form_forward", &linear_form_forward_cpu);
}

}  // namespace se_kernels
