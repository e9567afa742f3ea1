// The se_kernels ops on CPU tensors.
//
// Forward:  one pass pools x, the MLP runs on the [N, C] pooled vectors (ATen matmuls),
//           one pass writes out = out_act(s * x + residual).
// Backward: one pass reduces ds = sum_p dy * x (and counts the max positions), the MLP
//           backward runs on [N, C] vectors, one pass writes dx (and the residual's grad).
// Samples go through these steps in groups sized to stay in cache, so the second pass
// re-reads x (forward) or grad_out and x (backward) from cache rather than memory.
#include <ATen/ATen.h>
#include <ATen/Version.h>
#include <torch/library.h>

#include <algorithm>

#include "../se_common.h"
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

// Samples per group: the passes over one group run back to back, so the second finds the
// group's inputs still in the last-level cache. Each group also runs the MLP, which reads
// both weight matrices, so a group is never so small that weight traffic rivals the
// traffic it saves on x.
int64_t samples_per_group(int64_t N, int64_t bytes_per_sample, int64_t weight_bytes) {
  constexpr int64_t kGroupBytes = int64_t{4} << 20;  // well inside a server L3
  constexpr int64_t kWeightRatio = 8;
  const int64_t per_sample = std::max<int64_t>(1, bytes_per_sample);
  const int64_t fits = kGroupBytes / per_sample;
  const int64_t amortizes = (kWeightRatio * weight_bytes + per_sample - 1) / per_sample;
  return std::clamp<int64_t>(std::max(fits, amortizes), 1, std::max<int64_t>(1, N));
}

int64_t weight_bytes(const at::Tensor& w1, const at::Tensor& x) {
  return 2 * w1.numel() * c10::elementSize(accumulate_type(x.scalar_type()));
}

at::Tensor rows(const at::Tensor& t, int64_t n0, int64_t len) {
  return t.defined() && t.numel() ? t.narrow(0, n0, len) : at::Tensor();
}

ForwardResult se_forward_cpu(const at::Tensor& x_in, const at::Tensor& w1,
                             const std::optional<at::Tensor>& b1, const at::Tensor& w2,
                             const std::optional<at::Tensor>& b2,
                             const std::optional<at::Tensor>& residual_in,
                             c10::string_view activation, c10::string_view gate,
                             c10::string_view pool, c10::string_view out_activation) {
  const Options opt = parse_options(activation, gate, pool, out_activation);
  check_forward_args(x_in, w1, b1, w2, b2, residual_in);
  const Geometry geo = geometry_of(x_in);
  const auto fmt = geo.memory_format();
  const at::Tensor x = x_in.contiguous(fmt);
  const at::Tensor residual = residual_in ? residual_in->contiguous(fmt) : at::Tensor();
  const auto acc = x.options().dtype(accumulate_type(x.scalar_type()));
  const int64_t N = geo.N, C = geo.C, S = w1.size(0);
  at::Tensor out = at::empty(x.sizes(), x.options().memory_format(fmt));
  at::Tensor z = at::empty({N, C}, acc), a = at::empty({N, S}, acc), g = at::empty({N, C}, acc);
  at::Tensor zmax = opt.uses_max() ? at::empty({N, C}, acc) : at::empty({0}, acc);

  const auto& kernels = cpu::kernels();
  const int64_t group = samples_per_group(N, C * geo.P * x.element_size(), weight_bytes(w1, x));
  for (int64_t n0 = 0; n0 < N; n0 += group) {
    const int64_t len = std::min(group, N - n0);
    const Geometry part{len, C, geo.P, geo.channels_last};
    const at::Tensor xg = x.narrow(0, n0, len);
    const at::Tensor sums = kernels.pool(part, xg, opt.uses_max());
    at::Tensor zg = z.narrow(0, n0, len);
    switch (opt.pool) {
      case Pool::Avg: zg.copy_(sums[0] / static_cast<double>(geo.P)); break;
      case Pool::Max: zg.copy_(sums[1]); break;
      case Pool::AvgMax: zg.copy_(sums[0] * (0.5 / static_cast<double>(geo.P)) + sums[1] * 0.5); break;
    }
    if (opt.uses_max()) zmax.narrow(0, n0, len).copy_(sums[1]);
    const Excitation ex = excite_forward(zg, w1, b1, w2, b2, opt);
    a.narrow(0, n0, len).copy_(ex.a);
    g.narrow(0, n0, len).copy_(ex.g);
    kernels.scale(part, xg, rows(residual, n0, len), ex.s, opt.out_relu(), out.narrow(0, n0, len));
  }
  return {out, z, zmax, a, g};
}

