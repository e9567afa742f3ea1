// The se_kernels ops on CPU tensors.
//
// Forward:  one pass pools x, the MLP runs on the [N, C] pooled vectors, one pass writes
//           out = out_act(s * x + residual).
// Backward: one pass reduces ds = sum_p dy * x (and counts the max positions), the MLP
//           backward runs on [N, C] vectors, one pass writes dx (and the residual's grad).
// Samples go through these steps in groups sized to stay in cache, so the second pass
// re-reads x (forward) or grad_out and x (backward) from cache rather than memory. The
// kernels themselves are in kernels_impl.h; this file allocates, groups and registers.
#include <ATen/ATen.h>
#include <ATen/Version.h>
#include <torch/library.h>

#include <algorithm>

#include "../se_common.h"
#include "groups.h"
#include "kernels.h"

namespace se_kernels {

const cpu::KernelTable& cpu::kernels() {
#if defined(SE_KERNELS_CPU_AVX2)
  // ATen's own choice for this CPU, which also honours ATEN_CPU_CAPABILITY=default.
  static const bool avx2 = at::get_cpu_capability() != "DEFAULT";
  if (avx2) return AVX2::kKernels;
#endif
  return DEFAULT::kKernels;
}

namespace {

using cpu::at_sample;
using cpu::samples_per_group;

ForwardResult se_forward_cpu(const at::Tensor& x, const at::Tensor& w1,
                             const std::optional<at::Tensor>& b1, const at::Tensor& w2,
                             const std::optional<at::Tensor>& b2,
                             const std::optional<at::Tensor>& residual,
                             c10::string_view activation, c10::string_view gate,
                             c10::string_view pool, c10::string_view out_activation) {
  ForwardTensors t = prepare_forward(x, w1, b1, w2, b2, residual, activation, gate, pool,
                                     out_activation);
  const Geometry& geo = t.geo;
  const int64_t N = geo.N;
  const auto acc = t.z.scalar_type();
  const at::Tensor w1_acc = t.w1.to(acc), w2_acc = t.w2.to(acc);
  const at::Tensor b1_acc = t.b1.defined() ? t.b1.to(acc) : at::Tensor();
  const at::Tensor b2_acc = t.b2.defined() ? t.b2.to(acc) : at::Tensor();
  const int64_t group = samples_per_group(N, geo.C * geo.P * t.x.element_size(),
                                          2 * w1_acc.numel() * w1_acc.element_size());
  for (int64_t n0 = 0; n0 < N; n0 += group) {
    cpu::ForwardArgs args{};
    args.geo = Geometry{std::min(group, N - n0), geo.C, geo.P, geo.channels_last};
    args.opt = t.opt;
    args.dtype = t.x.scalar_type();
    args.S = t.S;
    args.x = at_sample(t.x, n0);
    args.residual = at_sample(t.residual, n0);
    args.out = at_sample(t.out, n0);
    args.w1 = w1_acc.const_data_ptr();
    args.b1 = at_sample(b1_acc, 0);
    args.w2 = w2_acc.const_data_ptr();
    args.b2 = at_sample(b2_acc, 0);
    args.z = at_sample(t.z, n0);
    args.zmax = t.opt.uses_max() ? at_sample(t.zmax, n0) : nullptr;
    args.a = at_sample(t.a, n0);
    args.g = at_sample(t.g, n0);
    cpu::kernels().forward(args);
  }
  return {t.out, t.z, t.zmax, t.a, t.g};
}

BackwardResult se_backward_cpu(const at::Tensor& grad_out, const at::Tensor& x,
                               const std::optional<at::Tensor>& out, const at::Tensor& w1,
                               const at::Tensor& w2, const at::Tensor& z, const at::Tensor& zmax,
                               const at::Tensor& a, const at::Tensor& g,
                               c10::string_view activation, c10::string_view gate,
                               c10::string_view pool, c10::string_view out_activation,
                               bool residual_grad) {
  BackwardTensors t = prepare_backward(grad_out, x, out, w1, w2, z, zmax, a, g, activation, gate,
                                       pool, out_activation, residual_grad);
  const Geometry& geo = t.geo;
  const int64_t N = geo.N, C = geo.C, S = t.S;
  // Summed in the accumulation dtype: written by the first group and added to by the
  // others (zeros for an empty batch), rounded to the weights' dtype at the end.
  const auto acc_type = accumulate_type(t.x.scalar_type());
  const auto acc = t.x.options().dtype(acc_type);
  auto weight_grad = [&](at::IntArrayRef size) { return N > 0 ? at::empty(size, acc) : at::zeros(size, acc); };
  const at::Tensor w1_acc = t.w1.to(acc_type), w2_acc = t.w2.to(acc_type);
  at::Tensor dw1 = weight_grad({S, C}), db1 = weight_grad({S});
  at::Tensor dw2 = weight_grad({C, S}), db2 = weight_grad({C});

  const int64_t read_per_sample = C * geo.P * t.x.element_size() * (t.out.defined() ? 3 : 2);
  const int64_t group = samples_per_group(N, read_per_sample, 2 * dw1.numel() * dw1.element_size());
  for (int64_t n0 = 0; n0 < N; n0 += group) {
    cpu::BackwardArgs args{};
    args.geo = Geometry{std::min(group, N - n0), C, geo.P, geo.channels_last};
    args.opt = t.opt;
    args.dtype = t.x.scalar_type();
    args.S = S;
    args.grad_out = at_sample(t.grad_out, n0);
    args.out = at_sample(t.out, n0);
    args.x = at_sample(t.x, n0);
    args.w1 = w1_acc.const_data_ptr();
    args.w2 = w2_acc.const_data_ptr();
    args.z = at_sample(t.z, n0);
    args.zmax = at_sample(t.zmax, n0);
    args.a = at_sample(t.a, n0);
    args.g = at_sample(t.g, n0);
    args.dx = at_sample(t.dx, n0);
    args.dresidual = t.dresidual.numel() ? at_sample(t.dresidual, n0) : nullptr;
    // Each group adds its share, in group order: deterministic for any thread count.
    args.dw1 = dw1.data_ptr();
    args.db1 = db1.data_ptr();
    args.dw2 = dw2.data_ptr();
    args.db2 = db2.data_ptr();
    args.accumulate = n0 > 0;
    cpu::kernels().backward(args);
  }
  return {t.dx, dw1.to(w1.scalar_type()), db1.to(w1.scalar_type()), dw2.to(w2.scalar_type()),
          db2.to(w2.scalar_type()), t.dresidual};
}

}  // namespace

TORCH_LIBRARY_IMPL(se_kernels, CPU, m) {
  m.impl("se_forward", &se_forward_cpu);
  m.impl("se_backward", &se_backward_cpu);
}

}  // namespace se_kernels
