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

// Byte offset of sample n0 / row n0 in a dense tensor.
const void* at_sample(const at::Tensor& t, int64_t n0) {
  return t.defined() ? static_cast<const char*>(t.const_data_ptr()) + n0 * t.stride(0) * t.element_size()
                     : nullptr;
}
void* at_sample(at::Tensor& t, int64_t n0) {
  return t.defined() ? static_cast<char*>(t.data_ptr()) + n0 * t.stride(0) * t.element_size() : nullptr;
}

ForwardResult se_forward_cpu(const at::Tensor& x_in, const at::Tensor& w1_in,
                             const std::optional<at::Tensor>& b1, const at::Tensor& w2_in,
                             const std::optional<at::Tensor>& b2,
                             const std::optional<at::Tensor>& residual_in,
                             c10::string_view activation, c10::string_view gate,
                             c10::string_view pool, c10::string_view out_activation) {
  const Options opt = parse_options(activation, gate, pool, out_activation);
  check_forward_args(x_in, w1_in, b1, w2_in, b2, residual_in);
  const Geometry geo = geometry_of(x_in);
  const auto fmt = geo.memory_format();
  const at::Tensor x = x_in.contiguous(fmt);
  const at::Tensor residual = residual_in ? residual_in->contiguous(fmt) : at::Tensor();
  const at::Tensor w1 = w1_in.contiguous(), w2 = w2_in.contiguous();
  const at::Tensor b1c = b1 ? b1->contiguous() : at::Tensor(), b2c = b2 ? b2->contiguous() : at::Tensor();
  const auto acc = x.options().dtype(accumulate_type(x.scalar_type()));
  const int64_t N = geo.N, C = geo.C, S = w1.size(0);
  at::Tensor out = at::empty(x.sizes(), x.options().memory_format(fmt));
  at::Tensor z = at::empty({N, C}, acc), a = at::empty({N, S}, acc), g = at::empty({N, C}, acc);
  at::Tensor zmax = opt.uses_max() ? at::empty({N, C}, acc) : at::empty({0}, acc);

  const int64_t group = samples_per_group(N, C * geo.P * x.element_size(),
                                          2 * w1.numel() * z.element_size());
  for (int64_t n0 = 0; n0 < N; n0 += group) {
    cpu::ForwardArgs args{};
    args.geo = Geometry{std::min(group, N - n0), C, geo.P, geo.channels_last};
    args.opt = opt;
    args.dtype = x.scalar_type();
    args.S = S;
    args.x = at_sample(x, n0);
    args.residual = at_sample(residual, n0);
    args.out = at_sample(out, n0);
    args.w1 = w1.const_data_ptr();
    args.b1 = b1c.defined() ? b1c.const_data_ptr() : nullptr;
    args.w2 = w2.const_data_ptr();
    args.b2 = b2c.defined() ? b2c.const_data_ptr() : nullptr;
    args.z = at_sample(z, n0);
    args.zmax = opt.uses_max() ? at_sample(zmax, n0) : nullptr;
    args.a = at_sample(a, n0);
    args.g = at_sample(g, n0);
    cpu::kernels().forward(args);
  }
  return {out, z, zmax, a, g};
}

BackwardResult se_backward_cpu(const at::Tensor& grad_out_in, const at::Tensor& x_in,
                               const std::optional<at::Tensor>& out_in, const at::Tensor& w1_in,
                               const at::Tensor& w2_in, const at::Tensor& z_in,
                               const at::Tensor& zmax_in, const at::Tensor& a_in,
                               const at::Tensor& g_in, c10::string_view activation,
                               c10::string_view gate, c10::string_view pool,
                               c10::string_view out_activation, bool residual_grad) {
  const Options opt = parse_options(activation, gate, pool, out_activation);
  check_backward_args(grad_out_in, x_in, out_in, w1_in, w2_in, z_in, zmax_in, a_in, g_in, opt);
  const Geometry geo = geometry_of(x_in);
  const auto fmt = geo.memory_format();
  const at::Tensor x = x_in.contiguous(fmt);
  const at::Tensor grad_out = grad_out_in.contiguous(fmt);
  const at::Tensor out = opt.out_relu() ? out_in->contiguous(fmt) : at::Tensor();
  const at::Tensor w1 = w1_in.contiguous(), w2 = w2_in.contiguous();
  const at::Tensor z = z_in.contiguous(), a = a_in.contiguous(), g = g_in.contiguous();
  const at::Tensor zmax = opt.uses_max() ? zmax_in.contiguous() : at::Tensor();
  const int64_t N = geo.N, C = geo.C, S = w1.size(0);
  at::Tensor dx = at::empty(x.sizes(), x.options().memory_format(fmt));
  at::Tensor dresidual = opt.out_relu() && residual_grad
                             ? at::empty(x.sizes(), x.options().memory_format(fmt))
                             : at::empty({0}, x.options());
  const auto acc = x.options().dtype(accumulate_type(x.scalar_type()));
  // Written by the first group and added to by the others; zeros for an empty batch.
  auto weight_grad = [&](at::IntArrayRef size) { return N > 0 ? at::empty(size, acc) : at::zeros(size, acc); };
  at::Tensor dw1 = weight_grad({S, C}), db1 = weight_grad({S});
  at::Tensor dw2 = weight_grad({C, S}), db2 = weight_grad({C});

  const int64_t read_per_sample = C * geo.P * x.element_size() * (out.defined() ? 3 : 2);
  const int64_t group = samples_per_group(N, read_per_sample, 2 * dw1.numel() * dw1.element_size());
  for (int64_t n0 = 0; n0 < N; n0 += group) {
    cpu::BackwardArgs args{};
    args.geo = Geometry{std::min(group, N - n0), C, geo.P, geo.channels_last};
    args.opt = opt;
    args.dtype = x.scalar_type();
    args.S = S;
    args.grad_out = at_sample(grad_out, n0);
    args.out = at_sample(out, n0);
    args.x = at_sample(x, n0);
    args.w1 = w1.const_data_ptr();
    args.w2 = w2.const_data_ptr();
    args.z = at_sample(z, n0);
    args.zmax = at_sample(zmax, n0);
    args.a = at_sample(a, n0);
    args.g = at_sample(g, n0);
    args.dx = at_sample(dx, n0);
    args.dresidual = dresidual.numel() ? at_sample(dresidual, n0) : nullptr;
    // Each group adds its share, in group order: deterministic for any thread count.
    args.dw1 = dw1.data_ptr();
    args.db1 = db1.data_ptr();
    args.dw2 = dw2.data_ptr();
    args.db2 = db2.data_ptr();
    args.accumulate = n0 > 0;
    cpu::kernels().backward(args);
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