BackwardResult se_backward_cpu(const at::Tensor& grad_out_in, const at::Tensor& x_in,
                               const std::optional<at::Tensor>& out_in, const at::Tensor& w1,
                               const at::Tensor& w2, const at::Tensor& z, const at::Tensor& zmax_in,
                               const at::Tensor& a, const at::Tensor& g,
                               c10::string_view activation, c10::string_view gate,
                               c10::string_view pool, c10::string_view out_activation,
                               bool residual_grad) {
  const Options opt = parse_options(activation, gate, pool, out_activation);
  check_backward_args(grad_out_in, x_in, out_in, w1, w2, z, zmax_in, a, g, opt);
  const Geometry geo = geometry_of(x_in);
  const auto fmt = geo.memory_format();
  const at::Tensor x = x_in.contiguous(fmt);
  const at::Tensor grad_out = grad_out_in.contiguous(fmt);
  const at::Tensor out = opt.out_relu() ? out_in->contiguous(fmt) : at::Tensor();
  const at::Tensor zmax = opt.uses_max() ? zmax_in.contiguous() : at::Tensor();
  const at::Tensor zc = z.contiguous(), ac = a.contiguous(), gc = g.contiguous();
  const int64_t N = geo.N, C = geo.C;
  at::Tensor dx = at::empty(x.sizes(), x.options().memory_format(fmt));
  at::Tensor dresidual = opt.out_relu() && residual_grad
                             ? at::empty(x.sizes(), x.options().memory_format(fmt))
                             : at::empty({0}, x.options());

  const auto acc = x.options().dtype(accumulate_type(x.scalar_type()));
  at::Tensor dw1 = at::zeros(w1.sizes(), acc), db1 = at::zeros({w1.size(0)}, acc);
  at::Tensor dw2 = at::zeros(w2.sizes(), acc), db2 = at::zeros({C}, acc);
  const auto& kernels = cpu::kernels();
  const int64_t bytes_per_sample = C * geo.P * x.element_size() * (out.defined() ? 3 : 2);
  const int64_t group = samples_per_group(N, bytes_per_sample, weight_bytes(w1, x));
  for (int64_t n0 = 0; n0 < N; n0 += group) {
    const int64_t len = std::min(group, N - n0);
    const Geometry part{len, C, geo.P, geo.channels_last};
    const at::Tensor xg = x.narrow(0, n0, len), grad_g = grad_out.narrow(0, n0, len);
    const at::Tensor out_g = rows(out, n0, len), zmax_g = rows(zmax, n0, len);
    const at::Tensor sums = kernels.grad_reduce(part, grad_g, out_g, xg, zmax_g);
    const ExcitationGrads eg = excite_backward_acc(
        sums[0], opt.uses_max() ? sums[1] : at::Tensor(), zc.narrow(0, n0, len),
        ac.narrow(0, n0, len), gc.narrow(0, n0, len), w1, w2, geo.P, opt);
    // Summed group by group in a fixed order: deterministic for any thread count.
    dw1.add_(eg.dw1);
    db1.add_(eg.db1);
    dw2.add_(eg.dw2);
    db2.add_(eg.db2);
    kernels.grad_input(part, grad_g, out_g, xg, eg.s.contiguous(),
                       eg.dx_avg.defined() ? eg.dx_avg.contiguous() : at::Tensor(), zmax_g,
                       eg.dx_max.defined() ? eg.dx_max.contiguous() : at::Tensor(),
                       dx.narrow(0, n0, len), rows(dresidual, n0, len));
  }
  return {dx, dw1.to(w1.scalar_type()), db1.to(w1.scalar_type()), dw2.to(w2.scalar_type()),
          db2.to(w2.scalar_type()), dresidual};
}

}  // namespace

TORCH_LIBRARY_IMPL(se_kernels, CPU, m) {
  m.impl("se_forward", &se_forward_cpu);
  m.impl("se_backward", &se_backward_cpu);
}

}  // namespace se_kernels
